"""The native delegate (runtime_native/, loaded by executorch_wgpu.native) twins the Python runtime.

libexecutorch_wgpu_native.so registers "WebGPUBackend" with ExecuTorch, so
ExecuTorch's OWN runtime (executorch.runtime) runs our .pte files. It re-implements
in C++ what runtime_py/ and backend/serialization/blob.py do in Python; this file
pins that the two agree:

  * both blob readers see the same value in every field of real blobs;
  * both planners make the same dispatches (same kernels, grids, split K) for
    the same call, and refuse the same calls;
  * the library compiles, for every registry kernel, the WGSL the Python runtime
    assembles (shaders/registry.py), byte for byte;
  * ExecuTorch's runtime gives the outputs of our Python runtime (and of the
    fp64 golden) with the same kernel per call, for every kernel, split K,
    a mixed model and layers split over the binding / grid limits;
  * bad inputs and blobs of another schema version are errors with a log line
    that names the problem, never a crash.

Its programs are lowered linears-only (WebGPUPartitioner(linears_only=True)): one
WGQ4 blob per q4 linear; graph blobs are test_native_graph.py's. Every test is
marked `native` (conftest): without the built library they are
skipped, saying why, or fail when EXECUTORCH_WGPU_REQUIRE_NATIVE=1 asks for it
(CI, which builds it). `native_lib` is the library, loaded into this process.
"""

import dataclasses
import itertools
import re

import pytest
import torch
from executorch.runtime import Runtime as EtRuntime

import executorch_wgpu.backend.serialization.blob as blob_module
from executorch_wgpu.backend.route_table import LAST_BUCKET_M_MAX, RouteTable, RouteTableEntry
from executorch_wgpu.backend.serialization.blob import deserialize_q4linear
from executorch_wgpu.errors import WebGPUDelegateError
from executorch_wgpu.runtime import Runtime as PyRuntime
from executorch_wgpu.runtime_py.gpu import capped_plan_limits, gpu_context
from executorch_wgpu.shaders import registry
from executorch_wgpu.runtime_py.q4_linear import plan_call
from executorch_wgpu.tools.reference import golden_linear, rel_err

pytestmark = pytest.mark.native


# ---- helpers --------------------------------------------------------------------------------------


def route_table(k, n, decode, prefill, name="native-test"):
    entry = RouteTableEntry(k, n, 32, decode, tuple(prefill), {"1": {decode: 1.0}})
    return RouteTable(name=name, adapter="Test GPU, Vulkan", date="2026-01-02", command="tune", entries=[entry])


# Real single-layer models, each lowered once per run: id -> (K, N, group size, bias, dynamic M range, options).
# Together they cover every kernel as decode and prefill route, every route source, bias or not,
# group sizes 32/64/128, split K in the shmem GEMM (K=512, N=16: one tile) and in the GEMV (K=4096).
LAYERS = {
    "default-rule": (256, 72, 32, True, (1, 48), {"adapter_rules": False}),
    "default-rule-knobs": (256, 64, 32, False, (1, 48), {"skinny_max_m": 4, "shmem_min_mn": 512,
                                                          "adapter_rules": False}),
    "adapter-rules": (256, 72, 32, True, (1, 48), {}),
    "adapter-route-table": (256, 64, 32, False, (1, 48),
                            {"route_table": dataclasses.replace(route_table(256, 64, "skinny", (
                                (LAST_BUCKET_M_MAX, "shmem"),)), adapter_class="cpu")}),
    "static-m": (256, 40, 64, True, None, {"adapter_rules": False}),
    "forced-regtiled": (256, 40, 64, False, (1, 48), {"prefill_route": "regtiled", "adapter_rules": False}),
    "forced-skinny": (512, 24, 128, True, (1, 48), {"prefill_route": "skinny", "decode_route": "skinny"}),
    "forced-shmem": (256, 136, 32, True, (1, 48), {"prefill_route": "shmem", "decode_route": "regtiled"}),
    "shmem-split-k": (512, 16, 32, True, (1, 48), {"prefill_route": "shmem", "decode_route": "shmem"}),
    "gemv-split-k": (4096, 16, 32, False, (1, 8), {"adapter_rules": False}),
    "route-table": (256, 64, 32, True, (1, 48),
                    {"route_table": route_table(256, 64, "skinny", ((3, "regtiled"), (8, "skinny"),
                                                                     (LAST_BUCKET_M_MAX, "shmem")))}),
}
EXAMPLE_M = 5


