"""python -m executorch_wgpu: a help listing that says what each command does, --version, clear usage errors."""

from __future__ import annotations

import ast
import subprocess
import sys
import time

import pytest

import executorch_wgpu
from executorch_wgpu.__main__ import COMMANDS


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "executorch_wgpu", *args], capture_output=True, text=True,
                          timeout=60)


def test_help_lists_every_command_with_what_it_does_without_importing_the_tools():
    result = cli("--help")
    assert result.returncode == 0 and result.stderr == ""
    for name, (_, summary) in COMMANDS.items():
        assert name in result.stdout and summary.split()[0] in result.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys; from executorch_wgpu.__main__ import main\n"
                            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                            "print(sorted(m for m in ('torch', 'torchao', 'wgpu') if m in sys.modules))"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip().splitlines()[-1] == "[]"


def test_version_prints_the_package_version():
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"executorch_wgpu {executorch_wgpu.__version__}"


@pytest.mark.parametrize("args, words", [(("bogus",), "invalid choice: 'bogus'"),
                                         ((), "the following arguments are required: command")])
def test_a_wrong_command_is_a_usage_error_not_a_traceback(args, words):
    result = cli(*args)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


# Each tool's own options: a bad value is a usage error (exit 2, the option named, no traceback) that argparse
# gives before anything slow is imported or run -- `demo --prefill-route bogus` once failed after 13 s of loading.
BAD_ARGUMENTS = [
    (("bench", "--m", "abc"), "argument --m"),
    (("bench", "--m", "0"), "argument --m"),
    (("bench", "--group-size", "33"), "argument --group-size"),
    (("bench", "--quick", "--group-size", "512"), "argument --group-size"),   # a multiple of 32 that divides no K
    (("bench", "--route-table", "missing.json"), "argument --route-table"),
    (("bench", "--shapes", "nope"), "argument --shapes"),
    (("bench", "--reps", "0"), "argument --reps"),
    (("bench", "--model", "7b"), "argument --model"),
    (("demo", "--prefill-route", "bogus"), "argument --prefill-route"),
    (("demo", "--decode-route", "bogus"), "argument --decode-route"),
    (("demo", "--route-table", "missing.json"), "argument --route-table"),
    (("demo", "--max-seq", "4"), "argument --max-seq"),
    (("demo", "--pte", "no/such/folder/minilm.pte"), "argument --pte"),
    (("demo", "--ffn", "--dim", "100"), "argument --dim"),
    (("demo", "--ffn", "--prompt", "300"), "argument --prompt"),
    (("llama-bench", "--config", "7b"), "argument --config"),
    (("llama-bench", "--prompt", "1"), "argument --prompt"),
    (("llama-bench", "--prompt", "x"), "argument --prompt"),
    (("llama-bench", "--decode-tokens", "0"), "argument --decode-tokens"),
    (("llama-bench", "--route-table", "missing.json"), "argument --route-table"),
    (("native-bench", "--k", "33"), "argument --k"),
    (("native-bench", "--runtimes", "python,bogus"), "argument --runtimes"),
    (("tune", "--out", "routes.json", "--group-size", "33"), "argument --group-size"),
    (("tune", "--out", "routes.json", "--reps", "0"), "argument --reps"),
    (("tune", "--out", "routes.json", "--warmup", "-1"), "argument --warmup"),
    (("tune", "--out", "routes.json", "--rounds", "x"), "argument --rounds"),
    (("tune", "--out", "no/such/folder/routes.json"), "argument --out"),
    (("tune", "--out", "routes.json", "--pte", "missing.pte"), "argument --pte"),
]


def cli_timed(*args: str, cwd=None) -> tuple:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "executorch_wgpu", *args], capture_output=True, text=True,
                            timeout=60, cwd=cwd)
    return result, time.perf_counter() - start


