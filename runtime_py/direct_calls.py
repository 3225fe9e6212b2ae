"""A call's command sequence -- a layer's or a graph's -- issued straight through wgpu-native's C API.

Why this exists: wgpu-py wraps every WebGPU call in Python (descriptor
structs built per call, error capture, a poller thread that resolves buffer
maps), which costs far more host time per delegate call than a decode
call's GPU work (figures: docs/PERFORMANCE.md, "Runtime overhead"). A
layer's call is always the same few commands on objects created at load, so
here they go through the same cffi handle wgpu-py itself uses, with the C
descriptors built once, and the readback map is waited for on the calling
thread (wgpuDevicePoll) instead of through a thread handoff.

Only the hot path lives here. Buffers, pipelines and bind groups are created
with wgpu-py at load (q4_linear.py), where its validation and error messages
are worth their cost. A map that fails (e.g. the device was lost) raises.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from wgpu.backends.wgpu_native import ffi, lib

from executorch_wgpu.errors import WebGPUDelegateError
from executorch_wgpu.shaders.registry import DISPATCHES_PER_SUBMIT

SPIN_SECONDS = 0.002   # how long a call polls without blocking before it sleeps in wgpuDevicePoll


class DirectCalls:
    """Encode, submit and read back one layer's calls without per-call Python wrappers."""

    def __init__(self, device, query_set=None):
        self._device = device._internal
        self._queue = device.queue._internal
        self._encoder_desc = ffi.new("WGPUCommandEncoderDescriptor *")
        self._buffer_desc = ffi.new("WGPUCommandBufferDescriptor *")
        self._commands = ffi.new("WGPUCommandBuffer[1]")
        # Pass descriptors by (first pass of the call, last pass of the call): with timestamps, the
        # call's first pass writes tick 0 at its start and its last pass tick 1 at its end.
        self._pass_descs: Dict[Tuple[bool, bool], Any] = {}
        self._timestamp_writes: List[Any] = []   # referenced by the descriptors: kept alive with them
        self._query_set = None if query_set is None else query_set._internal
        unset = lib.WGPU_QUERY_SET_INDEX_UNDEFINED
        for first in (False, True):
            for last in (False, True):
                desc = ffi.new("WGPUComputePassDescriptor *")
                if query_set is not None and (first or last):
                    ts = ffi.new("WGPUPassTimestampWrites *")
                    ts.querySet = self._query_set
                    ts.beginningOfPassWriteIndex = 0 if first else unset
                    ts.endOfPassWriteIndex = 1 if last else unset
                    desc.timestampWrites = ts
                    self._timestamp_writes.append(ts)
                self._pass_descs[first, last] = desc
        self._map_status = [0]
        self.last_split_us = (0.0, 0.0, 0.0, 0.0)   # upload, encode + submit, wait, readback of the last run

        status_cell = self._map_status   # not self: a callback holding self would make a reference cycle

        @ffi.callback("void(WGPUMapAsyncStatus, WGPUStringView, void *, void *)")
        def on_mapped(status, message, userdata1, userdata2):
            status_cell[0] = status

        self._on_mapped = on_mapped   # keep the callback alive as long as this object
        self._map_info = ffi.new("WGPUBufferMapCallbackInfo *")
        self._map_info.mode = lib.WGPUCallbackMode_AllowProcessEvents
        self._map_info.callback = on_mapped

    def run(self, x: np.ndarray, x_buffer, bind_group, pipelines: Sequence, grids: Sequence,
            y_buffer, y_bytes: int, staging, ts_resolve=None, ts_offset: int = 0) -> tuple:
        """Upload x, run the dispatches in one pass, copy y (and timestamps) to staging, read them back.

        Returns (y as float32 array, (tick0, tick1) or None).
        """
        bind = bind_group._internal
        data, ticks = self.run_dispatches([(x_buffer, np.ascontiguousarray(x))],
                                          [(p._internal, bind, *grid) for p, grid in zip(pipelines, grids)],
                                          [(y_buffer, 0, y_bytes)], staging, y_bytes, ts_resolve, ts_offset)
        return data.view(np.float32), ticks

    def run_dispatches(self, writes: Sequence, dispatches: Sequence, copies: Sequence, staging, read_bytes: int,
                       ts_resolve=None, ts_offset: int = 0) -> tuple:
        """A call: write buffers, run the dispatches (one pass per submit), copy results to staging, read back.

        writes: (buffer, contiguous array); dispatches: (pipeline, bind group, gx, gy, gz) as wgpu-py
        objects' C handles (`._internal`); copies: (source buffer, staging offset, bytes). Returns
        (a copy of the staging bytes [0, read_bytes) as a uint8 array, (tick0, tick1) or None);
        last_split_us says where the host time went.
        """
        t0 = time.perf_counter()
        for buffer, data in writes:
            lib.wgpuQueueWriteBuffer(self._queue, buffer._internal, 0, ffi.from_buffer(data), data.nbytes)
        t1 = time.perf_counter()
        set_pipeline, set_bind_group = lib.wgpuComputePassEncoderSetPipeline, lib.wgpuComputePassEncoderSetBindGroup
        dispatch, null = lib.wgpuComputePassEncoderDispatchWorkgroups, ffi.NULL
        # Long calls go in several submits of DISPATCHES_PER_SUBMIT dispatches, so the GPU runs the
        # first while the host still encodes the rest; queue order keeps them in sequence.
        starts = range(0, max(len(dispatches), 1), DISPATCHES_PER_SUBMIT)
        for start in starts:
            last = start == starts[-1]
            encoder = lib.wgpuDeviceCreateCommandEncoder(self._device, self._encoder_desc)
            cpass = lib.wgpuCommandEncoderBeginComputePass(encoder, self._pass_descs[start == 0, last])
            for pipeline, bind_group, gx, gy, gz in dispatches[start:start + DISPATCHES_PER_SUBMIT]:
                set_pipeline(cpass, pipeline)
                set_bind_group(cpass, 0, bind_group, 0, null)
                dispatch(cpass, gx, gy, gz)
            lib.wgpuComputePassEncoderEnd(cpass)
            lib.wgpuComputePassEncoderRelease(cpass)
            if not last:
                self._submit(encoder)
        for source, offset, nbytes in copies:
            lib.wgpuCommandEncoderCopyBufferToBuffer(encoder, source._internal, 0, staging._internal, offset, nbytes)
        total = read_bytes
        if self._query_set is not None and ts_resolve is not None:
            lib.wgpuCommandEncoderResolveQuerySet(encoder, self._query_set, 0, 2, ts_resolve._internal, 0)
            lib.wgpuCommandEncoderCopyBufferToBuffer(encoder, ts_resolve._internal, 0, staging._internal, ts_offset, 16)
            total = ts_offset + 16
        self._submit(encoder)
        t2 = time.perf_counter()
        self._map_status[0] = 0
        lib.wgpuBufferMapAsync(staging._internal, lib.WGPUMapMode_Read, 0, max(total, 4), self._map_info[0])
        # Spin on non-blocking polls first: a decode call's GPU work takes tens of
        # µs, less than a blocking wait's wake-up; block only once it runs long.
        spin_until = time.perf_counter() + SPIN_SECONDS
        while self._map_status[0] == 0:
            lib.wgpuDevicePoll(self._device, time.perf_counter() > spin_until, ffi.NULL)
        if self._map_status[0] != lib.WGPUMapAsyncStatus_Success:
            raise WebGPUDelegateError(f"reading the result back failed (map status {self._map_status[0]})")
        t3 = time.perf_counter()
        try:
            mapped = ffi.buffer(lib.wgpuBufferGetConstMappedRange(staging._internal, 0, max(total, 4)), max(total, 4))
            data = np.frombuffer(mapped, dtype=np.uint8, count=read_bytes).copy()
            ticks: Optional[tuple] = None
            if total > read_bytes:
                t = np.frombuffer(mapped, dtype=np.uint64, count=2, offset=ts_offset)
                ticks = (int(t[0]), int(t[1]))
        finally:
            lib.wgpuBufferUnmap(staging._internal)
        t4 = time.perf_counter()
        self.last_split_us = ((t1 - t0) * 1e6, (t2 - t1) * 1e6, (t3 - t2) * 1e6, (t4 - t3) * 1e6)
        return data, ticks

    def _submit(self, encoder) -> None:
        self._commands[0] = lib.wgpuCommandEncoderFinish(encoder, self._buffer_desc)
        lib.wgpuQueueSubmit(self._queue, 1, self._commands)
        lib.wgpuCommandBufferRelease(self._commands[0])
        lib.wgpuCommandEncoderRelease(encoder)


