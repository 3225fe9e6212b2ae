"""Cold-weight timing: bench's M = 1 rows after an L2 flush, and a model's linears in one submit per step.

Timing is never asserted here (lavapipe); what is measured, how it is labelled and
the correctness checks behind each figure are.
"""

import json

from executorch_wgpu.tools import bench, bench_model
from executorch_wgpu.tools.models import LLAMA_CONFIGS
from executorch_wgpu.tools.reference import TOLERANCES


def test_model_linears_are_every_projection_of_every_layer_then_lm_head():
    c = LLAMA_CONFIGS["1b"]
    linears = bench_model.model_linears("1b")
    assert len(linears) == 7 * c["n_layers"] + 1 == 113
    assert linears[:7] == [("q", 2048, 2048), ("k", 2048, 512), ("v", 2048, 512), ("o", 2048, 2048),
                           ("gate", 2048, 8192), ("up", 2048, 8192), ("down", 8192, 2048)]
    assert linears[-1] == ("lm_head", 2048, 128256)


def test_model_bench_times_each_step_in_one_submit_and_checks_each_shape(tmp_path, capsys):
    bench.main(["--quick", "--model", "small", "--m", "1,5", "--reps", "2", "--warmup", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "model.json").read_text())
    assert result["layers"] == len(bench_model.model_linears("small"))
    assert [r["M"] for r in result["rows"]] == [1, 5]
    for row in result["rows"]:
        assert row["ok"] and row["max_rel_err"] < TOLERANCES["fp32"] == 1e-4
        assert row["step_us"] >= row["passes_us"] * 0.999 > 0   # the step spans every pass
        assert row["weight_bytes"] == sum(v["bytes"] for v in row["by_kind"].values())
        assert sum(v["layers"] for v in row["by_kind"].values()) == result["layers"]
    decode, prefill = result["rows"]
    # The kernels a lowered model runs on this adapter (gemv at M = 1 on a GPU, regtiled everywhere on lavapipe).
    from executorch_wgpu.runtime_py.gpu import gpu_context

    def routed(k, n, m):
        return bench.routed_kernel(None, k, n, m, 32, gpu_context().adapter_class)

    dim, vocab = 256, 4096   # the small config
    assert {k for v in decode["by_kind"].values() for k in v["kernels"]} == {routed(dim, dim, 1)}
    assert prefill["by_kind"]["lm_head"]["kernels"] == [routed(dim, vocab, 1)]   # lm_head of the last position only
    assert prefill["by_kind"]["q"]["kernels"] == [routed(dim, dim, 5)]
    assert f"| 5 | lm_head | 1 | {routed(dim, vocab, 1)} |" in (tmp_path / "model.md").read_text()
    assert "one submit per step" in capsys.readouterr().out


def test_decode_rows_are_timed_cold_and_prefill_rows_say_they_are_l2_warm(tmp_path):
    bench.main(["--quick", "--shapes", "kv", "--m", "1,8", "--reps", "2", "--warmup", "1", "--rounds", "1",
                "--flush-mb", "4", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["M"], r["weights"]) for r in rows] == [(1, "cold"), (8, "L2-warm")]
    assert all(v["ok"] for r in rows for v in r["kernels"].values())
