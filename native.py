"""Load the native delegate into this process, so ExecuTorch's own runtime runs our .pte.

    import executorch_wgpu.native_backend   # registers WebGPUBackend: executorch_wgpu.native.register()
    from executorch.runtime import Runtime
    method = Runtime.get().load_program("model.pte").load_method("forward")
    y, = method.execute([x])

The library (libexecutorch_wgpu_native.so, built by CMakeLists.txt; `make
setup` builds it into build/native/; an installed executorch_wgpu finds it
through $EXECUTORCH_WGPU_NATIVE_LIB) registers the backend "WebGPUBackend"
with ExecuTorch's registry when it is loaded. Without it ExecuTorch's runtime
says only "Backend WebGPUBackend is not registered". It links libexecutorch.so and
wgpu-native from the installed executorch and wgpu packages; importing
executorch's Python extension first makes both runtimes share one registry.

Beyond registering, the library has a small C API (runtime_native/c_api.h)
this module wraps for tests and the benchmark: its reading of a blob, its
call plans, its route report, the WGSL it compiles for each registry kernel.
"""

from __future__ import annotations

import ctypes
import json
import os
import pathlib
import subprocess
import tempfile
from typing import Optional, Sequence

from executorch_wgpu.errors import WebGPUDelegateError
from executorch_wgpu.shaders import registry

LIBRARY_NAME = "libexecutorch_wgpu_native.so"
LIBRARY_VARIABLE = "EXECUTORCH_WGPU_NATIVE_LIB"   # the library's path, where it is not in build/native/ here
RUNNER_NAME = "wgq4_run_pte"   # runtime_native/run_pte.cpp: a .pte through ExecuTorch's C++ Module API
LLAMA_RUNNER_NAME = "wgq4_llama_run"   # runtime_native/llama_run.cpp: a Llama .pte's prefill and greedy decode
# Where `make setup` builds it: the repository root is this package's directory.
DEFAULT_BUILD_DIR = pathlib.Path(__file__).resolve().parent / "build" / "native"


class NativeUnavailableError(WebGPUDelegateError):
    """The native library is not built here, or cannot be loaded."""


def library_path() -> pathlib.Path:
    """$EXECUTORCH_WGPU_NATIVE_LIB, else build/native/ of this checkout."""
    override = os.environ.get(LIBRARY_VARIABLE)
    return pathlib.Path(override) if override else DEFAULT_BUILD_DIR / LIBRARY_NAME


def runner_path() -> pathlib.Path:
    """wgq4_run_pte, built beside the library."""
    return library_path().parent / RUNNER_NAME


def llama_runner_path() -> pathlib.Path:
    """wgq4_llama_run, built beside the library."""
    return library_path().parent / LLAMA_RUNNER_NAME


def llama_runner_unavailable_reason() -> Optional[str]:
    """Why run_llama_in_cpp() would fail here for want of a build, or None when the runner is built."""
    reason = unavailable_reason()
    if reason is None and not llama_runner_path().is_file():
        reason = (f"the native Llama runner is not built: no {llama_runner_path()} beside the library; "
                  "rebuild (`make setup`, or `cmake --build build/native`)")
    return reason


def run_llama_in_cpp(pte_path, prompt: Sequence[int], new_tokens: int, warmup: int = 1, repeats: int = 1,
                     timeout: float = 600) -> dict:
    """The JSON result of wgq4_llama_run on a Llama .pte: prefill `prompt`, greedy decode to `new_tokens` tokens.

    A process of its own with no Python (ExecuTorch's C++ Module API and this library).
    The result holds "tokens" (the generated ids, the first from the prefill, as
    tools/models.greedy_generate gives them), "prefill_ms" / "prefill_tokens_per_s" (median of
    `repeats` timed prefills after `warmup` untimed ones) and "decode_ms_per_token" /
    "decode_tokens_per_s" (the decode calls after the first `warmup`; null when none is left).
    Raises RuntimeError with the runner's stderr when it fails.
    """
    args = [str(llama_runner_path()), str(pte_path), "--prompt", ",".join(str(int(t)) for t in prompt),
            "--new-tokens", str(new_tokens), "--warmup", str(warmup), "--repeats", str(repeats)]
    done = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{llama_runner_path()} failed ({done.returncode}): {done.stderr.strip()}")
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_pte_in_cpp(pte_path, x, warmup: int = 1, iters: int = 1, timeout: float = 600) -> tuple:
    """(the runner's JSON result, its first output) of wgq4_run_pte on pte_path with the float32 input x.

    A process of its own with no Python: ExecuTorch's C++ Module API and this
    library. Raises RuntimeError with the runner's stderr when it fails.
    """
    import numpy as np
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        x_path, y_path = pathlib.Path(tmp, "x.f32"), pathlib.Path(tmp, "y.f32")
        x.detach().contiguous().numpy().astype("<f4").tofile(x_path)
        args = [str(runner_path()), str(pte_path), "--shape", "x".join(str(d) for d in x.shape), "--input",
                str(x_path), "--output", str(y_path), "--warmup", str(warmup), "--iters", str(iters)]
        done = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{runner_path()} failed ({done.returncode}): {done.stderr.strip()}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        y = torch.from_numpy(np.fromfile(y_path, dtype="<f4")).reshape(result["output_shape"])
    return result, y


