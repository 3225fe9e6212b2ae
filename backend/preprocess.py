"""WebGPUBackend.preprocess: one partition -> one delegate blob.

A partition of the graph mode (compile spec GRAPH_SPEC) becomes a graph blob
(backend/graph/compile.py) with its weights in the program's named data; a
linear-only partition (one q4gsw linear) a WGQ4 blob.
"""

from __future__ import annotations

from typing import List, Tuple

import sympy
import torch
from executorch.exir.backend.backend_details import BackendDetails, PreprocessResult
from executorch.exir.backend.compile_spec_schema import CompileSpec
from torch.export import ExportedProgram
from torch.utils._sympy.value_ranges import bound_sympy

from executorch_wgpu.backend.packing import pack_q4gsw_scales, pack_q4gsw_weights
from executorch_wgpu.backend.q4gsw_pattern import Decline, Q4LinearMatch, find_q4gsw_linears
from executorch_wgpu.backend.routing import RouteOptions, adapter_routes, decide_route
from executorch_wgpu.backend.serialization.blob import N_ALIGN, Q4LinearRecord, round_up, serialize_q4linear

# The compile spec that marks a graph-mode partition (WebGPUPartitioner(linears_only=False)).
GRAPH_SPEC = "graph"
# Graph mode fuses sibling q4 linears (one input, one dispatch: backend/graph/fused_linears.py) unless a
# compile spec of this key says b"0" (to measure or compare the unfused program).
FUSE_LINEARS_SPEC = "fuse_linears"

# Upper bound recorded for M when the export leaves a leading dim unbounded.
M_UNBOUNDED = 2**62


def m_range(ep: ExportedProgram, activation: torch.fx.Node) -> Tuple[int, int]:
    """[min, max] of M = product of the activation's leading dims.

    The upper bound comes from the export's shape ranges. A dynamic M gets
    lower bound 1: to_edge re-traces with 0/1 specialization and raises a
    user's `Dim(min=1)` to 2 in the Edge program, yet M = 1 (decode) is
    exactly what dynamic shapes are for, and every kernel runs any M >= 1.
    """
    shape = activation.meta["val"].shape
    expr = sympy.Integer(1)
    for d in shape[:-1]:
        expr = expr * (d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(int(d)))
    if expr.is_number:
        return int(expr), int(expr)
    ranges = {sym: vr for sym, vr in ep.range_constraints.items() if isinstance(sym, sympy.Symbol)}
    upper = bound_sympy(expr, ranges).upper
    return 1, int(upper) if upper.is_finite and int(upper) < M_UNBOUNDED else M_UNBOUNDED


def build_record(ep: ExportedProgram, match: Q4LinearMatch, options: RouteOptions) -> Q4LinearRecord:
    n, k = match.codes.shape
    m_min, m_max = m_range(ep, match.activation)
    return Q4LinearRecord(
        name=match.name,
        in_features=k,
        out_features=n,
        group_size=match.group_size,
        n_stride=round_up(n, N_ALIGN),
        m_min=m_min,
        m_max=m_max,
        qweight=pack_q4gsw_weights(match.codes),
        scales=pack_q4gsw_scales(match.scales),
        bias=None if match.bias is None else match.bias.detach().to(torch.float32).numpy().copy(),
        route=decide_route(k, n, match.group_size, options),
        adapter_routes=adapter_routes(k, n, match.group_size, options),
        prefill_precision=options.prefill_precision,
    )


class WebGPUBackend(BackendDetails):
    @staticmethod
    def preprocess(edge_program: ExportedProgram, compile_specs: List[CompileSpec]) -> PreprocessResult:
        if any(s.key == GRAPH_SPEC for s in compile_specs):
            from executorch_wgpu.backend.graph.compile import compile_graph

            fuse = all(s.value != b"0" for s in compile_specs if s.key == FUSE_LINEARS_SPEC)
            routing = [s for s in compile_specs if s.key not in (GRAPH_SPEC, FUSE_LINEARS_SPEC)]
            blob, named_data = compile_graph(edge_program, RouteOptions.from_compile_specs(routing), fuse_linears=fuse)
            return PreprocessResult(processed_bytes=blob, data_store_output=named_data)
        options = RouteOptions.from_compile_specs(compile_specs)
        results = find_q4gsw_linears(edge_program)
        if len(results) != 1:
            raise RuntimeError(f"WebGPUBackend: a partition holds exactly one q4gsw linear, found {len(results)}")
        if isinstance(results[0], Decline):
            # Reachable only through to_edge() + to_backend(), where the partitioner saw fake weights.
            raise RuntimeError(f"WebGPUBackend: layer {results[0].name} cannot run as q4gsw: {results[0].reason}")
        record = build_record(edge_program, results[0], options)
        return PreprocessResult(processed_bytes=serialize_q4linear(record))
