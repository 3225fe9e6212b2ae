"""A graph blob on the GPU: buffers allocated once, one command buffer and one submit per call.

The loader creates every buffer the blob lists (constants and the initial
state from the program's named data), one 256-byte uniform slot per step,
and every bind group, once. A call then

  1. reads the symbols (input dims, input_pos) from the inputs, checks their
     ranges and the export's assertions, and evaluates the blob's expression
     table with one compiled Python function;
  2. writes the inputs (int64 token ids become i32, checked) and every step's
     Params in one upload;
  3. encodes every step into one compute pass -- a q4gsw linear takes the
     kernel its route gives this M, as a linear-only delegate does, and a
     fused one writes each of its parts to the part's own buffer -- copies
     the outputs to a staging buffer, submits once and maps once.

The interpreter knows no op: what each step computes was decided by
preprocess (backend/graph/).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import wgpu
from wgpu.classes import GPUBindGroup, GPUBuffer, GPUComputePipeline, GPUQuerySet

from executorch_wgpu.backend.serialization.blob import Q4LinearRecord, deserialize_q4linear
from executorch_wgpu.backend.serialization.graph_blob import GraphRecord, Linear, compile_exprs, deserialize_graph
from executorch_wgpu.errors import InputError, ProgramFormatError, WebGPUDelegateError
from executorch_wgpu.runtime_py.gpu import GPUContext, gpu_context
from executorch_wgpu.runtime_py.direct_calls import DirectCalls, run_through_wgpu_py
from executorch_wgpu.runtime_py.q4_linear import LinearCall, Plan, plan_call, q4_params, prefill_precision_on, use_direct_calls
from executorch_wgpu.shaders import registry

SLOT_BYTES = 256    # one step's Params: WebGPU's minUniformBufferOffsetAlignment
SLOT_WORDS = SLOT_BYTES // 4
_USAGE = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_DST | wgpu.BufferUsage.COPY_SRC
_TORCH_DTYPES = {"f32": torch.float32, "i32": torch.int32, "i64": torch.int64}
_I32_MAX = 2**31 - 1


@dataclass
class GraphCall:
    """What the last call of a graph delegate did, for profiles and llama-bench."""

    dispatches: int
    gpu_us: Optional[float]     # the compute pass, by GPU timestamps, when the adapter has them
    prepare_us: float           # symbols, checks, expressions, Params, the dispatch list (host)
    encode_us: float            # writing inputs and Params, encoding, submitting (host)
    wait_us: float              # submit to mapped outputs
    readback_us: float
    # With GraphDelegate.profile set: (fx node, kernel, GPU µs) per dispatch, each timed in its own
    # compute pass -- inflated by a pass boundary each, so read it for where time goes, not for totals.
    profile: Optional[List[Tuple[str, str, float]]] = None


class _Linear:
    """A q4gsw linear step: its weights, its route, and a bind group over the graph's x and output buffers."""

    def __init__(self, ctx: GPUContext, rec: Q4LinearRecord, slot: int, lin: Linear):
        self.rec = rec
        self.slot = slot
        self.x = lin.x   # the graph's buffer of its activations
        # Its outputs, one (buffer, columns, name) per part: a fused linear's parts, else y, all N, the layer.
        self.parts = [(p.y, p.columns, p.name) for p in lin.parts] or [(lin.y, rec.out_features, rec.name)]
        columns = [c for _, c, _ in self.parts]
        if sum(columns) != rec.out_features:
            raise ProgramFormatError(f"graph delegate: linear {rec.name!r} has parts of {columns} columns, "
                                     f"its blob {rec.out_features}")
        self.route, choice = rec.route_for_adapter(ctx.adapter_class)
        self.precision, precision_note = prefill_precision_on(ctx, rec, self.route)
        why = f"({self.route.source}) [{choice}]; {self.route.reason}"
        fused = f"; fused: one layer {rec.name}" if lin.parts else ""
        self.reasons = (f"M == 1: decode route {why}{fused}", f"M > 1: prefill route {why}{precision_note}{fused}")
        largest = max(rec.qweight.nbytes, rec.scales.nbytes)
        if largest > ctx.plan_limits().max_binding_bytes:
            raise WebGPUDelegateError(
                f"layer {rec.name!r}: a {largest}-byte weight buffer exceeds this adapter's "
                f"{ctx.plan_limits().max_binding_bytes}-byte binding limit; export with "
                "WebGPUPartitioner(linears_only=True), which splits such layers")
        dev = ctx.device
        self.qweight = dev.create_buffer_with_data(label=f"{rec.name}.qweight", data=rec.qweight, usage=_USAGE)
        self.scales = dev.create_buffer_with_data(label=f"{rec.name}.scales", data=rec.scales, usage=_USAGE)
        bias = np.zeros(rec.n_stride, dtype=np.float32)
        if rec.bias is not None:
            bias[: rec.out_features] = rec.bias
        self.bias = dev.create_buffer_with_data(label=f"{rec.name}.bias", data=bias, usage=_USAGE)
        self.plans: Dict[int, Plan] = {}
        self._params: Dict[int, List[int]] = {}
        self.max_groups = ctx.plan_limits().max_workgroups_per_dim

    def plan(self, m: int) -> Plan:
        plan = self.plans.get(m)
        if plan is None:
            rec = self.rec
            plan = self.plans[m] = plan_call(self.route.kernel_for(m), m, rec.in_features, rec.out_features,
                                             rec.n_stride, rec.group_size, self.max_groups, self.precision)
        return plan

    def params(self, plan: Plan) -> List[int]:
        """The kernels' Params for a plan (built once per M)."""
        cached = self._params.get(plan.m)
        if cached is None:
            rec = self.rec
            columns = tuple(c for _, c, _ in self.parts) if len(self.parts) > 1 else ()
            cached = self._params[plan.m] = list(q4_params(plan, rec.in_features, rec.out_features, rec.n_stride,
                                                           rec.group_size, columns))
        return cached


