"""Every kernel against the fp64 golden, on the default adapter, without going through a .pte."""

import pytest
import torch

from executorch_wgpu.backend.packing import pack_q4gsw_weights, unpack_q4gsw_weights
from executorch_wgpu.backend.routing import RouteOptions
from executorch_wgpu.backend.serialization.blob import N_ALIGN, round_up
from executorch_wgpu.runtime_py.gpu import gpu_context
from executorch_wgpu.runtime_py.q4_linear import Q4LinearGPU, plan_call
from executorch_wgpu.tools.reference import random_q4_layer, rel_err


def gpu_layer(k, n, gs, bias, decode, prefill, seed=0):
    """(the layer on the GPU with both kernels forced, its reference weights)."""
    weights = random_q4_layer(k, n, gs, bias=bias, seed=seed)
    rec = weights.record("probe", RouteOptions(decode_route=decode, prefill_route=prefill))
    return Q4LinearGPU(gpu_context(), rec), weights


def test_packing_round_trips_codes_including_padded_columns():
    codes = torch.randint(-8, 8, (13, 64), dtype=torch.int8)
    words = pack_q4gsw_weights(codes)
    assert words.size == 64 // 8 * 16
    assert torch.equal(unpack_q4gsw_weights(words, 64, 13), codes)


@pytest.mark.parametrize("kernel", ["gemv", "skinny", "regtiled", "shmem"])
@pytest.mark.parametrize("k,n,gs,bias", [
    (1024, 136, 32, True), (256, 30, 64, False), (512, 8, 128, True),
    (4096, 40, 32, True),   # 128 groups: the GEMV splits K over 2 workgroups + reduce
])
def test_decode_kernel_matches_fp64_golden(kernel, k, n, gs, bias):
    layer, weights = gpu_layer(k, n, gs, bias, decode=kernel, prefill="regtiled")
    x = torch.randn(1, k)
    y, call = layer(x)
    assert call.kernel == kernel
    assert y.shape == (1, n)
    assert rel_err(y, weights.golden(x)) < 1e-4


@pytest.mark.parametrize("kernel", ["skinny", "regtiled", "shmem"])
@pytest.mark.parametrize("m,k,n,gs,bias", [
    (70, 1024, 136, 32, True),    # partial tiles in M and N for both kernels; shmem splits K 4 ways
    (2, 256, 30, 64, False),      # N not a multiple of 4: padded columns
    (129, 512, 64, 128, True),    # one row past a 128-row shmem tile; K split 2 ways
    (128, 128, 200, 32, False),   # exact M tiles, partial N tile, no split
    (3, 1056, 8, 32, True),       # K split into chunks that do not divide it (4 x 272 > 1056)
])
def test_prefill_kernel_matches_fp64_golden(kernel, m, k, n, gs, bias):
    layer, weights = gpu_layer(k, n, gs, bias, decode="gemv", prefill=kernel)
    x = torch.randn(m, k)
    y, call = layer(x)
    assert call.kernel == kernel and call.M == m
    assert rel_err(y, weights.golden(x)) < 1e-4


@pytest.mark.parametrize("m,k,n,splits", [(70, 1024, 136, 4), (129, 512, 64, 2), (128, 128, 200, 1),
                                           (512, 2048, 2048, 4), (512, 2048, 8192, 1), (2048, 8192, 2048, 1)])
def test_shmem_splits_k_only_when_tiles_leave_the_gpu_idle(m, k, n, splits):
    plan = plan_call("shmem", m, k, n, round_up(n, N_ALIGN), 32)
    assert plan.k_splits == splits
    assert plan.k_chunk % 16 == 0 and (plan.k_splits - 1) * plan.k_chunk < k <= plan.k_splits * plan.k_chunk
    assert [d.kernel for d in plan.dispatches] == ["shmem"] + (["splitk_reduce"] if splits > 1 else [])


@pytest.mark.parametrize("k,gs,splits", [(2048, 32, 1), (4096, 32, 2), (8192, 32, 4), (8192, 128, 1), (65536, 32, 8)])
def test_gemv_splits_k_over_workgroups_only_for_long_k(k, gs, splits):
    plan = plan_call("gemv", 1, k, 100, round_up(100, N_ALIGN), gs)
    assert plan.k_splits == splits
    assert plan.k_chunk % gs == 0 and (plan.k_splits - 1) * plan.k_chunk < k <= plan.k_splits * plan.k_chunk
    assert [d.kernel for d in plan.dispatches] == ["gemv"] + (["splitk_reduce"] if splits > 1 else [])


def test_layer_serves_decode_and_prefill_alternately():
    layer, weights = gpu_layer(256, 40, 32, True, decode="gemv", prefill="shmem")
    for m in (1, 17, 1, 100, 3, 1):
        x = torch.randn(m, 256)
        y, call = layer(x)
        assert call.kernel == ("gemv" if m == 1 else "shmem")
        assert rel_err(y, weights.golden(x)) < 1e-4


def test_timestamps_are_reported_when_the_adapter_has_them():
    layer, _ = gpu_layer(128, 16, 32, False, decode="gemv", prefill="regtiled")
    _, call = layer(torch.randn(1, 128))
    if gpu_context().has_timestamps:
        assert call.gpu_us is not None and call.gpu_us > 0
    else:
        assert call.gpu_us is None


def test_direct_c_api_path_and_wgpu_py_path_give_identical_results(monkeypatch):
    direct, weights = gpu_layer(512, 72, 32, True, decode="gemv", prefill="shmem", seed=3)
    monkeypatch.setenv("EXECUTORCH_WGPU_DIRECT", "0")
    through_py, _ = gpu_layer(512, 72, 32, True, decode="gemv", prefill="shmem", seed=3)
    assert direct.direct is not None and through_py.direct is None
    for m in (1, 5, 1, 130):
        x = torch.randn(m, 512)
        (y_direct, call_direct), (y_py, call_py) = direct(x), through_py(x)
        assert torch.equal(y_direct, y_py)
        assert rel_err(y_direct, weights.golden(x)) < 1e-4
        assert (call_direct.gpu_us is None) == (call_py.gpu_us is None) == (not gpu_context().has_timestamps)
        assert all(v >= 0 for v in (call_direct.upload_us, call_direct.submit_us, call_direct.wait_us,
                                    call_direct.readback_us))
