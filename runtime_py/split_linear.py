"""Layers bigger than one binding or one dispatch: split over N into parts, over M into row chunks.

A q4gsw layer's packed weights, scales and activations each go into one
storage binding, and each dispatch has at most max-compute-workgroups-per-
dimension workgroups per grid axis. A layer within those limits runs as one
Q4LinearGPU (one submit per call). A larger one -- an lm_head with a big
vocabulary, or a call with a very large M -- is split:

  * over N into column parts: the packed layout stores columns in 16-wide
    blocks, each contiguous over K (schema.fbs), so a part [n0, n1) with n0,
    n1 multiples of 16 is a contiguous slice of qweight and scales and becomes
    its own Q4LinearGPU;
  * over M into row chunks, so x, y and every grid of a chunk fit.

Each chunk runs every part and the column slices are joined on the host.
Every output element is computed by the same kernel from the same inputs as
unsplit, so gemv, skinny and regtiled give bit-identical results; the shmem
GEMM may split K differently for a smaller part or chunk (it splits to fill
the GPU), which changes only the order of its fp32 sums.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Tuple

import numpy as np
import torch

from executorch_wgpu.backend.serialization.blob import QW_BLOCK, Q4LinearRecord, Route
from executorch_wgpu.errors import WebGPUDelegateError
from executorch_wgpu.runtime_py.gpu import GPUContext, PlanLimits
from executorch_wgpu.runtime_py.q4_linear import (
    GEMV_COLUMNS,
    SKINNY_COLUMNS,
    LinearCall,
    Q4LinearGPU,
    check_input,
    plan_call,
)
from executorch_wgpu.shaders import registry

# Rows of M one workgroup row covers, per kernel (grid y = ceil(M / rows)); the
# smallest bounds how many rows a chunk may hold under the grid limit.
MIN_ROWS_PER_WORKGROUP = registry.kernel("skinny").constants["ROWS"]


def column_parts(rec: Q4LinearRecord, limits: PlanLimits) -> List[Tuple[int, int]]:
    """[n0, n1) column ranges, multiples of 16 (128 where possible), each within the limits."""
    k = rec.in_features
    bytes_per_column = max(k // 8, k // rec.group_size) * 4         # qweight is the larger of the two
    by_binding = limits.max_binding_bytes // bytes_per_column
    by_grid = limits.max_workgroups_per_dim * min(GEMV_COLUMNS, SKINNY_COLUMNS)   # their grids: a workgroup per block
    width = min(by_binding, by_grid, rec.n_stride)
    tile = registry.kernel("shmem").constants["TN"]
    step = tile if width >= tile else QW_BLOCK                      # whole shmem tiles when they fit
    width = width // step * step
    if width < QW_BLOCK:
        raise WebGPUDelegateError(
            f"layer {rec.name!r}: 16 columns of K={k} ({QW_BLOCK * bytes_per_column} bytes) exceed the "
            f"{limits.max_binding_bytes}-byte binding limit"
        )
    return [(n0, min(n0 + width, rec.n_stride)) for n0 in range(0, rec.n_stride, width)]


def part_record(rec: Q4LinearRecord, n0: int, n1: int) -> Q4LinearRecord:
    """The layer restricted to columns [n0, n1) (n0, n1 multiples of 16)."""
    k8, groups = rec.in_features // 8, rec.in_features // rec.group_size
    out = min(rec.out_features, n1) - n0
    return dataclasses.replace(
        rec,
        name=f"{rec.name}[{n0}:{n0 + out}]",
        out_features=out,
        n_stride=n1 - n0,
        qweight=rec.qweight[n0 * k8:n1 * k8],
        scales=rec.scales[n0 * groups:n1 * groups],
        bias=None if rec.bias is None else rec.bias[n0:n0 + out],
    )


def chunk_rows(rec: Q4LinearRecord, route: Route, part: Q4LinearRecord, limits: PlanLimits, m: int,
               precision: str = "fp32") -> int:
    """Most rows of M one call of every part (routed by `route`, its prefill in `precision`) can take: x, y and
    split-K scratch fit, grids fit."""
    rows = min(m,
               limits.max_binding_bytes // (rec.in_features * 4),
               limits.max_binding_bytes // (part.n_stride * 4),
               limits.max_workgroups_per_dim * MIN_ROWS_PER_WORKGROUP)
    while rows > 1:
        kernel = route.kernel_for(rows)
        try:
            plan = plan_call(kernel, rows, rec.in_features, part.out_features, part.n_stride, rec.group_size,
                             limits.max_workgroups_per_dim, precision)
            if plan.partial_bytes <= limits.max_binding_bytes:
                return rows
        except WebGPUDelegateError:
            pass
        rows //= 2
    if rows < 1 or rec.in_features * 4 > limits.max_binding_bytes:
        raise WebGPUDelegateError(
            f"layer {rec.name!r}: one row of x (K={rec.in_features}) exceeds the {limits.max_binding_bytes}-byte "
            "binding limit"
        )
    return 1


class Q4Linear:
    """A loaded q4gsw layer of any size: one Q4LinearGPU, or several column parts run per row chunk."""

    def __init__(self, ctx: GPUContext, rec: Q4LinearRecord):
        self.rec = rec
        self.limits = ctx.plan_limits()
        ranges = column_parts(rec, self.limits)
        records = [rec] if len(ranges) == 1 else [part_record(rec, n0, n1) for n0, n1 in ranges]
        # Inputs are checked against the whole layer here; a row chunk may hold
        # fewer rows than the exported minimum of M, so parts accept any M >= 1.
        self.parts = [Q4LinearGPU(ctx, dataclasses.replace(r, m_min=1)) for r in records]
        self._rows: Dict[int, int] = {}   # M -> rows per chunk

    def check_input(self, x: torch.Tensor) -> int:
        return check_input(self.rec, x)

    def __call__(self, x: torch.Tensor) -> tuple:
        """y = x @ dequant(W)^T + b; returns (y, LinearCall) like Q4LinearGPU."""
        m = self.check_input(x)
        rows = self._rows.get(m)
        if rows is None:   # planned once per M: calls at a given M repeat (decode, fixed prompts)
            # parts[0] is the widest; every part takes the same route (the same adapter, the same blob)
            first = self.parts[0]
            rows = self._rows[m] = chunk_rows(self.rec, first.route, first.rec, self.limits, m, first.precision)
        if len(self.parts) == 1 and rows >= m:
            return self.parts[0](x)
        flat = x.detach().reshape(m, self.rec.in_features)
        out = torch.empty(m, self.rec.out_features, dtype=torch.float32)
        calls = []
        for r0 in range(0, m, rows):
            chunk = flat[r0:r0 + rows]
            col = 0
            for part in self.parts:
                y, call = part(chunk)
                out[r0:r0 + chunk.shape[0], col:col + part.rec.out_features] = y
                col += part.rec.out_features
                calls.append(call)
        return out.reshape(*x.shape[:-1], self.rec.out_features), self._merge(calls, m, rows)

    def _merge(self, calls: List[LinearCall], m: int, rows: int) -> LinearCall:
        """One route-report entry for the whole layer: kernels of its calls, times summed."""
        def total(field):
            values = [getattr(c, field) for c in calls]
            return None if any(v is None for v in values) else float(np.sum(values))

        kernels = sorted({c.kernel for c in calls})
        chunks = math.ceil(m / rows)
        split = (f"; split into {len(self.parts)} column part(s) x {chunks} row chunk(s) to fit the "
                 f"{self.limits.max_binding_bytes}-byte binding / {self.limits.max_workgroups_per_dim}-workgroup limits")
        first = calls[0]
        return LinearCall(self.rec.name, m, self.rec.in_features, self.rec.out_features, "+".join(kernels),
                          first.reason + split, total("gpu_us"), upload_us=total("upload_us"),
                          submit_us=total("submit_us"), wait_us=total("wait_us"), readback_us=total("readback_us"))
