"""WebGPUPartitioner: tags what our kernels run -- by default whole regions of the graph (graph mode).

Graph mode (the default) hands the largest connected regions of ops the GPU
runs, the accepted q4gsw linears among them, to backend/graph/partition.py:
each region is one delegate, with its constants and mutable buffers (a KV
cache) on the GPU. With linears_only=True each accepted layer (see
q4gsw_pattern.py) becomes its own delegate instead: its torchao dequantize
node, the linear (whole, or permute_copy + addmm/mm), and the constant
weights, scales and bias; every other op runs on the CPU. In both modes
declined layers are logged once with name, reason and what would make them
delegable, and lowered to plain ATen ops, so the model still exports and runs
them on the CPU. Each lowering ends with one summary line: how many q4
linears were delegated and how many not.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from executorch.exir.backend.partitioner import DelegationSpec, Partitioner, PartitionResult
from executorch.exir.backend.compile_spec_schema import CompileSpec
from executorch.exir.backend.utils import tag_constant_data
from torch.export import ExportedProgram
from torch.fx import Node

from executorch_wgpu.backend.decompose import inline_dequantize_affine
from executorch_wgpu.backend.preprocess import GRAPH_SPEC, WebGPUBackend
from executorch_wgpu.backend.q4gsw_pattern import (
    LINEAR,
    Decline,
    Q4LinearMatch,
    find_q4gsw_linears,
    op_name,
)
from executorch_wgpu.backend.route_table import RouteTable
from executorch_wgpu.backend.routing import DEFAULT_SHMEM_MIN_MN, DEFAULT_SKINNY_MAX_M, RouteOptions

log = logging.getLogger(__name__)

QUANTIZE_HINT = ("quantize it first with torchao: quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, "
                 "granularity=PerGroup(32))) (README, Use)")


def as_route_table(route_table: Union[None, str, os.PathLike, RouteTable]) -> Optional[RouteTable]:
    """The table itself, or the one loaded from a path (RouteTableError when it cannot be used)."""
    if route_table is None or isinstance(route_table, RouteTable):
        return route_table
    return RouteTable.load(route_table)


class WebGPUPartitioner(Partitioner):
    """Delegates int4 group-symmetric weight-only linears, and by default the ops around them, to executorch_wgpu.

    Args:
        prefill_route: force the M > 1 kernel of every layer (one of shaders/registry.py PREFILL_KERNELS);
            None applies the default rule (skinny while M <= skinny_max_m or
            M*N < shmem_min_mn, else shmem; measured on an H100, see docs/PERFORMANCE.md).
        decode_route: force the M == 1 kernel (one of registry.DECODE_KERNELS); None: the rule's or table's.
        skinny_max_m, shmem_min_mn: knobs of the default rule (positive; defaults 32 and 2**18).
        route_table: a measured route table (`python -m executorch_wgpu tune`), as a path
            or a RouteTable. Layers whose (K, N, group size) it lists take its routes,
            the others the default rule; forced routes above win over it. A file that
            cannot be read raises RouteTableError here, before any lowering. A table that
            names its adapter's kind (tune writes it) gives the routes of that kind only.
        linears_only: False (the default): graph mode -- the largest regions of ops the GPU runs
            (backend/graph/ops.py), each one delegate with its weights and KV cache on the GPU and one
            readback per call. True: one delegate per q4gsw linear, every other op on the CPU (and the
            KV cache in the program). Both runtimes, Python and native, run either.
        adapter_rules: also write the routes measured per kind of adapter (routing.ADAPTER_RULES:
            the register-tiled GEMM at every M on CPU adapters such as lavapipe); each blob then
            carries a route set per kind, and the runtime takes its adapter's (the route report
            says which). False: one route set for every adapter.
        precision: "fp32" (the default), "f16" or "int8": opt in to faster math for prefill. Calls with
            M > 1 that the routes give the shared-memory GEMM then run its variant: shmem_f16 (f16 products
            and 32-term sums, f32 accumulation and output; max relative error about 1e-3 against fp64, where
            fp32 keeps 1e-6) on devices with shader-f16, fp32 elsewhere (the route report says so); or
            shmem_int8 on any device (activations quantized to int8 per 32 k, exact integer dot products
            against the int4 codes; max relative error 5-7e-3 from the activations' rounding; where the
            driver has no integer dot product instruction, naga emulates it: correct, but possibly slower
            than fp32 -- measure with llama-bench). Decode
            (M == 1) and the other kernels stay fp32. Routes are chosen as for fp32.
    """

    def __init__(
        self,
        prefill_route: Optional[str] = None,
        decode_route: Optional[str] = None,
        skinny_max_m: int = DEFAULT_SKINNY_MAX_M,
        shmem_min_mn: int = DEFAULT_SHMEM_MIN_MN,
        route_table: Union[None, str, os.PathLike, RouteTable] = None,
        adapter_rules: bool = True,
        linears_only: bool = False,
        precision: str = "fp32",
    ):
        super().__init__()
        self.linears_only = linears_only
        self.route_options = RouteOptions(
            prefill_route, decode_route, skinny_max_m, shmem_min_mn, as_route_table(route_table), adapter_rules,
            prefill_precision=precision,
        )
        specs = self.route_options.to_compile_specs()
        if not linears_only:
            specs.append(CompileSpec(GRAPH_SPEC, b"1"))
        self.delegation_spec = DelegationSpec(WebGPUBackend.__name__, specs)
        # Layers the pre-decomposition transform declined (and lowered to ATen ops), one
        # batch per method, for partition()'s summary of the same method: ExecuTorch
        # transforms every method first, then partitions them in the same order.
        self._declined: List[List[Decline]] = []

    # -- to_edge_transform_and_lower hooks, in the order ExecuTorch calls them --

    def transform_for_pre_decomposition(self, exported_program: ExportedProgram) -> ExportedProgram:
        """Lower every declined dequantize_affine to ATen ops before decomposition (graph mode keeps a quantized
        embedding table whole: its delegate gathers from the codes)."""
        # Functionalize and flatten torchao's tensor subclasses first, so weights are plain
        # constant placeholders we can inspect (ExecuTorch runs this same step next anyway).
        ep = exported_program.run_decompositions({})
        declined: List[Decline] = []    # q4 linears, for partition()'s summary
        inlined = False
        logged = set()
        for d in find_q4gsw_linears(ep):
            if not isinstance(d, Decline):
                continue
            table = None if self.linears_only else self._embedding_table(ep, d)
            if table:
                continue   # graph mode gathers its rows from the codes (backend/graph/ops_quantized.py)
            if (d.name, d.describe()) not in logged:   # once per layer (a module called twice dequantizes twice)
                log.warning("WebGPUPartitioner: layer %s stays on the CPU: %s", d.name, d.describe())
                logged.add((d.name, d.describe()))
            inline_dequantize_affine(ep.graph_module, d.dequant)
            inlined = True
            if table is None:
                declined.append(d)
        self._declined.append(declined)
        if inlined:
            ep.graph.eliminate_dead_code()
            ep.graph_module.recompile()
        return ep

    @staticmethod
    def _embedding_table(ep: ExportedProgram, d: Decline) -> Optional[bool]:
        """Graph mode: is this dequantize_affine, which no q4 linear takes, a quantized embedding table? None: not
        a table (something besides embeddings reads it); True: the graph delegate gathers from it; False: a table
        that stays on the CPU, d's reason now saying why."""
        from executorch_wgpu.backend.graph.ops_quantized import feeds_embeddings, table_problem

        if not feeds_embeddings(d.dequant):
            return None
        problem = table_problem(d.dequant, ep)
        if problem is not None:
            d.reason, d.fix = problem, ""
        return problem is None

    def ops_to_not_decompose(
        self, ep: ExportedProgram
    ) -> Tuple[List[torch._ops.OpOverload], Optional[Callable[[Node], bool]]]:
        """Keep aten.linear whole where it consumes an accepted q4gsw weight."""
        accepted = {m.output for m in find_q4gsw_linears(ep) if isinstance(m, Q4LinearMatch)}
        return [torch.ops.aten.linear.default], lambda node: op_name(node) == LINEAR and node in accepted

    def partition(self, exported_program: ExportedProgram) -> PartitionResult:
        partition_tags: Dict[str, DelegationSpec] = {}
        declined = self._declined.pop(0) if self._declined else []
        accepted: List[Q4LinearMatch] = []
        results = find_q4gsw_linears(exported_program)
        if not self.linears_only:
            from executorch_wgpu.backend.graph.partition import partition_graph

            from executorch_wgpu.backend.graph.ops_quantized import feeds_embeddings

            accepted = [r for r in results if isinstance(r, Q4LinearMatch)]
            # an embedding's table left whole by the transform is partition_graph's (it logs a decline)
            declined += [r for r in results if isinstance(r, Decline) and not feeds_embeddings(r.dequant)]
            partition_tags = partition_graph(exported_program, accepted, self.delegation_spec)
            log_route_table_gaps(accepted, self.route_options)
            log_summary(len(accepted), declined, graph_delegates=len(partition_tags))
            return PartitionResult(tagged_exported_program=exported_program, partition_tags=partition_tags)
        for i, result in enumerate(results):
            if isinstance(result, Decline):
                # Only reachable through to_edge() + to_backend(), which skip our
                # pre-decomposition transform: the dequantize node stays in the graph.
                log.warning(
                    "WebGPUPartitioner: layer %s stays on the CPU: %s (and lower with "
                    "to_edge_transform_and_lower so its dequantize op is decomposed)", result.name, result.describe()
                )
                declined.append(result)
                continue
            tag = f"webgpu_q4gsw_{i}"
            for node in result.compute_nodes:
                node.meta["delegation_tag"] = tag
            partition_tags[tag] = self.delegation_spec
            accepted.append(result)
        tag_constant_data(exported_program)
        log_route_table_gaps(accepted, self.route_options)
        log_summary(len(partition_tags), declined)
        return PartitionResult(tagged_exported_program=exported_program, partition_tags=partition_tags)