class NativeLibrary:
    """The loaded library: its C API, with JSON answers decoded."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        # RTLD_GLOBAL is not needed: ExecuTorch finds the backend through the
        # registry the library writes into when it loads.
        self._lib = ctypes.CDLL(str(path))
        lib = self._lib
        lib.wgq4_native_submit_roundtrip.restype = ctypes.c_void_p
        lib.wgq4_native_submit_roundtrip.argtypes = [ctypes.c_int]
        for name in ("wgq4_native_info", "wgq4_native_adapter", "wgq4_native_take_calls"):
            getattr(lib, name).restype = ctypes.c_void_p
            getattr(lib, name).argtypes = []
        lib.wgq4_native_describe_blob.restype = ctypes.c_void_p
        lib.wgq4_native_describe_blob.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        lib.wgq4_native_plan.restype = ctypes.c_void_p
        lib.wgq4_native_plan.argtypes = [ctypes.c_int, ctypes.c_uint64] + [ctypes.c_uint32] * 5 + [ctypes.c_int]
        lib.wgq4_native_kernel_source.restype = ctypes.c_void_p
        lib.wgq4_native_kernel_source.argtypes = [ctypes.c_char_p]
        lib.wgq4_native_set_limit_caps.restype = None
        lib.wgq4_native_set_limit_caps.argtypes = [ctypes.c_uint64, ctypes.c_uint32]
        lib.executorch_wgpu_reset_state.restype = ctypes.c_long
        lib.executorch_wgpu_reset_state.argtypes = []
        lib.wgq4_native_set_backend_option.restype = ctypes.c_int
        lib.wgq4_native_set_backend_option.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.wgq4_native_describe_graph_blob.restype = ctypes.c_void_p
        lib.wgq4_native_describe_graph_blob.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        lib.wgq4_native_last_graph_call.restype = ctypes.c_void_p
        lib.wgq4_native_last_graph_call.argtypes = []
        lib.wgq4_native_free.restype = None
        lib.wgq4_native_free.argtypes = [ctypes.c_void_p]

    def _text(self, pointer: Optional[int]) -> Optional[str]:
        if not pointer:
            return None
        try:
            return ctypes.string_at(pointer).decode("utf-8")
        finally:
            self._lib.wgq4_native_free(pointer)

    def _json(self, pointer: Optional[int]):
        text = self._text(pointer)
        if text is None:
            raise WebGPUDelegateError("the native library returned nothing (out of memory?)")
        return json.loads(text)

    def info(self) -> dict:
        """{"backend_id", "schema_version", "registered", "kernels"}."""
        return self._json(self._lib.wgq4_native_info())

    def adapter(self) -> dict:
        """The native runtime's adapter and limits, or {"error": ...}."""
        return self._json(self._lib.wgq4_native_adapter())

    def describe_blob(self, blob: bytes) -> dict:
        """Every field of a blob as the C++ reader reads it, or {"error": ...}."""
        blob = bytes(blob)
        return self._json(self._lib.wgq4_native_describe_blob(blob, len(blob)))

    def plan(self, kernel: str, m: int, k: int, n: int, n_stride: int, group_size: int, max_groups: int,
             precision: str = "fp32") -> dict:
        """The C++ plan of a call (runtime_native/plan.h; precision: what the layer's prefill runs in), or
        {"error": ...}."""
        spec = registry.kernel(kernel)
        if spec.variant_of is not None:   # a variant named itself: its kernel's call in its precision
            if m == 1:   # as runtime_py/q4_linear.py plan_call refuses it
                return {"error": f"{kernel} runs prefill calls (M > 1) only, not M = 1"}
            kernel, precision = spec.variant_of, spec.precision
        route_id = registry.kernel(kernel).route_id
        return self._json(self._lib.wgq4_native_plan(-1 if route_id is None else route_id, m, k, n, n_stride,
                                                     group_size, max_groups, registry.PRECISIONS.index(precision)))

    def submit_roundtrip(self, iters: int = 300) -> dict:
        """The floor of a call's round trip: a 4-byte write and a tiny copy submitted, mapped, waited for (µs)."""
        return self._json(self._lib.wgq4_native_submit_roundtrip(iters))

    def take_calls(self) -> list:
        """The delegate calls since the last take: route report entries like Method.route_report()'s."""
        return self._json(self._lib.wgq4_native_take_calls())

    def kernel_source(self, name: str) -> Optional[str]:
        """The WGSL the library compiles for a registry kernel, or None when it has no such kernel."""
        return self._text(self._lib.wgq4_native_kernel_source(name.encode()))

    def reset_state(self) -> int:
        """Put every graph delegate's state (its KV cache) back to its value at load, in every program this
        process loaded through ExecuTorch's runtime (the twin of our Method.reset_state()); how many were reset."""
        count = int(self._lib.executorch_wgpu_reset_state())
        if count < 0:
            raise WebGPUDelegateError("resetting the graph delegates' state failed (the log says why)")
        return count

    def set_backend_option(self, key: str, value: bool) -> int:
        """ExecuTorch's executorch::runtime::set_option("WebGPUBackend", {key: value}); its Error code (0: Ok)."""
        return int(self._lib.wgq4_native_set_backend_option(key.encode(), int(bool(value))))

    def describe_graph_blob(self, blob: bytes) -> dict:
        """The C++ reader's verdict on a graph blob: its table sizes, or {"error", "version"}."""
        blob = bytes(blob)
        return self._json(self._lib.wgq4_native_describe_graph_blob(blob, len(blob)))

    def last_graph_call(self) -> Optional[dict]:
        """The last graph delegate call: dispatches, GPU µs (None without timestamps) and the host split."""
        return self._json(self._lib.wgq4_native_last_graph_call())

    def set_limit_caps(self, max_binding_bytes: int = 0, max_workgroups_per_dim: int = 0) -> None:
        """Plan layers loaded from now on against lower limits (0: the device's own)."""
        self._lib.wgq4_native_set_limit_caps(max_binding_bytes, max_workgroups_per_dim)


