"""wgq4_llama_run: an exported Llama end to end in ExecuTorch's C++ runtime, no Python in the process.

The runner (runtime_native/llama_run.cpp) prefills a prompt and greedy-decodes through
ExecuTorch's C++ Module API with the native delegate. Pinned here:

  * its greedy tokens equal our Python runtime's (models.greedy_generate) on the same .pte, for a
    graph-mode Llama (one delegate, the KV cache on the GPU) and a linears-only one (the KV cache
    in the program), with repeated prefills (warm-up + timed) not disturbing the decode;
  * bad input -- a missing or broken .pte, a token id outside the vocabulary or not a number, a
    prompt above the export's bound, decoding past the context -- is a non-zero exit and a
    `wgq4_llama_run: ...` line, never a crash;
  * `llama-bench --runtime native` reports the runner's tokens/s beside the Python runtime's.

Every test is marked `native` (conftest): skipped, saying why, where the library is not built.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import List

import pytest

from executorch_wgpu import native

pytestmark = pytest.mark.native

PROMPT = [1, 57, 300, 9, 1000, 77, 2048, 5, 4000, 12]
NEW_TOKENS = 12
MAX_TOKENS = 64
VOCAB = 4096   # the small config's


def export(path: Path, linears_only: bool, **overrides) -> Path:
    from executorch_wgpu.tools import models

    model = models.build_llama("small", seed=0, llm_ops=not linears_only, **overrides)
    models.export_llama_pte(model, path, max_tokens=MAX_TOKENS, linears_only=linears_only)
    return path


@pytest.fixture(scope="module")
def graph_pte(tmp_path_factory, small_llama_graph_pte) -> Path:
    """Llama small in graph mode: one delegate, the KV cache on the GPU (the session's shared program)."""
    assert small_llama_graph_pte.max_tokens == MAX_TOKENS
    path = tmp_path_factory.mktemp("llama") / "graph.pte"
    path.write_bytes(small_llama_graph_pte.pte)
    return path


@pytest.fixture(scope="module")
def linears_pte(tmp_path_factory) -> Path:
    """Llama small, 2 layers (a faster export), linears-only: a delegate per q4 linear, the KV cache in the program."""
    return export(tmp_path_factory.mktemp("llama") / "linears.pte", linears_only=True, n_layers=2)


def python_tokens(pte: Path) -> List[int]:
    from executorch_wgpu.runtime import Runtime
    from executorch_wgpu.tools import models

    method = Runtime.get().load_program(pte.read_bytes()).load_method("forward")
    return models.greedy_generate(models.method_runner(method), PROMPT, NEW_TOKENS)


def run_runner(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(native.llama_runner_path()), *args], capture_output=True, text=True,
                          errors="replace", timeout=300)


@pytest.mark.parametrize("program", ["graph_pte", "linears_pte"])
def test_the_runners_greedy_tokens_equal_the_python_runtimes(program, request):
    pte = request.getfixturevalue(program)
    result = native.run_llama_in_cpp(pte, PROMPT, NEW_TOKENS, warmup=1, repeats=2, timeout=300)
    expected = python_tokens(pte)
    assert result["tokens"] == expected and len(set(expected)) > 4
    assert (result["prompt_tokens"], result["new_tokens"], result["vocab"], result["max_tokens"]) == \
        (len(PROMPT), NEW_TOKENS, VOCAB, MAX_TOKENS)
    # timings: 2 timed prefills (after a warm-up), every decode call but the first (warm-up) timed
    assert len(result["prefill_ms_runs"]) == 2 and result["prefill_ms"] > 0
    assert result["prefill_tokens_per_s"] == pytest.approx(len(PROMPT) * 1e3 / result["prefill_ms"], rel=1e-3)
    assert result["decode_steps_timed"] == NEW_TOKENS - 2
    assert result["decode_tokens_per_s"] == pytest.approx(1e3 / result["decode_ms_per_token"], rel=1e-3)
    assert result["load_ms"] > 0


def test_prefill_only_times_no_decode(graph_pte):
    result = native.run_llama_in_cpp(graph_pte, PROMPT[:3], 1, warmup=0, repeats=1)
    assert len(result["tokens"]) == 1 and result["decode_steps_timed"] == 0
    assert result["decode_tokens_per_s"] is None and result["decode_ms_per_token"] is None


def test_a_bad_pte_is_an_error_exit_with_a_message(tmp_path):
    done = run_runner(str(tmp_path / "missing.pte"), "--prompt", "1,2")
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "wgq4_llama_run:" in done.stderr and "cannot read the file" in done.stderr
    (tmp_path / "junk.pte").write_bytes(b"not a program" * 100)
    done = run_runner(str(tmp_path / "junk.pte"), "--prompt", "1,2")
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "not a valid .pte" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--prompt", f"1,{VOCAB}"], f"token id {VOCAB} (position 1) is outside the program's vocabulary [0, {VOCAB})"),
    (["--prompt", "1,abc"], "token id 'abc' is not a non-negative integer"),
    (["--prompt", "-5"], "token id '-5' is not a non-negative integer"),
    (["--prompt", ",".join(["1"] * (MAX_TOKENS + 1))], f"this program takes at most {MAX_TOKENS} per call"),
    (["--prompt", "1", "--new-tokens", "0"], "--new-tokens must be an integer >= 1"),
    ([], "--prompt is required"),
    (["--prompt", "1", "--temperature", "1"], "unknown flag --temperature"),
])
def test_bad_arguments_are_a_usage_error_naming_the_problem(graph_pte, args, message):
    done = run_runner(str(graph_pte), *args)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert message in done.stderr


def test_decoding_past_the_context_stops_with_the_delegates_message(graph_pte):
    """The export bounds input_pos (max_context_len 128): the call that crosses it fails, naming the step."""
    done = run_runner(str(graph_pte), "--prompt", "1,2", "--new-tokens", "200", "--warmup", "0")
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "wgq4_llama_run: decode step" in done.stderr and "InvalidArgument" in done.stderr
    assert "outside the exported range" in done.stderr   # the graph delegate's line


def test_llama_bench_reports_native_tokens_per_s_beside_pythons(tmp_path):
    from executorch_wgpu.tools import llama_bench

    llama_bench.main(["--config", "small", "--layers", "1", "--prompt", "8", "--decode-tokens", "3", "--repeats", "1",
                      "--runtime", "native", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "llama_bench.json").read_text())
    assert result["runtime"] == "native" and "skipped" not in result["native"]
    (prefill,), decode = result["prefill"], result["decode"]
    assert prefill["native_tokens_per_s"] > 0 and decode["native_tokens_per_s"] > 0
    assert result["native"]["decode"]["tokens"] == 3
    # graph mode: both runtimes run the same kernels on the same .pte, so the same greedy tokens
    assert result["native"]["decode"]["generated_tokens"] == decode["generated_tokens"]
    md = (tmp_path / "llama_bench.md").read_text()
    assert "| tokens/s | native C++ tokens/s |" in md and "the same greedy tokens as ours" in md
