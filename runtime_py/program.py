"""Runtime / Program / Method: load a .pte and interpret its execution plan.

The API mirrors executorch.runtime so ExecuTorch users feel at home:

    program = Runtime.get().load_program("model.pte")   # a path or the bytes
    method = program.load_method("forward")
    outputs = method.execute([x])                         # list of torch.Tensor
    method.route_report()                                 # per delegated linear of the last call

DelegateCall instructions run our blobs on wgpu (delegate.py); KernelCall
instructions run the named op on the CPU through torch (operators.py).
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import torch
from executorch.exir import schema as et
from wgpu.classes import GPUError

from executorch_wgpu.errors import InputError, OperatorError, ProgramFormatError, WebGPUDelegateError
from executorch_wgpu.runtime_py.delegate import load_delegate
from executorch_wgpu.runtime_py.entry import Runtime  # noqa: F401  (here too: the one Runtime)
from executorch_wgpu.runtime_py.operators import (
    CompiledKernelCall,
    compile_kernel_call,
    convert_int,
    dtype_of,
    resolve_operator,
    run_kernel_call,
)
from executorch_wgpu.runtime_py.pte_checks import check_delegate_io, check_outputs, check_plan, max_steps, parse_pte
from executorch_wgpu.runtime_py.q4_linear import LinearCall


@dataclass
class _List:
    """IntList / TensorList / OptionalTensorList: items are value ids resolved at call time."""

    kind: str
    items: List[int]


def _constant_tensor(t: et.Tensor, buffers: List[et.Buffer]) -> torch.Tensor:
    if t.data_buffer_idx >= len(buffers):
        raise ProgramFormatError(f"tensor refers to constant buffer {t.data_buffer_idx} of {len(buffers)}")
    if list(t.dim_order) != list(range(len(t.sizes))):
        raise ProgramFormatError(f"constant with dim order {t.dim_order} is not supported (contiguous only)")
    dtype = dtype_of(t.scalar_type)
    numel = 1
    for s in t.sizes:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    storage = buffers[t.data_buffer_idx].storage
    if len(storage) < nbytes:
        raise ProgramFormatError(f"constant buffer {t.data_buffer_idx} holds {len(storage)} bytes, needs {nbytes}")
    if nbytes == 0:
        return torch.empty(list(t.sizes), dtype=dtype)
    return torch.frombuffer(bytearray(storage[:nbytes]), dtype=dtype).reshape(list(t.sizes))


def _named_data_reader(pte):
    """key -> bytes of the program's named data (where delegates keep their weights); KeyError when absent."""
    store = pte.named_data

    def read(key: str) -> bytes:
        if store is None or key not in store.pte_data:
            raise KeyError(key)
        return store.buffers[store.pte_data[key].buffer_index]

    return read


