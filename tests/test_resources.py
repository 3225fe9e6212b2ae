"""Resources and determinism: no leak over load/release cycles, shared device, bit-identical answers, no adapter.

GPU memory is read from wgpu 0.32's diagnostics, which is what the API offers
(no allocator/driver memory report): wgpu.diagnostics.object_counts tracks
every live GPUBuffer object and the bytes they hold ("resource_mem"), and
wgpu.diagnostics.wgpu_native_counts the buffers wgpu-core keeps for the user
(its registry report). Process memory is the resident set from /proc/self/statm.
"""

from __future__ import annotations

import gc
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
import wgpu

import executorch_wgpu.runtime_py.gpu as gpu_module
from executorch_wgpu.runtime import Runtime
from executorch_wgpu.tools.reference import golden_linear, rel_err

REPO = pathlib.Path(__file__).resolve().parents[1]
CYCLES = 100
WARMUP = 5


def rss_bytes() -> int:
    return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def gpu_buffers() -> dict:
    """Live GPUBuffer objects and their bytes (wgpu-py), buffers wgpu-core keeps for the user (wgpu-native)."""
    py = wgpu.diagnostics.object_counts.get_dict().get("Buffer", {})
    native = wgpu.diagnostics.wgpu_native_counts.get_dict().get("Buffer", {})
    return {"count": py.get("count", 0), "bytes": py.get("resource_mem", 0), "native_count": native.get("count", 0)}


# Program a: conftest's linear_program, a q4 Linear(128, 24) on [1, M, 128] inputs, M in [1, 16];
# program b: another shape, without bias. Both linears-only: one WGQ4 delegate each.
@pytest.fixture(scope="module")
def pte_a(linear_program):
    return linear_program.pte


@pytest.fixture(scope="module")
def model_b(single_linear):
    return single_linear(256, 40, bias=False, seed=1)


@pytest.fixture(scope="module")
def pte_b(model_b, lower):
    return lower(model_b, torch.randn(1, 6, 256), {1: (1, 16)}, linears_only=True)


X_A = {m: torch.randn(1, m, 128, generator=torch.Generator().manual_seed(10 + m)) for m in (1, 5, 16)}
X_B = {m: torch.randn(1, m, 256, generator=torch.Generator().manual_seed(20 + m)) for m in (1, 5, 16)}


def run_all(method, xs) -> dict:
    return {m: method.execute([x])[0] for m, x in xs.items()}


def test_load_and_release_100_times_grows_neither_rss_nor_gpu_buffers(pte_a, linear_program):
    def cycle():
        program = Runtime.get().load_program(pte_a)
        method = program.load_method("forward")
        ys = run_all(method, X_A)
        loaded = gpu_buffers()
        del program, method
        return ys, loaded

    gc.collect()   # garbage of earlier tests (say, a failed one's traceback) must not count as ours
    gpu_module.gpu_context()   # the context and its own buffers (unused output parts) outlive every program
    before_any = gpu_buffers()
    for _ in range(WARMUP):
        ys, loaded = cycle()
    gc.collect()
    rss0, buffers0 = rss_bytes(), gpu_buffers()
    rss_peak = rss0
    for i in range(CYCLES):
        ys_i, loaded_i = cycle()
        # Released by reference counting alone, at once: no cyclic garbage holds a GPU buffer.
        assert gpu_buffers() == buffers0, f"cycle {i}: GPU buffers {gpu_buffers()} after release, {buffers0} before"
        assert loaded_i == loaded
        assert all(torch.equal(ys_i[m], ys[m]) for m in ys)
        rss_peak = max(rss_peak, rss_bytes())
    gc.collect()
    rss1, buffers1 = rss_bytes(), gpu_buffers()
    print(f"\n{CYCLES} load/run/release cycles on {gpu_module.gpu_context().adapter_name}: "
          f"RSS {rss0 / 2**20:.1f} MiB after {WARMUP} warm-up cycles -> {rss1 / 2**20:.1f} MiB "
          f"(peak {rss_peak / 2**20:.1f} MiB); GPU buffers while loaded {loaded}, released {buffers1} "
          f"(before any load {before_any})")
    assert rss1 <= rss0 * 1.10 and rss_peak <= rss0 * 1.10
    assert buffers1 == buffers0 and buffers1["bytes"] == before_any["bytes"]
    assert loaded["count"] > buffers0["count"] and loaded["bytes"] > 0   # the diagnostics do see our buffers
    assert all(rel_err(ys[m], golden_linear(X_A[m], linear_program.model[0])) < 1e-4 for m in ys)


@pytest.mark.xfail(strict=False, reason=(
    "a released program still leaves 21 objects that only the cyclic GC frees: three ctypes array types "
    "(c_uint8 * 2048 / 512 / 128, 7 objects each) that wgpu-py 0.32 creates when it uploads a layer's "
    "weights, scales and bias (traced with gc.DEBUG_SAVEALL, docs/RELIABILITY.md). They hold no GPU "
    "buffer (see the test above)."))
def test_a_released_program_leaves_no_cyclic_garbage(pte_a):
    gc.collect()
    gc.disable()
    try:
        program = Runtime.get().load_program(pte_a)
        run_all(program.load_method("forward"), X_A)
        del program
        found = gc.collect()
    finally:
        gc.enable()
    assert found == 0, f"{found} objects of a released program were only freed by the cyclic GC"


