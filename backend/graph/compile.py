"""Preprocess of a graph partition: the Edge program of one delegate -> a graph blob plus named data.

Order of work: remove auto-functionalization (so llama::update_cache writes
its cache in place), find the q4gsw linears (q4gsw_pattern.py, as the
linear-only path does) and group the siblings among them that read one input
(fused_linears.py: each group becomes one layer, one dispatch), then lower
every node in graph order through its rule (ops.py), and let the Lowerer plan
memory and write the blob.
"""

from __future__ import annotations

from typing import Dict, List, Set, Tuple

import torch
from executorch.exir._serialize._named_data_store import NamedDataStore, NamedDataStoreOutput
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx import Node

from executorch_wgpu.backend.graph import ops
from executorch_wgpu.backend.graph.fused_linears import fused_match, sibling_groups
from executorch_wgpu.backend.graph.exprs import sym
from executorch_wgpu.backend.graph.lowering import DTYPE_NAMES, Lowerer, LoweringError, TensorRef, named_data_key
from executorch_wgpu.backend.q4gsw_pattern import Q4LinearMatch, constant_value, find_q4gsw_linears
from executorch_wgpu.backend.routing import RouteOptions
from executorch_wgpu.backend.serialization.blob import serialize_q4linear
from executorch_wgpu.backend.serialization.graph_blob import serialize_graph

# Named data is aligned for any GPU upload (and for mmap-friendly loaders).
NAMED_DATA_ALIGNMENT = 64


def remove_auto_functionalization(ep: ExportedProgram) -> ExportedProgram:
    from torch.export._remove_auto_functionalized_pass import unsafe_remove_auto_functionalized_pass

    return unsafe_remove_auto_functionalized_pass(ep)


def compile_graph(ep: ExportedProgram, options: RouteOptions,
                  fuse_linears: bool = True) -> Tuple[bytes, NamedDataStoreOutput]:
    """The partition's graph blob and named data; fuse_linears=False keeps every q4 linear its own layer."""
    # Imported here: preprocess.py imports this module, and build_record lives beside preprocess.
    from executorch_wgpu.backend.preprocess import build_record

    ep = remove_auto_functionalization(ep)
    store = NamedDataStore()
    keys: Set[str] = set()

    def add_named_data(data: bytes) -> str:
        key = named_data_key(data)
        if key not in keys:
            store.add_named_data(key, data, alignment=NAMED_DATA_ALIGNMENT)
            keys.add(key)
        return key

    lw = Lowerer(ep, add_named_data)
    matches: Dict[Node, Q4LinearMatch] = {}
    claimed: Set[Node] = set()
    for m in find_q4gsw_linears(ep):
        if isinstance(m, Q4LinearMatch):
            matches[m.output] = m
            claimed.update(n for n in m.compute_nodes if n is not m.output)
    groups = sibling_groups(list(matches.values())) if fuse_linears else []
    group_of = {m.output: g for g in groups for m in g}

    kinds = {s.arg.name: s for s in ep.graph_signature.input_specs}
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            _lower_placeholder(lw, ep, node, kinds[node.name], mutated)
        elif node.op == "call_function":
            if node in claimed:
                continue   # a q4 linear's dequantize / permute: its blob holds the packed weights
            if node in group_of:
                if node not in lw.values:   # the group's first member in graph order lowers them all
                    _lower_fused_linears(lw, ep, group_of[node], build_record, options)
                continue
            if node in matches:
                _lower_q4_linear(lw, ep, node, matches[node], build_record, options)
                continue
            reason = ops.unsupported_reason(node)
            if reason is not None:
                raise LoweringError(f"{node.name} ({ops.target_name(node)}) cannot run in the graph delegate: {reason}")
            ops.RULES[ops.target_name(node)].lower(lw, node)
        elif node.op == "output":
            _lower_outputs(lw, ep, node)
    rec = lw.finish()
    return serialize_graph(rec), store.get_named_data_store_output()


