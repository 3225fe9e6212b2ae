"""Opt-in int8 prefill (WebGPUPartitioner(precision="int8")): quantize_int8 and the shmem_int8 kernel. What every
prefill precision shares (blob, lowering, a model, the native runtime): test_prefill_precisions.py.

shmem_int8 quantizes x to int8 per block of 32 k and sums 32-k products of codes exactly (dot4I8Packed). Its
results are judged two ways: against the fp64 golden of the layer by reference.INT8_TOLERANCE (the error of
rounding x to int8: why that bar, its comment), and against the int8 math's own emulation
(reference.int8_activations, fp64) by INT8_EMULATION_TOLERANCE, which a wrong block scale, slot order or
rounding fails. An int8 result must also show more than FP32_CEILING of error against fp64, so a layer that
silently ran the fp32 kernel fails.
"""

from __future__ import annotations

import pytest
import torch

from executorch_wgpu.backend.routing import RouteOptions
from executorch_wgpu.backend.serialization.blob import N_ALIGN, round_up
from executorch_wgpu.errors import WebGPUDelegateError
from executorch_wgpu.runtime_py.gpu import gpu_context
from executorch_wgpu.runtime_py.q4_linear import Q4LinearGPU, plan_call
from executorch_wgpu.runtime_py.split_linear import Q4Linear
from executorch_wgpu.shaders import registry
from executorch_wgpu.tools.reference import (INT8_EMULATION_TOLERANCE, INT8_TOLERANCE, int8_activations,
                                             random_q4_layer, rel_err)

FP32_TOLERANCE = 1e-4  # every fp32 path keeps the project's bar
FP32_CEILING = 1e-5    # the fp32 kernels measure ~4e-7 here: an "int8" result this close was not int8


def int8_layer(k, n, gs, bias, seed=0, **routes):
    weights = random_q4_layer(k, n, gs, bias=bias, seed=seed)
    rec = weights.record("probe", RouteOptions(prefill_precision="int8", **routes))
    return Q4LinearGPU(gpu_context(), rec), weights


def assert_int8_result(y, weights, x):
    assert rel_err(y, weights.golden(int8_activations(x))) <= INT8_EMULATION_TOLERANCE
    assert FP32_CEILING < rel_err(y, weights.golden(x)) <= INT8_TOLERANCE


# ---- the kernel against fp64 ---------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n,gs,bias", [
    (70, 1024, 136, 32, True),    # partial M and N tiles; K split 4 ways (+ splitk_reduce)
    (2, 256, 30, 64, False),      # N not a multiple of 4: padded columns; two 32-k blocks per group of 64
    (129, 512, 64, 128, True),    # one row past a 128-row tile; one group scale over four blocks
    (128, 128, 200, 32, False),   # exact M tile, a partial 64-column tile, no split
    (3, 1056, 8, 32, True),       # K split into chunks that do not divide it; K = 33 blocks: a last tile of one
    (257, 2080, 272, 32, True),   # K = 65 blocks, 3 row tiles, 5 column tiles (the last partial)
    (2, 96, 40, 32, False),       # K = 3 blocks, no split: a half K tile read from the scratch buffer's start
])
def test_shmem_int8_matches_its_emulation_and_the_fp64_golden_within_the_int8_bound(m, k, n, gs, bias):
    layer, weights = int8_layer(k, n, gs, bias, decode_route="gemv", prefill_route="shmem")
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y, call = layer(x)
    assert call.kernel == "shmem_int8" and call.M == m and y.shape == (m, n)
    assert_int8_result(y, weights, x)


def test_a_nan_or_inf_activation_makes_its_rows_outputs_nan_not_a_finite_guess():
    """WGSL's max and clamp drop a NaN operand: without quantize_int8's check a NaN would become a finite code and
    its row a plausible wrong answer. The other rows are untouched."""
    layer, weights = int8_layer(256, 64, 32, True, prefill_route="shmem")
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(3))
    x[1, 40] = float("nan")
    x[4, 200] = float("inf")
    y, call = layer(x)
    assert call.kernel == "shmem_int8"
    assert bool(torch.isnan(y[[1, 4]]).all())
    finite = [0, 2, 3, 5]
    assert bool(torch.isfinite(y[finite]).all())
    assert rel_err(y[finite], weights.golden(int8_activations(x[finite]))) <= INT8_EMULATION_TOLERANCE


