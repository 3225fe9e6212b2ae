"""tune on a user's own layers (--shapes KxN, --pte model.pte); the partitioner names the layers a table lacks."""

from __future__ import annotations

import logging

import pytest
import torch

from executorch_wgpu.backend.route_table import RouteTable, RouteTableEntry
from executorch_wgpu.tools.models import quantize_q4
from executorch_wgpu.tools.tune import LAST_BUCKET_M_MAX, main as tune_main

FAST = ["--m", "1,4", "--reps", "2", "--warmup", "1", "--rounds", "1"]
GAP = "has no entry for"


def entry_keys(table: RouteTable) -> set:
    return {(e.K, e.N, e.group_size) for e in table.entries}


def three_linears() -> torch.nn.Module:
    """64 -> 96 -> 64 -> 96: three layers of two shapes; layer 0 quantized at group size 64, 2 and 4 at 32."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 96)).eval()
    quantize_q4(model, 64, filter_fn=lambda m, fqn: fqn == "0")
    return quantize_q4(model, 32, filter_fn=lambda m, fqn: fqn in ("2", "4"))


def gap_messages(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.name.startswith("executorch_wgpu") and GAP in r.getMessage()]


# ---- tune --shapes KxN / --pte ------------------------------------------------------------------


def test_tune_measures_a_kxn_shape(tmp_path, capsys):
    out = tmp_path / "routes.json"
    tune_main(["--shapes", "64x96", *FAST, "--out", str(out)])
    t = RouteTable.load(out)
    assert entry_keys(t) == {(64, 96, 32)}
    assert set(t.entry_for(64, 96, 32).measured_us) == {"1", "4"}
    assert "--shapes 64x96" in t.command
    assert "K=64 N=96 gs=32: decode" in capsys.readouterr().out


def test_tune_pte_measures_exactly_its_layer_shapes_at_their_group_sizes(tmp_path, lower, caplog):
    """A graph-mode .pte (the default): its layers are the graph delegate's q4 linears, in the named data."""
    model = three_linears()
    pte = tmp_path / "model.pte"
    pte.write_bytes(lower(model, torch.randn(2, 64)))
    out = tmp_path / "routes.json"
    # --group-size applies to --shapes only: the .pte's layers keep theirs (K=96 is no multiple of 128).
    with caplog.at_level(logging.INFO, logger="executorch_wgpu"):
        tune_main(["--pte", str(pte), "--group-size", "128", *FAST, "--out", str(out)])
    assert entry_keys(RouteTable.load(out)) == {(64, 96, 64), (96, 64, 32), (64, 96, 32)}
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "3 q4 layers, 3 distinct (K, N, group size)" in text and "--group-size 128 applies to --shapes only" in text

    # Lowered with that table, every layer has its entry: nothing to report.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="executorch_wgpu"):
        lower(model, torch.randn(2, 64), route_table=out)
    assert gap_messages(caplog) == []


def test_tune_pte_and_shapes_together_measure_both(tmp_path, lower):
    """A linears-only .pte: its layer is its own delegate's blob."""
    pte = tmp_path / "one.pte"
    pte.write_bytes(lower(quantize_q4(torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()), torch.randn(2, 64),
                          linears_only=True))
    out = tmp_path / "routes.json"
    tune_main(["--pte", str(pte), "--shapes", "128x16", "--group-size", "128", *FAST, "--out", str(out)])
    assert entry_keys(RouteTable.load(out)) == {(64, 32, 32), (128, 16, 128)}


