"""Which kernel runs each layer: the route rule lives here and nowhere else.

M = product of the input's leading dims, known only per call; K and N are
known at lowering time. So preprocess records two decisions per layer: the
decode kernel (M == 1) and the prefill kernel (M > 1), or with a measured
route table, prefill kernels per M bucket. The runtime obeys them.

Precedence, per half (decode, prefill): a route forced by the partitioner,
then the route table's entry for (K, N, group size), then the default rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import List, Optional

from executorch.exir.backend.compile_spec_schema import CompileSpec

from executorch_wgpu.backend.route_table import RouteTable
from executorch_wgpu.backend.serialization.blob import KERNELS, Route

# From the published A/B (pytorch/executorch PR 20605): the shared-memory GEMM
# won +150..303 % on wide FFN shapes and lost on the square 2048x2048.
DEFAULT_K_THRESHOLD = 4096
DEFAULT_N_THRESHOLD = 4096
PREFILL_KERNELS = ("regtiled", "shmem", "skinny")
DECODE_KERNELS = KERNELS


@dataclass(frozen=True)
class RouteOptions:
    """Per-lowering routing knobs, carried from the partitioner to preprocess as compile specs."""

    prefill_route: Optional[str] = None   # force "regtiled", "shmem" or "skinny" for M > 1
    decode_route: Optional[str] = None    # force any kernel for M == 1
    k_threshold: int = DEFAULT_K_THRESHOLD
    n_threshold: int = DEFAULT_N_THRESHOLD
    route_table: Optional[RouteTable] = None   # measured routes (from `tune`); shapes it lacks use the rule

    def __post_init__(self) -> None:
        if self.prefill_route is not None and self.prefill_route not in PREFILL_KERNELS:
            raise ValueError(f"prefill_route must be one of {PREFILL_KERNELS} or None, got {self.prefill_route!r}")
        if self.decode_route is not None and self.decode_route not in DECODE_KERNELS:
            raise ValueError(f"decode_route must be one of {DECODE_KERNELS} or None, got {self.decode_route!r}")
        if self.k_threshold < 1 or self.n_threshold < 1:
            raise ValueError("shmem thresholds must be positive")

    def to_compile_specs(self) -> List[CompileSpec]:
        specs = [
            CompileSpec("shmem_k_threshold", str(self.k_threshold).encode()),
            CompileSpec("shmem_n_threshold", str(self.n_threshold).encode()),
        ]
        if self.prefill_route:
            specs.append(CompileSpec("prefill_route", self.prefill_route.encode()))
        if self.decode_route:
            specs.append(CompileSpec("decode_route", self.decode_route.encode()))
        if self.route_table is not None:
            specs.append(CompileSpec(ROUTE_TABLE_SPEC, route_table_spec_bytes(self.route_table)))
        return specs

    @classmethod
    def from_compile_specs(cls, specs: List[CompileSpec]) -> "RouteOptions":
        values = {s.key: s.value.decode() for s in specs}
        unknown = set(values) - {"shmem_k_threshold", "shmem_n_threshold", "prefill_route", "decode_route",
                                 ROUTE_TABLE_SPEC}
        if unknown:
            raise ValueError(f"unknown WebGPU compile specs: {sorted(unknown)}")
        table = None
        if ROUTE_TABLE_SPEC in values:
            spec = json.loads(values[ROUTE_TABLE_SPEC])
            table = RouteTable.from_json(spec, source=f"compile spec {ROUTE_TABLE_SPEC!r}")
        return cls(
            prefill_route=values.get("prefill_route"),
            decode_route=values.get("decode_route"),
            k_threshold=int(values.get("shmem_k_threshold", DEFAULT_K_THRESHOLD)),
            n_threshold=int(values.get("shmem_n_threshold", DEFAULT_N_THRESHOLD)),
            route_table=table,
        )


ROUTE_TABLE_SPEC = "route_table"


def route_table_spec_bytes(table: RouteTable) -> bytes:
    """The table as a compile spec: its routes without the timings behind them.

    ExecuTorch stores every delegate's compile specs in the .pte, once per
    delegated layer, so the evidence (measured_us) would be repeated there for
    nothing; the routes are all preprocess reads. Sorted keys keep the bytes,
    and so the .pte, the same for the same table.
    """
    return json.dumps(table.without_evidence().to_json(), sort_keys=True, separators=(",", ":")).encode()


def choose_prefill_route(k: int, n: int, k_threshold: int, n_threshold: int) -> str:
    """The default rule for M > 1: shared-memory GEMM on wide layers, register-tiled otherwise."""
    return "shmem" if k >= k_threshold or n >= n_threshold else "regtiled"


def decide_route(k: int, n: int, group_size: int, options: RouteOptions) -> Route:
    """The route of one layer of K inputs, N outputs and this group size."""
    measured = options.route_table.route_for(k, n, group_size) if options.route_table is not None else None
    if options.prefill_route or options.decode_route:
        return forced_route(k, n, group_size, options, measured)
    if measured is not None:
        return measured
    return default_route(k, n, options, default_rule_reason(k, n, options) + no_entry_note(k, n, group_size, options))


def no_entry_note(k: int, n: int, group_size: int, options: RouteOptions) -> str:
    """Why a lowering given a route table still used the default rule ('' without a table)."""
    if options.route_table is None:
        return ""
    return f"; route table {options.route_table.describe()} has no entry for K={k}, N={n}, group_size={group_size}"


def rule_text(options: RouteOptions) -> str:
    return f"K >= {options.k_threshold} or N >= {options.n_threshold} -> shmem, else regtiled"


def default_rule_reason(k: int, n: int, options: RouteOptions) -> str:
    prefill = choose_prefill_route(k, n, options.k_threshold, options.n_threshold)
    return f"decode -> gemv; prefill -> {prefill} by default rule ({rule_text(options)}; K={k}, N={n})"


def default_route(k: int, n: int, options: RouteOptions, reason: str) -> Route:
    return Route(
        decode_kernel="gemv",
        prefill_kernel=choose_prefill_route(k, n, options.k_threshold, options.n_threshold),
        source="default-rule",
        k_threshold=options.k_threshold,
        n_threshold=options.n_threshold,
        reason=reason,
    )


def forced_route(k: int, n: int, group_size: int, options: RouteOptions, measured: Optional[Route]) -> Route:
    """A half the partitioner forces wins; the other half comes from the table, else the default rule."""
    otherwise = measured or default_route(k, n, options, "")
    decode = options.decode_route or otherwise.decode_kernel
    if options.prefill_route:
        prefill, buckets = options.prefill_route, ()   # one kernel for every M > 1: no buckets
    else:
        prefill, buckets = otherwise.prefill_kernel, otherwise.prefill_buckets
    forced = [f"{what}={value} forced" for what, value in
              (("prefill", options.prefill_route), ("decode", options.decode_route)) if value]
    both_forced = bool(options.prefill_route and options.decode_route)
    if measured is not None and not both_forced:
        rest = f"route table otherwise ({measured.reason})"
    else:
        rest = f"default rule otherwise ({rule_text(options)}; K={k}, N={n})"
        if not both_forced:
            rest += no_entry_note(k, n, group_size, options)
    return Route(
        decode_kernel=decode,
        prefill_kernel=prefill,
        source="forced",
        k_threshold=options.k_threshold,
        n_threshold=options.n_threshold,
        reason=", ".join(forced) + " by the partitioner; " + rest,
        table=measured.table if measured is not None and not both_forced else "",
        prefill_buckets=buckets,
    )
