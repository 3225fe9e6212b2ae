"""Graph mode fuses sibling q4 linears -- several reading one input -- into one layer: one dispatch, not one each.

Preprocess (backend/graph/fused_linears.py) concatenates their codes, scales and biases along N
into one WGQ4 blob; the graph blob (version 2) lists the linear's parts, and every q4gsw kernel
writes each part as its own contiguous [M][N_i] tensor (q4gsw_prelude.wgsl store_y), so its
consumers see the tensors they saw before. The spec:

  * every route (gemv with and without split K, skinny, regtiled, shmem with and without split
    K) writes the parts of a fused layer within 1e-4 of an fp64 golden, on odd part widths;
  * a model's siblings (one without a bias) fuse, in both runtimes, with eager-int4 outputs;
  * the small Llama's q/k/v and gate/up fuse: 3 linear dispatches fewer per layer, in decode and
    prefill, with the unfused program's logits; the route report still lists every q4 linear;
  * graph blobs of version 1 (no parts) still load; other versions and malformed parts are refused.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Dict, List, Sequence

import pytest
import torch

from executorch_wgpu.backend.routing import RouteOptions
from executorch_wgpu.backend.serialization import graph_blob as gb
from executorch_wgpu.backend.serialization.blob import N_ALIGN, round_up, serialize_q4linear
from executorch_wgpu.errors import BlobFormatError, BlobVersionError, ProgramFormatError
from executorch_wgpu.runtime import Runtime
from executorch_wgpu.runtime_py.graph_delegate import GraphDelegate
from executorch_wgpu.runtime_py.q4_linear import LinearCall, plan_call
from executorch_wgpu.tools import models
from executorch_wgpu.tools.reference import golden_linear, random_q4_layer, rel_err

M_MAX = 160
PROMPT = [1, 57, 300, 9, 1000, 77, 2048, 5, 4000, 12]


# ---- a graph blob of one fused linear, built by hand: the kernels' parts vs fp64 --------------------


def fused_graph(k: int, columns: Sequence[int], rec_bytes: bytes, version_parts: bool = True) -> tuple:
    """(graph record, named data) of one linear x [M, K] -> one output per part [M, N_i] (M dynamic)."""
    key = "fused"
    exprs = [((1, 0),), ((0, k),)] + [((0, c),) for c in columns]   # M, K, then each part's N_i
    buffers = [gb.Buffer("work", 4 * M_MAX * k, name="x")] + [
        gb.Buffer("work", 4 * M_MAX * c, name=f"y{i}") for i, c in enumerate(columns)]
    parts = tuple(gb.LinearPart(1 + i, c, f"part{i}") for i, c in enumerate(columns)) if version_parts else ()
    rec = gb.GraphRecord(
        symbols=[gb.Symbol("M", "input-dim", 0, 0, 1, M_MAX)], exprs=exprs, buffers=buffers,
        inputs=[gb.IO(0, "f32", (0, 1), name="x")],
        outputs=[gb.IO(1 + i, "f32", (0, 2 + i), name=f"y{i}") for i in range(len(columns))],
        steps=[gb.Step(linear=0, node="fused")], linears=[gb.Linear(key, 0, 1, 0, parts)])
    return rec, {key: rec_bytes}


def run_fused(k: int, columns: Sequence[int], gs: int, bias: bool, decode: str, prefill: str, ms: Sequence[int],
              seed: int = 0) -> List[tuple]:
    """[(M, outputs per part, fp64 goldens per part, route-report entries)] of a fused layer at each M."""
    layer = random_q4_layer(k, sum(columns), gs, bias=bias, seed=seed)
    record = layer.record("+".join(f"part{i}" for i in range(len(columns))),
                          RouteOptions(decode_route=decode, prefill_route=prefill), m_max=M_MAX)
    rec, named = fused_graph(k, columns, serialize_q4linear(record))
    delegate = GraphDelegate(gb.serialize_graph(rec), named.__getitem__)
    results = []
    for m in ms:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + m))
        calls: List[LinearCall] = []
        outputs = delegate.execute([x], calls)
        golden = layer.golden(x)
        starts = [sum(columns[:i]) for i in range(len(columns) + 1)]
        results.append((m, outputs, [golden[:, a:b] for a, b in zip(starts, starts[1:])], calls))
    return results


@pytest.mark.parametrize("kernel,k,gs,splits", [
    ("gemv", 4096, 32, 2),     # 128 groups: K split over 2 workgroups, then splitk_reduce writes the parts
    ("gemv", 256, 64, 1),
    ("regtiled", 512, 32, 1),
    ("skinny", 256, 32, 1),
    ("shmem", 1024, 32, 4),    # one tile: shmem splits K 4 ways, splitk_reduce writes the parts
])
def test_decode_route_writes_each_part_of_a_fused_layer(kernel, k, gs, splits):
    columns = (20, 36, 13)     # boundaries inside a column quad and a 16-column block
    assert plan_call(kernel, 1, k, sum(columns), round_up(sum(columns), N_ALIGN), gs).k_splits == splits
    (result,) = run_fused(k, columns, gs, bias=True, decode=kernel, prefill="regtiled", ms=[1])
    m, outputs, goldens, calls = result
    for y, golden, c in zip(outputs, goldens, columns):
        assert y.shape == (1, c) and rel_err(y, golden) < 1e-4
    # the route report: one entry per part, the fused layer's kernel
    assert [(e.name, e.M, e.K, e.N, e.kernel) for e in calls] == [(f"part{i}", 1, k, c, kernel)
                                                                 for i, c in enumerate(columns)]
    assert all("fused: one layer part0+part1+part2" in e.reason for e in calls)


@pytest.mark.parametrize("kernel,m,k,columns,bias", [
    ("skinny", 5, 256, (100, 28), True),         # two parts; a partial row block
    ("skinny", 70, 512, (8, 40, 90), False),
    ("regtiled", 70, 256, (20, 36, 13), True),   # partial tiles in M and N
    ("regtiled", 33, 1024, (129, 3), False),
    ("shmem", 70, 1024, (20, 36, 13), True),     # K split 4 ways + splitk_reduce
    ("shmem", 129, 512, (130, 70), True),        # one row past a 128-row tile, a part boundary across tiles
    ("shmem", 150, 256, (64, 64, 72), False),    # no split K (K < 2 x its min chunk): the tile stores the parts
])
def test_prefill_route_writes_each_part_of_a_fused_layer(kernel, m, k, columns, bias):
    (result,) = run_fused(k, columns, 32, bias, decode="gemv", prefill=kernel, ms=[m])
    _, outputs, goldens, calls = result
    for y, golden, c in zip(outputs, goldens, columns):
        assert y.shape == (m, c) and rel_err(y, golden) < 1e-4, (kernel, m, c)
    assert {e.kernel for e in calls} == {kernel}


def test_a_fused_layer_serves_decode_and_prefill_alternately():
    for m, outputs, goldens, calls in run_fused(512, (24, 56, 17), 32, True, "gemv", "shmem", [1, 9, 1, 140, 2, 1]):
        assert all(rel_err(y, g) < 1e-4 for y, g in zip(outputs, goldens)), m
        assert {e.kernel for e in calls} == {"gemv" if m == 1 else "shmem"}


# ---- the blob: versions and malformed parts -----------------------------------------------------------


def test_version_1_blobs_still_load_and_unknown_versions_are_refused():
    layer = random_q4_layer(256, 40, 32, bias=True)
    rec, named = fused_graph(256, (40,), serialize_q4linear(layer.record("one")), version_parts=False)
    old = gb.GRAPH_SCHEMA_VERSION
    try:
        blobs = {}
        for v in (gb.OLDEST_READABLE_GRAPH_VERSION - 1, 1, old + 1):
            gb.GRAPH_SCHEMA_VERSION = v
            blobs[v] = gb.serialize_graph(rec)
    finally:
        gb.GRAPH_SCHEMA_VERSION = old
    assert gb.OLDEST_READABLE_GRAPH_VERSION == 1 and old == 2
    delegate = GraphDelegate(blobs[1], named.__getitem__)   # a version-1 blob: one output, no parts
    x = torch.randn(3, 256)
    (y,) = delegate.execute([x], [])
    assert rel_err(y, layer.golden(x)) < 1e-4
    for v, advice in ((0, "re-export the model"), (old + 1, "upgrade executorch_wgpu")):
        with pytest.raises(BlobVersionError, match=f"schema version {v}; this executorch_wgpu reads versions 1 to "
                                                   f"{old}: {advice}"):
            gb.deserialize_graph(blobs[v])


def test_malformed_parts_are_refused_naming_the_problem():
    layer = random_q4_layer(256, 69, 32)
    rec, named = fused_graph(256, (20, 36, 13), serialize_q4linear(layer.record("q+k+v")))
    (lin,) = rec.linears

    def with_linear(**changes) -> bytes:
        return gb.serialize_graph(dataclasses.replace(rec, linears=[dataclasses.replace(lin, **changes)]))

    p0, p1, p2 = lin.parts
    cases = {
        "has 4 parts; a fused linear has 2 to 3": with_linear(parts=(p0, p1, p2, p2)),
        "has 1 parts": with_linear(parts=(p0,)),
        "writes its first part to buffer 2, not its y 1": with_linear(parts=(p1, p0, p2)),
        "two of its parts share a buffer": with_linear(parts=(p0, p1, dataclasses.replace(p2, y=p1.y))),
        "refers to buffer 9 of 4": with_linear(parts=(p0, p1, dataclasses.replace(p2, y=9))),
        "has no columns": with_linear(parts=(p0, p1, dataclasses.replace(p2, columns=0))),
    }
    for words, blob in cases.items():
        with pytest.raises(BlobFormatError, match=words):
            gb.deserialize_graph(blob)
    # well formed, but its parts' columns are not the WGQ4 blob's N: refused at load
    short = with_linear(parts=(p0, p1, dataclasses.replace(p2, columns=12)))
    with pytest.raises(ProgramFormatError, match=r"has parts of \[20, 36, 12\] columns, its blob 69"):
        GraphDelegate(short, named.__getitem__)


# ---- a model's siblings, lowered: both runtimes ------------------------------------------------------


class Siblings(torch.nn.Module):
    """q/k/v-like siblings (one without a bias), a gate/up-like pair on another input, a lone linear."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(256, 20)
        self.k = torch.nn.Linear(256, 36, bias=False)
        self.v = torch.nn.Linear(256, 13)
        self.gate = torch.nn.Linear(4096, 24, bias=False)   # K = 4096: gemv splits K
        self.up = torch.nn.Linear(4096, 40, bias=False)
        self.lone = torch.nn.Linear(4096, 8)

    def forward(self, x, z):
        h = x * 2.0
        return self.q(h), self.k(h), self.v(h), self.gate(z), self.up(z) + 1.0, self.lone(z * 0.5)

    def golden(self, x, z):
        h = x * 2.0
        return [golden_linear(h, self.q), golden_linear(h, self.k), golden_linear(h, self.v),
                golden_linear(z, self.gate), golden_linear(z, self.up) + 1.0, golden_linear(z * 0.5, self.lone)]


