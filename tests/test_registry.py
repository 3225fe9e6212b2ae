"""The kernel registry is the one list of kernels, and GPU timestamps are in nanoseconds.

The registry (shaders/registry.py) declares each kernel once; the WGSL a
device compiles, the blob's route ids, the planners and the bench all read it.
These tests pin what that promises: every shader file belongs to a kernel,
every kernel compiles on this adapter as assembled, a blob names kernels by
their registry route id, and timestamp ticks are scaled by the device's period.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from executorch_wgpu.backend.routing import RouteOptions
from executorch_wgpu.backend.serialization.blob import deserialize_q4linear, serialize_q4linear
from executorch_wgpu.runtime_py.gpu import gpu_context
from executorch_wgpu.runtime_py.q4_linear import Q4LinearGPU
from executorch_wgpu.shaders import registry
from executorch_wgpu.tools import bench
from executorch_wgpu.tools.reference import random_q4_layer, rel_err


def test_every_wgsl_file_is_a_registry_kernel_or_a_prelude_it_includes():
    used = {k.wgsl for k in registry.KERNELS} | {f for k in registry.KERNELS for f in k.prelude}
    on_disk = {p.name for p in registry.SHADER_DIR.glob("*.wgsl")}
    assert on_disk == used


def test_kernel_files_declare_no_bindings_params_or_constants_of_their_own():
    """Those come from the registry's generated header, so they cannot disagree with the runtimes."""
    for name in sorted({k.wgsl for k in registry.KERNELS} | {f for k in registry.KERNELS for f in k.prelude}):
        text = re.sub(r"//[^\n]*", "", (registry.SHADER_DIR / name).read_text())
        assert not re.search(r"@binding\(|struct Params|@workgroup_size\(\s*\d", text), name


def test_assembled_source_binds_each_declared_resource_at_its_layout_index():
    source = registry.wgsl_source("gemv")
    assert "@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;" in source
    assert "@group(0) @binding(6) var<storage, read_write> partial: array<f32>;" in source
    assert "const SLICES: u32 = 64u;" in source and "const WORKGROUP_Y: u32 = 64u;" in source
    skinny = registry.wgsl_source("skinny")
    assert "partial:" not in skinny.split("// q4gsw skinny GEMM")[0]   # skinny binds no split-K scratch


@pytest.mark.parametrize("name", [k.name for k in registry.KERNELS])
def test_every_registry_kernel_compiles_on_this_adapter(name):
    missing = set(registry.kernel(name).features) - set(gpu_context().device.features)
    if missing:
        pytest.skip(f"{name} needs {sorted(missing)}, which adapter {gpu_context().adapter_name} lacks")
    assert gpu_context().pipeline(name) is not None


def test_precision_variants_stand_in_for_a_routable_kernel_and_f16_ones_enable_f16_first():
    assert {precision for precision, _ in registry.VARIANTS} == set(registry.PRECISIONS) - {"fp32"}
    for (precision, fp32), variant in registry.VARIANTS.items():
        assert registry.kernel(variant).precision == precision and registry.variant(fp32, precision) == variant
        assert registry.kernel(variant).route_id is None and registry.kernel(fp32).route_id is not None
        assert variant not in registry.PREFILL_KERNELS   # routes, tables and tune never pick a precision
        assert registry.wgsl_source(variant).startswith("enable f16;\n") == (precision == "f16")
    assert "enable" not in registry.wgsl_source("shmem")
    assert registry.variant("skinny", "int8") == "skinny"   # no variant: the kernel itself


def test_route_ids_number_the_routable_kernels_from_zero():
    assert [k.route_id for k in registry.ROUTABLE] == list(range(len(registry.ROUTABLE)))
    assert "gemv" in registry.DECODE_KERNELS and "gemv" not in registry.PREFILL_KERNELS


@pytest.mark.parametrize("kernel", registry.PREFILL_KERNELS)
def test_a_blob_names_each_forced_kernel_by_its_route_id_and_reads_it_back(kernel):
    layer = random_q4_layer(64, 32, seed=1)
    record = layer.record("probe", RouteOptions(prefill_route=kernel, decode_route=kernel))
    back = deserialize_q4linear(serialize_q4linear(record))
    assert back.route.prefill_kernel == back.route.decode_kernel == kernel


def test_unknown_kernel_names_fail_with_the_registry_listed():
    with pytest.raises(KeyError, match="gemv"):
        registry.kernel("no_such_kernel")


# ---- GPU timestamps are ticks times the device's period --------------------------------------------


def test_route_report_gpu_time_is_ticks_times_the_timestamp_period(monkeypatch):
    """An adapter whose tick is not 1 ns (some AMD, Intel, Apple) reports true µs, not ticks / 1000."""
    ctx = gpu_context()
    if not ctx.has_timestamps:
        pytest.skip(f"adapter {ctx.adapter_name} has no timestamp queries")
    layer = random_q4_layer(64, 32, seed=2)
    gpu = Q4LinearGPU(ctx, layer.record("timed"))
    assert gpu.direct is not None, "the hot path (direct calls) is the default"
    real_run = gpu.direct.run

    def run_with_known_ticks(*args, **kwargs):
        y, _ = real_run(*args, **kwargs)
        return y, (1_000, 3_000)

    monkeypatch.setattr(gpu.direct, "run", run_with_known_ticks)
    monkeypatch.setattr(ctx, "timestamp_period_ns", 7.0)
    x = torch.randn(1, 64)
    y, call = gpu(x)
    assert call.gpu_us == pytest.approx(2_000 * 7.0 / 1000.0)
    assert rel_err(y, layer.golden(x)) < 1e-4


def test_bench_gpu_times_are_ticks_times_the_timestamp_period(monkeypatch):
    """With a faked period of 1 ms per tick every measured time is a whole number of milliseconds."""
    ctx = gpu_context()
    if not ctx.has_timestamps:
        pytest.skip(f"adapter {ctx.adapter_name} has no timestamp queries")
    probe = bench.StreamProbe(ctx)
    monkeypatch.setattr(ctx, "timestamp_period_ns", 1e6)
    data = ctx.device.create_buffer(size=1 << 16, usage="STORAGE")
    sink = ctx.device.create_buffer(size=256 * 4 * 4, usage="STORAGE")
    bind = ctx.device.create_bind_group(layout=probe.layout, entries=[
        {"binding": 0, "resource": {"buffer": data, "offset": 0, "size": data.size}},
        {"binding": 1, "resource": {"buffer": sink, "offset": 0, "size": sink.size}},
    ])

    def encode(enc, ts):
        cpass = enc.begin_compute_pass(**({"timestamp_writes": ts} if ts else {}))
        cpass.set_pipeline(probe.pipeline)
        cpass.set_bind_group(0, bind)
        cpass.dispatch_workgroups(4, 1, 1)
        cpass.end()

    us = np.array(bench.time_gpu_passes(ctx, encode, reps=5, warmup=1))
    assert (us > 0).any() and np.all(us % 1000.0 == 0.0), us


def test_ticks_running_backwards_give_no_time():
    assert gpu_context().ticks_to_us(5, 3) is None