class Method:
    """One execution plan: values, compiled instructions and loaded delegates."""

    def __init__(self, pte, plan: et.ExecutionPlan):
        self.name = plan.name
        self._plan = plan
        program = pte.program
        check_plan(plan, program)   # ids, indices, jump targets, tensor shapes vs the memory plan
        try:
            self._initial = [self._initial_value(v, program, pte) for v in plan.values]
            named = _named_data_reader(pte)
            self._delegates = [
                load_delegate(d.id, self._delegate_bytes(program, d), named) for d in plan.delegates
            ]
            check_delegate_io(plan, [d.record for d in self._delegates])
            operators = [resolve_operator(o.name, o.overload) for o in plan.operators]
            self._operator_names = [f"{o.name}.{o.overload or 'default'}" for o in plan.operators]
            self._instructions = [self._compile(i.instr_args, operators) for c in plan.chains for i in c.instructions]
        except (IndexError, KeyError, TypeError, AttributeError) as e:
            raise ProgramFormatError(f"method {plan.name!r} is malformed: {type(e).__name__}: {e}") from e
        # Mutable state (a KV cache): vid -> the tensor it holds between execute() calls.
        self._state: Dict[int, torch.Tensor] = self._find_state()
        self._state_at_load = {vid: t.clone() for vid, t in self._state.items()}
        self._last_calls: List[LinearCall] = []
        self._ran: list = []   # the delegates the last execute called

    # -- load --

    @staticmethod
    def _arena_key(ev: et.EValue):
        """Where memory planning put a tensor; values sharing a key alias the same bytes."""
        v = ev.val
        if isinstance(v, et.Tensor) and v.allocation_info is not None:
            a = v.allocation_info
            return (a.memory_id, a.memory_offset_low, a.memory_offset_high)
        return None

    def _initial_value(self, ev: et.EValue, program: et.Program, pte) -> Any:
        v = ev.val
        if isinstance(v, et.Tensor):
            if v.data_buffer_idx > 0 and v.allocation_info is None:
                return _constant_tensor(v, program.constant_buffer)
            if v.data_buffer_idx > 0:
                # Planned memory with initial data: a mutable buffer whose initial value
                # was serialized (InitializedMutableBufferPass). Its data_buffer_idx
                # indexes the mutable data segment (ExtraTensorInfo.mutable_data_segments_idx
                # says which; the deserializer restores segment 0 as pte.mutable_data), and
                # ExecuTorch copies it into the planned memory when the method loads.
                info = v.extra_tensor_info
                if info is not None and info.mutable_data_segments_idx != 0:
                    raise ProgramFormatError(
                        f"mutable data segment {info.mutable_data_segments_idx} is not supported (only 0)"
                    )
                return _constant_tensor(v, pte.mutable_data or []).clone()
            return None   # produced at run time
        if isinstance(v, et.Null):
            return None
        if isinstance(v, (et.Int, et.Bool)):
            return v.int_val if isinstance(v, et.Int) else v.bool_val
        if isinstance(v, et.Double):
            return float(v.double_val)
        if isinstance(v, et.String):
            return v.string_val
        if isinstance(v, (et.DoubleList, et.BoolList)):
            return list(v.items)
        if isinstance(v, et.IntList):
            return _List("int", list(v.items))
        if isinstance(v, et.TensorList):
            return _List("tensor", list(v.items))
        if isinstance(v, et.OptionalTensorList):
            return _List("optional_tensor", list(v.items))
        raise ProgramFormatError(f"value kind {type(v).__name__} is not supported")

    @staticmethod
    def _delegate_bytes(program: et.Program, d: et.BackendDelegate) -> bytes:
        if d.processed.location != et.DataLocation.INLINE:
            raise ProgramFormatError(f"delegate {d.id!r} data location {d.processed.location} not restored")
        return program.backend_delegate_data[d.processed.index].data

    def _compile(self, instr, operators):
        if isinstance(instr, et.KernelCall):
            return compile_kernel_call(operators[instr.op_index], instr.args, self._operator_names[instr.op_index])
        if isinstance(instr, et.DelegateCall) and not 0 <= instr.delegate_index < len(self._delegates):
            raise ProgramFormatError(f"delegate call refers to delegate {instr.delegate_index}")
        return instr

    def _find_state(self) -> Dict[int, torch.Tensor]:
        """The values that carry state from one execute() to the next: mutated buffers.

        ExecuTorch keeps a mutated buffer (e.g. a KV cache) in planned memory
        that the method owns for its lifetime: the graph reads it, computes
        the update (index_put, index_copy, ...) and writes it back with
        aten::copy_, and the next execute() reads what the previous one left.
        The .pte marks such a value by where it lives, not by a flag: it is a
        planned tensor that an instruction reads before any instruction of the
        call (or an input) has written its memory. Its initial value is the
        data serialized with it in the mutable data segment (when
        InitializedMutableBufferPass marked it), else zeros (ExecuTorch calls
        that state meaningless; zeros keep masked-out cache slots finite).
        """
        plan = self._plan
        written = {self._arena_key(plan.values[vid]) for vid in plan.inputs}
        state: Dict[int, torch.Tensor] = {}
        owners: Dict[tuple, int] = {}

        def tensor_ids(vids):
            for vid in vids:
                v = self._initial[vid]
                if isinstance(v, _List):
                    yield from (j for j in v.items if j >= 0)
                else:
                    yield vid

        for vid, v in enumerate(self._initial):   # planned tensors with serialized initial data
            if isinstance(v, torch.Tensor) and self._arena_key(plan.values[vid]) is not None:
                state[vid] = v
                owners[self._arena_key(plan.values[vid])] = vid
        for instr in self._instructions:
            reads, writes = self._reads_and_writes(instr)
            for vid in tensor_ids(reads):
                key = self._arena_key(plan.values[vid])
                if key is None or key in written or vid in plan.inputs or key in owners:
                    continue
                spec = plan.values[vid].val
                state[vid] = torch.zeros(list(spec.sizes), dtype=dtype_of(spec.scalar_type))
                owners[key] = vid
            for vid in tensor_ids(writes):
                written.add(self._arena_key(plan.values[vid]))
        return state

    def _reads_and_writes(self, instr) -> tuple:
        """(value ids an instruction reads, value ids it writes)."""
        if isinstance(instr, CompiledKernelCall):
            reads = [vid for spec, vid in zip(instr.schema_args, instr.arg_ids) if not spec.is_out]
            writes = [vid for spec, vid in zip(instr.schema_args, instr.arg_ids) if spec.is_out] + instr.ret_ids
            return reads, writes
        if isinstance(instr, et.DelegateCall):
            n_out = self._delegates[instr.delegate_index].n_outputs
            return list(instr.args[:-n_out]), list(instr.args[-n_out:])
        if isinstance(instr, et.MoveCall):
            return [instr.move_from], [instr.move_to]
        if isinstance(instr, et.JumpFalseCall):
            return [instr.cond_value_index], []
        return [], []

    def reset_state(self) -> None:
        """Put every mutable buffer (KV cache) back to its value at load, as a freshly loaded method has:
        those the CPU holds, and those a graph delegate holds on the GPU."""
        for vid, t in self._state_at_load.items():
            self._state[vid] = t.clone()
        for d in self._delegates:
            d.reset_state()

    # -- run --

    def _check_inputs(self, inputs: Sequence[Any]) -> None:
        plan = self._plan
        if isinstance(inputs, torch.Tensor) or not isinstance(inputs, Sequence):
            raise InputError(
                f"method {self.name!r} takes a list of {len(plan.inputs)} inputs, got a {type(inputs).__name__} "
                "(pass [x])"
            )
        if len(inputs) != len(plan.inputs):
            raise InputError(f"method {self.name!r} takes {len(plan.inputs)} inputs, got {len(inputs)}")
        for i, (vid, x) in enumerate(zip(plan.inputs, inputs)):
            spec = plan.values[vid].val
            if not isinstance(spec, et.Tensor):
                continue
            if not isinstance(x, torch.Tensor):
                raise InputError(f"input {i} must be a torch.Tensor, got {type(x).__name__}")
            if x.device.type != "cpu" or x.layout != torch.strided:
                raise InputError(
                    f"input {i} is a {x.layout} tensor on {x.device}; the runtime takes dense (strided) CPU tensors"
                )
            want = dtype_of(spec.scalar_type)
            if x.dtype != want:
                raise InputError(f"input {i} has dtype {x.dtype}, expected {want}")
            if x.dim() != len(spec.sizes):
                raise InputError(f"input {i} has rank {x.dim()} (shape {tuple(x.shape)}), expected rank {len(spec.sizes)}")
            for d, (got, bound) in enumerate(zip(x.shape, spec.sizes)):
                if spec.shape_dynamism == et.TensorShapeDynamism.STATIC and got != bound:
                    raise InputError(f"input {i} dim {d} is {got}, the program was exported for exactly {bound}")
                if got > bound:
                    raise InputError(f"input {i} dim {d} is {got}, above the exported upper bound {bound}")

    def execute(self, inputs: Sequence[Any]) -> List[Any]:
        """Run the method; returns its outputs (torch.Tensors for tensor outputs)."""
        self._check_inputs(inputs)
        values = list(self._initial)
        plan = self._plan

        # The emitter elides static views: the view's value shares its source's
        # planned memory and no instruction writes it. We track which value last
        # wrote each planned location -- an input, a mutable buffer, an op's
        # output -- and read such a value as a view of that one.
        last_writer: Dict[tuple, int] = {}
        for vid, t in self._state.items():   # mutable buffers hold what the last call left
            values[vid] = t
            last_writer[self._arena_key(plan.values[vid])] = vid
        for vid, x in zip(plan.inputs, inputs):
            values[vid] = x.contiguous() if isinstance(x, torch.Tensor) else x
            key = self._arena_key(plan.values[vid])
            if key is not None and isinstance(x, torch.Tensor):
                last_writer[key] = vid

        def aliased(vid: int) -> Any:
            key = self._arena_key(plan.values[vid])
            src = last_writer.get(key) if key is not None else None
            spec = plan.values[vid].val
            if (src is None or src == vid or not isinstance(values[src], torch.Tensor)
                    or not isinstance(spec, et.Tensor)):
                return None
            return values[src].view(dtype_of(spec.scalar_type)).reshape(list(spec.sizes))

        def read(vid: int, type_name: str) -> Any:
            v = values[vid]
            if v is None:
                v = aliased(vid)
            if isinstance(v, _List):   # items are value ids; -1 is None in an optional tensor list
                return [values[j] if j >= 0 else None for j in v.items]
            if isinstance(v, int) and not isinstance(v, bool):
                return convert_int(v, type_name)
            return v

        # (No closure here calls itself: a self-referencing closure is a reference cycle
        # through `self`, which would keep the method's GPU buffers alive until the
        # cyclic GC runs instead of releasing them when the method is dropped.)
        def write_value(vid: int, value: Any) -> None:
            values[vid] = value
            key = self._arena_key(plan.values[vid])
            if key is not None:
                last_writer[key] = vid

        def write(vid: int, value: Any) -> None:
            held = values[vid]
            if not isinstance(held, _List):
                write_value(vid, value)
            elif held.kind == "tensor" and isinstance(value, list):
                # A list out (split_with_sizes_copy's Tensor[] out) fills its items; a
                # TensorList return aliases outs already written.
                for item, tensor in zip(held.items, value):
                    write_value(item, tensor)

        def new_tensor_out(vid: int) -> torch.Tensor:
            spec = plan.values[vid].val
            if not isinstance(spec, et.Tensor):
                raise ProgramFormatError(f"out argument {vid} is a {type(spec).__name__}, not a tensor")
            return torch.empty(0, dtype=dtype_of(spec.scalar_type))

        def new_out(vid: int) -> Any:
            """A fresh out argument: an empty tensor of the planned dtype, or a list of them for a Tensor[] out."""
            held = values[vid]
            if isinstance(held, _List) and held.kind == "tensor":
                return [new_tensor_out(item) for item in held.items]
            return new_tensor_out(vid)

        calls: List[LinearCall] = []
        ran: list = []
        instructions = self._instructions
        pc = 0
        steps, step_limit = 0, max_steps()
        try:
            while pc < len(instructions):
                instr = instructions[pc]
                pc += 1
                steps += 1
                if steps > step_limit:
                    raise ProgramFormatError(
                        f"method {self.name!r} ran {step_limit} instructions without finishing: its jumps loop "
                        "(EXECUTORCH_WGPU_MAX_STEPS raises the limit)"
                    )
                if isinstance(instr, et.DelegateCall):   # args: the inputs, then the outputs
                    delegate = self._delegates[instr.delegate_index]
                    ran.append(delegate)
                    n_out = delegate.n_outputs
                    inputs = [read(vid, "Tensor") for vid in instr.args[:-n_out]]
                    for vid, y in zip(instr.args[-n_out:], delegate.execute(inputs, calls)):
                        write(vid, y)
                elif isinstance(instr, et.MoveCall):
                    values[instr.move_to] = values[instr.move_from]
                elif isinstance(instr, et.JumpFalseCall):
                    if not values[instr.cond_value_index]:
                        pc = instr.destination_instruction
                elif isinstance(instr, et.FreeCall):
                    values[instr.value_index] = None
                else:
                    run_kernel_call(instr, read, write, new_out)
        except WebGPUDelegateError:
            raise
        except (RuntimeError, IndexError, GPUError) as e:
            # torch's own errors of an op (IndexError: an index out of range), or the GPU's in a delegate call.
            failed = instructions[pc - 1]
            what = (failed.name if isinstance(failed, CompiledKernelCall)
                    else f"delegate call {failed.delegate_index}" if isinstance(failed, et.DelegateCall)
                    else "an instruction")
            raise OperatorError(f"method {self.name!r}: {what} (instruction {pc - 1}) failed: {type(e).__name__}: {e}") from e
        except Exception as e:   # an op handed values of the wrong kind: the program is malformed
            raise ProgramFormatError(
                f"method {self.name!r} failed at instruction {pc - 1}: {type(e).__name__}: {e}"
            ) from e
        for vid in self._state:   # an out= write may have replaced the tensor rather than updated it
            if isinstance(values[vid], torch.Tensor):
                self._state[vid] = values[vid]
        self._last_calls = calls
        self._ran = ran
        try:
            outputs = [values[vid] if values[vid] is not None else aliased(vid) for vid in plan.outputs]
        except RuntimeError as e:   # an output read through planned memory that does not hold its shape
            raise ProgramFormatError(f"method {self.name!r}: cannot read its outputs: {e}") from e
        check_outputs(plan, outputs, dtype_of)
        # An output that is (a view of) a mutable buffer would change under the caller at the next call.
        state_ptrs = {t.untyped_storage().data_ptr() for t in self._state.values()}
        return [o.clone() if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in state_ptrs else o
                for o in outputs]

    def set_profile(self, on: bool) -> None:
        """Time every dispatch of this method's graph delegates in the next calls (graph_report()'s "profile")."""
        for d in self._delegates:
            if hasattr(d, "profile"):
                d.profile = on

    def graph_report(self) -> List[Dict[str, Any]]:
        """One entry per graph delegate the last execute ran: {"dispatches", "gpu_us" (the call's compute
        passes, from the first's start to the last's end, by GPU timestamps; None without them),
        "prepare_us", "encode_us", "wait_us", "readback_us", "profile" (per-dispatch GPU µs when the
        delegate's `profile` flag was set, else None)}."""
        calls = [getattr(d, "last_call", None) for d in self._ran]
        return [dataclasses.asdict(c) for c in calls if c is not None]

    def route_report(self) -> List[Dict[str, Any]]:
        """One entry per delegated linear call of the last execute:
        {"name", "M", "K", "N", "kernel", "reason", "gpu_us", "wall_us"}."""
        return [c.as_dict() for c in self._last_calls]


class Program:
    def __init__(self, data: bytes):
        self._pte = parse_pte(data)
        self._plans = {p.name: p for p in self._pte.program.execution_plan}
        self._methods: Dict[str, Method] = {}

    @property
    def method_names(self) -> List[str]:
        return list(self._plans)

    def load_method(self, name: str = "forward") -> Method:
        if name not in self._plans:
            raise KeyError(f"no method {name!r} in this program (it has {self.method_names})")
        if name not in self._methods:
            self._methods[name] = Method(self._pte, self._plans[name])
        return self._methods[name]
