"""Which kernel runs each layer: the route rule lives here and nowhere else.

M = product of the input's leading dims, known only per call; K and N are
known at lowering time. So preprocess records per layer the decode kernel
(M == 1) and the prefill kernels (M > 1) as M buckets ((m_max, kernel), ...);
the runtime obeys them.

Precedence, per half (decode, prefill): a route forced by the partitioner,
then the route table's entry for (K, N, group size), then the rule measured on
the adapter's kind (ADAPTER_RULES, written per kind: adapter_routes), then the
default rule (`default_prefill_buckets`): M == 1 -> gemv; M > 1 -> skinny while
M <= skinny_max_m or M*N < shmem_min_mn, shmem above. A table that names its
adapter's kind serves that kind only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from executorch.exir.backend.compile_spec_schema import CompileSpec

from executorch_wgpu.backend.route_table import LAST_BUCKET_M_MAX, RouteTable, describe_buckets
from executorch_wgpu.backend.serialization.blob import ADAPTER_CLASSES, Route
from executorch_wgpu.shaders.registry import DECODE_KERNELS, PRECISIONS, PREFILL_KERNELS

# The default rule: skinny while M <= 32 or while M*N is small, where shmem's 128x128
# tiles are mostly padding or too few to fill the GPU; the shared-memory GEMM above.
# The measurements behind it: docs/PERFORMANCE.md, "Default rule, revisited with data".
DEFAULT_SKINNY_MAX_M = 32
DEFAULT_SHMEM_MIN_MN = 1 << 18

# The blob stores skinny_max_m as a uint and shmem_min_mn as a ulong.
UINT32_LIMIT = 1 << 32
UINT64_LIMIT = 1 << 64


@dataclass(frozen=True)
class RouteOptions:
    """Per-lowering routing knobs, carried from the partitioner to preprocess as compile specs."""

    prefill_route: Optional[str] = None   # force one of registry.PREFILL_KERNELS for M > 1
    decode_route: Optional[str] = None    # force one of registry.DECODE_KERNELS for M == 1
    skinny_max_m: int = DEFAULT_SKINNY_MAX_M   # default rule: skinny for every M <= this ...
    shmem_min_mn: int = DEFAULT_SHMEM_MIN_MN   # ... and while M*N < this; shmem above
    route_table: Optional[RouteTable] = None   # measured routes (from `tune`); shapes it lacks use the rule
    adapter_rules: bool = True   # also write ADAPTER_RULES' routes for the adapter kinds they were measured on
    # Not a route but carried with them: "f16" or "int8" asks the runtimes to run prefill calls of the kernels
    # that have a variant in that precision (registry.VARIANTS: shmem -> shmem_f16, shmem_int8) in it (blob
    # Q4Linear.prefill_precision); routes are chosen as for fp32.
    prefill_precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.prefill_route is not None and self.prefill_route not in PREFILL_KERNELS:
            raise ValueError(f"prefill_route must be one of {PREFILL_KERNELS} or None, got {self.prefill_route!r}")
        if self.decode_route is not None and self.decode_route not in DECODE_KERNELS:
            raise ValueError(f"decode_route must be one of {DECODE_KERNELS} or None, got {self.decode_route!r}")
        for name, limit in (("skinny_max_m", UINT32_LIMIT), ("shmem_min_mn", UINT64_LIMIT)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < limit:
                raise ValueError(f"{name} must be a positive integer below 2**{limit.bit_length() - 1}, got {value!r}")
        if self.prefill_precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.prefill_precision!r}")

    def to_compile_specs(self) -> List[CompileSpec]:
        specs = [
            CompileSpec("skinny_max_m", str(self.skinny_max_m).encode()),
            CompileSpec("shmem_min_mn", str(self.shmem_min_mn).encode()),
        ]
        if self.prefill_route:
            specs.append(CompileSpec("prefill_route", self.prefill_route.encode()))
        if self.decode_route:
            specs.append(CompileSpec("decode_route", self.decode_route.encode()))
        if self.route_table is not None:
            specs.append(CompileSpec(ROUTE_TABLE_SPEC, route_table_spec_bytes(self.route_table)))
        if not self.adapter_rules:
            specs.append(CompileSpec("adapter_rules", b"0"))
        if self.prefill_precision != "fp32":   # fp32 lowerings keep the specs (and .pte bytes) they had
            specs.append(CompileSpec(PRECISION_SPEC, self.prefill_precision.encode()))
        return specs

    @classmethod
    def from_compile_specs(cls, specs: List[CompileSpec]) -> "RouteOptions":
        values = {s.key: s.value.decode() for s in specs}
        unknown = set(values) - {"skinny_max_m", "shmem_min_mn", "prefill_route", "decode_route", ROUTE_TABLE_SPEC,
                                 "adapter_rules", PRECISION_SPEC}
        if unknown:
            raise ValueError(f"unknown WebGPU compile specs: {sorted(unknown)}")
        table = None
        if ROUTE_TABLE_SPEC in values:
            spec = json.loads(values[ROUTE_TABLE_SPEC])
            table = RouteTable.from_json(spec, source=f"compile spec {ROUTE_TABLE_SPEC!r}")
        return cls(
            prefill_route=values.get("prefill_route"),
            decode_route=values.get("decode_route"),
            skinny_max_m=int(values.get("skinny_max_m", DEFAULT_SKINNY_MAX_M)),
            shmem_min_mn=int(values.get("shmem_min_mn", DEFAULT_SHMEM_MIN_MN)),
            route_table=table,
            adapter_rules=values.get("adapter_rules", "1") != "0",
            prefill_precision=values.get(PRECISION_SPEC, "fp32"),
        )


ROUTE_TABLE_SPEC = "route_table"
PRECISION_SPEC = "prefill_precision"


def route_table_spec_bytes(table: RouteTable) -> bytes:
    """The table as a compile spec: its routes without the timings behind them.

    ExecuTorch stores every delegate's compile specs in the .pte, once per
    delegated layer, so the evidence (measured_us) would be repeated there for
    nothing; the routes are all preprocess reads. Sorted keys keep the bytes,
    and so the .pte, the same for the same table.
    """
    return json.dumps(table.without_evidence().to_json(), sort_keys=True, separators=(",", ":")).encode()


def default_prefill_buckets(n: int, options: RouteOptions) -> Tuple[Tuple[int, str], ...]:
    """The default rule for M > 1 of a layer with N outputs, as M buckets ((m_max, kernel), ...).

    skinny while M <= skinny_max_m or M*N < shmem_min_mn, shmem above. M is known only
    per call, so the rule becomes one bound: M*N < shmem_min_mn <=> M <= (shmem_min_mn - 1) // N,
    and skinny runs up to the larger of that and skinny_max_m.
    """
    bound = max(options.skinny_max_m, (options.shmem_min_mn - 1) // n)
    if bound < 2:                       # no M > 1 is skinny's
        return ((LAST_BUCKET_M_MAX, "shmem"),)
    if bound >= LAST_BUCKET_M_MAX:      # every M is skinny's
        return ((LAST_BUCKET_M_MAX, "skinny"),)
    return ((bound, "skinny"), (LAST_BUCKET_M_MAX, "shmem"))


# Rules measured on one kind of adapter where its fastest kernels differ from the
# default rule's (measured on discrete GPUs): adapter class -> the kernel for every M.
# A CPU Vulkan (lavapipe) runs workgroup reductions serially, so the register-tiled
# GEMM, which has none, wins every row there (docs/PERFORMANCE.md, "Routes per adapter class").
ADAPTER_RULES = {"cpu": "regtiled"}


def adapter_routes(k: int, n: int, group_size: int, options: RouteOptions) -> Tuple[Tuple[str, Route], ...]:
    """The routes for particular kinds of adapter (blob Q4Linear.adapter_routes), by adapter class.

    Precedence, per half: a forced route (on every adapter: with both halves forced there
    are no per-kind routes), then a route table (one that names its adapter class: for
    that class; one that does not: for every adapter, so a layer it lists gets no
    per-kind routes), then the measured rules of ADAPTER_RULES (unless
    adapter_rules=False), then the default rule (decide_route).
    """
    if options.prefill_route and options.decode_route:
        return ()
    routes = _unforced_adapter_routes(k, n, group_size, options)
    if options.prefill_route or options.decode_route:   # the forced half over each kind's other half
        return tuple((cls, forced_route(k, n, group_size, options, route)) for cls, route in routes)
    return routes


def _unforced_adapter_routes(k: int, n: int, group_size: int, options: RouteOptions) -> Tuple[Tuple[str, Route], ...]:
    table = options.route_table
    if table is not None and table.adapter_class is None and table.route_for(k, n, group_size) is not None:
        return ()
    routes: Dict[str, Route] = {}
    if options.adapter_rules:
        for cls, kernel in ADAPTER_RULES.items():
            routes[cls] = Route(
                decode_kernel=kernel, prefill_kernel=kernel, source="default-rule", skinny_max_m=0, shmem_min_mn=0,
                reason=f"{kernel} at every M: the rule measured on {cls} adapters (K={k}, N={n})",
                prefill_buckets=((LAST_BUCKET_M_MAX, kernel),),
            )
    if table is not None and table.adapter_class is not None:
        measured = table.route_for(k, n, group_size)
        if measured is not None:
            routes[table.adapter_class] = measured
    return tuple(sorted(routes.items(), key=lambda item: ADAPTER_CLASSES.index(item[0])))


def decide_route(k: int, n: int, group_size: int, options: RouteOptions) -> Route:
    """The route of one layer of K inputs, N outputs and this group size (on adapters adapter_routes does not cover).

    A route table that names its adapter class serves that class only (adapter_routes), not this route.
    """
    table = options.route_table if options.route_table is not None and options.route_table.adapter_class is None \
        else None
    measured = table.route_for(k, n, group_size) if table is not None else None
    if options.prefill_route or options.decode_route:
        return forced_route(k, n, group_size, options, measured)
    if measured is not None:
        return measured
    return default_route(k, n, options, default_rule_reason(k, n, options) + no_entry_note(k, n, group_size, options))


def no_entry_note(k: int, n: int, group_size: int, options: RouteOptions) -> str:
    """Why a lowering given a route table still used the default rule ('' without a table)."""
    if options.route_table is None or options.route_table.adapter_class is not None:
        return ""
    return f"; route table {options.route_table.describe()} has no entry for K={k}, N={n}, group_size={group_size}"


def rule_text(options: RouteOptions) -> str:
    return f"M <= {options.skinny_max_m} or M*N < {options.shmem_min_mn} -> skinny, else shmem"


def default_rule_reason(k: int, n: int, options: RouteOptions) -> str:
    prefill = describe_buckets(default_prefill_buckets(n, options))
    return f"decode -> gemv; prefill {prefill} by default rule ({rule_text(options)}; K={k}, N={n})"


def default_route(k: int, n: int, options: RouteOptions, reason: str) -> Route:
    buckets = default_prefill_buckets(n, options)
    return Route(
        decode_kernel="gemv",
        prefill_kernel=buckets[-1][1],
        source="default-rule",
        skinny_max_m=options.skinny_max_m,
        shmem_min_mn=options.shmem_min_mn,
        reason=reason,
        prefill_buckets=buckets,
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
    table = measured if measured is not None and not both_forced else None   # the measured half, if one
    from_table = table is not None
    if table is not None:
        what = "route table" if table.source == "route-table" else "the rule of this kind of adapter"
        rest = f"{what} otherwise ({table.reason})"
    else:
        rest = f"default rule otherwise ({rule_text(options)}; K={k}, N={n})"
        if not both_forced:
            rest += no_entry_note(k, n, group_size, options)
    return Route(
        decode_kernel=decode,
        prefill_kernel=prefill,
        source="forced",
        skinny_max_m=0 if from_table else options.skinny_max_m,
        shmem_min_mn=0 if from_table else options.shmem_min_mn,
        reason=", ".join(forced) + " by the partitioner; " + rest,
        table=table.table if table is not None and table.source == "route-table" else "",
        prefill_buckets=buckets,
    )