_loaded: Optional[NativeLibrary] = None


def unavailable_reason() -> Optional[str]:
    """Why load() would fail here, or None when the library is built."""
    path = library_path()
    if path.is_file():
        return None
    build = ("build it in a checkout of executorch_wgpu (`make setup`, or `cmake -S . -B build/native "
             "-DPython3_EXECUTABLE=.venv/bin/python && cmake --build build/native`)")
    if os.environ.get(LIBRARY_VARIABLE):
        return (f"the native delegate is not where {LIBRARY_VARIABLE} says: no {path}; {build} "
                f"and point {LIBRARY_VARIABLE} at its build/native/{LIBRARY_NAME}")
    return (f"the native delegate is not built: no {path}; {build}. A checkout finds its own build; "
            f"an installed executorch_wgpu needs {LIBRARY_VARIABLE}=<checkout>/build/native/{LIBRARY_NAME}")


def register() -> NativeLibrary:
    """Register WebGPUBackend with ExecuTorch's runtime in this process (idempotent): load().

    `import executorch_wgpu.native_backend` does the same in one line. Raises
    NativeUnavailableError, saying how to build the library or where to point it, when it cannot.
    """
    return load()


def load() -> NativeLibrary:
    """Load the native delegate once per process; ExecuTorch's runtime then runs WebGPUBackend delegates."""
    global _loaded
    if _loaded is not None:
        return _loaded
    reason = unavailable_reason()
    if reason:
        raise NativeUnavailableError(reason)
    # wgpu-native enumerates Vulkan adapters when ExecuTorch first asks the backend
    # (is_available, init): quiet Mesa's XDG_RUNTIME_DIR complaint there too (runtime_py/xdg.py).
    from executorch_wgpu.runtime_py.xdg import ensure_xdg_runtime_dir

    ensure_xdg_runtime_dir()
    # The Python extension loads libexecutorch.so; ours then binds to that
    # copy, so both use one backend registry.
    import executorch.runtime  # noqa: F401
    try:
        lib = NativeLibrary(library_path())
    except OSError as e:
        raise NativeUnavailableError(f"cannot load the native delegate {library_path()}: {e}") from e
    info = lib.info()
    if not info["registered"]:
        raise NativeUnavailableError(
            f"{library_path()} loaded but could not register backend {info['backend_id']!r}: "
            "another library registered that name first"
        )
    _loaded = lib
    return lib