def siblings_inputs(tokens: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, 256, generator=g), torch.randn(1, tokens, 4096, generator=g)


@pytest.fixture(scope="module")
def siblings():
    torch.manual_seed(0)
    model = models.quantize_q4(Siblings())
    tokens = torch.export.Dim("tokens", min=1, max=40)
    dynamic = ({1: tokens}, {1: tokens})
    ptes = {routes: models.lower_to_pte(model, siblings_inputs(3), dynamic, linears_only=False,
                                        decode_route=routes[0], prefill_route=routes[1])
            for routes in (("gemv", "skinny"), ("regtiled", "shmem"))}
    return types.SimpleNamespace(model=model, ptes=ptes)


def test_siblings_fuse_into_one_layer_each_with_eager_int4_outputs(siblings):
    for (decode, prefill), pte in siblings.ptes.items():
        method = Runtime.get().load_program(pte).load_method("forward")
        rec = method._delegates[0].record
        assert sorted(tuple(p.name for p in lin.parts) for lin in rec.linears) == [
            (), ("gate", "up"), ("q", "k", "v")]
        for tokens in (1, 7, 1, 33):
            inputs = siblings_inputs(tokens, seed=tokens)
            outputs = method.execute(list(inputs))
            for y, golden in zip(outputs, siblings.model.golden(*inputs)):
                assert y.shape == golden.shape and rel_err(y, golden) < 1e-4, (decode, prefill, tokens)
            report = method.route_report()
            assert sorted(e["name"] for e in report) == sorted(["q", "k", "v", "gate", "up", "lone"])
            assert {e["kernel"] for e in report} == {decode if tokens == 1 else prefill}


