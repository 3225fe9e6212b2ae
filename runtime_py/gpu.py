"""The process-wide wgpu device and the compiled kernels.

One adapter and one device per process, shared by every loaded program:
created on first use, with timestamp queries when the adapter offers them.
Pipelines and bind group layouts are built from the kernel registry
(shaders/registry.py), once per process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import wgpu
from wgpu.backends.wgpu_native import lib as wgpu_native
from wgpu.classes import GPUAdapter, GPUBindGroupLayout, GPUBuffer, GPUComputePipeline, GPUDevice, GPUPipelineLayout

from executorch_wgpu.backend.serialization.blob import adapter_class_of
from executorch_wgpu.errors import NoAdapterError
from executorch_wgpu.shaders import registry
from executorch_wgpu.shaders.registry import Binding

log = logging.getLogger(__name__)

NO_ADAPTER_HELP = (
    "wgpu found no GPU adapter. On a machine without a GPU install Mesa's software Vulkan "
    "driver (lavapipe): `apt-get install mesa-vulkan-drivers`; on a GPU machine check the "
    "Vulkan driver (`vulkaninfo --summary`)."
)


@dataclass(frozen=True)
class PlanLimits:
    """The limits a layer's buffers and dispatches are planned against (split_linear.py)."""

    max_binding_bytes: int        # largest storage buffer one binding may hold
    max_workgroups_per_dim: int   # largest grid dimension of one dispatch


_limit_caps: dict = {}


@contextlib.contextmanager
def capped_plan_limits(max_binding_bytes: Optional[int] = None, max_workgroups_per_dim: Optional[int] = None):
    """Plan layers loaded inside this block against lower limits than the device's.

    The device's real limits (lavapipe: 128 MiB bindings, 65535 workgroups)
    need layers far too big for a CPU test to exercise the split paths; a cap
    makes them run on small layers. Caps only lower limits, never raise them.
    """
    saved = dict(_limit_caps)
    if max_binding_bytes is not None:
        _limit_caps["max_binding_bytes"] = max_binding_bytes
    if max_workgroups_per_dim is not None:
        _limit_caps["max_workgroups_per_dim"] = max_workgroups_per_dim
    try:
        yield
    finally:
        _limit_caps.clear()
        _limit_caps.update(saved)