def log_route_table_gaps(accepted: List[Q4LinearMatch], options: RouteOptions, shown_names: int = 3) -> None:
    """Once per lowering given a route table: the delegated layers whose (K, N, group size) it has no entry
    for, which take the default rule instead, and the `tune` command that measures them."""
    table = options.route_table
    if table is None or (options.prefill_route and options.decode_route):   # both forced: the table is unused
        return
    missing: Dict[Tuple[int, int, int], List[str]] = {}
    for layer in accepted:
        n, k = layer.codes.shape
        if table.route_for(k, n, layer.group_size) is None:
            missing.setdefault((k, n, layer.group_size), []).append(layer.name)
    if not missing:
        return
    shapes = []
    for (k, n, gs), names in missing.items():
        more = f", ... ({len(names)} layers)" if len(names) > shown_names else ""
        shapes.append(f"K={k} N={n} gs={gs} ({', '.join(names[:shown_names])}{more})")
    commands = []
    for group_size in sorted({gs for _, _, gs in missing}):
        kn = ",".join(f"{k}x{n}" for k, n, gs in missing if gs == group_size)
        commands.append(f"python -m executorch_wgpu tune --shapes {kn} --group-size {group_size} --out routes.json")
    log.warning("WebGPUPartitioner: route table %s has no entry for %d of %d delegated layers, which use the "
                "default rule (or their adapter class's rule) instead: %s; to measure them on this adapter: %s",
                table.describe(), sum(len(v) for v in missing.values()), len(accepted), "; ".join(shapes),
                " and ".join(commands))


def log_summary(delegated: int, declined: List[Decline], graph_delegates: int = 0) -> None:
    """One line per lowering: what runs on the GPU, what stays on the CPU (each logged above with its fix).
    graph_delegates: graph mode's delegates, which may hold other ops where the program has no q4 linear."""
    total = delegated + len(declined)
    if total == 0 and graph_delegates:
        log.warning("WebGPUPartitioner: the program has no int4 weight-only linears, so only its other ops are "
                    "delegated (%d graph delegate(s)); %s", graph_delegates, QUANTIZE_HINT)
    elif total == 0:
        log.warning("WebGPUPartitioner: the program has no int4 weight-only linears, so nothing is delegated; %s",
                    QUANTIZE_HINT)
    elif declined:
        log.warning("WebGPUPartitioner: %d of %d q4 linears delegated; %d stay on the CPU: %s", delegated, total,
                    len(declined), ", ".join(d.name for d in declined))
    else:
        log.info("WebGPUPartitioner: %d of %d q4 linears delegated", delegated, total)
