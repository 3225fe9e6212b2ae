"""Graph mode through the native delegate: ExecuTorch's own runtime runs graph blobs as our Python runtime does.

The spec is ExecuTorch's Llama (small config, q4gsw, with ExecuTorch's LLM transforms) lowered
with WebGPUPartitioner(linears_only=False): one delegate owning its KV cache. Loaded by
`executorch.runtime` with the native library registered, its C++ graph interpreter
(runtime_native/graph_reader, graph_delegate) must

  * give the Python runtime's outputs (the same kernels with the same parameters: equal to
    within 1e-5 relative, in practice bit for bit) for prefill and decode calls, alternating,
    and the same greedy tokens;
  * keep its KV cache across calls, per loaded method, and put it back to zeros on
    executorch_wgpu_reset_state() or the backend option "reset_state";
  * refuse bad inputs with InvalidArgument (0x12) and a `WebGPUBackend: graph delegate: ...`
    line naming the problem, and stay usable;
  * refuse a corrupted graph blob with DelegateInvalidCompatibility (0x30, another schema
    version) or InvalidProgram (0x23), naming the problem, and never crash: those cases run in
    a worker process (this file, run as a script), so a crash is a failed case, not a dead run.

Every test is marked `native` (conftest): skipped, saying why, where the library is not built.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
import types
from typing import List, Sequence, Tuple

import numpy as np
import pytest
import torch

WORKER_SECONDS = 600
PROMPT = [1, 57, 300, 9, 1000, 77, 2048, 5, 4000, 12]
NEW_TOKENS = 20
MAX_TOKENS = 64
# ExecuTorch's runtime error codes (runtime/core/error.h).
NOT_SUPPORTED, INVALID_ARGUMENT, INVALID_PROGRAM, INVALID_COMPATIBILITY = 0x10, 0x12, 0x23, 0x30

pytestmark = pytest.mark.native


# ---- shared ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(small_llama_graph_pte):
    from executorch_wgpu.tools import models

    assert small_llama_graph_pte.max_tokens == MAX_TOKENS
    model = models.build_llama("small", seed=0, llm_ops=True)   # the weights the shared program was lowered from
    return types.SimpleNamespace(model=model, pte=small_llama_graph_pte.pte)


def et_method(pte: bytes):
    """The program's forward through ExecuTorch's runtime: our native delegate runs the graph."""
    from executorch.runtime import Runtime as EtRuntime

    return EtRuntime.get().load_program(pte).load_method("forward")


def py_method(pte: bytes):
    from executorch_wgpu.runtime import Runtime

    return Runtime.get().load_program(pte).load_method("forward")


def call(method, tokens: Sequence[int], pos: int) -> torch.Tensor:
    (y,) = method.execute([torch.tensor([list(tokens)]), torch.tensor([pos])])
    return y.clone()   # ExecuTorch's output memory is reused by the next call


def status(code: int) -> str:
    """A pattern of ExecuTorch's Python extension's error text for an Error code: "error 0x12" at execute,
    "error: 0x:30" at load_method."""
    return f"0x:?{code:x}\\b"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    from executorch_wgpu.tools.reference import rel_err as measure

    return measure(a, b)


def graph_blob_of(pte: bytes, blobs_in) -> Tuple[bytes, int]:
    """(the program's one delegate blob, its offset in the .pte)."""
    (blob,) = blobs_in(pte)
    return blob, pte.index(blob)


# ---- 1. the same outputs as the Python runtime ----------------------------------------------------


def test_the_cpp_reader_reads_the_graph_blob_as_python_does(native_lib, llama, blobs_in):
    from executorch_wgpu.backend.serialization import graph_blob

    blob, _ = graph_blob_of(llama.pte, blobs_in)
    rec = graph_blob.deserialize_graph(blob)
    assert native_lib.describe_graph_blob(blob) == {
        "schema_version": graph_blob.GRAPH_SCHEMA_VERSION, "symbols": len(rec.symbols), "exprs": len(rec.exprs),
        "checks": len(rec.checks), "buffers": len(rec.buffers), "inputs": len(rec.inputs),
        "outputs": len(rec.outputs), "steps": len(rec.steps), "linears": len(rec.linears)}
    assert rec.linears and any(b.kind == "state" for b in rec.buffers)


def test_prefill_and_decode_alternate_with_the_python_runtimes_outputs_and_route_report(native_lib, llama):
    native, python = et_method(llama.pte), py_method(llama.pte)
    calls = [(PROMPT[:5], 0), ([PROMPT[5]], 5), (PROMPT[6:9], 6), ([PROMPT[9]], 9), ([3], 10), ([7, 8], 11),
             ([9], 13), ([4] * 16, 14), ([2], 30)]
    native_lib.take_calls()
    for tokens, pos in calls:
        start = time.perf_counter()
        ours = call(native, tokens, pos)
        native_s = time.perf_counter() - start
        theirs = call(python, tokens, pos)
        assert ours.shape == theirs.shape == (1, llama.model.args.vocab_size)
        assert rel_err(ours, theirs) <= 1e-5, (tokens, pos)
        # the route report: every q4 linear, at the M it ran, with the kernel and reason Python's gives
        report = [(e["name"], e["M"], e["K"], e["N"], e["kernel"], e["reason"]) for e in native_lib.take_calls()]
        expected = [(e["name"], e["M"], e["K"], e["N"], e["kernel"], e["reason"]) for e in python.route_report()]
        assert report == expected, (tokens, pos)
        assert {m for _, m, *_ in report} == {len(tokens), 1}
        last = native_lib.last_graph_call()
        assert last["dispatches"] > len(report) and last["wall_us"] <= native_s * 1e6


def test_greedy_decoding_gives_the_same_tokens_in_both_runtimes_and_eager(native_lib, llama):
    from executorch_wgpu.tools import models

    ours = models.greedy_generate(models.method_runner(et_method(llama.pte)), PROMPT, NEW_TOKENS)
    assert ours == models.greedy_generate(models.method_runner(py_method(llama.pte)), PROMPT, NEW_TOKENS)
    models.reset_kv_cache(llama.model)
    assert ours == models.greedy_generate(models.eager_runner(llama.model), PROMPT, NEW_TOKENS)
    assert len(ours) == NEW_TOKENS and len(set(ours)) > 4


# ---- 2. state: persists per method, reset on request ----------------------------------------------


def test_the_kv_cache_persists_per_method_and_reset_state_clears_every_graph(native_lib, llama, capfd):
    native = et_method(llama.pte)
    call(native, PROMPT[:6], 0)
    chunked = call(native, PROMPT[6:], 6)   # saw the first chunk through the GPU cache
    whole = call(py_method(llama.pte), PROMPT, 0)
    assert rel_err(chunked, whole) <= 1e-5
    other = et_method(llama.pte)            # another load of the program: its own, fresh cache
    fresh = call(py_method(llama.pte), PROMPT[6:], 6)
    assert rel_err(call(other, PROMPT[6:], 6), fresh) <= 1e-5

    assert native_lib.reset_state() >= 2
    alone = call(native, PROMPT[6:], 6)     # on a zero cache, as a fresh load
    assert rel_err(alone, fresh) <= 1e-5 and rel_err(alone, chunked) > 1e-2

    # ExecuTorch's own route to the same: set_option("WebGPUBackend", {"reset_state": true})
    call(native, PROMPT[:6], 0)
    assert native_lib.set_backend_option("reset_state", True) == 0
    assert rel_err(call(native, PROMPT[6:], 6), fresh) <= 1e-5
    assert native_lib.set_backend_option("reset_state", False) == 0   # asks for nothing
    capfd.readouterr()
    assert native_lib.set_backend_option("bogus", True) == INVALID_ARGUMENT
    assert "WebGPUBackend: unknown backend option 'bogus'" in capfd.readouterr().err


# ---- 3. bad inputs ---------------------------------------------------------------------------------

BAD_INPUTS = {
    # (tokens, input_pos, ExecuTorch's status, the line naming the problem)
    "token id beyond the vocabulary": ([1, 4096], 0, INVALID_ARGUMENT,
                                       "WebGPUBackend: graph delegate: input 0 (tokens) holds 4096, outside [0, 4096) "
                                       "(token ids of a 4096-row embedding)"),
    "negative token id": ([1, -3], 0, INVALID_ARGUMENT, "input 0 (tokens) holds -3, outside [0, 4096)"),
    "a check of the export fails": ([1] * 10, 120, INVALID_ARGUMENT,
                                    "WebGPUBackend: graph delegate: the inputs break a condition of the export: "
                                    "Runtime assertion failed for expression s27 + u0 <= 128"),
    "input_pos outside its range": ([1], -1, INVALID_ARGUMENT,
                                    "WebGPUBackend: graph delegate: input 1 element 0 is -1, outside the exported "
                                    "range [0, 126]"),
    # beyond the exported token count ExecuTorch itself refuses the input, before any delegate
    "more tokens than exported": ([1] * (MAX_TOKENS + 1), 0, NOT_SUPPORTED, "Attempted to resize a bounded tensor"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_are_refused_naming_the_problem_and_the_method_stays_usable(native_lib, llama, capfd, name):
    tokens, pos, code, line = BAD_INPUTS[name]
    native = et_method(llama.pte)
    capfd.readouterr()
    with pytest.raises(RuntimeError, match=status(code)):
        call(native, tokens, pos)
    err = capfd.readouterr().err
    assert line in err, err
    # nothing ran: the cache is as loaded, and the next call computes what a fresh method computes
    assert rel_err(call(native, PROMPT, 0), call(py_method(llama.pte), PROMPT, 0)) <= 1e-5


# ---- 4. corrupted blobs: refused, naming the problem, in a worker process --------------------------


def root_field_offset(blob: bytes, field: int) -> int:
    """Offset in blob of scalar field `field` of the flatbuffer's root table."""
    root = struct.unpack_from("<I", blob, 0)[0]
    vtable = root - struct.unpack_from("<i", blob, root)[0]
    at = struct.unpack_from("<H", blob, vtable + 4 + 2 * field)[0]
    assert at, "the field is absent"
    return root + at


def replace_string(data: bytes, old: bytes, new: bytes) -> bytes:
    """data with its first flatbuffer string `old` (length prefix, bytes, NUL) made `new`, of the same length."""
    assert len(old) == len(new)
    field = struct.pack("<I", len(old)) + old + b"\0"
    assert field in data
    return data.replace(field, struct.pack("<I", len(new)) + new + b"\0", 1)


def corrupted_programs(pte: bytes, blob: bytes, at: int) -> dict:
    """name -> (.pte with one corruption of its graph blob or named data, the outcome expected in the worker
    ("refused-load" or "refused-run"), ExecuTorch's status code, the line naming the problem)."""
    import dataclasses

    from executorch_wgpu.backend.serialization import graph_blob

    version, oldest = graph_blob.GRAPH_SCHEMA_VERSION, graph_blob.OLDEST_READABLE_GRAPH_VERSION
    where = at + root_field_offset(blob, 0)

    def with_blob(new: bytes) -> bytes:
        assert len(new) == len(blob)   # the program's offsets stay valid
        return pte[:at] + new + pte[at + len(blob):]

    def with_version(v: int) -> bytes:
        return pte[:where] + struct.pack("<I", v) + pte[where + 4:]

    rec = graph_blob.deserialize_graph(blob)
    assert graph_blob.serialize_graph(rec) == blob   # the writer is deterministic: records can be edited

    def with_expr(index: int, tokens) -> bytes:
        exprs = list(rec.exprs)
        exprs[index] = tuple(tokens)
        return with_blob(graph_blob.serialize_graph(dataclasses.replace(rec, exprs=exprs)))

    ops = {name: code for name, (code, _) in graph_blob.EXPR_OPS.items()}
    const, floordiv, mul, minimum = ops["const"], ops["floordiv"], ops["mul"], ops["min"]
    kernel_steps = [s for s in rec.steps if s.linear < 0]
    # a divisor (a constant right before a floordiv): made 0
    div = next(i for i, e in enumerate(rec.exprs)
               if any(e[t][0] == const and e[t + 1][0] == floordiv for t in range(len(e) - 1)))
    t = next(t for t in range(len(rec.exprs[div]) - 1)
             if rec.exprs[div][t][0] == const and rec.exprs[div][t + 1][0] == floordiv)
    zero_divisor = [*rec.exprs[div][:t], (const, 0), *rec.exprs[div][t + 1:]]
    # a grid's min(cap, tokens): made 2^30 * tokens, beyond any device's workgroups per dimension
    grid = next(g for st in kernel_steps for g in st.groups if [c for c, _ in rec.exprs[g]] == [const, 1, minimum])
    huge_grid = [(const, 1 << 30), rec.exprs[grid][1], (mul, 0)]
    # a float parameter's bits (a constant-only expression above 2^20): made 2^40
    bits = next(i for i, e in enumerate(rec.exprs) if len(e) == 1 and e[0][0] == const and e[0][1] > 1 << 20)
    kernel = next(s.kernel for s in kernel_steps).encode()
    key = rec.linears[0].blob_key.encode()
    wgq4 = pte.index(b"WGQ4", at + len(blob)) - 4          # a linear's WGQ4 blob in the named data
    middle = wgq4 + 2048
    load, run = "refused-load", "refused-run"
    return {
        "newer schema version": (with_version(version + 1), load, INVALID_COMPATIBILITY,
                                 f"graph blob has schema version {version + 1}; this executorch_wgpu reads versions "
                                 f"{oldest} to {version}: upgrade executorch_wgpu"),
        "older schema version": (with_version(oldest - 1), load, INVALID_COMPATIBILITY,
                                 f"graph blob has schema version {oldest - 1}; this executorch_wgpu reads versions "
                                 f"{oldest} to {version}: re-export the model"),
        "truncated": (pte[:at + len(blob) // 2] + bytes(len(blob) - len(blob) // 2) + pte[at + len(blob):], load,
                      INVALID_PROGRAM, "graph blob is truncated or corrupted"),
        "unknown kernel": (with_blob(replace_string(blob, kernel, kernel[:-1] + b"!")), load, INVALID_PROGRAM,
                           f"names kernel '{kernel[:-1].decode()}!', which this executorch_wgpu does not have"),
        "missing named data": (with_blob(replace_string(blob, key, key[:-1] + (b"0" if key[-1:] != b"0" else b"1"))),
                               load, INVALID_PROGRAM, "which the program lacks"),
        "corrupted linear weights": (pte[:middle] + bytes([pte[middle] ^ 0xFF]) + pte[middle + 1:], load,
                                     INVALID_PROGRAM, "payload checksum mismatch"),
        # well-formed blobs whose values are wrong for the inputs: refused at execute, before any GPU work
        "a division by zero": (with_expr(div, zero_divisor), run, INVALID_ARGUMENT,
                               f"graph delegate: expression {div} divides by zero for these inputs"),
        "a grid beyond the device's limits": (with_expr(grid, huge_grid), run, INVALID_ARGUMENT,
                                              "workgroups for these inputs is outside [0, "),
        "a parameter beyond 32 bits": (with_expr(bits, [(const, 1 << 40)]), run, INVALID_ARGUMENT,
                                       f"is {1 << 40} for these inputs, which does not fit in 32 bits"),
    }


def run_worker(tmp_path, cases: List[bytes], tokens: Sequence[int], pos: int, python: bool) -> tuple:
    """(results by case, stderr by case) of the cases run in a worker process; fails on a crash or a hang."""
    np.savez(tmp_path / "cases.npz", **{f"c{i}": np.frombuffer(c, dtype=np.uint8) for i, c in enumerate(cases)})
    args = [sys.executable, __file__, str(tmp_path / "cases.npz"), json.dumps([list(tokens), pos]),
            "python" if python else "native"]
    try:
        done = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=WORKER_SECONDS)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        last = re.findall(r"=== case (\d+)", stderr)
        pytest.fail(f"the worker hung (> {WORKER_SECONDS} s), in case {last[-1] if last else '?'}")
    logs = {int(m.group(1)): text for m, text in
            zip(re.finditer(r"=== case (\d+)\n", done.stderr), re.split(r"=== case \d+\n", done.stderr)[1:])}
    results = {r["i"]: r for r in map(json.loads, done.stdout.splitlines())}
    if done.returncode != 0:
        crashed = max(logs) if logs else None
        if crashed is not None:
            (tmp_path / "crash.pte").write_bytes(cases[crashed])
        pytest.fail(f"the worker died (exit {done.returncode}) in case {crashed}; reproducer: "
                    f"{tmp_path / 'crash.pte'}\n{done.stderr[-3000:]}")
    assert len(results) == len(cases), done.stderr[-3000:]
    return results, logs


def test_corrupted_graph_blobs_are_refused_with_the_right_status_naming_the_problem(tmp_path, native_lib, llama,
                                                                                   blobs_in):
    blob, at = graph_blob_of(llama.pte, blobs_in)
    corrupted = corrupted_programs(llama.pte, blob, at)
    names = list(corrupted)
    results, logs = run_worker(tmp_path, [corrupted[n][0] for n in names] + [llama.pte], PROMPT[:4], 0, python=False)
    for i, name in enumerate(names):
        _, outcome, code, line = corrupted[name]
        r = results[i]
        assert r["native"] == outcome and re.search(status(code), r["native_error"]), (name, r)
        assert re.search(r"WebGPUBackend: .*" + re.escape(line), logs[i]), (name, logs[i])
    assert results[len(names)]["native"] == "ran"   # the same worker runs the intact program


def test_cpp_and_python_graph_readers_refuse_or_accept_the_same_mutated_blobs(native_lib, llama, blobs_in, fuzz,
                                                                              fuzz_stats):
    from hypothesis import given

    from executorch_wgpu.backend.serialization import graph_blob
    from executorch_wgpu.errors import BlobFormatError

    blob, _ = graph_blob_of(llama.pte, blobs_in)
    sites = fuzz.structure(graph_blob._graph_schema(), blob)
    test = "graph reader"

    @fuzz.settings(fuzz.cases(300, 0.25), deadline_ms=5000)
    @given(fuzz.mutated(blob, sites, fuzz.BLOB_HEADER_SITES))
    def run(data):
        cpp = native_lib.describe_graph_blob(data)
        try:
            rec = graph_blob.deserialize_graph(data)
        except BlobFormatError as e:
            assert "error" in cpp, f"C++ accepts a graph blob Python refuses ({e})"
            fuzz_stats.count(test, "both refuse")
            return
        assert "error" not in cpp, f"C++ refuses a graph blob Python accepts: {cpp['error']}"
        assert (cpp["exprs"], cpp["steps"], cpp["buffers"]) == (len(rec.exprs), len(rec.steps), len(rec.buffers))
        fuzz_stats.count(test, "both accept")

    run()


def test_mutated_graph_blobs_in_a_pte_run_as_the_python_runtime_runs_them_or_are_refused(tmp_path, native_lib, llama,
                                                                                       blobs_in, fuzz, fuzz_stats):
    """Blob mutations (truncations, bit flips, edits aimed at every offset, count and scalar) in the .pte, run by
    both runtimes in one worker: the native delegate refuses a case, naming the problem, or computes what the
    Python runtime computes from the same blob (a graph blob carries no checksum: a mutated constant can be a
    valid, different program)."""
    from hypothesis import given

    from executorch_wgpu.backend.serialization import graph_blob

    blob, at = graph_blob_of(llama.pte, blobs_in)
    sites = fuzz.structure(graph_blob._graph_schema(), blob)
    cases: List[bytes] = []

    @fuzz.settings(fuzz.cases(40, 0.1), deadline_ms=None)
    @given(fuzz.mutated(blob, sites, fuzz.BLOB_HEADER_SITES))
    def collect(data):
        data = data[:len(blob)] + bytes(max(0, len(blob) - len(data)))   # the program's offsets stay valid
        cases.append(llama.pte[:at] + data + llama.pte[at + len(blob):])

    collect()
    results, logs = run_worker(tmp_path, cases, PROMPT[:4], 0, python=True)
    test = "pte, graph blob mutated"
    for i in range(len(cases)):
        r, log = results[i], logs.get(i, "")
        fuzz_stats.count(test, f"native {r['native']}, python {r['python']}")
        if r["native"] == "ran":
            assert r["python"] == "ran", f"case {i}: the native delegate ran a blob Python refuses: {r}"
            ours, theirs = (torch.tensor(r[k], dtype=torch.float32) for k in ("native_out", "python_out"))
            assert ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5, equal_nan=True), \
                f"case {i}: the two runtimes compute different outputs"
        else:
            assert re.search(r"WebGPUBackend: ", log), f"case {i}: refused without a WebGPUBackend line:\n{log}"
            if r["native"] == "refused-load":
                assert r["python"] == "refused-load", f"case {i}: only the native delegate refuses the blob: {r}\n{log}"


# ---- the worker -------------------------------------------------------------------------------------


def worker(cases_path: str, inputs_json: str, which: str) -> int:
    """Runs each .pte case through ExecuTorch's runtime with the native delegate (and, with which == "python",
    through our Python runtime too); one JSON line per case on stdout, "=== case <i>" on stderr before it."""
    import executorch_wgpu.native as native

    native.load()
    tokens, pos = json.loads(inputs_json)
    inputs = [torch.tensor([tokens]), torch.tensor([pos])]
    cases = np.load(cases_path)
    for i in range(len(cases.files)):
        data = cases[f"c{i}"].tobytes()
        os.write(2, f"=== case {i}\n".encode())
        result = {"i": i}
        runs = [("native", et_method)] + ([("python", py_method)] if which == "python" else [])
        for name, load in runs:
            try:
                method = load(data)
            except Exception as e:
                result.update({name: "refused-load", f"{name}_error": f"{type(e).__name__}: {e}"})
                continue
            try:
                (y,) = method.execute([x.clone() for x in inputs])
                result.update({name: "ran", f"{name}_out": y.tolist()})
            except Exception as e:
                result.update({name: "refused-run", f"{name}_error": f"{type(e).__name__}: {e}"})
            del method
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker(*sys.argv[1:4]))
