"""The benchmark harness on the default adapter (lavapipe in CI): it runs, checks every kernel, writes its reports.

Timing is never asserted here; the harness's correctness checks and outputs are.
"""

import json

import pytest

from executorch_wgpu.tools import bench


def test_quick_bench_checks_every_kernel_against_the_golden_and_writes_reports(tmp_path):
    bench.main(["--quick", "--shapes", "q,down", "--m", "1,16", "--reps", "2", "--warmup", "1", "--rounds", "1",
                "--out", str(tmp_path)])
    results = json.loads((tmp_path / "bench.json").read_text())
    rows = results["rows"]
    assert [(r["shape"], r["M"]) for r in rows] == [("q", 1), ("q", 16), ("down", 1), ("down", 16)]
    for r in rows:
        expected = set(bench.KERNELS_FOR_M[r["M"] == 1])
        assert set(r["kernels"]) == expected
        for kernel, m in r["kernels"].items():
            assert m["ok"] and m["rel_err"] <= bench.tolerance(kernel) == 1e-4, (r["shape"], r["M"], kernel, m)
            assert m["us"] > 0 and m["tflops"] > 0
        assert r["routed"] in r["kernels"] and r["fastest"] in r["kernels"]
        assert r["routed_vs_fastest"] >= 1.0
        assert r["stream_read_us"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert table.count("\n| q |") == 2 and table.count("\n| down |") == 2
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_an_unknown_shape_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--shapes", "nope", "--out", str(tmp_path)])
    assert "unknown shapes" in capsys.readouterr().err