def run_through_wgpu_py(device, writes: Sequence, dispatches: Sequence, copies: Sequence, staging, read_bytes: int,
                        query_set=None, ts_resolve=None, ts_offset: int = 0) -> tuple:
    """The call of DirectCalls.run_dispatches through wgpu-py's API (EXECUTORCH_WGPU_DIRECT=0), with wgpu-py
    objects for dispatches' pipelines and bind groups: (staging bytes as a uint8 array, ticks or None, split µs)."""
    t0 = time.perf_counter()
    for buffer, data in writes:
        device.queue.write_buffer(buffer, 0, data)
    t1 = time.perf_counter()
    encoder = device.create_command_encoder()
    timestamps = None
    if query_set is not None:
        timestamps = {"query_set": query_set, "beginning_of_pass_write_index": 0, "end_of_pass_write_index": 1}
    cpass = encoder.begin_compute_pass(timestamp_writes=timestamps)
    for pipeline, bind_group, gx, gy, gz in dispatches:
        cpass.set_pipeline(pipeline)
        cpass.set_bind_group(0, bind_group)
        cpass.dispatch_workgroups(gx, gy, gz)
    cpass.end()
    for source, offset, nbytes in copies:
        encoder.copy_buffer_to_buffer(source, 0, staging, offset, nbytes)
    if query_set is not None and ts_resolve is not None:
        encoder.resolve_query_set(query_set, 0, 2, ts_resolve, 0)
        encoder.copy_buffer_to_buffer(ts_resolve, 0, staging, ts_offset, 16)
    device.queue.submit([encoder.finish()])
    t2 = time.perf_counter()
    # "READ_NOSYNC": wgpu-py otherwise submits an empty command buffer before
    # every read map (its workaround for reading a buffer no submit has
    # touched); ours was just written by the submit above.
    staging.map_sync("READ_NOSYNC")
    t3 = time.perf_counter()
    try:
        data = np.frombuffer(staging.read_mapped(0, max(read_bytes, 4), copy=False), dtype=np.uint8,
                             count=read_bytes).copy()
        ticks: Optional[tuple] = None
        if query_set is not None and ts_resolve is not None:
            t = np.frombuffer(staging.read_mapped(ts_offset, 16, copy=False), dtype=np.uint64)
            ticks = (int(t[0]), int(t[1]))
    finally:
        staging.unmap()
    t4 = time.perf_counter()
    return data, ticks, ((t1 - t0) * 1e6, (t2 - t1) * 1e6, (t3 - t2) * 1e6, (t4 - t3) * 1e6)
