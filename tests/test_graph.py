"""Graph mode: a whole model as one delegate, its KV cache on the GPU, one submit per call.

ExecuTorch's Llama (small config, q4gsw, with ExecuTorch's LLM transforms: custom_sdpa and
update_cache) is the spec: it lowers to ONE graph delegate, and greedy decoding gives exactly
eager torch's tokens (and the linear-only program's).
"""

from __future__ import annotations

import logging
import types

import pytest
import torch

from executorch_wgpu.backend.graph import ops
from executorch_wgpu.backend.serialization import graph_blob
from executorch_wgpu.errors import BlobFormatError, BlobVersionError, InputError
from executorch_wgpu.runtime import Runtime
from executorch_wgpu.runtime_py.graph_delegate import GraphDelegate
from executorch_wgpu.tools import models
from executorch_wgpu.tools.reference import rel_err

PROMPT = [1, 57, 300, 9, 1000, 77, 2048, 5, 4000, 12]
NEW_TOKENS = 32
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def llama(small_llama_graph_pte):
    assert small_llama_graph_pte.max_tokens == MAX_TOKENS
    model = models.build_llama("small", seed=0, llm_ops=True)   # the weights the shared program was lowered from
    return types.SimpleNamespace(model=model, pte=small_llama_graph_pte.pte, declines=small_llama_graph_pte.declines)


def load(pte: bytes):
    return Runtime.get().load_program(pte).load_method("forward")


def eager_generate(model, prompt, n):
    models.reset_kv_cache(model)
    return models.greedy_generate(models.eager_runner(model), prompt, n)


def eager_logits(model, calls):
    """Eager logits of a sequence of (tokens, input_pos) calls on a fresh cache."""
    models.reset_kv_cache(model)
    with torch.no_grad():
        return [model(torch.tensor([t]), torch.tensor([p])) for t, p in calls]


def test_llama_lowers_to_one_graph_delegate_that_owns_its_kv_cache(llama):
    method = load(llama.pte)
    assert len(method._delegates) == 1 and isinstance(method._delegates[0], GraphDelegate)
    rec = method._delegates[0].record
    state = [b for b in rec.buffers if b.kind == "state"]
    assert sorted(b.name for b in state) == sorted(
        f"transformer.layers.{i}.attention.kv_cache.{kv}_cache" for i in range(4) for kv in "kv")
    # every q4 linear, q/k/v and gate/up each fused into one (their parts)
    assert sum(max(1, len(lin.parts)) for lin in rec.linears) == len(models.llama_linear_names(llama.model))
    # the program around the delegate holds no cache: the delegate call is its only instruction
    plan = method._plan
    assert [type(i.instr_args).__name__ for c in plan.chains for i in c.instructions] == ["DelegateCall"]
    assert llama.declines == []


def test_greedy_tokens_equal_eager_and_the_linear_only_program(llama):
    method = load(llama.pte)
    reports = []
    ours = models.greedy_generate(models.method_runner(method), PROMPT, NEW_TOKENS,
                                  on_step=lambda step, t: reports.append(method.route_report()))
    assert ours == eager_generate(llama.model, PROMPT, NEW_TOKENS)
    assert len(set(ours)) > 4
    plain = models.build_llama("small", seed=0)   # the same weights, without the LLM transforms
    linears_only = load(models.export_llama_pte(plain, max_tokens=MAX_TOKENS, linears_only=True))
    assert models.greedy_generate(models.method_runner(linears_only), PROMPT, NEW_TOKENS) == ours
    # the route report still lists every q4 linear, at M = prompt length, then 1
    names = sorted(models.llama_linear_names(llama.model))
    for step, report in enumerate(reports):
        assert sorted(e["name"] for e in report) == names
        for e in report:
            assert e["M"] == (len(PROMPT) if step == 0 and e["name"] != "transformer.output" else 1), e


def test_token_counts_alternate_between_prefill_and_decode_in_one_program(llama):
    method = load(llama.pte)
    calls = [(PROMPT[:5], 0), ([PROMPT[5]], 5), (PROMPT[6:9], 6), ([PROMPT[9]], 9), ([3], 10), (PROMPT[:4], 11)]
    for (tokens, pos), expected in zip(calls, eager_logits(llama.model, calls)):
        (got,) = method.execute([torch.tensor([tokens]), torch.tensor([pos])])
        assert rel_err(got, expected) <= 1e-4, (tokens, pos)


def test_kv_cache_persists_across_calls_and_reset_state_clears_it(llama):
    method = load(llama.pte)
    prompt = torch.tensor([PROMPT])
    (first,) = method.execute([prompt[:, :6], torch.tensor([0])])
    (chunked,) = method.execute([prompt[:, 6:], torch.tensor([6])])
    (whole,) = eager_logits(llama.model, [(PROMPT, 0)])
    assert rel_err(chunked, whole) <= 1e-4           # the second chunk saw the first through the GPU cache
    method.reset_state()
    (alone,) = method.execute([prompt[:, 6:], torch.tensor([6])])
    (fresh,) = eager_logits(llama.model, [(PROMPT[6:], 6)])   # on a zero cache
    assert rel_err(alone, fresh) <= 1e-4
    assert rel_err(alone, whole) > 1e-2