@pytest.fixture(scope="module")
def layer(lower, single_linear):
    """layer(name) -> (model, .pte bytes) of LAYERS[name], lowered on first use."""
    programs = {}

    def program(name: str):
        if name not in programs:
            k, n, gs, bias, m_range, options = LAYERS[name]
            model = single_linear(k, n, bias=bias, group_size=gs, seed=len(name))
            x = torch.randn(EXAMPLE_M, k)
            programs[name] = model, lower(model, x, {0: m_range} if m_range else None, linears_only=True, **options)
        return programs[name]

    return program


def et_method(pte: bytes):
    """The method as ExecuTorch's own runtime loads it (our native delegate runs the blobs)."""
    return EtRuntime.get().load_program(pte).load_method("forward")


def py_method(pte: bytes):
    return PyRuntime.get().load_program(pte).load_method("forward")


def run_both(native_lib, et, py, x):
    """(native y, native route report, Python y, Python route report) of one call."""
    native_lib.take_calls()   # drain whatever earlier calls left
    (y_native,) = et.execute([x])
    y_native = y_native.clone()   # the output may alias the program's planned memory
    native_calls = native_lib.take_calls()
    (y_py,) = py.execute([x])
    return y_native, native_calls, y_py, py.route_report()


# ---- 1. blob readers ------------------------------------------------------------------------------


def test_both_blob_readers_agree_on_every_field_of_real_blobs(native_lib, layer, mixed_program, blobs_in,
                                                             python_blob_fields):
    blobs = [b for name in LAYERS for b in blobs_in(layer(name)[1])] + blobs_in(mixed_program.pte)
    seen = {"source": set(), "bias": set(), "group_size": set(), "buckets": set(), "decode": set(), "prefill": set()}
    for blob in blobs:
        expected = python_blob_fields(blob)
        assert native_lib.describe_blob(blob) == expected
        route = expected["route"]
        seen["source"].add(route["source"])
        seen["bias"].add(expected["bias"] is None)
        seen["group_size"].add(expected["group_size"])
        seen["buckets"].add(len(route["prefill_buckets"]) > 0)
        seen["decode"].add(route["decode_kernel"])
        seen["prefill"].add(route["prefill_kernel"])
    # The blobs above are varied enough to mean something.
    assert seen["source"] == set(blob_module.ROUTE_SOURCES)
    assert seen["bias"] == {True, False} and seen["buckets"] == {True, False}
    assert seen["group_size"] == {32, 64, 128}
    assert seen["decode"] == set(registry.DECODE_KERNELS) and seen["prefill"] == set(registry.PREFILL_KERNELS)


def blob_of_version(blob: bytes, version: int, monkeypatch) -> bytes:
    """The blob re-serialized by a writer that stamps another schema version."""
    rec = deserialize_q4linear(blob)
    with monkeypatch.context() as patch:
        patch.setattr(blob_module, "SCHEMA_VERSION", version)
        return blob_module.serialize_q4linear(rec)


def python_error(blob: bytes) -> str:
    with pytest.raises(blob_module.BlobFormatError) as e:
        deserialize_q4linear(blob)
    return str(e.value)


