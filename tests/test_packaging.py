"""Packaging: a plain (non-editable) wheel works outside the checkout, and the public modules stay light.

The wheel is built from a copy of the sources (building in place would write build/lib and an
egg-info into the checkout, beside the editable link tree), installed with `pip install --target`,
and used by a fresh interpreter whose only executorch_wgpu is that one (PYTHONPATH, a working
directory outside the checkout; its dependencies come from the venv). No XDG_RUNTIME_DIR is set
there: the runtime makes its own, so Mesa's drivers print nothing about it.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import executorch_wgpu
from executorch_wgpu import native

REPO = Path(__file__).resolve().parents[1]
XDG_COMPLAINT = "XDG_RUNTIME_DIR"   # Mesa's "error: XDG_RUNTIME_DIR is invalid or not set in the environment."
# Not sources: caches, build outputs, the venv, and what the tests and tools write.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache",
                                     ".pytest_cache", ".hypothesis", ".gpu", "bench-out", "llama_bench_out", "*.pte",
                                     "tests", "docs")


def clean_env(**extra: str) -> dict:
    """This process's environment without what would hide a packaging fault: no hand-set XDG_RUNTIME_DIR,
    no EXECUTORCH_WGPU_NATIVE_LIB, no PYTHONPATH of ours."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_RUNTIME_DIR", native.LIBRARY_VARIABLE, "PYTHONPATH")}
    env.update(extra)
    return env


