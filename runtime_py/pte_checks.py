"""Everything the loader checks before it trusts a .pte, and after a call.

parse_pte() reads the file with ExecuTorch's own deserializer
(executorch.exir._serialize), but first checks what that deserializer
trusts: the extended header's sizes against the file, every flatbuffer
offset, count and length against the flatbuffer (fbverify), and every
segment's range against the segment data, so no field of the file can make
it read out of bounds or allocate out of proportion to the file. Anything
it still raises becomes a ProgramFormatError naming the problem.

check_plan() then checks an execution plan's cross references (value ids,
operator and delegate indices, jump targets), its tensors' shapes against
the memory plan, and check_delegate_io() the delegate blobs' K and N against
the tensors the plan passes them. check_outputs() checks a call's outputs
against the plan's output specs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Tuple

import torch
from executorch.exir import schema as et
from executorch.exir._serialize._program import (
    PTEFile,
    _flatbuffer_to_program,
    _get_extended_header,
    _restore_segments,
)

from executorch_wgpu.backend.serialization import fbverify
from executorch_wgpu.errors import ProgramFormatError

PTE_IDENTIFIER_PREFIX = b"ET"   # flatbuffer file identifier "ET12" etc. at offset 4
MAX_RANK = 16                   # ExecuTorch's kTensorDimensionLimit
# Bytes per element of every ExecuTorch ScalarType (executorch/exir/scalar_type.py).
ELEMENT_SIZES = {
    0: 1, 1: 1, 2: 2, 3: 4, 4: 8, 5: 2, 6: 4, 7: 8, 8: 4, 9: 8, 10: 16, 11: 1, 12: 1, 13: 1, 14: 4,
    15: 2, 16: 1, 17: 1, 22: 2, 23: 1, 24: 1, 25: 1, 26: 1, 27: 2, 28: 4, 29: 8,
}
# Instructions one execute() may run before it is taken for a loop that never ends
# (a JumpFalseCall whose condition never changes); EXECUTORCH_WGPU_MAX_STEPS overrides.
DEFAULT_MAX_STEPS = 1_000_000

_schema: Optional[fbverify.Schema] = None


def program_schema() -> fbverify.Schema:
    """ExecuTorch's program.fbs, from the installed executorch wheel (the deserializer's own schema)."""
    global _schema
    if _schema is None:
        _schema = fbverify.schema_from_package("executorch.exir._serialize", "program.fbs", "scalar_type.fbs")
    return _schema


def max_steps() -> int:
    try:
        return max(1, int(os.environ.get("EXECUTORCH_WGPU_MAX_STEPS", DEFAULT_MAX_STEPS)))
    except ValueError:
        return DEFAULT_MAX_STEPS


def memory_limit() -> int:
    """Most bytes a program may plan: this machine's physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _fail(msg: str) -> NoReturn:
    raise ProgramFormatError(msg)


# -- the file --

def parse_pte(data: bytes) -> PTEFile:
    """The .pte's PTEFile; raises ProgramFormatError for anything truncated, corrupted or out of bounds."""
    data = bytes(data)
    if len(data) < 8 or data[4:6] != PTE_IDENTIFIER_PREFIX:
        _fail(f"not an ExecuTorch .pte file: {len(data)} bytes, identifier {bytes(data[4:8])!r} at offset 4")
    schema = program_schema()
    if data[4:8] != schema.file_identifier:
        _fail(
            f".pte file identifier {data[4:8]!r}: this runtime reads {schema.file_identifier!r} programs "
            "(the installed executorch's schema); re-export the model with this executorch"
        )
    program_size, base = len(data), 0
    eh = _get_extended_header(data)
    if eh is not None:
        header_end = 8 + eh.length
        if not header_end <= eh.program_size <= len(data):
            _fail(f".pte extended header says the program is {eh.program_size} bytes; the file has {len(data)} "
                  f"(truncated or corrupted)")
        program_size = eh.program_size
        base = eh.segment_base_offset
        if base and not program_size <= base <= len(data):
            _fail(f".pte extended header puts the segments at offset {base}, outside [{program_size}, {len(data)}] "
                  "(truncated or corrupted)")
        if base and eh.segment_data_size and base + eh.segment_data_size > len(data):
            _fail(f".pte file is truncated: its segments need {base + eh.segment_data_size} bytes, "
                  f"the file has {len(data)}")
    flatbuffer = data[:program_size]
    try:
        fbverify.verify(schema, flatbuffer)
    except fbverify.FlatbufferVerifyError as e:
        raise ProgramFormatError(f".pte file is truncated or corrupted: {e}") from e
    try:
        program = _flatbuffer_to_program(flatbuffer)
    except Exception as e:   # ExecuTorch's converter: ValueError (enums), TypeError, UnicodeDecodeError, ...
        raise ProgramFormatError(f".pte file is corrupted: {type(e).__name__}: {e}") from e
    _check_required(program, "program")
    if not base:
        return PTEFile(program=program, mutable_data=None, named_data=None)
    _check_segments(program, len(data) - base)
    try:
        return _restore_segments(program=program, segment_data=data[base:])
    except Exception as e:
        raise ProgramFormatError(f".pte file's segments are corrupted: {type(e).__name__}: {e}") from e