@pytest.mark.native
def test_the_native_runtime_runs_fused_layers_as_the_python_runtime_does(native_lib, siblings):
    from executorch.runtime import Runtime as EtRuntime

    for routes, pte in siblings.ptes.items():
        native = EtRuntime.get().load_program(pte).load_method("forward")
        python = Runtime.get().load_program(pte).load_method("forward")
        for tokens in (1, 7, 33):
            inputs = siblings_inputs(tokens, seed=tokens)
            native_lib.take_calls()
            got = [y.clone() for y in native.execute(list(inputs))]
            native_report = [(e["name"], e["M"], e["K"], e["N"], e["kernel"], e["reason"])
                             for e in native_lib.take_calls()]
            want = python.execute(list(inputs))
            for y, expected, golden in zip(got, want, siblings.model.golden(*inputs)):
                assert rel_err(y, expected) <= 1e-5 and rel_err(y, golden) < 1e-4, (routes, tokens)
            assert native_report == [(e["name"], e["M"], e["K"], e["N"], e["kernel"], e["reason"])
                                     for e in python.route_report()]


# ---- the small Llama: fewer dispatches, the same tokens ----------------------------------------------


@pytest.fixture(scope="module")
def llamas():
    """The small Llama in graph mode, fused (the default) and with fusion turned off by its compile spec."""
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.backend.compile_spec_schema import CompileSpec

    from executorch_wgpu import WebGPUPartitioner
    from executorch_wgpu.backend.preprocess import FUSE_LINEARS_SPEC

    model = models.build_llama("small", seed=0, llm_ops=True, n_layers=2)   # per-layer counts: two layers show them
    fused = models.export_llama_pte(model, max_tokens=32, linears_only=False)
    partitioner = WebGPUPartitioner(linears_only=False)
    partitioner.delegation_spec.compile_specs.append(CompileSpec(FUSE_LINEARS_SPEC, b"0"))
    models.reset_kv_cache(model)
    example = (torch.tensor([[1, 2, 3]], dtype=torch.long), torch.tensor([0], dtype=torch.long))
    dynamic = ({1: torch.export.Dim("tokens", min=1, max=32)}, None)
    with torch.no_grad():
        ep = torch.export.export(model, example, dynamic_shapes=dynamic)
        edge = to_edge_transform_and_lower(ep, partitioner=[partitioner])
        unfused = edge.to_executorch(ExecutorchBackendConfig(run_reinplace_pass=True)).buffer   # as export_llama_pte
    return types.SimpleNamespace(model=model, fused=fused, unfused=unfused)


