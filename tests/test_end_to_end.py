"""The public path: torchao quantize_ -> torch.export -> to_edge_transform_and_lower -> .pte -> our runtime.

The default partitioner lowers in graph mode (test_the_default_partitioner_lowers_in_graph_mode; graph mode's
own tests: test_graph*.py); the other tests here pin linears-only mode (WebGPUPartitioner(linears_only=True)):
one WGQ4 delegate per q4 linear, each in the route report with its own route and times.
"""

import logging

import pytest
import torch

from executorch_wgpu.backend.route_table import LAST_BUCKET_M_MAX
from executorch_wgpu.backend.serialization.blob import FILE_IDENTIFIER, deserialize_q4linear
from executorch_wgpu.runtime import Runtime
from executorch_wgpu.tools.models import quantize_q4
from executorch_wgpu.tools.reference import golden_linear, rel_err


def run(pte: bytes, *inputs):
    method = Runtime.get().load_program(pte).load_method("forward")
    return method.execute(list(inputs)), method


def test_the_default_partitioner_lowers_in_graph_mode(blobs_in, lower):
    """WebGPUPartitioner() is graph mode: the q4 linears and the op between them are ONE delegate, a WGGR graph
    blob; linears_only=True is the opt-in for one WGQ4 delegate per linear."""
    from executorch_wgpu import WebGPUPartitioner
    from executorch_wgpu.backend.serialization.graph_blob import GRAPH_FILE_IDENTIFIER, is_graph_blob
    from executorch_wgpu.runtime_py.graph_delegate import GraphDelegate

    assert WebGPUPartitioner().linears_only is False and WebGPUPartitioner(linears_only=True).linears_only
    torch.manual_seed(0)
    model = quantize_q4(torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32)).eval())
    x = torch.randn(3, 64)
    pte = lower(model, x)
    (blob,) = blobs_in(pte)
    assert blob[4:8] == GRAPH_FILE_IDENTIFIER and is_graph_blob(blob)
    (y,), method = run(pte, x)
    assert len(method._delegates) == 1 and isinstance(method._delegates[0], GraphDelegate)
    # the delegate call is the program's only instruction: the relu runs on the GPU too
    assert [type(i.instr_args).__name__ for c in method._plan.chains for i in c.instructions] == ["DelegateCall"]
    with torch.no_grad():
        assert rel_err(y, model(x)) < 1e-4
    assert [e["name"] for e in method.route_report()] == ["0", "2"]
    # no per-linear times in graph mode: graph_report() times the one delegate
    assert all(e["gpu_us"] is None and e["wall_us"] is None for e in method.route_report())
    assert len(method.graph_report()) == 1
    linears = blobs_in(lower(model, x, linears_only=True))
    assert [b[4:8] for b in linears] == [FILE_IDENTIFIER] * 2


@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("bias", [True, False])
def test_single_linear_matches_fp64_golden_for_each_group_size(gs, bias, lower, single_linear):
    model = single_linear(256, 72, bias=bias, group_size=gs)
    x = torch.randn(5, 256)
    (y,), method = run(lower(model, x, adapter_rules=False, linears_only=True), x)
    assert rel_err(y, golden_linear(x, model[0])) < 1e-4
    (entry,) = method.route_report()
    assert (entry["M"], entry["K"], entry["N"], entry["kernel"]) == (5, 256, 72, "skinny")   # default rule: M <= 32


@pytest.mark.parametrize("prefill_route", ["regtiled", "shmem"])
@pytest.mark.parametrize("decode_route", ["gemv", "regtiled", "shmem"])
def test_forced_routes_are_obeyed_and_correct(prefill_route, decode_route, lower, single_linear):
    model = single_linear(1024, 136)
    x = torch.randn(70, 1024)   # partial tiles for every GEMM
    pte = lower(model, x, {0: (1, 128)}, prefill_route=prefill_route, decode_route=decode_route, linears_only=True)
    method = Runtime.get().load_program(pte).load_method("forward")
    for m in (70, 1):
        xm = x[:m]
        (y,) = method.execute([xm])
        assert rel_err(y, golden_linear(xm, model[0])) < 1e-4
        (entry,) = method.route_report()
        assert entry["kernel"] == (decode_route if m == 1 else prefill_route)
        assert "forced" in entry["reason"]


def test_default_rule_runs_skinny_at_small_m_and_shmem_above_with_the_partitioners_knobs(lower, single_linear):
    # N = 64, skinny_max_m = 4, shmem_min_mn = 512: skinny while M <= 4 or M*64 < 512, i.e. up to M = 7.
    model = single_linear(256, 64)
    pte = lower(model, torch.randn(4, 256), {0: (1, 48)}, skinny_max_m=4, shmem_min_mn=512, adapter_rules=False,
                linears_only=True)
    method = Runtime.get().load_program(pte).load_method("forward")
    for m, kernel in ((1, "gemv"), (4, "skinny"), (7, "skinny"), (8, "shmem"), (48, "shmem")):
        x = torch.randn(m, 256)
        (y,) = method.execute([x])
        assert rel_err(y, golden_linear(x, model[0])) < 1e-4
        (entry,) = method.route_report()
        assert (entry["M"], entry["kernel"]) == (m, kernel)
        assert "(default-rule)" in entry["reason"] and "M<=7 skinny, M>7 shmem" in entry["reason"]
        assert "M <= 4 or M*N < 512 -> skinny, else shmem" in entry["reason"]