def test_two_programs_share_the_device_and_answer_as_each_alone(pte_a, pte_b):
    alone_a = run_all(Runtime.get().load_program(pte_a).load_method("forward"), X_A)
    alone_b = run_all(Runtime.get().load_program(pte_b).load_method("forward"), X_B)
    method_a = Runtime.get().load_program(pte_a).load_method("forward")
    method_b = Runtime.get().load_program(pte_b).load_method("forward")
    devices = {id(d.layer.parts[0].ctx.device) for m in (method_a, method_b) for d in m._delegates}
    assert devices == {id(gpu_module.gpu_context().device)}
    for _ in range(2):   # interleaved, in both orders
        for m in (16, 1, 5):
            assert torch.equal(method_a.execute([X_A[m]])[0], alone_a[m])
            assert torch.equal(method_b.execute([X_B[m]])[0], alone_b[m])
        for m in (5, 16, 1):
            assert torch.equal(method_b.execute([X_B[m]])[0], alone_b[m])
            assert torch.equal(method_a.execute([X_A[m]])[0], alone_a[m])


def test_same_inputs_give_bit_identical_outputs_across_calls(pte_a):
    method = Runtime.get().load_program(pte_a).load_method("forward")
    first = run_all(method, X_A)
    for _ in range(5):
        again = run_all(method, dict(reversed(list(X_A.items()))))
        assert all(torch.equal(again[m], first[m]) for m in first)


CHILD_RUN = textwrap.dedent("""
    import sys, torch
    from executorch_wgpu.runtime import Runtime
    pte, inputs, out = sys.argv[1:4]
    xs = torch.load(inputs)
    method = Runtime.get().load_program(pte).load_method("forward")
    torch.save({m: method.execute([x])[0] for m, x in xs.items()}, out)
""")


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env.setdefault("XDG_RUNTIME_DIR", "/tmp")
    env.update(extra)
    return env


def test_same_inputs_give_bit_identical_outputs_across_processes(pte_a, tmp_path):
    (tmp_path / "a.pte").write_bytes(pte_a)
    torch.save(X_A, tmp_path / "x.pt")
    here = run_all(Runtime.get().load_program(pte_a).load_method("forward"), X_A)
    subprocess.run([sys.executable, "-c", CHILD_RUN, str(tmp_path / "a.pte"), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, env=child_env(), cwd=REPO, timeout=300,
                   capture_output=True)
    there = torch.load(tmp_path / "y.pt")
    for m in here:
        assert here[m].numpy().tobytes() == there[m].numpy().tobytes(), f"M={m} differs between processes"


# Every write to sys.stderr is traced with the Python stack that made it: a write
# from executorch_wgpu's code that does not pass through `logging` is a stray print.
# Native messages (Vulkan loader, wgpu-native) go to fd 2 without passing sys.stderr.
CHILD_NO_ADAPTER = textwrap.dedent("""
    import json, logging, os, sys, sysconfig, traceback
    repo = sys.argv[1]
    stdlib = sysconfig.get_paths()["stdlib"] + os.sep
    writes = []

    class Tracer:
        def __init__(self, real):
            self.real = real
        def write(self, s):
            frames = traceback.extract_stack()[:-1]
            # The author of a write: the innermost frame outside the standard library
            # (print, logging, warnings and io live there).
            author = next((f.filename for f in reversed(frames) if not f.filename.startswith(stdlib)), "")
            ours = author.startswith(repo + os.sep) and os.sep + ".venv" + os.sep not in author
            via_logging = any(f.filename.endswith(os.path.join("logging", "__init__.py")) for f in frames)
            writes.append({"text": s, "ours": ours, "via_logging": via_logging, "author": author})
            return self.real.write(s)
        def flush(self):
            self.real.flush()
        def __getattr__(self, name):
            return getattr(self.real, name)

    sys.stderr = Tracer(sys.stderr)
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="LOGGING %(name)s %(levelname)s: %(message)s")
    from executorch_wgpu.errors import NoAdapterError
    from executorch_wgpu.runtime import Runtime
    result = {"writes": writes}
    try:
        Runtime.get().load_program(sys.argv[2]).load_method("forward")
        result["error"] = None
    except NoAdapterError as e:
        result["error"] = str(e)
    print("RESULT " + json.dumps(result))
""")


def test_no_adapter_raises_no_adapter_error_and_prints_only_through_logging(pte_a, tmp_path):
    (tmp_path / "a.pte").write_bytes(pte_a)
    # Hiding the Vulkan ICDs alone is not enough: wgpu then falls back to OpenGL (llvmpipe
    # through EGL), so the EGL vendor libraries are hidden as well.
    env = child_env(VK_ICD_FILENAMES="/nonexistent/icd.json", VK_DRIVER_FILES="/nonexistent/icd.json",
                    __EGL_VENDOR_LIBRARY_FILENAMES="/nonexistent/egl.json")
    proc = subprocess.run([sys.executable, "-c", CHILD_NO_ADAPTER, str(REPO), str(tmp_path / "a.pte")],
                          env=env, cwd=REPO, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["error"] is not None, "the program loaded: an adapter was found"
    assert "mesa-vulkan-drivers" in result["error"] and "lavapipe" in result["error"]
    stray = [w["text"] for w in result["writes"] if w["ours"] and not w["via_logging"]]
    assert not stray, f"executorch_wgpu wrote to stderr outside logging: {stray}"
    # Everything else on stderr comes from other libraries: print it for the record.
    traced = "".join(w["text"] for w in result["writes"])
    native = proc.stderr.replace(traced, "") if traced in proc.stderr else proc.stderr
    print(f"\nno-adapter error: {result['error'].splitlines()[0]}\n"
          f"native stderr (wgpu / Vulkan / EGL): {native.strip()[:400]!r}\n"
          f"stderr through sys.stderr: {len(result['writes'])} writes:")
    for w in result["writes"]:
        who = "executorch_wgpu" if w["ours"] else os.path.relpath(w["author"], REPO) if w["author"] else "?"
        print(f"  [{who}{', logging' if w['via_logging'] else ''}] {w['text'].strip()[:120]!r}")
