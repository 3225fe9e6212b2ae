"""The process-wide wgpu device and the compiled q4gsw kernels.

One adapter and one device per process, shared by every loaded program:
created on first use, with timestamp queries when the adapter offers them.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import threading
from dataclasses import dataclass, field
from typing import Dict, Optional

import wgpu

from executorch_wgpu.errors import NoAdapterError

log = logging.getLogger(__name__)

# Shader name -> WGSL file in shaders/. The first four are the kernels a
# blob routes to (blob.KERNELS); splitk_reduce is the shmem GEMM's epilogue.
SHADER_FILES = {
    "gemv": "q4gsw_gemv.wgsl",
    "regtiled": "q4gsw_gemm_regtiled.wgsl",
    "shmem": "q4gsw_gemm_shmem.wgsl",
    "skinny": "q4gsw_gemm_skinny.wgsl",
    "splitk_reduce": "q4gsw_splitk_reduce.wgsl",
    "stream_read": "stream_read.wgsl",     # the bench's bandwidth probe, not a model kernel
}

# Every q4gsw shader binds a subset of the same seven resources (see the
# shader headers), so one explicit layout serves all pipelines and one bind
# group per layer works with whichever kernel a call routes to.
_READ = wgpu.BufferBindingType.read_only_storage
_BINDINGS = (
    (0, wgpu.BufferBindingType.uniform),   # Params
    (1, _READ),                            # x
    (2, _READ),                            # qweight
    (3, _READ),                            # scales
    (4, _READ),                            # bias
    (5, wgpu.BufferBindingType.storage),   # y
    (6, wgpu.BufferBindingType.storage),   # partial sums of a split-K GEMM
)

NO_ADAPTER_HELP = (
    "wgpu found no GPU adapter. On a machine without a GPU install Mesa's software Vulkan "
    "driver (lavapipe): `apt-get install mesa-vulkan-drivers`; on a GPU machine check the "
    "Vulkan driver (`vulkaninfo --summary`)."
)


def read_shader(name: str) -> str:
    return importlib.resources.files("executorch_wgpu.shaders").joinpath(SHADER_FILES[name]).read_text()


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
    adapter: wgpu.GPUAdapter
    device: wgpu.GPUDevice
    has_timestamps: bool
    bind_group_layout: wgpu.GPUBindGroupLayout
    pipeline_layout: wgpu.GPUPipelineLayout
    _pipelines: Dict[str, wgpu.GPUComputePipeline] = field(default_factory=dict)

    @property
    def adapter_name(self) -> str:
        info = self.adapter.info
        return f"{info.get('device', '?')} ({info.get('backend_type', '?')}, {info.get('description', '')})"

    def plan_limits(self) -> PlanLimits:
        """The device's binding and grid limits, lowered by any capped_plan_limits() in force."""
        limits = self.device.limits
        binding = min(limits["max-storage-buffer-binding-size"], limits["max-buffer-size"])
        groups = limits["max-compute-workgroups-per-dimension"]
        return PlanLimits(
            max_binding_bytes=min(binding, _limit_caps.get("max_binding_bytes", binding)),
            max_workgroups_per_dim=min(groups, _limit_caps.get("max_workgroups_per_dim", groups)),
        )

    def pipeline(self, name: str) -> wgpu.GPUComputePipeline:
        """The compute pipeline of a shader, compiled once per process."""
        if name not in self._pipelines:
            module = self.device.create_shader_module(label=SHADER_FILES[name], code=read_shader(name))
            self._pipelines[name] = self.device.create_compute_pipeline(
                label=name, layout=self.pipeline_layout, compute={"module": module, "entry_point": "main"}
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
    try:
        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception as e:  # wgpu raises plain RuntimeError/GPUError when no backend loads
        raise NoAdapterError(f"{NO_ADAPTER_HELP} ({type(e).__name__}: {e})") from e
    if adapter is None:
        raise NoAdapterError(NO_ADAPTER_HELP)
    has_timestamps = "timestamp-query" in adapter.features
    limits = adapter.limits
    device = adapter.request_device_sync(
        label="executorch_wgpu",
        required_features=["timestamp-query"] if has_timestamps else [],
        required_limits={
            "max-storage-buffer-binding-size": limits["max-storage-buffer-binding-size"],
            "max-buffer-size": limits["max-buffer-size"],
        },
    )
    bind_group_layout = device.create_bind_group_layout(
        label="q4gsw",
        entries=[
            {"binding": b, "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": t}} for b, t in _BINDINGS
        ],
    )
    pipeline_layout = device.create_pipeline_layout(label="q4gsw", bind_group_layouts=[bind_group_layout])
    ctx = GPUContext(adapter, device, has_timestamps, bind_group_layout, pipeline_layout)
    log.info("executorch_wgpu: using adapter %s (timestamps: %s)", ctx.adapter_name, has_timestamps)
    return ctx
