"""One q4gsw linear layer on the GPU: weights uploaded once, one submit per call.

A call writes x and the per-call parameters, records one compute pass with
the kernel the blob routes this M to, copies y (and the pass's two
timestamps, when the adapter has them) into one staging buffer, submits once
and maps that buffer once.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import wgpu

from executorch_wgpu.backend.serialization.blob import Q4LinearRecord
from executorch_wgpu.errors import InputError, WebGPUDelegateError
from executorch_wgpu.runtime.gpu import GPUContext

_STORAGE = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_DST
_TIMESTAMP_BYTES = 16   # two u64 ticks
_PARAMS = struct.Struct("<8I")


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

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def workgroup_grid(kernel: str, m: int, n_stride: int) -> tuple:
    """Workgroups to dispatch; tile sizes match the shader headers."""
    if kernel == "gemv":
        return (math.ceil(n_stride / 64), 1, 1)
    if kernel == "regtiled":
        return (math.ceil(n_stride / 32), math.ceil(m / 32), 1)
    if kernel == "shmem":
        return (math.ceil(n_stride / 64), math.ceil(m / 64), 1)
    raise WebGPUDelegateError(f"unknown kernel {kernel!r}")


class Q4LinearGPU:
    def __init__(self, ctx: GPUContext, rec: Q4LinearRecord):
        self.ctx = ctx
        self.rec = rec
        dev = ctx.device
        limit = dev.limits["max-storage-buffer-binding-size"]
        if rec.qweight.nbytes > limit:
            raise WebGPUDelegateError(
                f"layer {rec.name!r}: packed weights are {rec.qweight.nbytes} bytes, more than this "
                f"adapter's max-storage-buffer-binding-size {limit}; layers that large are not supported yet"
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
        self.query_set = None
        self.query_resolve = None
        if ctx.has_timestamps:
            self.query_set = dev.create_query_set(type=wgpu.QueryType.timestamp, count=2)
            self.query_resolve = dev.create_buffer(
                size=_TIMESTAMP_BYTES, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC
            )
        self.capacity = 0   # rows of M the activation buffers hold

    def _ensure_capacity(self, m: int) -> None:
        """Grow x/y/staging buffers (and the bind group) to hold m rows; they are reused across calls."""
        if m <= self.capacity:
            return
        rows = min(max(1 << (m - 1).bit_length(), 1), self.rec.m_max)
        rows = max(rows, m)
        dev, rec = self.ctx.device, self.rec
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
        buffers = (self.params, self.x, self.qweight, self.scales, self.bias, self.y)
        self.bind_group = dev.create_bind_group(
            label=rec.name,
            layout=self.ctx.bind_group_layout,
            entries=[{"binding": i, "resource": {"buffer": b, "offset": 0, "size": b.size}} for i, b in enumerate(buffers)],
        )
        self.capacity = rows

    def check_input(self, x: torch.Tensor) -> int:
        """M of this call; raises InputError for anything the layer was not exported for."""
        rec = self.rec
        if x.dtype != torch.float32:
            raise InputError(f"layer {rec.name!r}: input dtype is {x.dtype}, expected torch.float32")
        if x.dim() < 1 or x.shape[-1] != rec.in_features:
            raise InputError(
                f"layer {rec.name!r}: input shape {tuple(x.shape)} does not end in K={rec.in_features}"
            )
        m = x.numel() // rec.in_features
        if not rec.m_min <= m <= rec.m_max:
            raise InputError(
                f"layer {rec.name!r}: M={m} (product of leading dims of {tuple(x.shape)}) is outside the "
                f"exported range [{rec.m_min}, {rec.m_max}]"
            )
        return m

    def __call__(self, x: torch.Tensor) -> tuple:
        """y = x @ dequant(W)^T + b on the GPU; returns (y, LinearCall)."""
        rec = self.rec
        m = self.check_input(x)
        kernel = rec.route.kernel_for(m)
        self._ensure_capacity(m)
        dev = self.ctx.device
        dev.queue.write_buffer(self.params, 0, _PARAMS.pack(m, rec.in_features, rec.out_features, rec.n_stride,
                                                            rec.group_size, 0, 0, 0))
        dev.queue.write_buffer(self.x, 0, x.detach().contiguous().numpy())

        encoder = dev.create_command_encoder()
        pass_args = {}
        if self.query_set is not None:
            pass_args["timestamp_writes"] = {
                "query_set": self.query_set,
                "beginning_of_pass_write_index": 0,
                "end_of_pass_write_index": 1,
            }
        cpass = encoder.begin_compute_pass(**pass_args)
        cpass.set_pipeline(self.ctx.pipeline(kernel))
        cpass.set_bind_group(0, self.bind_group)
        cpass.dispatch_workgroups(*workgroup_grid(kernel, m, rec.n_stride))
        cpass.end()
        y_bytes = m * rec.out_features * 4
        encoder.copy_buffer_to_buffer(self.y, 0, self.staging, 0, y_bytes)
        if self.query_set is not None:
            encoder.resolve_query_set(self.query_set, 0, 2, self.query_resolve, 0)
            encoder.copy_buffer_to_buffer(self.query_resolve, 0, self.staging, self.ts_offset, _TIMESTAMP_BYTES)
        dev.queue.submit([encoder.finish()])

        self.staging.map_sync(wgpu.MapMode.READ)
        try:
            y = np.frombuffer(self.staging.read_mapped(0, y_bytes), dtype=np.float32).copy()
            gpu_us = None
            if self.query_set is not None:
                t0, t1 = np.frombuffer(self.staging.read_mapped(self.ts_offset, _TIMESTAMP_BYTES), dtype=np.uint64)
                gpu_us = float(t1 - t0) / 1000.0 if t1 >= t0 else None
        finally:
            self.staging.unmap()
        out = torch.from_numpy(y).reshape(*x.shape[:-1], rec.out_features)
        phase = "M == 1: decode route" if m == 1 else "M > 1: prefill route"
        reason = f"{phase} ({rec.route.source}); {rec.route.reason}"
        return out, LinearCall(rec.name, m, rec.in_features, rec.out_features, kernel, reason, gpu_us)