_REQUIRED: Dict[type, List[Tuple[str, Optional[bool]]]] = {}


def _required_fields(cls: type) -> List[Tuple[str, Optional[bool]]]:
    """(name, is a list) of the fields of an ExecuTorch schema dataclass that are not scalar:
    lists, bytes and nested tables, which the file must hold (the writer always writes them),
    and (name, None) for Optional ones, checked only when present."""
    if cls not in _REQUIRED:
        hints = typing.get_type_hints(cls)
        fields: List[Tuple[str, Optional[bool]]] = []
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            origin = typing.get_origin(hint)
            if origin is list:
                fields.append((f.name, True))
            elif hint is bytes or (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
                fields.append((f.name, False))
            elif origin is typing.Union and type(None) not in typing.get_args(hint):
                fields.append((f.name, False))   # EValue.val, Instruction.instr_args
            elif origin is typing.Union:
                fields.append((f.name, None))    # Optional[...]: walk into it when present
        _REQUIRED[cls] = fields
    return _REQUIRED[cls]


def _check_required(obj: Any, path: str) -> None:
    """Every list, bytes and table field the schema does not mark Optional is present, all the way down.

    flatbuffers readers return None for an absent field; a corrupted vtable
    entry (zeroed) makes any field absent, and the runtime would otherwise
    fail on the None far from the cause."""
    for name, is_list in _required_fields(type(obj)):
        value = getattr(obj, name)
        if value is None:
            if is_list is None:
                continue
            _fail(f".pte file is corrupted: {path}.{name} is missing")
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if dataclasses.is_dataclass(item):
                _check_required(item, f"{path}.{name}[{i}]" if isinstance(value, list) else f"{path}.{name}")


def _check_segments(program: et.Program, segment_bytes: int) -> None:
    """Segment ranges and sub-segment offsets inside the segment data; no region counted twice."""
    total = 0
    for i, s in enumerate(program.segments):
        if s.offset + s.size > segment_bytes:
            _fail(f".pte segment {i} [{s.offset}, {s.offset + s.size}) overflows the {segment_bytes} bytes "
                  "of segment data (truncated or corrupted)")
        total += s.size
    if total > segment_bytes:
        _fail(f".pte segments claim {total} bytes, more than the {segment_bytes} bytes of segment data "
              "(overlapping segments)")
    subsegments = [("constant segment", program.constant_segment)]
    subsegments += [(f"mutable data segment {i}", s) for i, s in enumerate(program.mutable_data_segments or [])]
    for what, sub in subsegments:
        if sub is None or not sub.offsets:
            continue
        if sub.segment_index >= len(program.segments):
            _fail(f".pte {what} refers to segment {sub.segment_index} of {len(program.segments)}")
        size = program.segments[sub.segment_index].size
        offsets = list(sub.offsets)
        if any(b < a for a, b in zip(offsets, offsets[1:])) or offsets[-1] > size:
            _fail(f".pte {what}: offsets must increase and lie within its {size}-byte segment")
    named = 0
    for entry in program.named_data or []:
        if entry.segment_index >= len(program.segments):
            _fail(f".pte named data {entry.key!r} refers to segment {entry.segment_index} of {len(program.segments)}")
        named += program.segments[entry.segment_index].size
    if named > segment_bytes:
        _fail(f".pte named data claims {named} bytes, more than the {segment_bytes} bytes of segment data")


# -- an execution plan --

def tensor_nbytes(t: et.Tensor) -> int:
    return math.prod(t.sizes) * ELEMENT_SIZES.get(int(t.scalar_type), 1)


def check_plan(plan: et.ExecutionPlan, program: et.Program) -> None:
    """Cross references and tensor shapes of a plan, before anything is allocated from them."""
    name = plan.name
    values = plan.values
    n = len(values)
    arenas = list(plan.non_const_buffer_sizes)
    limit = memory_limit()
    if any(s < 0 for s in arenas):
        _fail(f"method {name!r}: planned memory sizes {arenas} include a negative size")
    if sum(arenas) > limit:
        _fail(f"method {name!r} plans {sum(arenas)} bytes of memory, more than this machine's {limit}")

    def vid(v: int, what: str, allow_none: bool = False) -> None:
        if not (0 <= v < n or (allow_none and v == -1)):
            _fail(f"method {name!r}: {what} refers to value {v}; the plan has {n} values")

    for i, ev in enumerate(values):
        v = ev.val
        if v is None:
            _fail(f"method {name!r}: value {i} is of an unknown kind")
        if isinstance(v, et.Tensor):
            _check_tensor(name, i, v, arenas, limit)
        elif isinstance(v, (et.IntList, et.TensorList)):
            for j in v.items:
                vid(j, f"list value {i}")
        elif isinstance(v, et.OptionalTensorList):
            for j in v.items:
                vid(j, f"list value {i}", allow_none=True)
    for i in plan.inputs:
        vid(i, "an input")
    for i in plan.outputs:
        vid(i, "an output")
    n_instructions = sum(len(c.instructions) for c in plan.chains)
    for c in plan.chains:
        for pc, instr in enumerate(c.instructions):
            a = instr.instr_args
            what = f"instruction {pc}"
            if isinstance(a, et.KernelCall):
                if not 0 <= a.op_index < len(plan.operators):
                    _fail(f"method {name!r}: {what} calls operator {a.op_index} of {len(plan.operators)}")
                for j in a.args:
                    vid(j, what)
            elif isinstance(a, et.DelegateCall):
                if not 0 <= a.delegate_index < len(plan.delegates):
                    _fail(f"method {name!r}: {what} calls delegate {a.delegate_index} of {len(plan.delegates)}")
                if len(a.args) < 2:
                    _fail(f"method {name!r}: {what} passes {len(a.args)} values to a delegate (inputs, then the output)")
                for j in a.args:
                    vid(j, what)
            elif isinstance(a, et.MoveCall):
                vid(a.move_from, what)
                vid(a.move_to, what)
            elif isinstance(a, et.JumpFalseCall):
                vid(a.cond_value_index, what)
                if not 0 <= a.destination_instruction <= n_instructions:
                    _fail(f"method {name!r}: {what} jumps to {a.destination_instruction} of {n_instructions}")
            elif isinstance(a, et.FreeCall):
                vid(a.value_index, what)
            else:
                _fail(f"method {name!r}: {what} is of an unknown kind")
    for i, d in enumerate(plan.delegates):
        ref = d.processed
        if ref.location == et.DataLocation.INLINE and not 0 <= ref.index < len(program.backend_delegate_data):
            _fail(f"method {name!r}: delegate {i} refers to data {ref.index} of {len(program.backend_delegate_data)}")


def _check_tensor(method: str, i: int, t: et.Tensor, arenas: List[int], limit: int) -> None:
    where = f"method {method!r}: tensor value {i}"
    sizes = list(t.sizes)
    if len(sizes) > MAX_RANK:
        _fail(f"{where} has rank {len(sizes)}, above ExecuTorch's limit of {MAX_RANK}")
    if any(s < 0 for s in sizes):
        _fail(f"{where} has a negative size in {sizes}")
    order = list(t.dim_order)
    if order and sorted(order) != list(range(len(sizes))):
        _fail(f"{where}: dim order {order} is not a permutation of its {len(sizes)} dims")
    if int(t.scalar_type) not in ELEMENT_SIZES:
        _fail(f"{where} has unknown scalar type {int(t.scalar_type)}")
    nbytes = tensor_nbytes(t)
    if nbytes > limit:
        _fail(f"{where} of shape {sizes} needs {nbytes} bytes, more than this machine's {limit}")
    a = t.allocation_info
    if a is None or t.shape_dynamism == et.TensorShapeDynamism.DYNAMIC_UNBOUND:
        return
    if not 0 <= a.memory_id < len(arenas):
        _fail(f"{where} is planned in memory {a.memory_id}; the plan has {len(arenas)} memories")
    offset = a.memory_offset_low | (a.memory_offset_high << 32)
    if offset + nbytes > arenas[a.memory_id]:
        _fail(f"{where} of shape {sizes} ({nbytes} bytes at offset {offset}) overflows planned memory "
              f"{a.memory_id} of {arenas[a.memory_id]} bytes")


def check_delegate_io(plan: et.ExecutionPlan, records: Sequence[Any]) -> None:
    """Each delegate call passes one fp32 [..., K] tensor and gets one fp32 [..., N] tensor, K and N its blob's."""
    values = plan.values
    for c in plan.chains:
        for pc, instr in enumerate(c.instructions):
            a = instr.instr_args
            if not isinstance(a, et.DelegateCall):
                continue
            rec = records[a.delegate_index]
            if not hasattr(rec, "in_features"):
                continue   # a graph delegate: its blob checks its inputs and outputs at each call
            where = f"method {plan.name!r}: instruction {pc} (delegate {rec.name!r}, K={rec.in_features}, N={rec.out_features})"
            if len(a.args) != 2:
                _fail(f"{where} passes {len(a.args) - 1} inputs; the delegate takes 1")
            specs: List[et.Tensor] = []
            for what, vid, last in (("input", a.args[0], rec.in_features), ("output", a.args[1], rec.out_features)):
                spec = values[vid].val
                if not isinstance(spec, et.Tensor) or int(spec.scalar_type) != 6 or not spec.sizes:
                    _fail(f"{where}: its {what} is not a float32 tensor of rank >= 1")
                if spec.sizes[-1] != last:
                    _fail(f"{where}: its {what} has shape {list(spec.sizes)}, which does not end in {last}")
                specs.append(spec)
            x, y = specs
            if list(x.sizes[:-1]) != list(y.sizes[:-1]):
                _fail(f"{where}: input shape {list(x.sizes)} and output shape {list(y.sizes)} differ in leading dims")


def check_outputs(plan: et.ExecutionPlan, outputs: Sequence[Any], dtype_of) -> None:
    """Each tensor output has its spec's dtype and rank, and sizes within its spec's bounds."""
    for i, (vid, out) in enumerate(zip(plan.outputs, outputs)):
        spec = plan.values[vid].val
        if not isinstance(spec, et.Tensor):
            continue
        where = f"method {plan.name!r}: output {i}"
        if not isinstance(out, torch.Tensor):
            _fail(f"{where} is {type(out).__name__}, the program declares a tensor")
        want = dtype_of(spec.scalar_type)
        if out.dtype != want or out.dim() != len(spec.sizes):
            _fail(f"{where} is {out.dtype} of shape {tuple(out.shape)}; the program declares {want} of rank {len(spec.sizes)}")
        for d, (got, bound) in enumerate(zip(out.shape, spec.sizes)):
            static = spec.shape_dynamism == et.TensorShapeDynamism.STATIC
            if (static and got != bound) or (spec.shape_dynamism != et.TensorShapeDynamism.DYNAMIC_UNBOUND and got > bound):
                _fail(f"{where} has shape {tuple(out.shape)}; the program declares {list(spec.sizes)}"
                      f"{'' if static else ' as upper bounds'}")
