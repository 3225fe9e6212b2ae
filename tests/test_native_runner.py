"""The native delegate without Python: wgq4_run_pte runs a .pte in ExecuTorch's C++ Module API.

Pins that a program lowered by our partitioner runs in a process with no
Python at all (the deployment path), with outputs equal to our Python
runtime's and close to the fp64 golden, through the kernels the blob routes
to -- and that `python -m executorch_wgpu native-bench` compares the runtimes
on the same program. The programs are lowered linears-only (one WGQ4 delegate
per q4 linear, CPU ops between them); a graph-mode program in ExecuTorch's C++
runtime is test_native_graph.py's and test_native_llama_runner.py's.

Every test is marked `native` (conftest): skipped, saying why, where the
library is not built; failed instead when EXECUTORCH_WGPU_REQUIRE_NATIVE=1.
"""

import json
import os
import subprocess

import pytest
import torch

import executorch_wgpu.native as native
from executorch_wgpu.runtime import Runtime
from executorch_wgpu.tools.models import quantize_q4
from executorch_wgpu.tools.reference import golden_linear, rel_err

pytestmark = pytest.mark.native


@pytest.fixture(scope="module")
def small_pte(lower, single_linear):
    """A q4 Linear(64, 16) for M in [1, 8]: the program of the error tests."""
    return lower(single_linear(64, 16), torch.randn(2, 64), dynamic_dims={0: (1, 8)}, linears_only=True)


def run_cpp(tmp_path, pte: bytes, x: torch.Tensor, iters: int = 2) -> tuple:
    """(output, the runner's JSON line) of wgq4_run_pte on pte with input x."""
    (tmp_path / "m.pte").write_bytes(pte)
    result, y = native.run_pte_in_cpp(tmp_path / "m.pte", x, warmup=1, iters=iters, timeout=300)
    return y, result


def run_python(pte: bytes, x: torch.Tensor) -> tuple:
    method = Runtime.get().load_program(pte).load_method("forward")
    y, = method.execute([x])
    return y, [c["kernel"] for c in method.route_report()]


@pytest.mark.parametrize("m, prefill_route", [(1, None), (7, None), (9, "regtiled"), (40, "shmem")])
def test_cpp_runner_matches_python_runtime_and_golden(tmp_path, m, prefill_route, lower, single_linear):
    model = single_linear(128, 48, bias=True, seed=m)
    options = {"prefill_route": prefill_route} if prefill_route else {}
    pte = lower(model, torch.randn(4, 128), dynamic_dims={0: (1, 64)}, linears_only=True, **options)
    x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m))
    y_cpp, result = run_cpp(tmp_path, pte, x)
    y_py, kernels = run_python(pte, x)
    assert tuple(y_cpp.shape) == (m, 48)
    assert rel_err(y_cpp, y_py) <= 1e-5
    assert rel_err(y_cpp, golden_linear(x, model[0])) <= 1e-4
    assert result["kernels"] == kernels
    assert result["delegate_calls_per_execute"] == 1


def test_cpp_runner_runs_cpu_ops_between_delegates(tmp_path, lower):
    """Linear -> GELU -> Linear: the non-delegated op runs on ExecuTorch's CPU kernels in the C++ process."""
    torch.manual_seed(1)
    model = quantize_q4(torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32)).eval())
    x = torch.randn(3, 64)
    pte = lower(model, x, linears_only=True)
    y_cpp, result = run_cpp(tmp_path, pte, x)
    y_py, kernels = run_python(pte, x)
    assert rel_err(y_cpp, y_py) <= 1e-5
    with torch.no_grad():
        assert rel_err(y_cpp, model(x)) <= 1e-4
    assert result["delegate_calls_per_execute"] == 2


def test_cpp_runner_refuses_a_wrong_input_shape_with_an_error_not_a_crash(tmp_path, small_pte):
    pte_path, x_path = tmp_path / "m.pte", tmp_path / "x.f32"
    pte_path.write_bytes(small_pte)
    torch.zeros(2, 32).numpy().tofile(x_path)
    done = subprocess.run([str(native.runner_path()), str(pte_path), "--shape", "2x32", "--input", str(x_path),
                           "--warmup", "0", "--iters", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, (done.returncode, done.stderr)   # an error exit, not a signal
    assert "forward() failed" in done.stderr


def test_native_bench_compares_three_runtimes_on_one_program(tmp_path):
    from executorch_wgpu.tools import native_bench

    native_bench.main(["--k", "64", "--n", "32", "--calls", "3", "--warmup", "1", "--rounds", "1",
                       "--out", str(tmp_path)])
    result = json.loads((tmp_path / "native_bench.json").read_text())
    assert set(result["runtimes"]) == {"python", "et-python", "et-cpp"}
    # M = 1 runs the blob's decode route for this kind of adapter (gemv on a GPU, regtiled on lavapipe).
    from executorch_wgpu.runtime_py.gpu import gpu_context
    from executorch_wgpu.tools.bench import routed_kernel

    expected = routed_kernel(None, 64, 32, 1, 32, gpu_context().adapter_class)
    for name, stats in result["runtimes"].items():
        assert stats["rel_diff_vs_python"] <= 1e-5, name
        assert stats["kernel"] == expected, name
        assert stats["execute_us"] >= stats["delegate_us"] > 0, name
    assert "| et-cpp |" in (tmp_path / "native_bench.md").read_text()
    floor = result["submit_roundtrip"]
    assert 0 < floor["p10_us"] <= floor["median_us"] <= floor["p90_us"]


def test_no_adapter_is_an_error_naming_the_fix_not_a_crash(tmp_path, small_pte):
    """No Vulkan driver (and no EGL fallback): loading the program fails with the lavapipe hint in the log."""
    (tmp_path / "m.pte").write_bytes(small_pte)
    env = dict(os.environ, VK_ICD_FILENAMES="/nonexistent/icd.json", VK_DRIVER_FILES="/nonexistent/icd.json",
               __EGL_VENDOR_LIBRARY_FILENAMES="/nonexistent/egl.json")
    done = subprocess.run([str(native.runner_path()), str(tmp_path / "m.pte"), "--shape", "2x64", "--warmup", "0",
                           "--iters", "1"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "WebGPUBackend: wgpu found no GPU adapter" in done.stderr and "mesa-vulkan-drivers" in done.stderr
