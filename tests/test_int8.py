"""Opt-in int8 prefill (WebGPUPartitioner(precision="int8")): the shmem_int8 kernel, the blob field, both runtimes.

shmem_int8 quantizes x to int8 per block of 32 k and sums 32-k products of codes exactly (dot4I8Packed). Its
results are judged two ways: against the fp64 golden of the layer by reference.INT8_TOLERANCE (the error of
rounding x to int8: why that bar, its comment), and against the int8 math's own emulation
(reference.int8_activations, fp64) by INT8_EMULATION_TOLERANCE, which a wrong block scale, slot order or
rounding fails. An int8 result must also show more than FP32_CEILING of error against fp64, so a layer that
silently ran the fp32 kernel fails.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import pytest
import torch

from executorch_wgpu import WebGPUPartitioner
from executorch_wgpu.backend.routing import RouteOptions
from executorch_wgpu.backend.serialization.blob import N_ALIGN, deserialize_q4linear, round_up, serialize_q4linear
from executorch_wgpu.runtime import Runtime as PyRuntime
from executorch_wgpu.runtime_py.gpu import gpu_context
from executorch_wgpu.runtime_py.q4_linear import Q4LinearGPU, plan_call
from executorch_wgpu.runtime_py.split_linear import Q4Linear
from executorch_wgpu.shaders import registry
from executorch_wgpu.tools import models
from executorch_wgpu.tools.reference import (INT8_EMULATION_TOLERANCE, INT8_TOLERANCE, golden_linear,
                                             int8_activations, random_q4_layer, rel_err)

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
])
def test_shmem_int8_matches_its_emulation_and_the_fp64_golden_within_the_int8_bound(m, k, n, gs, bias):
    layer, weights = int8_layer(k, n, gs, bias, decode_route="gemv", prefill_route="shmem")
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y, call = layer(x)
    assert call.kernel == "shmem_int8" and call.M == m and y.shape == (m, n)
    assert_int8_result(y, weights, x)


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


# ---- the blob and the lowering ------------------------------------------------------------------


def test_the_blob_and_the_partitioner_carry_int8():
    rec = dataclasses.replace(random_q4_layer(64, 32, seed=1).record(), prefill_precision="int8")
    assert deserialize_q4linear(serialize_q4linear(rec)).prefill_precision == "int8"
    specs = WebGPUPartitioner(precision="int8").delegation_spec.compile_specs
    assert RouteOptions.from_compile_specs([s for s in specs if s.key != "graph"]).prefill_precision == "int8"


# ---- a model ------------------------------------------------------------------------------------

LLAMA_PROMPT = [1, 57, 300, 7, 1200, 99, 4000, 12, 8, 33, 1021, 5, 77, 2048, 3000, 11]   # M = 16 at prefill
LLAMA_NEW_TOKENS = 12


def llama_run(model, precision: str) -> tuple:
    """(greedy tokens, prefill kernels, first logits) of the small Llama in graph mode, its prefill forced onto
    shmem (on lavapipe the CPU rule would route it to regtiled, which has no int8 variant)."""
    pte = models.export_llama_pte(model, max_tokens=64, linears_only=False, prefill_route="shmem", precision=precision)
    method = PyRuntime.get().load_program(pte).load_method("forward")
    runner = models.method_runner(method)
    prefill: Dict[str, Any] = {}

    def run(tokens, pos):
        logits = runner(tokens, pos)
        prefill.setdefault("logits", logits.clone())
        return logits

    def on_step(step, _):
        if step == 0:
            prefill["kernels"] = {c["kernel"] for c in method.route_report()}

    tokens = models.greedy_generate(run, LLAMA_PROMPT, LLAMA_NEW_TOKENS, on_step)
    return tokens, prefill["kernels"], prefill["logits"]


def test_llama_greedy_tokens_in_int8_prefill_equal_fp32s():
    model = models.build_llama("small", llm_ops=True, n_layers=2)   # two layers keep lavapipe's shmem runs short
    tokens32, kernels32, logits32 = llama_run(model, "fp32")
    tokens8, kernels8, logits8 = llama_run(model, "int8")
    # M = 16 runs shmem (forced), lm_head's last position M = 1 the decode kernel (fp32 in both)
    assert "shmem" in kernels32 and kernels8 == kernels32 - {"shmem"} | {"shmem_int8"}
    assert FP32_CEILING < rel_err(logits8, logits32) <= INT8_TOLERANCE
    assert tokens8 == tokens32


# ---- the native runtime ---------------------------------------------------------------------------


@pytest.mark.native
@pytest.mark.parametrize("linears_only", [False, True], ids=["graph", "linears-only"])
def test_native_runtime_runs_an_int8_program_as_the_python_runtime_does(native_lib, lower, single_linear, blobs_in,
                                                                        python_blob_fields, linears_only):
    from executorch.runtime import Runtime as EtRuntime

    model = single_linear(512, 136, bias=True, seed=3)
    pte = lower(model, torch.randn(5, 512), {0: (1, 300)}, prefill_route="shmem", decode_route="gemv",
                precision="int8", linears_only=linears_only)
    if linears_only:   # the WGQ4 blob is the delegate's own (graph mode keeps it in named data)
        (blob,) = blobs_in(pte)
        assert native_lib.describe_blob(blob) == python_blob_fields(blob)
        assert python_blob_fields(blob)["prefill_precision"] == "int8"
    et = EtRuntime.get().load_program(pte).load_method("forward")
    py = PyRuntime.get().load_program(pte).load_method("forward")
    assert et is not None
    for m in (1, 70, 257):
        x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m))
        native_lib.take_calls()
        (y_native,) = et.execute([x])
        y_native = y_native.clone()
        (native_call,) = native_lib.take_calls()
        (y_py,) = py.execute([x])
        (py_call,) = py.route_report()
        kernel = "gemv" if m == 1 else "shmem_int8"
        assert native_call["kernel"] == py_call["kernel"] == kernel
        assert native_call["reason"] == py_call["reason"]
        assert torch.equal(y_native, y_py)   # the same kernel, plan and parameters on the same device
        golden = golden_linear(x, model[0])
        assert rel_err(y_native, golden) <= (INT8_TOLERANCE if m > 1 else FP32_TOLERANCE)


@pytest.mark.native
def test_cpp_and_python_plan_int8_calls_the_same_way(native_lib):
    for m in (1, 2, 3, 127, 129, 300, 1000, 4096):
        for k in (256, 1024, 1056, 2080, 8192):
            for n in (8, 100, 2048, 32000):
                for max_groups in (65535, 3):
                    n_stride = round_up(n, N_ALIGN)
                    got = native_lib.plan("shmem", m, k, n, n_stride, 32, max_groups, precision="int8")
                    try:
                        p = plan_call("shmem", m, k, n, n_stride, 32, max_groups, precision="int8")
                    except Exception as e:   # a grid beyond max_groups: both refuse
                        assert "error" in got and "exceeds" in str(e)
                        continue
                    assert got == {"kernel": p.kernel, "m": p.m, "k_splits": p.k_splits, "k_chunk": p.k_chunk,
                                   "partial_bytes": p.partial_bytes,
                                   "dispatches": [[d.kernel, *d.grid] for d in p.dispatches]}, (m, k, n, max_groups)
