"""Which kernel runs each layer: the route rule lives here and nowhere else.

M = product of the input's leading dims, known only per call; K and N are
known at lowering time. So preprocess records two decisions per layer: the
decode kernel (M == 1) and the prefill kernel (M > 1). The runtime obeys them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from executorch.exir.backend.compile_spec_schema import CompileSpec

from executorch_wgpu.backend.serialization.blob import KERNELS, Route

# From the published A/B (pytorch/executorch PR 20605): the shared-memory GEMM
# won +150..303 % on wide FFN shapes and lost on the square 2048x2048.
DEFAULT_K_THRESHOLD = 4096
DEFAULT_N_THRESHOLD = 4096
PREFILL_KERNELS = ("regtiled", "shmem")
DECODE_KERNELS = KERNELS


@dataclass(frozen=True)
class RouteOptions:
    """Per-lowering routing knobs, carried from the partitioner to preprocess as compile specs."""

    prefill_route: Optional[str] = None   # force "regtiled" or "shmem" for M > 1
    decode_route: Optional[str] = None    # force "gemv", "regtiled" or "shmem" for M == 1
    k_threshold: int = DEFAULT_K_THRESHOLD
    n_threshold: int = DEFAULT_N_THRESHOLD

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
        return specs

    @classmethod
    def from_compile_specs(cls, specs: List[CompileSpec]) -> "RouteOptions":
        values = {s.key: s.value.decode() for s in specs}
        unknown = set(values) - {"shmem_k_threshold", "shmem_n_threshold", "prefill_route", "decode_route"}
        if unknown:
            raise ValueError(f"unknown WebGPU compile specs: {sorted(unknown)}")
        return cls(
            prefill_route=values.get("prefill_route"),
            decode_route=values.get("decode_route"),
            k_threshold=int(values.get("shmem_k_threshold", DEFAULT_K_THRESHOLD)),
            n_threshold=int(values.get("shmem_n_threshold", DEFAULT_N_THRESHOLD)),
        )


def choose_prefill_route(k: int, n: int, k_threshold: int, n_threshold: int) -> str:
    """The default rule for M > 1: shared-memory GEMM on wide layers, register-tiled otherwise."""
    return "shmem" if k >= k_threshold or n >= n_threshold else "regtiled"


def decide_route(k: int, n: int, options: RouteOptions) -> Route:
    rule = f"K >= {options.k_threshold} or N >= {options.n_threshold} -> shmem, else regtiled"
    prefill = options.prefill_route or choose_prefill_route(k, n, options.k_threshold, options.n_threshold)
    decode = options.decode_route or "gemv"
    forced = [f"{what}={value} forced" for what, value in
              (("prefill", options.prefill_route), ("decode", options.decode_route)) if value]
    if forced:
        reason = ", ".join(forced) + f" by the partitioner; default rule otherwise ({rule}; K={k}, N={n})"
    else:
        reason = f"decode -> gemv; prefill -> {prefill} by default rule ({rule}; K={k}, N={n})"
    return Route(
        decode_kernel=decode,
        prefill_kernel=prefill,
        source="forced" if forced else "default-rule",
        k_threshold=options.k_threshold,
        n_threshold=options.n_threshold,
        reason=reason,
    )