def test_inputs_outside_the_export_are_refused_with_the_reason(llama):
    method = load(llama.pte)
    vocab = llama.model.args.vocab_size
    with pytest.raises(InputError, match=f"outside \\[0, {vocab}\\)"):
        method.execute([torch.tensor([[1, vocab]]), torch.tensor([0])])
    with pytest.raises(InputError, match="condition of the export"):
        method.execute([torch.tensor([[1] * 10]), torch.tensor([120])])   # 120 + 10 > the 128-row cache
    with pytest.raises(InputError, match="above the exported upper bound"):
        method.execute([torch.tensor([[1] * (MAX_TOKENS + 1)]), torch.tensor([0])])
    (ok,) = method.execute([torch.tensor([PROMPT]), torch.tensor([0])])   # and the method still works
    (expected,) = eager_logits(llama.model, [(PROMPT, 0)])
    assert rel_err(ok, expected) <= 1e-4


def test_every_op_of_the_llama_edge_graph_has_a_graph_rule():
    """The op set of the model's Edge graph; a new op the graph delegate does not cover fails here."""
    from executorch.exir import to_edge

    model = models.build_llama("small", seed=0, llm_ops=True, n_layers=1)
    example = (torch.tensor([[1, 2, 3]]), torch.tensor([0]))
    dynamic = ({1: torch.export.Dim("tokens", min=1, max=16)}, None)
    with torch.no_grad():
        graph = to_edge(torch.export.export(model, example, dynamic_shapes=dynamic)).exported_program().graph
    names = {ops.target_name(n) for n in graph.nodes if n.op == "call_function"}
    q4 = {"torchao.dequantize_affine.default", "aten.mm.default"}   # the q4gsw linears (q4gsw_pattern.py)
    wrappers = {"auto_functionalized_v2", "operator.getitem"}     # update_cache, functionalized
    assert names - q4 - wrappers <= set(ops.RULES), sorted(names - q4 - wrappers - set(ops.RULES))


def test_ops_the_gpu_does_not_run_stay_on_the_cpu_and_are_logged_once(caplog):
    class CumsumBetween(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)

        def forward(self, x):
            return self.fc2(torch.cumsum(self.fc1(x) * 2.0, dim=-1) + 1.0)

    torch.manual_seed(0)
    model = models.quantize_q4(CumsumBetween().eval())
    x = torch.randn(3, 64)
    with caplog.at_level(logging.INFO, logger="executorch_wgpu"):
        pte = models.lower_to_pte(model, (x,), None, linears_only=False)
    method = load(pte)
    assert len(method._delegates) == 2   # before and after the cumsum
    (got,) = method.execute([x])
    with torch.no_grad():
        assert rel_err(got, model(x)) <= 1e-4
    stayed = [r.getMessage() for r in caplog.records if "stay on the CPU" in r.getMessage()]
    assert len(stayed) == 1 and "aten.cumsum.default" in stayed[0] and "no graph rule" in stayed[0]


def test_graph_blob_round_trips_and_a_corrupted_one_is_refused(llama):
    method = load(llama.pte)
    rec = method._delegates[0].record
    blob = graph_blob.serialize_graph(rec)
    again = graph_blob.deserialize_graph(blob)
    assert again == rec
    bad = graph_blob.GraphRecord(**{**rec.__dict__, "steps": [graph_blob.Step("no_such_kernel", node="x")]})
    with pytest.raises(BlobFormatError, match="no_such_kernel"):
        graph_blob.deserialize_graph(graph_blob.serialize_graph(bad))
    bad = graph_blob.GraphRecord(**{**rec.__dict__, "exprs": [((2, 0),)]})   # "add" with nothing to add
    with pytest.raises(BlobFormatError, match="well-formed"):
        graph_blob.deserialize_graph(graph_blob.serialize_graph(bad))
    newer = bytearray(blob)
    with pytest.raises(BlobFormatError):
        graph_blob.deserialize_graph(bytes(newer[:40]))
    old, graph_blob.GRAPH_SCHEMA_VERSION = graph_blob.GRAPH_SCHEMA_VERSION, graph_blob.GRAPH_SCHEMA_VERSION + 1
    try:
        future = graph_blob.serialize_graph(rec)
    finally:
        graph_blob.GRAPH_SCHEMA_VERSION = old
    with pytest.raises(BlobVersionError, match="upgrade executorch_wgpu"):
        graph_blob.deserialize_graph(future)


def test_expressions_evaluate_like_python_integer_math():
    import sympy
    from torch.utils._sympy.functions import FloorDiv

    from executorch_wgpu.backend.graph.exprs import to_rpn

    s, u = sympy.symbols("s u", integer=True)
    cases = [s + u, 3 * s * u - 7, FloorDiv(s + 255, 256), sympy.Min(s, 5) + sympy.Max(u, 2), s ** 2,
             sympy.Le(s + u, 128), sympy.And(sympy.Ge(u, 0), sympy.Lt(s, 9))]
    exprs = [to_rpn(e, {s: 0, u: 1}) for e in cases]
    values = graph_blob.compile_exprs(exprs, 2)
    for sv, uv in ((1, 0), (7, 3), (300, 126)):
        expected = [int(bool(v)) if isinstance(v, sympy.logic.boolalg.Boolean) else int(v)
                    for v in (e.subs({s: sv, u: uv}) for e in cases)]
        assert values([sv, uv]) == expected


def test_wgpu_py_path_and_direct_c_api_path_give_identical_results(llama, monkeypatch):
    inputs = [torch.tensor([PROMPT]), torch.tensor([0])]
    (direct,) = load(llama.pte).execute(inputs)
    monkeypatch.setenv("EXECUTORCH_WGPU_DIRECT", "0")
    method = load(llama.pte)
    assert method._delegates[0].direct is None
    (through_wgpu_py,) = method.execute(inputs)
    assert torch.equal(direct, through_wgpu_py)
    assert method.graph_report()[0]["dispatches"] > 0