class GraphDelegate:
    """One graph blob loaded onto the shared GPU device."""

    def __init__(self, blob: bytes, named_data: Callable[[str], bytes]):
        self.record: GraphRecord = deserialize_graph(blob)
        rec = self.record
        self.ctx = ctx = gpu_context()
        dev = ctx.device
        self.n_outputs = len(rec.outputs)
        self._values = compile_exprs(rec.exprs, len(rec.symbols))
        self._named_data = named_data

        self.buffers = []
        self._state_init: List[Tuple[int, Optional[bytes]]] = []
        for i, b in enumerate(rec.buffers):
            size = max(16, -(-b.bytes // 16) * 16)
            if b.kind == "constant" or (b.kind == "state" and b.data_key):
                data = self._data(b.data_key, b.bytes, b.name)
                padded = data + bytes(size - len(data))
                self.buffers.append(dev.create_buffer_with_data(label=b.name, data=padded, usage=_USAGE))
                if b.kind == "state":
                    self._state_init.append((i, padded))
            else:
                self.buffers.append(dev.create_buffer(label=b.name, size=size, usage=_USAGE))
                if b.kind == "state":
                    self._state_init.append((i, None))

        # One uniform slot per step, in step order; linears keep theirs across their dispatches.
        self.uniform = dev.create_buffer(label="graph params", size=max(1, len(rec.steps)) * SLOT_BYTES,
                                         usage=wgpu.BufferUsage.UNIFORM | wgpu.BufferUsage.COPY_DST)
        self.linears: List[_Linear] = []
        self._kernel_steps: List[int] = []        # step indices of kernel dispatches
        self._pipelines: Dict[int, GPUComputePipeline] = {}   # step -> its pipeline (kernel steps)
        self._bind_groups: List[Optional[GPUBindGroup]] = []
        for s, st in enumerate(rec.steps):
            if st.linear >= 0:
                lin = rec.linears[st.linear]
                q4 = _Linear(ctx, deserialize_q4linear(self._data(lin.blob_key, None, f"linear {st.node}")), s, lin)
                self.linears.append(q4)
                self._bind_groups.append(None)   # built by _linear_bind_groups (needs the split-K scratch)
                continue
            k = registry.kernel(st.kernel)
            entries = []
            for i, (binding, buf) in enumerate(zip(k.layout, st.bindings)):
                if binding.kind == "uniform":
                    entries.append({"binding": i, "resource": {"buffer": self.uniform, "offset": s * SLOT_BYTES,
                                                               "size": SLOT_BYTES}})
                else:
                    entries.append({"binding": i, "resource": {"buffer": self.buffers[buf], "offset": 0,
                                                               "size": self.buffers[buf].size}})
            self._pipelines[s] = ctx.pipeline(k.name)
            self._bind_groups.append(dev.create_bind_group(label=st.node, layout=ctx.bind_group_layout(k.name),
                                                           entries=entries))
            self._kernel_steps.append(s)
        self._dispatch_lists: Dict[tuple, tuple] = {}
        self._linear_blocks: Dict[Tuple[int, ...], tuple] = {}
        self._linear_m = [rec.linears[rec.steps[lin.slot].linear].m for lin in self.linears]   # expr of each M
        self._linear_slots = np.array([lin.slot for lin in self.linears], dtype=np.int64)
        self.scratch = self._linear_bind_groups(16)

        # Index arrays: the Params and grids of kernel steps gathered from the expression values at once.
        n_fields = max([len(registry.kernel(rec.steps[s].kernel).params) for s in self._kernel_steps] or [0])
        self._param_index = np.full((len(self._kernel_steps), max(n_fields, 1)), -1, dtype=np.int64)
        self._group_index = np.zeros((len(self._kernel_steps), 3), dtype=np.int64)
        for row, s in enumerate(self._kernel_steps):
            st = rec.steps[s]
            self._param_index[row, :len(st.params)] = st.params
            self._group_index[row] = st.groups
        self._slots = np.array(self._kernel_steps, dtype=np.int64)
        self._output_offsets: List[int] = []
        size = 0
        for o in rec.outputs:
            self._output_offsets.append(size)
            size += -(-rec.buffers[o.buffer].bytes // 256) * 256
        self._staging = dev.create_buffer(label="graph outputs", size=max(size, 256) + 16,
                                          usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
        self._ts_offset = max(size, 256)
        self.query_set: Optional[GPUQuerySet] = None
        self.query_resolve: Optional[GPUBuffer] = None
        if ctx.has_timestamps:
            self.query_set = dev.create_query_set(type=wgpu.QueryType.timestamp, count=2)
            self.query_resolve = dev.create_buffer(size=16, usage=wgpu.BufferUsage.QUERY_RESOLVE
                                                   | wgpu.BufferUsage.COPY_SRC)
        # The hot path: wgpu-native's C API directly (direct_calls.py), unless
        # EXECUTORCH_WGPU_DIRECT=0 asks for wgpu-py's API (same commands, slower).
        self.direct = DirectCalls(dev, self.query_set) if use_direct_calls() else None
        self.last_call: Optional[GraphCall] = None
        self.profile = False   # set to time every dispatch of the next calls (GraphCall.profile)
        self.reset_state()

    # ---- load helpers ----

    def _data(self, key: str, nbytes: Optional[int], what: str) -> bytes:
        try:
            data = bytes(self._named_data(key))
        except KeyError:
            raise ProgramFormatError(f"graph delegate: {what} needs named data {key!r}, which the program lacks") \
                from None
        if nbytes is not None and len(data) != nbytes:
            raise ProgramFormatError(f"graph delegate: named data {key!r} of {what} holds {len(data)} bytes, "
                                     f"the blob expects {nbytes}")
        return data

    def _linear_bind_groups(self, scratch_bytes: int) -> GPUBuffer:
        """(Re)build the linears' bind groups around a new scratch buffer (split-K sums, int8 activations) of at
        least scratch_bytes."""
        dev = self.ctx.device
        scratch = dev.create_buffer(label="linear scratch", size=max(16, scratch_bytes),
                                    usage=wgpu.BufferUsage.STORAGE)
        layout = self.ctx.bind_group_layout("gemv")   # the layout every q4gsw linear kernel shares
        unused = self.ctx.unused_part_buffers()
        for lin in self.linears:
            buffers = {"x": self.buffers[lin.x], "qweight": lin.qweight, "scales": lin.scales, "bias": lin.bias,
                       "partial": scratch, **dict(zip(registry.Q4_OUTPUT_PARTS[1:], unused))}
            for name, (y, _, _) in zip(registry.Q4_OUTPUT_PARTS, lin.parts):
                buffers[name] = self.buffers[y]
            entries = []
            for i, b in enumerate(registry.Q4_LINEAR_LAYOUT):
                if b.kind == "uniform":
                    entries.append({"binding": i, "resource": {"buffer": self.uniform, "offset": lin.slot * SLOT_BYTES,
                                                               "size": SLOT_BYTES}})
                else:
                    buf = buffers[b.name]
                    entries.append({"binding": i, "resource": {"buffer": buf, "offset": 0, "size": buf.size}})
            self._bind_groups[lin.slot] = dev.create_bind_group(label=lin.rec.name, layout=layout, entries=entries)
        return scratch

    def reset_state(self) -> None:
        """Put every state buffer (the KV cache) back to its value at load, in one submit."""
        dev = self.ctx.device
        encoder = dev.create_command_encoder()
        for i, data in self._state_init:
            if data is None:
                encoder.clear_buffer(self.buffers[i])
        dev.queue.submit([encoder.finish()])
        for i, data in self._state_init:
            if data is not None:
                dev.queue.write_buffer(self.buffers[i], 0, data)

    # ---- a call ----

    def _symbols(self, inputs: Sequence[torch.Tensor]) -> List[int]:
        values = []
        elements: Dict[int, list] = {}   # input -> its elements, read once (input_pos is read by many symbols)
        for s in self.record.symbols:
            x = inputs[s.input]
            if s.source == "input-dim":
                v = int(x.shape[s.index]) if s.index < x.dim() else None
            else:
                if s.input not in elements:
                    elements[s.input] = x.reshape(-1).tolist()
                flat = elements[s.input]
                v = int(flat[s.index]) if s.index < len(flat) else None
            if v is None:
                raise InputError(f"input {s.input} has shape {tuple(x.shape)}: it has no {s.source} {s.index} "
                                 f"({s.name})")
            if not s.min <= v <= s.max:
                what = f"dim {s.index}" if s.source == "input-dim" else f"element {s.index}"
                raise InputError(f"input {s.input} {what} is {v}, outside the exported range [{s.min}, {s.max}]")
            values.append(v)
        return values

    def execute(self, inputs: Sequence, calls: List[LinearCall]) -> list:
        rec = self.record
        t0 = time.perf_counter()
        if len(inputs) != len(rec.inputs):
            raise ProgramFormatError(f"graph delegate takes {len(rec.inputs)} inputs, the program passes {len(inputs)}")
        values = self._values(self._symbols(inputs))
        for c in rec.checks:
            if not values[c.expr]:
                raise InputError(f"the inputs break a condition of the export: {c.message}")
        data_in = []
        for i, (io, x) in enumerate(zip(rec.inputs, inputs)):
            want = [values[d] for d in io.shape]
            if list(x.shape) != want:
                raise InputError(f"input {i} ({io.name}) has shape {tuple(x.shape)}, expected {tuple(want)}")
            if io.dtype in ("i64", "i32"):
                flat = x.detach().reshape(-1)
                if flat.numel():
                    lo, hi = int(flat.min()), int(flat.max())
                    if io.max_value > 0 and (lo < 0 or hi >= io.max_value):
                        raise InputError(f"input {i} ({io.name}) holds {lo if lo < 0 else hi}, outside [0, "
                                         f"{io.max_value}) (token ids of a {io.max_value}-row embedding)")
                    if lo < -_I32_MAX - 1 or hi > _I32_MAX:
                        raise InputError(f"input {i} ({io.name}) holds values outside int32")
                data_in.append(flat.to(torch.int32).numpy())
            else:
                data_in.append(x.detach().to(torch.float32).contiguous().reshape(-1).numpy())

        # Params of every step, one upload.
        value_array = np.asarray(values + [0], dtype=np.int64)   # index -1 (a missing field) reads the 0
        params = np.zeros((len(rec.steps), SLOT_WORDS), dtype=np.int64)
        if len(self._kernel_steps):
            params[self._slots, :self._param_index.shape[1]] = value_array[self._param_index]
        linear_plans, linear_params, need_scratch = self._linear_block(tuple(values[i] for i in self._linear_m))
        if self.linears:
            params[self._linear_slots, :len(registry.Q4_PARAMS)] = linear_params
        if params.min(initial=0) < 0 or params.max(initial=0) > 0xFFFFFFFF:
            raise WebGPUDelegateError("graph delegate: a kernel parameter does not fit in 32 bits for these inputs")
        if need_scratch > self.scratch.size:
            limit = self.ctx.plan_limits().max_binding_bytes
            if need_scratch > limit:   # runtime_native/graph_delegate.cpp says the same
                raise InputError(f"the linears' scratch (split-K sums, int8 activations) of {need_scratch} bytes for "
                                 f"these inputs exceeds this adapter's {limit}-byte binding limit: call with fewer "
                                 "tokens")
            self.scratch = self._linear_bind_groups(need_scratch)
            self._dispatch_lists.clear()   # they hold the linears' old bind groups
        groups = value_array[self._group_index] if len(self._kernel_steps) else np.zeros((0, 3), dtype=np.int64)
        dispatches, labels, handles = self._dispatch_list(groups, linear_plans)
        out_bytes = [4 * int(np.prod([values[d] for d in io.shape], dtype=np.int64)) for io in rec.outputs]
        copies = [(self.buffers[io.buffer], offset, n)
                  for io, offset, n in zip(rec.outputs, self._output_offsets, out_bytes) if n]
        writes = [(self.buffers[io.buffer], data) for io, data in zip(rec.inputs, data_in) if data.nbytes]
        writes.append((self.uniform, params.astype(np.uint32)))
        t1 = time.perf_counter()
        read_bytes = self._output_offsets[-1] + out_bytes[-1] if rec.outputs else 0
        profile = None
        if self.profile and self.ctx.has_timestamps:
            raw, profile_us, split = self._run_profiled(writes, dispatches, copies, read_bytes)
            profile = [(node, kernel, us) for (node, kernel), us in zip(labels, profile_us)]
            ticks = None
        elif self.direct is not None:
            raw, ticks = self.direct.run_dispatches(writes, handles, copies, self._staging, read_bytes,
                                                    self.query_resolve, self._ts_offset)
            split = self.direct.last_split_us
        else:
            raw, ticks, split = run_through_wgpu_py(self.ctx.device, writes, dispatches, copies, self._staging,
                                                    read_bytes, self.query_set, self.query_resolve, self._ts_offset)
        outputs = []
        for io, offset, n in zip(rec.outputs, self._output_offsets, out_bytes):
            shape = [values[d] for d in io.shape]
            outputs.append(torch.frombuffer(bytearray(raw[offset:offset + n]), dtype=torch.float32).reshape(shape)
                           if n else torch.empty(shape, dtype=torch.float32))
        gpu_us = None if ticks is None else self.ctx.ticks_to_us(*ticks)
        self.last_call = GraphCall(len(dispatches), gpu_us, (t1 - t0) * 1e6, split[0] + split[1], split[2], split[3],
                                   profile)
        for lin, plan in zip(self.linears, linear_plans):   # one entry per linear of the model: a fused one's parts
            for _, columns, name in lin.parts:
                calls.append(LinearCall(name, plan.m, lin.rec.in_features, columns, plan.kernel,
                                        lin.reasons[0 if plan.m == 1 else 1], None))
        return outputs

    def _linear_block(self, ms: Tuple[int, ...]) -> tuple:
        """(plans, Params rows, scratch bytes) of the linears at these M, built once per distinct M."""
        block = self._linear_blocks.get(ms)
        if block is None:
            plans = [lin.plan(int(m)) for lin, m in zip(self.linears, ms)]
            rows = np.array([lin.params(p) for lin, p in zip(self.linears, plans)], dtype=np.int64)
            block = (plans, rows, max([p.partial_bytes for p in plans] or [0]))
            if len(self._linear_blocks) >= 64:   # a bound: each distinct token count adds one
                self._linear_blocks.clear()
            self._linear_blocks[ms] = block
        return block

    def _dispatch_list(self, groups: np.ndarray, linear_plans: List[Plan]) -> tuple:
        """(dispatches, labels, C handles) of a call: (pipeline, bind group, grid) per dispatch, zero-sized grids
        skipped, and (fx node, kernel) per dispatch for a profile. Built once per distinct set of grids and
        linear plans, then reused: they change with the token count, and with input_pos only where a grid
        counts cache blocks (split-KV attention: once per 256 positions)."""
        key = (groups.tobytes(), tuple(map(id, linear_plans)))
        cached = self._dispatch_lists.get(key)
        if cached is not None:
            return cached
        dispatches: list = []
        labels: List[Tuple[str, str]] = []
        row = 0
        linear_at = iter(linear_plans)
        for s, st in enumerate(self.record.steps):
            if st.linear >= 0:
                plan = next(linear_at)
                for d in plan.dispatches:
                    dispatches.append((self.ctx.pipeline(d.kernel), self._bind_groups[s], *d.grid))
                    labels.append((st.node, d.kernel))
                continue
            gx, gy, gz = (int(g) for g in groups[row])
            row += 1
            if gx and gy and gz:
                dispatches.append((self._pipelines[s], self._bind_groups[s], gx, gy, gz))
                labels.append((st.node, st.kernel))
        handles = [(p._internal, b._internal, gx, gy, gz) for p, b, gx, gy, gz in dispatches]
        if len(self._dispatch_lists) >= 64:   # a bound: each distinct token count adds one
            self._dispatch_lists.clear()
        self._dispatch_lists[key] = (dispatches, labels, handles)
        return dispatches, labels, handles

    def _run_profiled(self, writes, dispatches, copies, read_bytes: int) -> tuple:
        """The call with each dispatch in its own timed compute pass: (bytes, [GPU µs per dispatch], split µs)."""
        dev = self.ctx.device
        t0 = time.perf_counter()
        for buffer, data in writes:
            dev.queue.write_buffer(buffer, 0, data)
        n = len(dispatches)
        query_set = dev.create_query_set(type=wgpu.QueryType.timestamp, count=max(2, 2 * n))
        resolve = dev.create_buffer(size=max(16, 16 * n), usage=wgpu.BufferUsage.QUERY_RESOLVE
                                    | wgpu.BufferUsage.COPY_SRC)
        ticks_out = dev.create_buffer(size=max(16, 16 * n), usage=wgpu.BufferUsage.MAP_READ
                                      | wgpu.BufferUsage.COPY_DST)
        t1 = time.perf_counter()
        encoder = dev.create_command_encoder()
        for i, (pipeline, bind_group, gx, gy, gz) in enumerate(dispatches):
            cpass = encoder.begin_compute_pass(timestamp_writes={
                "query_set": query_set, "beginning_of_pass_write_index": 2 * i, "end_of_pass_write_index": 2 * i + 1})
            cpass.set_pipeline(pipeline)
            cpass.set_bind_group(0, bind_group)
            cpass.dispatch_workgroups(gx, gy, gz)
            cpass.end()
        for source, offset, nbytes in copies:
            encoder.copy_buffer_to_buffer(source, 0, self._staging, offset, nbytes)
        if n:
            encoder.resolve_query_set(query_set, 0, 2 * n, resolve, 0)
            encoder.copy_buffer_to_buffer(resolve, 0, ticks_out, 0, 16 * n)
        dev.queue.submit([encoder.finish()])
        t2 = time.perf_counter()
        self._staging.map_sync("READ_NOSYNC")
        ticks_out.map_sync("READ_NOSYNC")
        t3 = time.perf_counter()
        try:
            raw = bytes(self._staging.read_mapped(0, max(read_bytes, 4), copy=True))[:read_bytes]
            t = np.frombuffer(ticks_out.read_mapped(0, max(16, 16 * n), copy=True), dtype=np.uint64)
        finally:
            self._staging.unmap()
            ticks_out.unmap()
        us = [self.ctx.ticks_to_us(int(t[2 * i]), int(t[2 * i + 1])) or 0.0 for i in range(n)]
        t4 = time.perf_counter()
        return raw, us, ((t1 - t0) * 1e6, (t2 - t1) * 1e6, (t3 - t2) * 1e6, (t4 - t3) * 1e6)
