"""One q4gsw linear layer on the GPU: weights uploaded once, one submit per call.

A call writes x and the per-call parameters, records one compute pass with
the kernel the blob routes this M to, copies y (and the pass's two
timestamps, when the adapter has them) into one staging buffer, submits once
and maps that buffer once.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import wgpu
from wgpu.classes import GPUBuffer

from executorch_wgpu.backend.serialization.blob import Q4LinearRecord, Route
from executorch_wgpu.errors import InputError, WebGPUDelegateError
from executorch_wgpu.runtime_py.direct_calls import DirectCalls, run_through_wgpu_py
from executorch_wgpu.runtime_py.gpu import GPUContext
from executorch_wgpu.shaders import registry

log = logging.getLogger(__name__)

_STORAGE = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_DST
_TIMESTAMP_BYTES = 16   # two u64 ticks
_PARAMS = struct.Struct("<" + "I" * len(registry.Q4_PARAMS))   # the kernels' Params uniform


@dataclass
class LinearCall:
    """What one call of a layer did: an entry of Method.route_report()."""

    name: str
    M: int
    K: int
    N: int
    kernel: str
    reason: str
    gpu_us: Optional[float]          # GPU timestamp delta of the compute pass, when the adapter has timestamps
    wall_us: Optional[float] = None  # host time of the whole delegate call: upload, dispatch, readback
    # Host time split of the call (µs): write x, encode + submit, wait for the
    # GPU (map), copy y out. Their sum is wall_us minus input checks.
    upload_us: Optional[float] = None
    submit_us: Optional[float] = None
    wait_us: Optional[float] = None
    readback_us: Optional[float] = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


MAX_GROUPS_PER_DIM = 65535    # WebGPU's maxComputeWorkgroupsPerDimension default

GEMV = registry.kernel("gemv")
SKINNY = registry.kernel("skinny")
REGTILED = registry.kernel("regtiled")
SHMEM = registry.kernel("shmem")
REDUCE = registry.kernel("splitk_reduce")
GEMV_COLUMNS = 4 * GEMV.constants["QUADS"]       # columns per gemv workgroup (one 16-column block)
SKINNY_COLUMNS = 4 * SKINNY.constants["QUADS"]   # columns per skinny workgroup (one 16-column block)


def use_direct_calls() -> bool:
    return os.environ.get("EXECUTORCH_WGPU_DIRECT", "1") != "0"


@dataclass(frozen=True)
class Dispatch:
    """One compute dispatch of a call: which kernel, on which grid."""

    kernel: str
    grid: tuple


@dataclass(frozen=True)
class Plan:
    """How one call of a layer runs: its dispatches and the kernel parameters they share."""

    kernel: str
    m: int
    n: int
    k_splits: int
    k_chunk: int
    dispatches: tuple
    quantized_x_bytes: int = 0   # an int8 call's activation codes and scales (q4gsw_int8_prelude.wgsl)

    @property
    def partial_bytes(self) -> int:
        """Bytes of the scratch buffer the plan writes: split-K partial sums (none without split K), then any
        quantized activations."""
        return (0 if self.k_splits == 1 else self.k_splits * self.m * self.n * 4) + self.quantized_x_bytes


def k_split_for(m: int, k: int, n_stride: int, max_groups: int = MAX_GROUPS_PER_DIM,
                gemm: registry.Kernel = SHMEM) -> tuple:
    """(k_splits, k_chunk) for a shared-memory GEMM (shmem and its variants): when its tiles alone would leave most
    of a large GPU idle, split K over extra workgroups (chunks a multiple of its K tile)."""
    c, p = gemm.constants, gemm.plan
    tiles = math.ceil(n_stride / c["TN"]) * math.ceil(m / c["TM"])
    splits = min(p["MAX_K_SPLITS"], max_groups, max(1, k // p["SPLITK_MIN_CHUNK"]),
                 math.ceil(p["SPLITK_TARGET_WORKGROUPS"] / tiles))
    if splits <= 1:
        return 1, k
    chunk = math.ceil(math.ceil(k / splits) / c["TK"]) * c["TK"]
    return math.ceil(k / chunk), chunk


def gemv_k_split_for(k: int, group_size: int, max_groups: int = MAX_GROUPS_PER_DIM) -> tuple:
    """(k_splits, k_chunk) for the GEMV: one quantization group per thread when K is long."""
    groups = k // group_size
    splits = max(1, min(GEMV.plan["MAX_K_SPLITS"], max_groups, groups // GEMV.constants["SLICES"]))
    if splits == 1:
        return 1, k
    chunk = math.ceil(groups / splits) * group_size
    return math.ceil(k / chunk), chunk


def plan_call(kernel: str, m: int, k: int, n: int, n_stride: int, group_size: int,
              max_groups: int = MAX_GROUPS_PER_DIM, precision: str = "fp32") -> Plan:
    """The dispatches that compute y for M = m with a routable kernel; grids match the shader headers.

    precision: what the layer's prefill runs in on this device (prefill_precision_on), so a call with M > 1 of
    a kernel that has a variant in it (registry.VARIANTS) runs that variant, planned from its own constants;
    the plan names it.
    Raises WebGPUDelegateError when a grid would exceed max_groups workgroups
    in a dimension (split_linear.py sizes parts and row chunks so it does not).
    """
    spec = registry.BY_NAME.get(kernel)
    if spec is not None and spec.variant_of is not None:   # a variant named itself (bench times each kernel)
        if m == 1:
            raise WebGPUDelegateError(f"{kernel} runs prefill calls (M > 1) only, not M = 1")
        kernel, precision = spec.variant_of, spec.precision
    if m > 1:
        kernel = registry.variant(kernel, precision)
    k_splits, k_chunk = 1, k
    quantized_x_bytes = 0
    reduce_rows = m
    if kernel == "gemv":
        if m != 1:
            raise WebGPUDelegateError(f"the gemv kernel computes M = 1 only, not M = {m}")
        k_splits, k_chunk = gemv_k_split_for(k, group_size, max_groups)
        dispatches: Tuple[Dispatch, ...] = (Dispatch("gemv", (n_stride // GEMV_COLUMNS, 1, k_splits)),)
    elif kernel == "regtiled":
        c = REGTILED.constants
        dispatches = (Dispatch("regtiled", (math.ceil(n_stride / c["TILE_N"]), math.ceil(m / c["TILE_M"]), 1)),)
    elif kernel == "skinny":
        rows = SKINNY.constants["ROWS"]
        dispatches = (Dispatch("skinny", (math.ceil(n_stride / SKINNY_COLUMNS), math.ceil(m / rows), 1)),)
    elif kernel in ("shmem", registry.variant("shmem", precision)):   # or its variant: its own tiles, one split rule
        gemm = registry.kernel(kernel)
        c = gemm.constants
        k_splits, k_chunk = k_split_for(m, k, n_stride, max_groups, gemm)
        dispatches = (Dispatch(kernel, (math.ceil(n_stride / c["TN"]), math.ceil(m / c["TM"]), k_splits)),)
        if gemm.prepass is not None:   # quantize_int8: one invocation per row and block of k
            prepass = registry.kernel(gemm.prepass)
            block = prepass.constants["INT8_BLOCK"]
            dispatches = (Dispatch(prepass.name, (math.ceil(m * k // block / prepass.workgroup_size[0]), 1, 1)),
                          *dispatches)
            quantized_x_bytes = m * k + m * (k // block) * 4
    else:
        raise WebGPUDelegateError(f"unknown kernel {kernel!r}")
    if k_splits > 1:
        threads = REDUCE.workgroup_size[0]
        dispatches += (Dispatch("splitk_reduce", (math.ceil(reduce_rows * n / threads), 1, 1)),)
    for d in dispatches:
        if max(d.grid) > max_groups:
            raise WebGPUDelegateError(
                f"{kernel} at M={m}, N={n}: grid {d.grid} exceeds {max_groups} workgroups per dimension"
            )
    return Plan(kernel, m, n, k_splits, k_chunk, dispatches, quantized_x_bytes)


def q4_params(plan: Plan, k: int, n: int, n_stride: int, group_size: int,
              part_columns: Tuple[int, ...] = ()) -> Tuple[int, ...]:
    """The q4gsw kernels' Params (registry.Q4_PARAMS order) for a plan of a layer of K x N; part_columns: the
    widths of a fused layer's output parts (registry.Q4_OUTPUT_PARTS), empty for one part."""
    starts = [sum(part_columns[:i]) for i in range(1, len(part_columns))]
    part1, part2 = (starts + [n, n])[:2]
    values = {"M": plan.m, "K": k, "N": n, "n_stride": n_stride, "group_size": group_size, "k_splits": plan.k_splits,
              "k_chunk": plan.k_chunk, "part1": part1, "part2": part2}
    return tuple(values.get(f, 0) for f in registry.Q4_PARAMS)