def test_both_blob_readers_refuse_bad_blobs_with_the_same_words(native_lib, monkeypatch, blobs_in, layer):
    (blob,) = blobs_in(layer("default-rule")[1])
    corrupted = bytearray(blob)
    corrupted[len(blob) // 2] ^= 0xFF   # inside the packed weights
    for bad in (blob[:7], bytes(corrupted), blob_of_version(blob, 99, monkeypatch)):
        assert native_lib.describe_blob(bad) == {"error": python_error(bad)}
    foreign = b"\x10\x00\x00\x00XXXX" + blob[8:]   # the Python reader also quotes the magic it found
    assert native_lib.describe_blob(foreign)["error"].startswith("not an executorch_wgpu blob: ")
    assert python_error(foreign).startswith("not an executorch_wgpu blob: ")


def test_a_blob_too_new_says_upgrade_and_one_too_old_says_re_export_in_both_readers(native_lib, monkeypatch,
                                                                                   blobs_in, layer):
    (blob,) = blobs_in(layer("default-rule")[1])
    newer = blob_of_version(blob, blob_module.SCHEMA_VERSION + 1, monkeypatch)
    older = blob_of_version(blob, blob_module.OLDEST_READABLE_VERSION - 1, monkeypatch)
    for bad, advice in ((newer, "upgrade executorch_wgpu"), (older, "re-export the model with this version")):
        message = python_error(bad)
        assert advice in message and native_lib.describe_blob(bad) == {"error": message}
    assert "upgrade" not in python_error(older)


def test_a_truncated_blob_of_another_version_is_refused_for_its_version_by_both_readers(native_lib, monkeypatch,
                                                                                       blobs_in, layer):
    (blob,) = blobs_in(layer("default-rule")[1])
    newer = blob_of_version(blob, 99, monkeypatch)
    truncated = newer[:len(newer) // 2]
    assert "schema version 99" in python_error(truncated)
    assert "schema version 99" in native_lib.describe_blob(truncated)["error"]


def test_library_reports_the_backend_id_and_schema_version_of_the_python_side(native_lib):
    info = native_lib.info()
    assert info["backend_id"] == blob_module.BACKEND_ID
    assert info["schema_version"] == blob_module.SCHEMA_VERSION
    assert info["registered"] is True


# ---- 2. plans -------------------------------------------------------------------------------------


def python_plan(kernel, m, k, n, n_stride, gs, max_groups) -> dict:
    """plan_call's plan in describe form, or {"error": message} with the grid left out as C++ words it."""
    try:
        p = plan_call(kernel, m, k, n, n_stride, gs, max_groups)
    except WebGPUDelegateError as e:
        return {"error": re.sub(r"grid \([^)]*\) exceeds", "grid exceeds", str(e))}
    return {"kernel": p.kernel, "m": p.m, "k_splits": p.k_splits, "k_chunk": p.k_chunk,
            "partial_bytes": p.partial_bytes,
            "dispatches": [[d.kernel, *d.grid] for d in p.dispatches]}


PLAN_MS = (1, 2, 3, 4, 5, 31, 32, 33, 127, 128, 129, 300, 1000, 4096, 70000, 300000)
PLAN_KS = ((32, 32), (256, 32), (512, 32), (512, 64), (512, 128), (1024, 32), (4096, 32), (4096, 128),
           (8192, 32), (8192, 64), (11008, 128))
PLAN_NS = (8, 16, 24, 100, 128, 129, 1000, 4096, 32000)
PLAN_MAX_GROUPS = (65535, 1, 2, 3, 7, 64)


def test_cpp_and_python_plan_every_call_the_same_way(native_lib):
    seen = {"shmem split K": 0, "gemv split K": 0, "refused": 0, "n not a multiple of 16": 0}
    for kernel, m, (k, gs), n, max_groups in itertools.product(
            registry.ROUTABLE_NAMES, PLAN_MS, PLAN_KS, PLAN_NS, PLAN_MAX_GROUPS):
        n_stride = blob_module.round_up(n, blob_module.N_ALIGN)
        expected = python_plan(kernel, m, k, n, n_stride, gs, max_groups)
        got = native_lib.plan(kernel, m, k, n, n_stride, gs, max_groups)
        assert got == expected, (kernel, m, k, n, gs, max_groups)
        if "error" in expected:
            seen["refused"] += 1
        elif expected["k_splits"] > 1:
            seen[f"{kernel} split K"] += 1
        elif n % 16:
            seen["n not a multiple of 16"] += 1
    assert all(seen.values()), seen


# ---- 3. kernels -----------------------------------------------------------------------------------


def test_native_library_compiles_exactly_the_wgsl_the_python_runtime_compiles(native_lib):
    """Every registry kernel, assembled the same way (a stale build of an edited shader fails here)."""
    assert native_lib.info()["kernels"] == [k.name for k in registry.KERNELS]
    for kernel in registry.KERNELS:
        assert native_lib.kernel_source(kernel.name) == registry.wgsl_source(kernel.name), kernel.name
    assert native_lib.kernel_source("no_such_kernel") is None


# ---- 4. ExecuTorch's runtime against ours ---------------------------------------------------------

# layer -> (M of each call, the kernel each must run). One program serves every M (dynamic dims).
RUNS = {
    "default-rule": ((1, 5, 48), ("gemv", "skinny", "skinny")),
    # Routes by kind of adapter: what runs depends on the adapter the test runs on (lavapipe: "cpu").
    "adapter-rules": ((1, 5, 48), {"cpu": ("regtiled",) * 3, "other": ("gemv", "skinny", "skinny")}),
    "adapter-route-table": ((1, 5, 48), {"cpu": ("skinny", "shmem", "shmem"), "other": ("gemv", "skinny", "skinny")}),
    "default-rule-knobs": ((1, 4, 7, 8, 33), ("gemv", "skinny", "skinny", "shmem", "shmem")),
    "static-m": ((EXAMPLE_M,), ("skinny",)),
    "forced-regtiled": ((1, 7, 40), ("gemv", "regtiled", "regtiled")),
    "forced-skinny": ((1, 7, 40), ("skinny", "skinny", "skinny")),
    "forced-shmem": ((1, 7, 40), ("regtiled", "shmem", "shmem")),
    "shmem-split-k": ((1, 5, 40), ("shmem", "shmem", "shmem")),
    "gemv-split-k": ((1, 3), ("gemv", "skinny")),
    "route-table": ((1, 3, 8, 20), ("skinny", "regtiled", "skinny", "shmem")),
}


def test_split_k_cases_really_split_k():
    k, n, gs = LAYERS["shmem-split-k"][:3]
    assert all(plan_call("shmem", m, k, n, 16, gs).k_splits > 1 for m in RUNS["shmem-split-k"][0])
    k, n, gs = LAYERS["gemv-split-k"][:3]
    assert plan_call("gemv", 1, k, n, 16, gs).k_splits > 1


ROUTE_KEYS = ("name", "M", "K", "N", "kernel", "reason")


@pytest.mark.parametrize("name", list(RUNS))
def test_executorch_runtime_matches_our_runtime_and_the_golden_with_the_same_routes(native_lib, name, layer):
    model, pte = layer(name)
    et, py = et_method(pte), py_method(pte)
    k = LAYERS[name][0]
    ms, kernels = RUNS[name]
    if isinstance(kernels, dict):
        kernels = kernels.get(gpu_context().adapter_class or "other", kernels["other"])
    for m, kernel in zip(ms, kernels):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        y_native, native_calls, y_py, py_calls = run_both(native_lib, et, py, x)
        assert y_native.shape == y_py.shape == (m, LAYERS[name][1])
        assert rel_err(y_native, y_py) <= 1e-5
        assert rel_err(y_native, golden_linear(x, model[0])) <= 1e-4
        assert [c["kernel"] for c in native_calls] == [c["kernel"] for c in py_calls] == [kernel], m
        (call,), (py_call,) = native_calls, py_calls
        assert call.keys() == py_call.keys()   # the same route report entry, timings included
        assert {key: call[key] for key in ROUTE_KEYS} == {key: py_call[key] for key in ROUTE_KEYS}


# ---- 5. a mixed model -----------------------------------------------------------------------------


def test_mixed_model_runs_through_executorch_like_through_our_runtime(native_lib, mixed_program):
    model, pte = mixed_program   # q4 linear -> relu -> q4 linear -> LayerNorm, * 2 + 1; seq in [1, 32]
    et, py = et_method(pte), py_method(pte)
    for seq in (5, 1, 16):
        x = torch.randn(2, seq, 64, generator=torch.Generator().manual_seed(seq))
        y_native, native_calls, y_py, py_calls = run_both(native_lib, et, py, x)
        assert y_native.shape == (2, seq, 32)
        assert rel_err(y_native, y_py) <= 1e-5
        assert rel_err(y_native, model.golden(x)) <= 1e-4
        assert [(c["name"], c["M"], c["kernel"]) for c in native_calls] == \
            [(c["name"], c["M"], c["kernel"]) for c in py_calls]
        assert [c["name"] for c in native_calls] == ["up", "down"]


# ---- 6. layers beyond the limits ------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_layer(lower, single_linear):
    """split_layer(k, n, prefill) -> (model, .pte bytes) of a q4 Linear(k, n) for M in [1, 64], lowered on first use."""
    programs = {}

    def program(k, n, prefill):
        if (k, n, prefill) not in programs:
            model = single_linear(k, n, bias=True, seed=k + n)
            programs[k, n, prefill] = model, lower(model, torch.randn(4, k), {0: (1, 64)}, prefill_route=prefill,
                                                   linears_only=True)
        return programs[k, n, prefill]

    return program


# (K, N, prefill route, caps, Ms, what the split reason must say at the last M)
SPLITS = {
    "binding-skinny": (256, 100, "skinny", {"max_binding_bytes": 4096}, (1, 7, 40),
                       "split into 4 column part(s) x 10 row chunk(s)"),
    "binding-regtiled": (256, 100, "regtiled", {"max_binding_bytes": 4096}, (1, 5),
                         "split into 4 column part(s) x 2 row chunk(s)"),
    "binding-shmem": (256, 100, "shmem", {"max_binding_bytes": 4096}, (9,),
                      "split into 4 column part(s) x 3 row chunk(s)"),
    "grid": (128, 200, "skinny", {"max_workgroups_per_dim": 3}, (1, 30),
             "split into 5 column part(s) x 3 row chunk(s)"),
}


@pytest.mark.parametrize("name", list(SPLITS))
def test_layers_beyond_the_limits_split_the_same_way_in_both_runtimes(native_lib, name, split_layer):
    k, n, prefill, caps, ms, split = SPLITS[name]
    model, pte = split_layer(k, n, prefill)
    native_lib.set_limit_caps(caps.get("max_binding_bytes", 0), caps.get("max_workgroups_per_dim", 0))
    try:
        et = et_method(pte)
        with capped_plan_limits(**caps):
            py = py_method(pte)
            for m in ms:
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
                y_native, (call,), y_py, (py_call,) = run_both(native_lib, et, py, x)
                assert rel_err(y_native, y_py) <= 1e-5
                assert rel_err(y_native, golden_linear(x, model[0])) <= 1e-4
                assert "split into" in call["reason"] and call["reason"] == py_call["reason"]
                assert call["kernel"] == py_call["kernel"]
    finally:
        native_lib.set_limit_caps(0, 0)
    assert split in call["reason"]


def test_limit_caps_apply_only_to_layers_loaded_while_they_are_set(native_lib, split_layer):
    k, n, prefill, caps, _, _ = SPLITS["binding-skinny"]
    model, pte = split_layer(k, n, prefill)
    native_lib.set_limit_caps(caps["max_binding_bytes"], 0)
    try:
        capped = et_method(pte)
    finally:
        native_lib.set_limit_caps(0, 0)
    uncapped = et_method(pte)
    x = torch.randn(7, k)
    native_lib.take_calls()
    capped.execute([x])
    uncapped.execute([x])
    first, second = native_lib.take_calls()
    assert "split into" in first["reason"] and "split into" not in second["reason"]


# ---- 7. bad input ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_input_layer(layer):
    return layer("default-rule")


# input -> what stderr must say. ExecuTorch itself refuses a wrong dtype and an M above the
# exported bound (in set_inputs, before any delegate runs); the delegate refuses the rest.
BAD_INPUTS = {
    "wrong K": (torch.randn(3, 100), "WebGPUBackend: layer '0': input shape (3, 100) does not end in K=256"),
    "M = 0": (torch.randn(0, 256),
              "WebGPUBackend: layer '0': M=0 (product of leading dims of (0, 256)) is outside the exported range"),
    "float64": (torch.randn(3, 256, dtype=torch.float64), "unexpected scalar type"),
    "M above the bound": (torch.randn(49, 256), "resize"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_an_error_naming_the_problem_and_the_method_stays_usable(native_lib, bad_input_layer, capfd, name):
    model, pte = bad_input_layer
    method = et_method(pte)
    x, message = BAD_INPUTS[name]
    capfd.readouterr()
    with pytest.raises(RuntimeError):
        method.execute([x])
    err = capfd.readouterr().err
    assert any(message in line for line in err.splitlines()), err
    good = torch.randn(4, 256)
    (y,) = method.execute([good])
    assert rel_err(y, golden_linear(good, model[0])) <= 1e-4


# ---- 8. blob of another schema version ------------------------------------------------------------


def test_blob_of_another_schema_version_fails_to_load_naming_the_version(native_lib, capfd, monkeypatch, lower,
                                                                         single_linear):
    monkeypatch.setattr(blob_module, "SCHEMA_VERSION", 99)
    pte = lower(single_linear(128, 24), torch.randn(2, 128), linears_only=True)
    monkeypatch.undo()
    capfd.readouterr()
    with pytest.raises(RuntimeError):
        et_method(pte)
    err = capfd.readouterr().err
    readable = f"reads versions {blob_module.OLDEST_READABLE_VERSION} to {blob_module.SCHEMA_VERSION}"
    assert any("WebGPUBackend" in line and "schema version 99" in line and readable in line
               for line in err.splitlines()), err


def test_c_api_refuses_to_plan_with_a_zero_dimension_instead_of_crashing(native_lib):
    """A group size of 0 divided by zero inside the planner (SIGFPE) before the C API checked its inputs."""
    for args in [("gemv", 1, 256, 16, 16, 0, 65535), ("shmem", 0, 256, 16, 16, 32, 65535),
                 ("regtiled", 4, 256, 16, 16, 32, 0)]:
        assert "of 0" in native_lib.plan(*args)["error"]


def with_blob(pte: bytes, span: tuple, rewrite) -> bytes:
    """pte with its blob (at span: offset, length) re-serialized through rewrite(record) -> record.

    The blob's length must not change: the program's offsets stay valid.
    """
    at, length = span
    new = blob_module.serialize_q4linear(rewrite(deserialize_q4linear(pte[at:at + length])))
    assert len(new) == length
    return pte[:at] + new + pte[at + length:]


def test_a_blob_whose_n_disagrees_with_the_program_is_refused_not_run_into_a_wrong_shape(native_lib, capfd, blob_span,
                                                                                         layer):
    """Without a bias the payload CRC ties N only to its 16-column block: N=60 of a 64-column layer passes the reader.

    Found by fuzzing: the native delegate resized the output to the blob's N,
    returning (M, 60) where the program declares (M, 64). Our Python runtime
    refuses it at load (pte_checks); the native one at execute.
    """
    model, pte = layer("default-rule-knobs")   # K=256, N=64, no bias
    bad = with_blob(pte, blob_span(pte), lambda rec: dataclasses.replace(rec, out_features=60))
    with pytest.raises(WebGPUDelegateError):
        py_method(bad)
    method = et_method(bad)
    capfd.readouterr()
    with pytest.raises(RuntimeError):
        method.execute([torch.randn(3, 256)])
    err = capfd.readouterr().err
    assert "WebGPUBackend: layer" in err and "the blob has N=60 output columns" in err, err


def test_control_characters_in_a_layer_name_are_escaped_as_python_does(native_lib, blobs_in, layer):
    """A NUL in a corrupted name cut the native log line before the problem; names are now written as repr() does."""
    (blob,) = blobs_in(layer("default-rule")[1])
    rec = deserialize_q4linear(blob)
    for name in ("a\x00b", "line\nbreak", "it's", 'both \' and "', "tab\there\\"):
        named = bytearray(blob_module.serialize_q4linear(dataclasses.replace(rec, name=name)))
        named[len(named) // 2] ^= 0xFF   # inside the weights: a checksum mismatch, whose message quotes the name
        message = native_lib.describe_blob(bytes(named)).get("error", "")
        assert message == python_error(bytes(named)), name
        assert "\x00" not in message and "\n" not in message


def test_native_and_python_runtimes_scale_timestamps_by_the_same_period(native_lib):
    """Both read wgpu-native's queue timestamp period (ns per tick) for GPU times in the route report."""
    from executorch_wgpu.runtime_py.gpu import gpu_context

    adapter = native_lib.adapter()
    ctx = gpu_context()
    assert adapter["timestamps"] == ctx.has_timestamps
    assert adapter["timestamp_period_ns"] == pytest.approx(ctx.timestamp_period_ns)