def test_shmem_int8_scales_each_block_by_its_own_maximum():
    """Blocks of one row that differ in magnitude by 1e12 keep their own precision (one scale per row, or per
    group, would round the small ones to zero), and an all-zero block has scale 0, not a NaN."""
    layer, weights = int8_layer(256, 64, 64, False, prefill_route="shmem")
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0))
    x[:, 32:64] *= 1e6
    x[:, 128:160] *= 1e-6
    x[2, :] = 0.0
    x[3, 64:96] = 0.0
    y, call = layer(x)
    assert call.kernel == "shmem_int8" and bool(torch.isfinite(y).all())
    assert rel_err(y, weights.golden(int8_activations(x))) <= INT8_EMULATION_TOLERANCE
    assert bool((y[2] == 0).all())   # a zero row: zero codes, zero scales
    small = torch.zeros_like(x)
    small[:, 128:160] = x[:, 128:160]   # the 1e-6 block alone, through the same kernel
    y_small, _ = layer(small)
    assert FP32_CEILING < rel_err(y_small, weights.golden(small)) <= INT8_TOLERANCE


def test_an_int8_call_quantizes_x_then_splits_k_in_chunks_of_its_own_k_tile():
    kernel = registry.kernel("shmem_int8")
    tm, tn, tk = (kernel.constants[c] for c in ("TM", "TN", "TK"))
    for m, k, n in ((3, 1056, 8), (70, 1024, 136), (512, 2048, 2048), (512, 8192, 2048)):
        p = plan_call("shmem", m, k, n, round_up(n, N_ALIGN), 32, precision="int8")
        quantize, gemm = p.dispatches[:2]
        assert p.kernel == gemm.kernel == "shmem_int8" and quantize.kernel == "quantize_int8"
        assert quantize.grid == (-(-m * k // 32 // 256), 1, 1)   # an invocation per row and block of 32 k
        assert gemm.grid == (-(-round_up(n, N_ALIGN) // tn), -(-m // tm), p.k_splits)
        assert p.k_chunk % tk == 0 and (p.k_splits - 1) * p.k_chunk < k <= p.k_splits * p.k_chunk
        # the scratch buffer: split-K sums, then the codes (a byte per element) and a scale per block
        assert p.partial_bytes == (p.k_splits * m * n * 4 if p.k_splits > 1 else 0) + m * k + m * (k // 32) * 4
    assert plan_call("shmem", 1, 1024, 64, 64, 32, precision="int8").kernel == "shmem"   # decode stays fp32
    assert plan_call("skinny", 40, 1024, 64, 64, 32, precision="int8").kernel == "skinny"   # no int8 variant
    with pytest.raises(WebGPUDelegateError, match="runs prefill calls"):   # named itself (bench), at M = 1
        plan_call("shmem_int8", 1, 1024, 64, 64, 32)


def test_int8_prefill_runs_only_where_the_route_gives_shmem():
    """Default rule: gemv at M == 1, skinny at small M (both fp32, 1e-4), shmem_int8 above; the reasons say so."""
    layer, weights = int8_layer(256, 1024, 32, True, adapter_rules=False)   # skinny up to M = 255, shmem above
    for m, kernel in ((1, "gemv"), (40, "skinny"), (300, "shmem_int8")):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
        y, call = layer(x)
        assert call.kernel == kernel
        if kernel == "shmem_int8":
            assert_int8_result(y, weights, x)
        else:
            assert rel_err(y, weights.golden(x)) <= FP32_TOLERANCE, (m, kernel)
    assert layer.reasons[1].endswith("; int8 prefill: shmem runs as shmem_int8")
    assert "int8" not in layer.reasons[0]
    regtiled, _ = int8_layer(256, 64, 32, False, prefill_route="regtiled")
    assert regtiled.reasons[1].endswith("; int8 prefill asked, but its prefill kernels (regtiled) have no int8 "
                                        "variant: fp32")


def test_split_layers_run_their_parts_and_row_chunks_in_int8():
    from executorch_wgpu.runtime_py.gpu import capped_plan_limits

    weights = random_q4_layer(256, 300, 32, bias=True, seed=4)
    rec = weights.record("split", RouteOptions(prefill_route="shmem", prefill_precision="int8"))
    with capped_plan_limits(max_binding_bytes=128 * 128):   # 128-column parts (128 bytes a column), 16 rows of x
        layer = Q4Linear(gpu_context(), rec)
    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(0))
    y, call = layer(x)
    assert len(layer.parts) == 3 and call.kernel == "shmem_int8" and "row chunk" in call.reason
    assert_int8_result(y, weights, x)