def run_python(code: str, cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, root / "src", ignore=NOT_SOURCES)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"),
                          str(root / "src")], check=True, capture_output=True, timeout=300)
    (built,) = (root / "dist").glob("executorch_wgpu-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps",
                    "--no-index", "--target", str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    return target


def test_the_wheel_holds_the_package_its_data_and_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shaders = {p.name for p in (REPO / "shaders").glob("*.wgsl")}
    assert shaders and {f"executorch_wgpu/shaders/{s}" for s in shaders} <= names
    assert {"executorch_wgpu/py.typed", "executorch_wgpu/backend/serialization/schema.fbs",
            "executorch_wgpu/runtime.py", "executorch_wgpu/native_backend.py"} <= names
    assert not [n for n in names if n.startswith(("executorch_wgpu/tests/", "executorch_wgpu/runtime_native/"))]
    (dist_info,) = {n.split("/")[0] for n in names if ".dist-info/" in n}
    assert f"{dist_info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: BSD-3-Clause" in metadata


# Runs in the installed wheel, outside the checkout: argv = site, .pte, input, output, native library or "".
INSTALLED_CHECK = r"""
import importlib.resources, json, os, sys
site, pte, x_path, y_path, native_lib = sys.argv[1:]
from executorch_wgpu.runtime import Runtime
report = {"heavy_after_import": sorted(m for m in ("torch", "executorch.exir", "torchao") if m in sys.modules)}
import executorch_wgpu
report["package"] = executorch_wgpu.__file__
report["shaders"] = sorted(p.name for p in importlib.resources.files("executorch_wgpu.shaders").iterdir()
                           if p.name.endswith(".wgsl"))
import torch
x = torch.load(x_path)
(y,) = Runtime.get().load_program(pte).load_method("forward").execute([x])
report["xdg"] = os.environ.get("XDG_RUNTIME_DIR")
from executorch_wgpu import native
report["unavailable"] = native.unavailable_reason()
try:
    import executorch_wgpu.native_backend
except native.NativeUnavailableError as e:
    report["register_error"] = str(e)
outputs = {"python": y}
if native_lib:
    os.environ["EXECUTORCH_WGPU_NATIVE_LIB"] = native_lib
    import executorch_wgpu.native_backend   # a failed import is not kept: this one registers
    from executorch.runtime import Runtime as ExecuTorchRuntime
    program = ExecuTorchRuntime.get().load_program(pte)
    (outputs["native"],) = program.load_method("forward").execute([x])
torch.save(outputs, y_path)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def installed_run(site, tiny_program, tmp_path_factory):
    """INSTALLED_CHECK on tiny_program: (its report, its outputs, the native library it was given or None)."""
    work = tmp_path_factory.mktemp("installed")
    (work / "tiny.pte").write_bytes(tiny_program.pte)
    torch.save(tiny_program.x, work / "x.pt")
    lib = native.library_path() if native.unavailable_reason() is None else None
    done = run_python(INSTALLED_CHECK, work, clean_env(PYTHONPATH=str(site), TMPDIR=str(work)), str(site),
                      str(work / "tiny.pte"), str(work / "x.pt"), str(work / "y.pt"), str(lib or ""))
    assert XDG_COMPLAINT not in done.stderr, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report, torch.load(work / "y.pt"), lib, work


def test_the_installed_wheel_runs_a_pte_with_its_shaders_and_says_how_to_get_the_native_library(site,
                                                                                                 installed_run,
                                                                                                 tiny_program):
    report, outputs, _, work = installed_run
    assert Path(report["package"]).parent == site / "executorch_wgpu"
    assert report["heavy_after_import"] == []
    assert report["shaders"] == sorted(p.name for p in (REPO / "shaders").glob("*.wgsl"))
    torch.testing.assert_close(outputs["python"], tiny_program.y, rtol=1e-6, atol=1e-6)
    # The runtime made XDG_RUNTIME_DIR itself: a private folder under the temporary directory.
    xdg = Path(report["xdg"])
    assert xdg.parent == work and (xdg.stat().st_mode & 0o777) == 0o700
    # No library beside an installed package: the message names the variable and how to build one.
    for message in (report["unavailable"], report["register_error"]):
        assert native.LIBRARY_VARIABLE in message and "make setup" in message and "cmake" in message


@pytest.mark.native
def test_the_installed_wheel_registers_the_native_delegate_named_by_the_variable(installed_run, tiny_program):
    _, outputs, lib, _ = installed_run
    assert lib is not None
    torch.testing.assert_close(outputs["native"], tiny_program.y, rtol=1e-5, atol=1e-5)


# ---- in the checkout ---------------------------------------------------------------------------

LIGHT_IMPORT = r"""
import json, sys
import executorch_wgpu.runtime
print(json.dumps(sorted(sys.modules)))
"""


def test_importing_the_runtime_pulls_in_no_exporter(tmp_path):
    """ExecuTorch's exporter (executorch.exir's __init__: to_edge, torch.export, dynamo, torchao) takes seconds;
    `import executorch_wgpu.runtime` needs none of it (the first load_program imports what loading needs)."""
    done = run_python(LIGHT_IMPORT, tmp_path, clean_env())
    modules = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "executorch_wgpu.runtime" in modules
    assert not modules & {"torchao", "executorch.exir", "executorch.exir.program", "torch.export", "torch._dynamo"}


def test_the_runtime_module_still_gives_program_and_method():
    import executorch_wgpu.runtime as runtime
    from executorch_wgpu.runtime_py import program

    assert runtime.Runtime is program.Runtime
    assert (runtime.Program, runtime.Method) == (program.Program, program.Method)
    assert set(runtime.__all__) <= set(dir(runtime))


def test_dir_lists_the_lazy_api():
    names = set(dir(executorch_wgpu))
    assert {"WebGPUPartitioner", "WebGPUBackend", "__version__"} <= names
    assert set(executorch_wgpu.__all__) <= names
    for name in executorch_wgpu.__all__:
        assert getattr(executorch_wgpu, name) is not None
    with pytest.raises(AttributeError):
        executorch_wgpu.no_such_name  # noqa: B018


def test_no_xdg_runtime_dir_is_needed(tmp_path):
    """Without XDG_RUNTIME_DIR, Mesa's Vulkan drivers (lavapipe) print a complaint at the first adapter request;
    the runtime gives the process a private one first."""
    code = ("import os\nfrom executorch_wgpu.runtime_py.gpu import gpu_context\n"
            "gpu_context()\nprint(os.environ['XDG_RUNTIME_DIR'])")
    done = run_python(code, tmp_path, clean_env(TMPDIR=str(tmp_path)))
    assert XDG_COMPLAINT not in done.stderr, done.stderr
    xdg = Path(done.stdout.strip().splitlines()[-1])
    assert xdg.parent == tmp_path and xdg.name == f"executorch_wgpu-xdg-{os.getuid()}"
    assert (xdg.stat().st_mode & 0o777) == 0o700