_logged_fallbacks: set = set()   # the precisions whose fallback to fp32 this process has logged


def prefill_precision_on(ctx: GPUContext, rec: Q4LinearRecord, route: Route) -> Tuple[str, str]:
    """The precision a layer's prefill runs in on this device, and what its route-report reason adds.

    A blob asks for a prefill precision (prefill_precision); the kernels with a variant in it
    (registry.VARIANTS: shmem -> shmem_f16, shmem_int8) then run that variant for M > 1 where the device has
    the variant's features (f16: shader-f16). Without them they run in fp32, which the reason says per layer
    and the log once per process. Decode (M == 1) and the other kernels stay fp32.
    runtime_native/q4_linear.cpp prefill_precision_on is the C++ twin (same words).
    """
    precision = rec.prefill_precision
    if precision == "fp32":
        return "fp32", ""
    kernels = sorted({k for _, k in route.prefill_buckets} or {route.prefill_kernel})
    variants = [k for k in kernels if (precision, k) in registry.VARIANTS]
    if not variants:
        return "fp32", (f"; {precision} prefill asked, but its prefill kernels ({', '.join(kernels)}) have no "
                        f"{precision} variant: fp32")
    missing = sorted({f for k in variants for f in ctx.missing_features(registry.variant(k, precision))})
    if missing:
        if precision not in _logged_fallbacks:
            _logged_fallbacks.add(precision)
            log.warning("executorch_wgpu: this program asks for %s prefill, but adapter %s lacks %s: its "
                        "layers' prefill runs in fp32 (route report reasons name them)", precision,
                        ctx.adapter_name, ", ".join(missing))
        return "fp32", (f"; {precision} prefill asked, but this adapter lacks {', '.join(missing)}: "
                        f"{', '.join(variants)} in fp32")
    return precision, f"; {precision} prefill: " + ", ".join(f"{k} runs as {registry.variant(k, precision)}"
                                                              for k in variants)