def _lower_placeholder(lw: Lowerer, ep: ExportedProgram, node: Node, spec, mutated: Set[str]) -> None:
    val = node.meta.get("val")
    if spec.kind == InputKind.USER_INPUT:
        if not isinstance(val, torch.Tensor):
            raise LoweringError(f"input {node.name} is not a tensor")
        dtype = DTYPE_NAMES.get(val.dtype)
        if dtype not in ("f32", "i64", "i32"):
            raise LoweringError(f"input {node.name} is {val.dtype}; the graph delegate takes float32 and int inputs")
        shape = tuple(sym(d) for d in val.shape)
        ref = TensorRef(-1, shape, "f32" if dtype == "f32" else "i32")
        ref.buffer = lw.new_buffer("work", 4 * lw.upper(ref.numel), node.name)
        index = len(lw.user_inputs)
        lw.user_inputs.append(node)
        lw.inputs.append((TensorRef(ref.buffer, shape, dtype), node.name, 0))
        for d, size in enumerate(shape):
            if hasattr(size, "is_Symbol") and size.is_Symbol:
                lw.add_symbol(size, "input-dim", index, d, lo=1)
        lw.values[node] = ref
        return
    value = constant_value(ep, node)
    if value is None:
        raise LoweringError(f"placeholder {node.name} ({spec.kind.name}) has no value")
    if spec.kind == InputKind.BUFFER and spec.target in mutated:
        t = value.detach().contiguous()
        if t.dtype != torch.float32:
            raise LoweringError(f"mutable buffer {spec.target} is {t.dtype}; the graph delegate keeps float32 state")
        data = t.numpy().tobytes()
        ref = TensorRef(-1, tuple(int(d) for d in t.shape))
        ref.buffer = lw.new_buffer("state", len(data), spec.target, None if not t.any() else data)
        lw.state_buffers[spec.target] = ref.buffer
        lw.values[node] = ref
        return
    # Other constants are uploaded when a step first reads one (Lowerer.value): the codes and scales of
    # a q4 linear live in its own blob and are never read as tensors.


def _lower_q4_linear(lw: Lowerer, ep: ExportedProgram, node: Node, match: Q4LinearMatch, build_record,
                     options: RouteOptions) -> None:
    x = lw.tensor(match.activation)
    y = lw.out_tensor(node)
    m = 1
    for d in x.shape[:-1]:   # M: the activation's leading dims (its last is K)
        m = m * d
    lw.linear(node, serialize_q4linear(build_record(ep, match, options)), x, y, m)
    lw.values[node] = y


def _lower_fused_linears(lw: Lowerer, ep: ExportedProgram, group: List[Q4LinearMatch], build_record,
                         options: RouteOptions) -> None:
    """Sibling linears of one input as one layer (fused_linears.py): one step, an output tensor per member."""
    x = lw.tensor(group[0].activation)
    m = 1
    for d in x.shape[:-1]:
        m = m * d
    parts = [(lw.out_tensor(g.output), int(g.codes.shape[0]), g.name) for g in group]
    blob = serialize_q4linear(build_record(ep, fused_match(group), options))
    lw.fused_linear(f"fused_linears@{group[0].output.name}", blob, x, parts, m)   # as patterns name their steps
    for g, (y, _, _) in zip(group, parts):
        lw.values[g.output] = y


def _lower_outputs(lw: Lowerer, ep: ExportedProgram, node: Node) -> None:
    specs = ep.graph_signature.output_specs
    for arg, spec in zip(ops.args_of(node)[0], specs):
        if spec.kind == OutputKind.BUFFER_MUTATION:
            state = lw.state_buffers.get(spec.target)
            value = lw.values.get(arg) if isinstance(arg, Node) else None
            if state is None:
                raise LoweringError(f"buffer {spec.target} is mutated but not held by the delegate")
            if isinstance(value, TensorRef) and value.buffer != state:
                # the new value was computed out of place (index_put): copy it into the state buffer
                shape = value.shape
                ops.elementwise(lw, arg, "OP_COPY", TensorRef(state, shape), shape, (value, 0, value.strides()))
            continue
        if spec.kind != OutputKind.USER_OUTPUT:
            raise LoweringError(f"output kind {spec.kind.name} is not supported by the graph delegate")
        val = arg.meta.get("val") if isinstance(arg, Node) else None
        if not isinstance(val, torch.Tensor) or val.dtype != torch.float32:
            # both runtimes hand outputs back as float32: anything else would reach the CPU wrong
            raise LoweringError(f"delegate output {getattr(arg, 'name', arg)} is "
                                f"{getattr(val, 'dtype', type(val).__name__)}; a graph delegate returns float32 only")
        ref = lw.tensor(arg)
        if any(ref.buffer == i[0].buffer for i in lw.inputs) or ref.buffer in lw.state_buffers.values() or \
                lw.vbuffers[ref.buffer].kind != "work":
            # an output that is an input, a constant or the state itself: give it its own copy
            ref = ops.copy_strided(lw, arg, ref, 0, ref.strides(), ref.shape)
        lw.outputs.append((ref, arg.name if isinstance(arg, Node) else str(arg)))