@pytest.mark.parametrize("args, words", [
    (["--shapes", "64x96,foo"], "'foo' is neither a shape name"),
    (["--shapes", "64x"], "'64x' is neither a shape name"),
    (["--shapes", "48x96"], "'48x96' (K=48, N=96) cannot be a q4gsw layer at --group-size 32"),
    (["--shapes", "0x96"], "'0x96' (K=0, N=96)"),
    (["--shapes", "64x0"], "'64x0' (K=64, N=0)"),
    (["--shapes", "64x96", "--group-size", "48"], "argument --group-size: expected a positive multiple of 32"),
    (["--shapes", "q", "--group-size", "96"], "'q' (K=2048, N=2048) cannot be a q4gsw layer at --group-size 96"),
    (["--m", "4,16"], "--m must hold 1"),
])
def test_a_bad_shape_or_option_is_a_usage_error_naming_it(tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as info:
        tune_main([*args, "--out", str(tmp_path / "routes.json")])
    assert info.value.code == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "routes.json").exists()


def test_a_pte_tune_cannot_read_is_a_usage_error_naming_it(tmp_path, lower, capsys):
    cases = {tmp_path / "absent.pte": "argument --pte: no such file", tmp_path / "text.pte": "not an ExecuTorch program"}
    (tmp_path / "text.pte").write_text("not a program")
    plain = tmp_path / "plain.pte"   # a program without q4 layers: nothing delegated
    plain.write_bytes(lower(torch.nn.Sequential(torch.nn.Linear(64, 32)).eval(), torch.randn(2, 64)))
    cases[plain] = "delegates no layer to executorch_wgpu"
    for path, words in cases.items():
        with pytest.raises(SystemExit) as info:
            tune_main(["--pte", str(path), "--out", str(tmp_path / "routes.json")])
        err = capsys.readouterr().err
        assert info.value.code == 2 and words in err and str(path) in err, err


# ---- the partitioner names the layers a table lacks ---------------------------------------------


def table_of(*shapes) -> RouteTable:
    entries = [RouteTableEntry(k, n, gs, "gemv", ((LAST_BUCKET_M_MAX, "shmem"),)) for k, n, gs in shapes]
    return RouteTable(name="lab", adapter="Test GPU, Vulkan", date="2026-01-02", command="tune", entries=entries)


def test_a_table_without_entries_for_the_layers_is_reported_once_with_the_command(caplog, lower):
    with caplog.at_level(logging.INFO, logger="executorch_wgpu"):
        lower(three_linears(), torch.randn(2, 64), route_table=table_of())
    (message,) = gap_messages(caplog)
    assert "route table lab (Test GPU, Vulkan, 2026-01-02) has no entry for 3 of 3 delegated layers" in message
    assert "default rule" in message
    assert "K=64 N=96 gs=64 (0)" in message and "K=96 N=64 gs=32 (2)" in message and "K=64 N=96 gs=32 (4)" in message
    assert "python -m executorch_wgpu tune --shapes 96x64,64x96 --group-size 32 --out routes.json" in message
    assert "python -m executorch_wgpu tune --shapes 64x96 --group-size 64 --out routes.json" in message
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("executorch_wgpu")]
    assert messages[-1] == "WebGPUPartitioner: 3 of 3 q4 linears delegated"   # the summary stays last


def test_only_the_shapes_the_table_lacks_are_named(caplog, lower):
    with caplog.at_level(logging.INFO, logger="executorch_wgpu"):
        lower(three_linears(), torch.randn(2, 64), route_table=table_of((64, 96, 32), (64, 96, 64)))
    (message,) = gap_messages(caplog)
    assert "no entry for 1 of 3 delegated layers" in message and "K=96 N=64 gs=32 (2)" in message
    assert "gs=64" not in message and "--shapes 96x64 --group-size 32" in message


def test_a_covering_table_or_both_routes_forced_say_nothing(caplog, lower):
    model = three_linears()
    with caplog.at_level(logging.INFO, logger="executorch_wgpu"):
        lower(model, torch.randn(2, 64), route_table=table_of((64, 96, 32), (64, 96, 64), (96, 64, 32)))
        lower(model, torch.randn(2, 64), route_table=table_of(), prefill_route="shmem", decode_route="gemv")
    assert gap_messages(caplog) == []