def check_input(rec: Q4LinearRecord, x: torch.Tensor) -> int:
    """M of a call; raises InputError for anything the layer was not exported for."""
    if x.dtype != torch.float32:
        raise InputError(f"layer {rec.name!r}: input dtype is {x.dtype}, expected torch.float32")
    if x.dim() < 1 or x.shape[-1] != rec.in_features:
        raise InputError(f"layer {rec.name!r}: input shape {tuple(x.shape)} does not end in K={rec.in_features}")
    m = x.numel() // rec.in_features
    if not rec.m_min <= m <= rec.m_max:
        raise InputError(
            f"layer {rec.name!r}: M={m} (product of leading dims of {tuple(x.shape)}) is outside the "
            f"exported range [{rec.m_min}, {rec.m_max}]"
        )
    return m


class Q4LinearGPU:
    """A loaded layer: its weights on the GPU and the buffers its calls reuse."""

    def __init__(self, ctx: GPUContext, rec: Q4LinearRecord):
        self.ctx = ctx
        self.rec = rec
        # The routes of this adapter's kind when the blob has them, else its default ones; the
        # route report says which; its reasons are built once, not per call (as the native twin does).
        self.route, route_choice = rec.route_for_adapter(ctx.adapter_class)
        self.precision, precision_note = prefill_precision_on(ctx, rec, self.route)
        why = f"({self.route.source}) [{route_choice}]; {self.route.reason}"
        self.reasons = (f"M == 1: decode route {why}", f"M > 1: prefill route {why}{precision_note}")
        dev = ctx.device
        self.limits = ctx.plan_limits()
        largest = max(rec.qweight.nbytes, rec.scales.nbytes)
        if largest > self.limits.max_binding_bytes:
            raise WebGPUDelegateError(
                f"layer {rec.name!r}: a {largest}-byte weight buffer exceeds the {self.limits.max_binding_bytes}-byte "
                f"binding limit; load it through split_linear.Q4Linear, which splits it over N"
            )
        self.qweight = dev.create_buffer_with_data(label=f"{rec.name}.qweight", data=rec.qweight, usage=_STORAGE)
        self.scales = dev.create_buffer_with_data(label=f"{rec.name}.scales", data=rec.scales, usage=_STORAGE)
        bias = np.zeros(rec.n_stride, dtype=np.float32)
        if rec.bias is not None:
            bias[: rec.out_features] = rec.bias
        self.bias = dev.create_buffer_with_data(label=f"{rec.name}.bias", data=bias, usage=_STORAGE)
        self.params = dev.create_buffer(
            label=f"{rec.name}.params", size=_PARAMS.size, usage=wgpu.BufferUsage.UNIFORM | wgpu.BufferUsage.COPY_DST
        )
        self.params_for: Optional[Tuple[int, int, int]] = None   # the (M, k_splits, k_chunk) the params buffer holds
        self.query_set = None
        self.query_resolve = None
        if ctx.has_timestamps:
            self.query_set = dev.create_query_set(type=wgpu.QueryType.timestamp, count=2)
            self.query_resolve = dev.create_buffer(
                size=_TIMESTAMP_BYTES, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC
            )
        # The hot path: wgpu-native's C API directly (direct_calls.py), unless
        # EXECUTORCH_WGPU_DIRECT=0 asks for wgpu-py's API (same commands, slower).
        self.direct = DirectCalls(dev, self.query_set) if use_direct_calls() else None
        self.capacity = 0        # rows of M the activation buffers hold
        self.partial: Optional[GPUBuffer] = None
        self.plans: Dict[Tuple[str, int], Plan] = {}

    def plan(self, kernel: str, m: int) -> Plan:
        key = (kernel, m)
        if key not in self.plans:
            rec = self.rec
            self.plans[key] = plan_call(kernel, m, rec.in_features, rec.out_features, rec.n_stride, rec.group_size,
                                        self.limits.max_workgroups_per_dim, self.precision)
        return self.plans[key]

    def _ensure_buffers(self, m: int, partial_bytes: int) -> None:
        """Grow x/y/staging (to m rows) and the split-K scratch buffer; rebuild the bind group when any grows."""
        dev, rec = self.ctx.device, self.rec
        grown = False
        if m > self.capacity:
            # Room for the next power of two of rows (fewer regrowths), within the binding limit.
            row_bytes = max(rec.in_features, rec.out_features) * 4
            rows = max(min(1 << (m - 1).bit_length(), rec.m_max, self.limits.max_binding_bytes // row_bytes), m)
            self.x = dev.create_buffer(label=f"{rec.name}.x", size=rows * rec.in_features * 4, usage=_STORAGE)
            y_bytes = rows * rec.out_features * 4
            self.y = dev.create_buffer(
                label=f"{rec.name}.y", size=y_bytes, usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC
            )
            self.ts_offset = (y_bytes + 7) // 8 * 8
            self.staging = dev.create_buffer(
                label=f"{rec.name}.staging",
                size=self.ts_offset + _TIMESTAMP_BYTES,
                usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST,
            )
            self.capacity = rows
            grown = True
        if self.partial is None or partial_bytes > self.partial.size:
            self.partial = dev.create_buffer(
                label=f"{rec.name}.partial", size=max(partial_bytes, 16), usage=wgpu.BufferUsage.STORAGE
            )
            grown = True
        if grown:
            buffers = {"params": self.params, "x": self.x, "qweight": self.qweight, "scales": self.scales,
                       "bias": self.bias, "y": self.y, "partial": self.partial,
                       **dict(zip(registry.Q4_OUTPUT_PARTS[1:], self.ctx.unused_part_buffers()))}
            self.bind_group = dev.create_bind_group(
                label=rec.name,
                layout=self.ctx.bind_group_layout("gemv"),   # the layout every q4gsw linear kernel shares
                entries=[
                    {"binding": i, "resource": {"buffer": buffers[b.name], "offset": 0, "size": buffers[b.name].size}}
                    for i, b in enumerate(registry.Q4_LINEAR_LAYOUT)
                ],
            )

    def check_input(self, x: torch.Tensor) -> int:
        return check_input(self.rec, x)

    def prepare(self, kernel: str, m: int) -> Plan:
        """Buffers, bind group and parameters for a call of `kernel` at M = m; returns its plan."""
        plan = self.plan(kernel, m)
        self._ensure_buffers(m, plan.partial_bytes)
        key = (m, plan.k_splits, plan.k_chunk)
        if self.params_for != key:
            rec = self.rec
            params = q4_params(plan, rec.in_features, rec.out_features, rec.n_stride, rec.group_size)
            self.ctx.device.queue.write_buffer(self.params, 0, _PARAMS.pack(*params))
            self.params_for = key
        return plan

    def encode(self, encoder, plan: Plan, timestamp_writes: Optional[dict] = None) -> None:
        """Record the plan's dispatches as one compute pass (prepare() first)."""
        cpass = encoder.begin_compute_pass(**({"timestamp_writes": timestamp_writes} if timestamp_writes else {}))
        self.record(cpass, plan)
        cpass.end()

    def record(self, cpass, plan: Plan) -> None:
        """Record the plan's dispatches into an open compute pass (prepare() first)."""
        cpass.set_bind_group(0, self.bind_group)
        for d in plan.dispatches:
            cpass.set_pipeline(self.ctx.pipeline(d.kernel))
            cpass.dispatch_workgroups(*d.grid)

    def __call__(self, x: torch.Tensor) -> tuple:
        """y = x @ dequant(W)^T + b on the GPU; returns (y, LinearCall)."""
        rec = self.rec
        m = self.check_input(x)
        plan = self.prepare(self.route.kernel_for(m), m)
        x_np = x.detach().contiguous().numpy()
        y_bytes = m * rec.out_features * 4
        if self.direct is not None:
            pipelines = [self.ctx.pipeline(d.kernel) for d in plan.dispatches]
            y, ticks = self.direct.run(x_np, self.x, self.bind_group, pipelines, [d.grid for d in plan.dispatches],
                                       self.y, y_bytes, self.staging, self.query_resolve, self.ts_offset)
            split = self.direct.last_split_us
        else:
            raw, ticks, split = run_through_wgpu_py(
                self.ctx.device, [(self.x, x_np)],
                [(self.ctx.pipeline(d.kernel), self.bind_group, *d.grid) for d in plan.dispatches],
                [(self.y, 0, y_bytes)], self.staging, y_bytes, self.query_set, self.query_resolve, self.ts_offset)
            y = raw.view(np.float32)
        gpu_us = None if ticks is None else self.ctx.ticks_to_us(*ticks)
        out = torch.from_numpy(y).reshape(*x.shape[:-1], rec.out_features)
        reason = self.reasons[0 if m == 1 else 1]
        return out, LinearCall(rec.name, m, rec.in_features, rec.out_features, plan.kernel, reason, gpu_us,
                               upload_us=split[0], submit_us=split[1], wait_us=split[2], readback_us=split[3])