@dataclass
class GPUContext:
    adapter: GPUAdapter
    device: GPUDevice
    has_timestamps: bool
    # Nanoseconds per timestamp tick (wgpu-native's queue period): 1 on NVIDIA,
    # other values on some AMD, Intel and Apple GPUs.
    timestamp_period_ns: float = 1.0
    # The device has shader-f16 (requested whenever the adapter offers it, unless registry.SHADER_F16_ENV is "0"):
    # f16 kernels (registry.VARIANTS) can run; without it a blob's f16 prefill runs in fp32
    # (q4_linear.prefill_precision_on).
    has_shader_f16: bool = False
    _layouts: Dict[Tuple[Binding, ...], Tuple[GPUBindGroupLayout, GPUPipelineLayout]] = \
        field(default_factory=dict)
    _pipelines: Dict[str, GPUComputePipeline] = field(default_factory=dict)
    _unused_parts: Tuple[GPUBuffer, ...] = ()

    def missing_features(self, kernel: str) -> List[str]:
        """The wgpu features a registry kernel needs (Kernel.features) that this device lacks, sorted."""
        has = {registry.SHADER_F16} if self.has_shader_f16 else set()
        return sorted(set(registry.kernel(kernel).features) - has)

    @property
    def adapter_name(self) -> str:
        info = self.adapter.info
        return f"{info.get('device', '?')} ({info.get('backend_type', '?')}, {info.get('description', '')})"

    @property
    def adapter_class(self) -> Optional[str]:
        """The adapter's kind as blobs name it ("discrete-gpu", "integrated-gpu", "cpu"); None when wgpu says Unknown."""
        return adapter_class_of(self.adapter.info.get("adapter_type"))

    def ticks_to_us(self, begin: int, end: int) -> Optional[float]:
        """Microseconds between two timestamp ticks of this device; None when they run backwards."""
        return (end - begin) * self.timestamp_period_ns / 1000.0 if end >= begin else None

    def unused_part_buffers(self) -> Tuple[GPUBuffer, ...]:
        """What a q4gsw layer binds to the output parts it does not have (registry.Q4_OUTPUT_PARTS after y): one
        small buffer per binding, which no kernel writes (store_y writes a part only when its columns exist)."""
        if not self._unused_parts:
            self._unused_parts = tuple(
                self.device.create_buffer(label=f"unused output part {name}", size=16, usage=wgpu.BufferUsage.STORAGE)
                for name in registry.Q4_OUTPUT_PARTS[1:])
        return self._unused_parts

    def plan_limits(self) -> PlanLimits:
        """The device's binding and grid limits, lowered by any capped_plan_limits() in force."""
        limits = self.device.limits
        binding = min(limits["max-storage-buffer-binding-size"], limits["max-buffer-size"])
        groups = limits["max-compute-workgroups-per-dimension"]
        return PlanLimits(
            max_binding_bytes=min(binding, _limit_caps.get("max_binding_bytes", binding)),
            max_workgroups_per_dim=min(groups, _limit_caps.get("max_workgroups_per_dim", groups)),
        )

    def bind_group_layout(self, kernel: str) -> GPUBindGroupLayout:
        """The bind group layout of a kernel (shared by every kernel with the same layout)."""
        return self._layout_objects(registry.kernel(kernel).layout)[0]

    def _layout_objects(self, layout: Tuple[Binding, ...]) -> tuple:
        if layout not in self._layouts:
            group = self.device.create_bind_group_layout(entries=[
                {"binding": i, "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": b.kind}}
                for i, b in enumerate(layout)
            ])
            self._layouts[layout] = (group, self.device.create_pipeline_layout(bind_group_layouts=[group]))
        return self._layouts[layout]

    def pipeline(self, name: str) -> GPUComputePipeline:
        """The compute pipeline of a registry kernel, compiled once per process."""
        if name not in self._pipelines:
            kernel = registry.kernel(name)
            module = self.device.create_shader_module(label=kernel.wgsl, code=registry.wgsl_source(name))
            self._pipelines[name] = self.device.create_compute_pipeline(
                label=name, layout=self._layout_objects(kernel.layout)[1],
                compute={"module": module, "entry_point": "main"},
            )
        return self._pipelines[name]


_context: Optional[GPUContext] = None
_lock = threading.Lock()


def gpu_context() -> GPUContext:
    """The shared GPU context; raises NoAdapterError when wgpu finds no adapter."""
    global _context
    with _lock:
        if _context is None:
            _context = _create_context()
        return _context


def _create_context() -> GPUContext:
    # Before the first adapter request: Mesa's drivers (lavapipe) complain on
    # stderr when XDG_RUNTIME_DIR is unset; give the process a private one.
    from executorch_wgpu.runtime_py.xdg import ensure_xdg_runtime_dir

    ensure_xdg_runtime_dir()
    try:
        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception as e:  # wgpu raises plain RuntimeError/GPUError when no backend loads
        raise NoAdapterError(f"{NO_ADAPTER_HELP} ({type(e).__name__}: {e})") from e
    if adapter is None:
        raise NoAdapterError(NO_ADAPTER_HELP)
    has_timestamps = "timestamp-query" in adapter.features
    has_shader_f16 = registry.SHADER_F16 in adapter.features and os.environ.get(registry.SHADER_F16_ENV) != "0"
    limits = adapter.limits
    device = adapter.request_device_sync(
        label="executorch_wgpu",
        required_features=(["timestamp-query"] if has_timestamps else []) + ([registry.SHADER_F16] if has_shader_f16
                                                                             else []),
        required_limits={
            "max-storage-buffer-binding-size": limits["max-storage-buffer-binding-size"],
            "max-buffer-size": limits["max-buffer-size"],
        },
    )
    period = wgpu_native.wgpuQueueGetTimestampPeriod(device.queue._internal) if has_timestamps else 1.0
    ctx = GPUContext(adapter, device, has_timestamps, timestamp_period_ns=float(period), has_shader_f16=has_shader_f16)
    ctx.unused_part_buffers()   # the context's own buffers exist from the start, not from the first load
    log.info("executorch_wgpu: using adapter %s (timestamps: %s, %g ns per tick, shader-f16: %s)", ctx.adapter_name,
             has_timestamps, ctx.timestamp_period_ns, has_shader_f16)
    return ctx
