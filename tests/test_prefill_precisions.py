"""What every opt-in prefill precision (WebGPUPartitioner(precision="f16" | "int8")) shares: the blob field and the
compile spec that carry it, a model's greedy tokens against fp32's, and the native runtime planning and running
its variant kernels (registry.VARIANTS) as the Python runtime does. The kernels themselves: test_f16.py and
test_int8.py.

A variant's result is judged by its precision's bar (reference.TOLERANCES), fp32 ones by the project's 1e-4. Where
the device lacks a variant's features (f16: shader-f16) its layers run fp32, and these tests expect that.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import pytest
import torch

from executorch_wgpu import WebGPUPartitioner
from executorch_wgpu.backend.routing import RouteOptions
from executorch_wgpu.backend.serialization.blob import N_ALIGN, deserialize_q4linear, round_up, serialize_q4linear
from executorch_wgpu.errors import BlobFormatError
from executorch_wgpu.runtime import Runtime as PyRuntime
from executorch_wgpu.runtime_py.gpu import gpu_context
from executorch_wgpu.runtime_py.q4_linear import plan_call
from executorch_wgpu.shaders import registry
from executorch_wgpu.tools import models
from executorch_wgpu.tools.reference import TOLERANCES, golden_linear, random_q4_layer, rel_err

PRECISIONS = [p for p in registry.PRECISIONS if p != "fp32"]
FP32_CEILING = 1e-5    # the fp32 kernels measure ~4e-7 here: a variant's result this close did not run the variant


def shmem_runs(precision: str) -> str:
    """The kernel a prefill call routed to shmem runs in this precision on this device."""
    variant = registry.variant("shmem", precision)
    return "shmem" if gpu_context().missing_features(variant) else variant


def tolerance(kernel: str) -> float:
    return TOLERANCES[registry.kernel(kernel).precision]


# ---- the blob and the lowering ------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_blob_records_the_precision_and_fp32_blobs_are_unchanged(precision):
    weights = random_q4_layer(64, 32, seed=1)
    fp32 = weights.record("probe", RouteOptions(prefill_route="shmem"))
    other = dataclasses.replace(fp32, prefill_precision=precision)
    assert deserialize_q4linear(serialize_q4linear(other)).prefill_precision == precision
    assert deserialize_q4linear(serialize_q4linear(fp32)).prefill_precision == "fp32"
    # fp32 writes no field (absent means fp32): its bytes are what a writer before the field wrote.
    assert len(serialize_q4linear(other)) > len(serialize_q4linear(fp32))


def test_an_unknown_precision_value_is_a_corrupted_blob(monkeypatch):
    rec = dataclasses.replace(random_q4_layer(64, 32, seed=1).record(), prefill_precision="bf16")
    with monkeypatch.context() as patch:   # a writer that knows one more precision
        patch.setattr(registry, "PRECISIONS", (*registry.PRECISIONS, "bf16"))
        blob = serialize_q4linear(rec)
    with pytest.raises(BlobFormatError, match=f"unknown prefill precision enum value {len(registry.PRECISIONS)}"):
        deserialize_q4linear(blob)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_partitioner_validates_and_carries_the_precision(precision):
    with pytest.raises(ValueError, match="precision must be one of"):
        WebGPUPartitioner(precision="fp8")
    specs = WebGPUPartitioner(precision=precision).delegation_spec.compile_specs
    assert RouteOptions.from_compile_specs([s for s in specs if s.key != "graph"]).prefill_precision == precision
    assert all(s.key != "prefill_precision" for s in WebGPUPartitioner().delegation_spec.compile_specs)


# ---- a model ------------------------------------------------------------------------------------

LLAMA_PROMPT = [1, 57, 300, 7, 1200, 99, 4000, 12, 8, 33, 1021, 5, 77, 2048, 3000, 11]   # M = 16 at prefill
LLAMA_NEW_TOKENS = 12


def llama_run(model, precision: str) -> tuple:
    """(greedy tokens, prefill kernels, first logits) of the small Llama in graph mode, its prefill forced onto
    shmem (on lavapipe the CPU rule would route it to regtiled, which has no variants)."""
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


@pytest.fixture(scope="module")
def llama():
    """The two-layer test Llama (two layers keep lavapipe's shmem runs short) and its fp32 run."""
    model = models.build_llama("small", llm_ops=True, n_layers=2)
    return model, llama_run(model, "fp32")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_llama_greedy_tokens_in_each_prefill_precision_equal_fp32s(llama, precision):
    kernel = shmem_runs(precision)
    if kernel == "shmem":
        pytest.skip(f"adapter {gpu_context().adapter_name} lacks {registry.variant('shmem', precision)}'s features")
    model, (tokens32, kernels32, logits32) = llama
    tokens, kernels, logits = llama_run(model, precision)
    # M = 16 runs shmem (forced), lm_head's last position M = 1 the decode kernel (fp32 in both)
    assert "shmem" in kernels32 and kernels == kernels32 - {"shmem"} | {kernel}
    assert FP32_CEILING < rel_err(logits, logits32) <= tolerance(kernel)
    assert tokens == tokens32


# ---- the native runtime ---------------------------------------------------------------------------


@pytest.mark.native
@pytest.mark.parametrize("linears_only", [False, True], ids=["graph", "linears-only"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_native_runtime_reads_and_runs_a_program_in_each_precision_as_the_python_runtime_does(
        native_lib, lower, single_linear, blobs_in, python_blob_fields, precision, linears_only):
    from executorch.runtime import Runtime as EtRuntime

    model = single_linear(512, 136, bias=True, seed=3)
    pte = lower(model, torch.randn(5, 512), {0: (1, 300)}, prefill_route="shmem", decode_route="gemv",
                precision=precision, linears_only=linears_only)
    if linears_only:   # the WGQ4 blob is the delegate's own (graph mode keeps it in named data)
        (blob,) = blobs_in(pte)
        assert native_lib.describe_blob(blob) == python_blob_fields(blob)
        assert python_blob_fields(blob)["prefill_precision"] == precision
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
        kernel = "gemv" if m == 1 else shmem_runs(precision)
        assert native_call["kernel"] == py_call["kernel"] == kernel
        assert native_call["reason"] == py_call["reason"]
        assert torch.equal(y_native, y_py)   # the same kernel, plan and parameters on the same device
        assert rel_err(y_native, golden_linear(x, model[0])) <= tolerance(kernel)


@pytest.mark.native
@pytest.mark.parametrize("precision", PRECISIONS)
def test_cpp_and_python_plan_calls_in_each_precision_the_same_way(native_lib, precision):
    for m in (1, 2, 3, 127, 129, 300, 1000, 4096):
        for k in (256, 1024, 1056, 2080, 8192):
            for n in (8, 100, 2048, 32000):
                for max_groups in (65535, 3):
                    n_stride = round_up(n, N_ALIGN)
                    got = native_lib.plan("shmem", m, k, n, n_stride, 32, max_groups, precision=precision)
                    try:
                        p = plan_call("shmem", m, k, n, n_stride, 32, max_groups, precision=precision)
                    except Exception as e:   # a grid beyond max_groups: both refuse
                        assert "error" in got and "exceeds" in str(e)
                        continue
                    assert got == {"kernel": p.kernel, "m": p.m, "k_splits": p.k_splits, "k_chunk": p.k_chunk,
                                   "partial_bytes": p.partial_bytes,
                                   "dispatches": [[d.kernel, *d.grid] for d in p.dispatches]}, (m, k, n, max_groups)
