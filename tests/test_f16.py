"""Opt-in f16 prefill (WebGPUPartitioner(precision="f16")): the shmem_f16 kernel, and both runtimes on a device
without shader-f16. What every prefill precision shares (blob, lowering, a model, the native runtime):
test_prefill_precisions.py.

f16 results are judged by reference.F16_TOLERANCE (2e-3, max |y - golden| / max |golden|; why that bar: its
comment), fp32 ones by the project's 1e-4. An f16 result must also show more than FP32_CEILING of error, so a
layer that silently ran the fp32 kernel fails.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import numpy as np
import pytest
import torch
import wgpu

import executorch_wgpu.runtime_py.q4_linear as q4_linear_module
from executorch_wgpu.backend.routing import RouteOptions
from executorch_wgpu.runtime_py.gpu import GPUContext, gpu_context
from executorch_wgpu.runtime_py.q4_linear import Q4LinearGPU, plan_call
from executorch_wgpu.runtime_py.split_linear import Q4Linear
from executorch_wgpu.shaders import registry
from executorch_wgpu.tools.models import quantize_q4
from executorch_wgpu.tools.reference import F16_TOLERANCE, golden_linear, random_q4_layer, rel_err

FP32_TOLERANCE = 1e-4  # every fp32 path keeps the project's bar
FP32_CEILING = 1e-5    # the fp32 kernels measure ~4e-7 here: an "f16" result this close was not f16


def needs_shader_f16():
    ctx = gpu_context()
    if not ctx.has_shader_f16:
        pytest.skip(f"adapter {ctx.adapter_name} lacks {registry.SHADER_F16}: the f16 kernel cannot run here "
                    "(test_without_shader_f16_an_f16_blob_runs_fp32_and_says_so covers this adapter)")


def f16_layer(k, n, gs, bias, seed=0, ctx=None, **routes):
    weights = random_q4_layer(k, n, gs, bias=bias, seed=seed)
    rec = weights.record("probe", RouteOptions(prefill_precision="f16", **routes))
    return Q4LinearGPU(ctx or gpu_context(), rec), weights


# ---- the kernel against fp64 ---------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n,gs,bias", [
    (70, 1024, 136, 32, True),    # partial M and N tiles; K split 4 ways (+ splitk_reduce)
    (2, 256, 30, 64, False),      # N not a multiple of 4: padded columns; one 32-k tile per group of 64
    (129, 512, 64, 128, True),    # one row past a 128-row tile; K split 2 ways
    (128, 128, 200, 32, False),   # exact M tile, partial N tile, no split
    (3, 1056, 8, 32, True),       # K split into chunks that do not divide it (4 x 288 > 1056)
    (257, 2080, 272, 32, True),   # K = 65 tiles of 32, 3 row tiles, 3 column tiles (the last partial)
])
def test_shmem_f16_matches_the_fp64_golden_within_the_f16_bound(m, k, n, gs, bias):
    needs_shader_f16()
    layer, weights = f16_layer(k, n, gs, bias, decode_route="gemv", prefill_route="shmem")
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y, call = layer(x)
    assert call.kernel == "shmem_f16" and call.M == m and y.shape == (m, n)
    err = rel_err(y, weights.golden(x))
    assert FP32_CEILING < err <= F16_TOLERANCE, err


def test_shmem_f16_splits_k_in_chunks_of_its_own_k_tile():
    tk = registry.kernel("shmem_f16").constants["TK"]
    for m, k, n in ((3, 1056, 8), (70, 1024, 136), (512, 2048, 2048)):
        fp32, f16 = plan_call("shmem", m, k, n, n, 32), plan_call("shmem", m, k, n, n, 32, precision="f16")
        assert f16.kernel == "shmem_f16" and [d.kernel for d in f16.dispatches][0] == "shmem_f16"
        assert f16.k_chunk % tk == 0 and (f16.k_splits - 1) * f16.k_chunk < k <= f16.k_splits * f16.k_chunk
        assert f16.k_splits == fp32.k_splits   # the same occupancy rule; only the chunk rounding differs
    assert plan_call("shmem", 1, 1024, 64, 64, 32, precision="f16").kernel == "shmem"   # decode stays fp32
    assert plan_call("skinny", 40, 1024, 64, 64, 32, precision="f16").kernel == "skinny"   # no f16 variant


def test_f16_prefill_runs_only_where_the_route_gives_shmem():
    """Default rule: gemv at M == 1, skinny at small M (both fp32, 1e-4), shmem_f16 above; the reasons say so."""
    needs_shader_f16()
    layer, weights = f16_layer(256, 1024, 32, True, adapter_rules=False)   # skinny up to M = 255, shmem above
    for m, kernel in ((1, "gemv"), (40, "skinny"), (300, "shmem_f16")):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
        y, call = layer(x)
        assert call.kernel == kernel
        err = rel_err(y, weights.golden(x))
        assert err <= (F16_TOLERANCE if kernel == "shmem_f16" else FP32_TOLERANCE), (m, err)
    assert layer.reasons[1].endswith("; f16 prefill: shmem runs as shmem_f16")
    assert "f16" not in layer.reasons[0]
    regtiled, _ = f16_layer(256, 64, 32, False, prefill_route="regtiled")
    assert regtiled.reasons[1].endswith("; f16 prefill asked, but its prefill kernels (regtiled) have no f16 "
                                        "variant: fp32")


def test_split_layers_run_their_parts_and_row_chunks_in_f16():
    from executorch_wgpu.runtime_py.gpu import capped_plan_limits

    needs_shader_f16()
    weights = random_q4_layer(256, 300, 32, bias=True, seed=4)
    rec = weights.record("split", RouteOptions(prefill_route="shmem", prefill_precision="f16"))
    with capped_plan_limits(max_binding_bytes=128 * 128):   # 128-column parts (128 bytes a column), 16 rows of x
        layer = Q4Linear(gpu_context(), rec)
    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(0))
    y, call = layer(x)
    assert len(layer.parts) == 3 and call.kernel == "shmem_f16" and "row chunk" in call.reason
    assert FP32_CEILING < rel_err(y, weights.golden(x)) <= F16_TOLERANCE


# ---- without shader-f16 -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctx_without_f16() -> GPUContext:
    """The default adapter with a device that has no shader-f16: what an adapter lacking it gives the runtime."""
    ctx = gpu_context()
    device = ctx.adapter.request_device_sync(
        label="no shader-f16", required_features=["timestamp-query"] if ctx.has_timestamps else [],
        required_limits={"max-storage-buffer-binding-size": ctx.device.limits["max-storage-buffer-binding-size"],
                         "max-buffer-size": ctx.device.limits["max-buffer-size"]})
    assert registry.SHADER_F16 not in device.features
    return GPUContext(ctx.adapter, device, ctx.has_timestamps, ctx.timestamp_period_ns, has_shader_f16=False)


def test_without_shader_f16_an_f16_blob_runs_fp32_and_says_so(ctx_without_f16, monkeypatch, caplog):
    monkeypatch.setattr(q4_linear_module, "_logged_fallbacks", set())
    with caplog.at_level(logging.WARNING, logger=q4_linear_module.__name__):
        layers = [f16_layer(512, 136, 32, True, seed=s, ctx=ctx_without_f16, prefill_route="shmem") for s in (0, 1)]
    fallbacks = [r for r in caplog.records if "lacks shader-f16" in r.getMessage()]
    assert len(fallbacks) == 1   # once per process, not per layer
    for layer, weights in layers:
        x = torch.randn(70, 512, generator=torch.Generator().manual_seed(1))
        y, call = layer(x)
        assert call.kernel == "shmem"
        assert rel_err(y, weights.golden(x)) <= FP32_TOLERANCE
        assert call.reason.endswith("; f16 prefill asked, but this adapter lacks shader-f16: shmem in fp32")


# Both runtimes in a process started with registry.SHADER_F16_ENV=0 (the native device is one per process):
# argv .pte, x.npy; prints {"native": [y, calls], "python": [y, calls]} as one JSON line.
NO_F16_WORKER = """
import json, sys
import numpy as np, torch
import executorch_wgpu.native as native
from executorch.runtime import Runtime as EtRuntime
from executorch_wgpu.runtime import Runtime as PyRuntime
lib = native.load()
pte, x = open(sys.argv[1], "rb").read(), torch.from_numpy(np.load(sys.argv[2]))
(y,) = EtRuntime.get().load_program(pte).load_method("forward").execute([x])
out = {"native": [y.tolist(), lib.take_calls()]}
method = PyRuntime.get().load_program(pte).load_method("forward")
(y,) = method.execute([x])
out["python"] = [y.tolist(), method.route_report()]
print(json.dumps(out))
"""


@pytest.mark.native
@pytest.mark.parametrize("linears_only", [False, True], ids=["graph", "linears-only"])
def test_both_runtimes_without_shader_f16_run_an_f16_program_in_fp32_and_say_so_once(lower, tmp_path, linears_only):
    torch.manual_seed(5)
    up, down = torch.nn.Linear(512, 256), torch.nn.Linear(256, 136)
    model = quantize_q4(torch.nn.Sequential(up, down).eval(), 32)   # in place: up and down are its layers
    pte = lower(model, torch.randn(5, 512), {0: (1, 300)}, prefill_route="shmem", precision="f16",
                linears_only=linears_only)
    (tmp_path / "f16.pte").write_bytes(pte)
    x = torch.randn(70, 512, generator=torch.Generator().manual_seed(2))
    np.save(tmp_path / "x.npy", x.numpy())
    done = subprocess.run([sys.executable, "-c", NO_F16_WORKER, str(tmp_path / "f16.pte"), str(tmp_path / "x.npy")],
                          env={**os.environ, registry.SHADER_F16_ENV: "0"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    golden = golden_linear(golden_linear(x, up), down)
    for runtime in ("native", "python"):
        y, calls = out[runtime]
        assert [c["kernel"] for c in calls] == ["shmem", "shmem"], runtime
        assert all("; f16 prefill asked, but this adapter lacks shader-f16: shmem in fp32" in c["reason"]
                   for c in calls), runtime
        assert rel_err(torch.tensor(y), golden) <= FP32_TOLERANCE, runtime
    assert out["native"][1][0]["reason"] == out["python"][1][0]["reason"]
    assert done.stderr.count("lacks shader-f16: its layers' prefill runs in fp32") == 2   # once per runtime


def test_wgpu_names_shader_f16_as_the_registry_does():
    assert registry.SHADER_F16 == wgpu.FeatureName.shader_f16