def dispatches_and_logits(pte: bytes, calls) -> tuple:
    method = Runtime.get().load_program(pte).load_method("forward")
    out: Dict[str, tuple] = {}
    for name, (tokens, pos) in calls.items():
        (logits,) = method.execute([torch.tensor([tokens]), torch.tensor([pos])])
        (report,) = method.graph_report()
        out[name] = (report["dispatches"], logits, method.route_report())
    return method, out


def test_llama_layers_run_three_linear_dispatches_fewer_with_the_same_logits(llamas):
    layers = llamas.model.args.n_layers
    calls = {"prefill": (PROMPT, 0), "decode": ([PROMPT[0]], len(PROMPT))}
    fused, with_fusion = dispatches_and_logits(llamas.fused, calls)
    unfused, without = dispatches_and_logits(llamas.unfused, calls)
    names = sorted(models.llama_linear_names(llamas.model))
    for name in calls:
        assert without[name][0] - with_fusion[name][0] == 3 * layers, name   # 7 linear dispatches a layer -> 4
        assert rel_err(with_fusion[name][1], without[name][1]) <= 1e-5, name
        # the route report lists every q4 linear either way, with its own N
        assert sorted(e["name"] for e in with_fusion[name][2]) == names
        assert sorted((e["name"], e["N"]) for e in with_fusion[name][2]) == \
            sorted((e["name"], e["N"]) for e in without[name][2])
    fused_linears = fused._delegates[0].record.linears
    assert len(unfused._delegates[0].record.linears) == 7 * layers + 1
    assert len(fused_linears) == 4 * layers + 1
    layer = "transformer.layers.{}."
    assert sorted(tuple(p.name for p in lin.parts) for lin in fused_linears if lin.parts) == sorted(
        [tuple((layer + "attention." + w).format(i) for w in ("wq", "wk", "wv")) for i in range(layers)]
        + [tuple((layer + "feed_forward." + w).format(i) for w in ("w1", "w3")) for i in range(layers)])


def test_llama_greedy_tokens_with_fused_layers_equal_eager(llamas):
    method = Runtime.get().load_program(llamas.fused).load_method("forward")
    ours = models.greedy_generate(models.method_runner(method), PROMPT, 12)
    models.reset_kv_cache(llamas.model)
    assert ours == models.greedy_generate(models.eager_runner(llamas.model), PROMPT, 12)