def heavy_modules_after(*args: str) -> list:
    """The heavy modules (torch, torchao, wgpu, executorch) that `main(args)` imported before it exited."""
    probe = subprocess.run([sys.executable, "-c", "import sys; from executorch_wgpu.__main__ import main\n"
                            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
                            "print(sorted(m for m in ('torch', 'torchao', 'wgpu', 'executorch') if m in sys.modules))",
                            *args], capture_output=True, text=True, timeout=60)
    return ast.literal_eval(probe.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args, option", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_a_bad_option_value_is_a_quick_usage_error_that_names_the_option(args, option, tmp_path):
    result, seconds = cli_timed(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert option in result.stderr and "usage:" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == "" and seconds < 5
    assert list(tmp_path.iterdir()) == []   # nothing written


def test_a_malformed_route_table_is_a_usage_error_that_says_why(tmp_path):
    table = tmp_path / "table.json"
    table.write_text("{not json")
    for command in ("bench", "demo", "llama-bench"):
        result, _ = cli_timed(command, "--route-table", str(table))
        assert result.returncode == 2 and "argument --route-table" in result.stderr and "not valid JSON" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [("bench", "--m", "abc"), ("demo", "--prefill-route", "bogus"),
                                  ("llama-bench", "--prompt", "x"), ("native-bench", "--k", "33"),
                                  ("tune", "--out", "routes.json", "--reps", "0"),
                                  ("tune", "--out", "routes.json", "--m", "2,4")])
def test_usage_errors_come_before_any_heavy_import(args):
    assert heavy_modules_after(*args) == []


@pytest.mark.parametrize("args", [("bench",), ("demo",), ("demo", "--ffn"), ("llama-bench",), ("native-bench",),
                                  ("tune",)])
def test_command_help_is_fast_and_quiet_and_imports_nothing_heavy(args):
    result, seconds = cli_timed(*args, "--help")
    assert result.returncode == 0 and result.stderr == "" and "usage: python -m executorch_wgpu" in result.stdout
    assert seconds < 2
    assert heavy_modules_after(*args, "--help") == []


def test_llama_bench_defaults_to_the_small_config_and_says_the_1b_needs_a_gpu():
    from executorch_wgpu.tools import llama_bench

    assert llama_bench.parse_args([]).config == "small"
    result, _ = cli_timed("llama-bench", "--help")
    assert "needs a GPU" in " ".join(result.stdout.split())


def test_measurements_show_three_significant_digits_and_a_dash_where_there_is_none():
    from executorch_wgpu.tools.cli import figure

    assert [figure(v) for v in (None, 4816.2, 12.345, 0.0012345)] == ["—", "4816", "12.3", "0.00123"]


def test_reports_leave_out_gpu_time_an_adapter_without_timestamp_queries_cannot_give():
    from executorch_wgpu.tools import llama_bench, native_bench

    calls = [{"name": "l0", "kernel": "gemv", "M": 1, "wall_us": 300.0, "gpu_us": None, "upload_us": 1.0,
              "submit_us": 2.0, "wait_us": 3.0, "readback_us": 4.0}] * 3
    split = llama_bench.phase_split(0.002, calls[:1])
    assert split["gpu_kernels_ms"] is None and split["delegate_overhead_ms"] is None
    result = {"config": "small", "date": "today", "adapter": "no-timestamps", "seed": 0, "group_size": 32,
              "model": {"dim": 256, "n_layers": 1, "hidden_dim": 1024, "n_heads": 8, "n_kv_heads": 4,
                        "vocab_size": 4096, "max_context_len": 128},
              "lm_head": {"mode": "q4", "why": "auto"}, "delegated_linears": 1, "export_s": 1.0, "pte_bytes": 10,
              "load_s": 0.1, "command": "llama-bench",
              "prefill": [{"prompt": 8, "tokens_per_s": 4000.0, **split}],
              "decode": {"after_prompt": 8, "tokens": 2, "tokens_per_s": 500.0, "ms_per_token_mean": 2.0,
                         "gpu_kernels_ms_per_token": None, "delegate_overhead_ms_per_token": None,
                         "delegate_wall_ms_per_token": 0.3, "cpu_ops_ms_per_token": 1.7, "kernels": {"gemv": 2}}}
    table = llama_bench.markdown(result)
    assert "GPU kernels ms" not in table and "no timestamp queries" in table and "| prefill | 8 |" in table
    header, rule = [line for line in table.splitlines() if line.startswith("| phase") or line.startswith("|---")]
    assert header.count("|") == rule.count("|")
    stats = native_bench.summary([500.0, 510.0, 520.0], calls)
    assert stats["gpu_us"] is None and stats["above_gpu_us"] is None
    row = native_bench.markdown({"K": 64, "N": 32, "M": 1, "adapter": "a", "date": "d", "calls": 3, "rounds": 1,
                                 "runtimes": {"python": stats}}).splitlines()[-1]
    assert row.startswith("| python | 510.0 | — |") and row.endswith("| — | gemv |") and " 0.0 " not in row


@pytest.mark.parametrize("command", ["tune", "demo"])
def test_a_folder_as_the_output_file_is_a_usage_error_before_measuring(command, tmp_path):
    option = "--out" if command == "tune" else "--pte"
    result, seconds = cli_timed(command, option, str(tmp_path))
    assert result.returncode == 2 and f"argument {option}" in result.stderr and "is a folder" in result.stderr
    assert "Traceback" not in result.stderr and seconds < 5


@pytest.mark.parametrize("module", ["demo", "llama_bench", "tune"])
def test_a_delegate_error_is_one_line_not_a_traceback(module, monkeypatch, capsys, tmp_path):
    # No adapter, an input past the export's bounds, a --reuse-pte of an old blob version: a WebGPUDelegateError
    # from anywhere in the run ends the command with "error: ..." and status 1, as bench and native-bench do.
    import importlib

    from executorch_wgpu.errors import WebGPUDelegateError

    tool = importlib.import_module(f"executorch_wgpu.tools.{module}")

    def broken(*args, **kwargs):
        raise WebGPUDelegateError("no adapter here")

    target = {"demo": "minilm_main", "llama_bench": "run", "tune": "tune"}[module]
    monkeypatch.setattr(tool, target, broken)
    argv = ["--out", str(tmp_path / "routes.json")] if module == "tune" else []
    with pytest.raises(SystemExit) as exit_info:
        tool.main(argv)
    assert exit_info.value.code == 1 and capsys.readouterr().err.strip().endswith("error: no adapter here")


@pytest.mark.parametrize("mode", [None, "linears-only"])
def test_demo_ffn_lowers_in_graph_mode_by_default_and_linears_only_on_request(mode, tmp_path, capsys):
    import re

    from executorch_wgpu.tools import demo

    demo.main(["--ffn", "--dim", "64", "--hidden", "128", "--prompt", "4", "--max-tokens", "8", "--repeats", "1",
               "--pte", str(tmp_path / "ffn.pte"), *(["--mode", mode] if mode else [])])
    captured = capsys.readouterr()
    assert f"exported and lowered ({mode or 'graph'})" in captured.err
    out = captured.out
    relative = [float(r) for r in re.findall(r"\(relative ([-+.e0-9]+)\)", out)]
    assert len(relative) == 2 and max(relative) < 1e-4   # prefill and decode match eager torch
    assert out.count("route report (last call):") == 2 and out.count("  gate ") == 2
    # graph mode: the delegate's own times; its linears have none, shown as a dash, not 0
    assert out.count("graph delegate (last call): ") == (2 if mode is None else 0)
    gate_rows = [line for line in out.splitlines() if line.startswith("  gate ")]
    assert all(("—         —" in line) == (mode is None) for line in gate_rows), gate_rows