def test_blob_records_routes_and_their_inputs(blobs_in, lower, single_linear):
    model = single_linear(256, 64)
    x = torch.randn(4, 256)
    (blob,) = blobs_in(lower(model, x, {0: (1, 64)}, linears_only=True))
    assert blob[4:8] == FILE_IDENTIFIER
    rec = deserialize_q4linear(blob)
    assert (rec.in_features, rec.out_features, rec.group_size, rec.m_min, rec.m_max) == (256, 64, 32, 1, 64)
    assert (rec.route.decode_kernel, rec.route.prefill_kernel, rec.route.source) == ("gemv", "shmem", "default-rule")
    assert (rec.route.skinny_max_m, rec.route.shmem_min_mn) == (32, 2**18)
    assert rec.route.prefill_buckets == (((2**18 - 1) // 64, "skinny"), (LAST_BUCKET_M_MAX, "shmem"))
    assert "K=256, N=64" in rec.route.reason


def test_3d_input_batch_by_sequence(lower, single_linear):
    model = single_linear(128, 48)
    x = torch.randn(2, 9, 128)
    (y,), method = run(lower(model, x, linears_only=True), x)
    assert y.shape == (2, 9, 48)
    assert rel_err(y, golden_linear(x, model[0])) < 1e-4
    assert method.route_report()[0]["M"] == 18


def test_one_program_serves_decode_and_prefill_alternately(lower, single_linear):
    model = single_linear(256, 96)
    x = torch.randn(1, 40, 256)
    pte = lower(model, x, {1: (1, 64)}, adapter_rules=False, linears_only=True)
    method = Runtime.get().load_program(pte).load_method("forward")
    for s in (1, 40, 1, 7, 64, 1):
        xs = torch.randn(1, s, 256)
        (y,) = method.execute([xs])
        assert y.shape == (1, s, 96)
        assert rel_err(y, golden_linear(xs, model[0])) < 1e-4
        assert method.route_report()[0]["kernel"] == ("gemv" if s == 1 else "skinny")


def test_mixed_model_matches_eager_torch_after_save_and_load(tmp_path, mixed_program):
    model, pte = mixed_program   # q4 linear -> relu -> q4 linear -> LayerNorm, * 2 + 1; seq in [1, 32]
    path = tmp_path / "mixed.pte"
    path.write_bytes(pte)
    method = Runtime.get().load_program(str(path)).load_method("forward")
    for s in (11, 1, 32):
        xs = torch.randn(2, s, 64)
        (y,) = method.execute([xs])
        with torch.no_grad():
            expected = model(xs)
        assert torch.allclose(y, expected, rtol=1e-4, atol=1e-4)
        assert [e["name"] for e in method.route_report()] == ["up", "down"]


def test_declined_asymmetric_layer_runs_on_the_cpu_and_is_logged_once(caplog, lower):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval()
    quantize_q4(model)
    # Make the second layer asymmetric: torchao keeps its zero points, we must not run it.
    model[2].weight.zero_point.fill_(1)
    x = torch.randn(3, 64)
    with caplog.at_level(logging.WARNING, logger="executorch_wgpu"):
        pte = lower(model, x, linears_only=True)
    declines = [r for r in caplog.records if "stays on the CPU" in r.getMessage()]
    assert len(declines) == 1 and "2" in declines[0].getMessage() and "zero point" in declines[0].getMessage()
    (y,), method = run(pte, x)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(y, expected, rtol=1e-4, atol=1e-4)
    assert [e["name"] for e in method.route_report()] == ["0"]


def test_unsupported_group_size_is_declined_and_still_runs(caplog, lower, single_linear):
    model = single_linear(64, 16, group_size=16)
    x = torch.randn(2, 64)
    with caplog.at_level(logging.WARNING, logger="executorch_wgpu"):
        pte = lower(model, x, linears_only=True)
    assert any("group size 16" in r.getMessage() for r in caplog.records)
    (y,), method = run(pte, x)
    with torch.no_grad():
        assert torch.allclose(y, model(x), rtol=1e-5, atol=1e-5)
    assert method.route_report() == []


def test_same_model_lowers_to_identical_bytes(blobs_in, lower, single_linear):
    model = single_linear(128, 40)
    x = torch.randn(3, 128)
    first, second = blobs_in(lower(model, x, linears_only=True))[0], blobs_in(lower(model, x, linears_only=True))[0]
    assert first == second
    assert lower(model, x, linears_only=True) == lower(model, x, linears_only=True)
