"""An attention layer's RoPE of q and of k and its two KV-cache writes run as one dispatch (rope_qk_cache).

In ExecuTorch's Llama (custom_sdpa + update_cache) each layer rotates q and k by one cos / sin, then
llama::update_cache writes the rotated k and v into the caches at start_pos: four dispatches, one after
another. Graph mode lowers them to one step of kernel rope_qk_cache (patterns.match_rope_cache finds the
layer; ops._lower_rope_qk_cache emits it and supersedes the four), in prefill and decode alike. The spec:

  * the kernel writes rotated q, and rotated k and v into the caches at start_pos, within 1e-5 of fp64
    (odd shapes: B > 1, S > 1 and S == 1, start_pos > 0, Hq != Hkv), and nothing else of the caches;
  * an attention core of those ops (q, k, v as inputs) lowers to one rope_qk_cache step and no cache copy,
    with eager torch's outputs over a prefill and decode steps;
  * where the pattern does not hold -- the rotated k read by something else, the rotated q read before the
    cache writes, the k cache read between the two writes, k rotated by other angles than q -- the layer
    keeps its rope and update_cache steps and the outputs still equal eager torch's;
  * the small Llama's layers each take three dispatches fewer per decode step and per prefill (against the
    same model lowered without the pattern) with the same logits, its greedy tokens equal eager torch's, and
    the native runtime runs it with the Python runtime's logits and dispatch count.
"""

from __future__ import annotations

import types
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

from executorch_wgpu.backend.graph import patterns
from executorch_wgpu.backend.serialization.graph_blob import GraphRecord
from executorch_wgpu.runtime import Runtime
from executorch_wgpu.shaders import registry
from executorch_wgpu.tools import models
from executorch_wgpu.tools.reference import rel_err, run_registry_kernel

SENTINEL = -7.0
PROMPT = [1, 57, 300, 9, 1000, 77, 2048, 5, 4000, 12]


def rope_fp64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """ExecuTorch's apply_rotary_emb in fp64: x [B, S, H, D] interleaved pairs, cos / sin [S, D / 2]."""
    xr, xi = x.double().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    c, s = cos.double()[None, :, None, :], sin.double()[None, :, None, :]
    return torch.stack([xr * c - xi * s, xr * s + xi * c], -1).flatten(-2)


@pytest.mark.parametrize("b,s,hq,hkv,d,start,c", [
    (1, 1, 8, 4, 32, 5, 16),     # decode: one position, GQA
    (2, 3, 6, 2, 10, 9, 12),     # B > 1, an odd count of pairs per head, up to the last cache row
    (1, 5, 3, 3, 6, 0, 9),       # prefill from position 0, Hq == Hkv
    (1, 37, 4, 1, 64, 40, 90),   # more pairs than one workgroup
])
def test_rope_qk_cache_kernel_writes_rotated_q_and_both_caches_against_fp64(b, s, hq, hkv, d, start, c):
    g = torch.Generator().manual_seed(b * 1000 + s * 10 + d)
    q, k, v = (torch.randn(b, s, h, d, generator=g) for h in (hq, hkv, hkv))
    angles = torch.rand(s, d // 2, generator=g, dtype=torch.float64) * 6.3
    cos, sin = angles.cos().float(), angles.sin().float()
    half = d // 2
    params = {"n_pairs": b * s * (hq + hkv) * half, "S": s, "Hq": hq, "Hkv": hkv, "half": half, "C": c,
              "start_pos": start,
              # cos / sin [S, D / 2] over [B, S, head, D / 2]: batch and head broadcast
              "c0": 0, "c1": half, "c2": 0, "c3": 1, "s0": 0, "s1": half, "s2": 0, "s3": 1}
    k_cache = np.full((b, c, hkv, d), SENTINEL, np.float32)
    v_cache = np.full((b, c, hkv, d), SENTINEL, np.float32)
    groups = -(-params["n_pairs"] // registry.kernel("rope_qk_cache").workgroup_size[0])
    q_out = run_registry_kernel("rope_qk_cache", (groups, 1, 1), params,
                                {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "cos_t": cos.numpy(),
                                 "sin_t": sin.numpy()},
                                np.full((b, s, hq, d), SENTINEL),
                                other_outputs={"k_cache": k_cache, "v_cache": v_cache})
    assert rel_err(torch.from_numpy(q_out), rope_fp64(q, cos, sin)) < 1e-5
    written = slice(start, start + s)
    assert rel_err(torch.from_numpy(k_cache[:, written]), rope_fp64(k, cos, sin)) < 1e-5
    assert (v_cache[:, written] == v.numpy()).all()
    for cache in (k_cache, v_cache):   # the other positions are untouched
        assert (cache[:, :start] == SENTINEL).all() and (cache[:, start + s:] == SENTINEL).all()


# ---- lowering: where the pattern holds, and where it does not ---------------------------------------------


class RopeCacheAttention(torch.nn.Module):
    """ExecuTorch's attention core with its LLM ops, on q, k, v given as inputs: rope of q and k, update_cache of
    the rotated k and of v, custom_sdpa. `k_read_early` also returns the rotated k (another reader of it than
    its cache write); `q_read_early` returns the rotated q doubled, computed before the cache writes (a step
    reading it before the fused step would run); `k_cache_read_between` returns the k cache's new rows read
    between the two cache writes (the earlier write observed before the later one); `k_angles_shift` rotates k
    by other positions' cos / sin than q (not one cos / sin)."""

    freqs_cos: torch.Tensor
    freqs_sin: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor

    def __init__(self, hq: int = 4, hkv: int = 2, d: int = 16, c: int = 24, k_read_early: bool = False,
                 q_read_early: bool = False, k_cache_read_between: bool = False, k_angles_shift: int = 0):
        super().__init__()
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers llama::update_cache, ...)
        from executorch.examples.models.llama.rope import precompute_freqs_cis

        cos, sin = precompute_freqs_cis(d, 2 * c)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)
        self.register_buffer("k_cache", torch.zeros(1, c, hkv, d))
        self.register_buffer("v_cache", torch.zeros(1, c, hkv, d))
        self.hq, self.c, self.k_angles_shift = hq, c, k_angles_shift
        self.k_read_early, self.q_read_early = k_read_early, q_read_early
        self.k_cache_read_between = k_cache_read_between

    def forward(self, q, k, v, input_pos):
        from executorch.examples.models.llama.rope import apply_rotary_emb

        start = input_pos[0].item()
        seq = q.shape[1]
        torch._check_is_size(start)
        torch._check(start + seq <= self.c)
        cos, sin = self.freqs_cos.narrow(0, start, seq), self.freqs_sin.narrow(0, start, seq)
        q, k_same = apply_rotary_emb(q, k, cos, sin)
        if self.k_angles_shift:
            shift = self.k_angles_shift
            k, _ = apply_rotary_emb(k, k, self.freqs_cos.narrow(0, start + shift, seq),
                                    self.freqs_sin.narrow(0, start + shift, seq))
        else:
            k = k_same
        extra = [q * 2.0] if self.q_read_early else []
        torch.ops.llama.update_cache(k, self.k_cache, start)
        extra += [self.k_cache.narrow(1, start, seq) * 3.0] if self.k_cache_read_between else []
        torch.ops.llama.update_cache(v, self.v_cache, start)
        out = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start, None, 0, True)
        extra += [k * 2.0] if self.k_read_early else []
        return (out, *extra) if extra else out


def graph_steps(method) -> list:
    """The steps of a loaded method's one graph delegate."""
    (delegate,) = method._delegates
    assert isinstance(delegate.record, GraphRecord)
    return list(delegate.record.steps)


def lowered(module: RopeCacheAttention, max_tokens: int = 6):
    """The module lowered in graph mode and loaded: (method, its graph delegate's steps as (kernel, node))."""
    from executorch.exir import ExecutorchBackendConfig

    hq, hkv, d = module.hq, module.k_cache.shape[2], module.k_cache.shape[3]
    example = (torch.randn(1, 3, hq, d), torch.randn(1, 3, hkv, d), torch.randn(1, 3, hkv, d),
               torch.tensor([0], dtype=torch.long))
    tokens = torch.export.Dim("tokens", min=1, max=max_tokens)
    dynamic = ({1: tokens}, {1: tokens}, {1: tokens}, None)
    pte = models.lower_to_pte(module, example, dynamic, backend_config=ExecutorchBackendConfig(run_reinplace_pass=True))
    method = Runtime.get().load_program(pte).load_method("forward")
    return method, [(st.kernel, st.node) for st in graph_steps(method)]


def outputs_match_eager(module: RopeCacheAttention, method) -> None:
    """A prefill of 4 positions from 0, a decode step at 4, a chunk of 3 at 5, a decode step at 8: each call's
    outputs against eager torch's (ExecuTorch's CPU kernels of the same ops) on the same inputs, the caches
    carried along in both."""
    g = torch.Generator().manual_seed(3)
    module.k_cache.zero_()
    module.v_cache.zero_()
    method.reset_state()
    for start, seq in ((0, 4), (4, 1), (5, 3), (8, 1)):
        hkv, d = module.k_cache.shape[2], module.k_cache.shape[3]
        q, k, v = (torch.randn(1, seq, h, d, generator=g) for h in (module.hq, hkv, hkv))
        pos = torch.tensor([start], dtype=torch.long)
        with torch.no_grad():
            eager = module(q, k, v, pos)
        ours = method.execute([q, k, v, pos])
        for got, want in zip(ours, eager if isinstance(eager, tuple) else (eager,)):
            assert rel_err(got, want) < 1e-5, (start, seq)


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (6, 1, 8), (2, 2, 32)])   # GQA, one kv head (MQA), MHA
def test_a_layers_ropes_and_cache_writes_lower_to_one_rope_qk_cache_step(hq, hkv, d):
    module = RopeCacheAttention(hq, hkv, d)
    method, steps = lowered(module)
    kernels = [kernel for kernel, _ in steps]
    assert kernels.count("rope_qk_cache") == 1 and "rope" not in kernels
    assert not [node for _, node in steps if node.startswith("update_cache")]   # no cache copy left
    outputs_match_eager(module, method)


@pytest.mark.parametrize("variant", [dict(k_read_early=True), dict(q_read_early=True), dict(k_cache_read_between=True),
                                     dict(k_angles_shift=3)],
                         ids=["rotated-k-read-elsewhere", "rotated-q-read-before-the-cache-writes",
                              "k-cache-read-between-the-writes", "k-rotated-by-other-angles"])
def test_without_the_pattern_the_layer_keeps_its_rope_and_update_cache_steps(variant):
    module = RopeCacheAttention(**variant)
    method, steps = lowered(module)
    kernels = [kernel for kernel, _ in steps]
    assert "rope_qk_cache" not in kernels and kernels.count("rope") == 2
    assert len([node for kernel, node in steps if kernel == "elementwise" and node.startswith("update_cache")]) == 2
    outputs_match_eager(module, method)


# ---- the small Llama: three dispatches fewer per layer, the same tokens --------------------------------------


@pytest.fixture(scope="module")
def llamas():
    """The small Llama (two layers show per-layer counts) in graph mode, and lowered as before this fusion."""
    model = models.build_llama("small", seed=0, llm_ops=True, n_layers=2)
    fused = models.export_llama_pte(model, max_tokens=16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(patterns, "match_rope_cache", lambda anchor: None)   # no layer matches: today's steps
        unfused = models.export_llama_pte(model, max_tokens=16)
    return types.SimpleNamespace(model=model, fused=fused, unfused=unfused)


def test_llama_layers_take_three_dispatches_fewer_per_prefill_and_decode_step_with_the_same_logits(llamas):
    layers = llamas.model.args.n_layers
    kernels: Dict[str, List[str]] = {}
    runs: Dict[str, List[Tuple[int, torch.Tensor]]] = {}
    for name, pte in (("fused", llamas.fused), ("unfused", llamas.unfused)):
        method = Runtime.get().load_program(pte).load_method("forward")
        kernels[name] = [st.kernel for st in graph_steps(method)]
        runs[name] = []
        for tokens, pos in ((PROMPT, 0), ([PROMPT[0]], len(PROMPT))):   # prefill, then one decode step
            (logits,) = method.execute([torch.tensor([tokens]), torch.tensor([pos])])
            (report,) = method.graph_report()
            runs[name].append((report["dispatches"], logits))
    assert kernels["fused"].count("rope_qk_cache") == layers and "rope" not in kernels["fused"]
    assert "rope_qk_cache" not in kernels["unfused"] and kernels["unfused"].count("rope") == 2 * layers
    for (fused_dispatches, fused_logits), (dispatches, logits) in zip(runs["fused"], runs["unfused"]):
        assert dispatches - fused_dispatches == 3 * layers   # rope q, rope k, two cache copies -> one step
        assert rel_err(fused_logits, logits) <= 1e-6


def test_llama_greedy_tokens_with_the_fused_layers_equal_eager(llamas):
    method = Runtime.get().load_program(llamas.fused).load_method("forward")
    ours = models.greedy_generate(models.method_runner(method), PROMPT[:5], 10)
    models.reset_kv_cache(llamas.model)
    assert ours == models.greedy_generate(models.eager_runner(llamas.model), PROMPT[:5], 10)


@pytest.mark.native
def test_the_native_runtime_runs_the_fused_layers_as_the_python_runtime_does(native_lib, llamas):
    """ExecuTorch's runtime with the native delegate: the same logits and dispatch count per call."""
    from executorch.runtime import Runtime as EtRuntime

    native = EtRuntime.get().load_program(llamas.fused).load_method("forward")
    assert native is not None
    python = Runtime.get().load_program(llamas.fused).load_method("forward")
    native_lib.reset_state()
    for tokens, pos in ((PROMPT[:6], 0), ([PROMPT[6]], 6), ([PROMPT[7]], 7)):
        inputs = [torch.tensor([tokens]), torch.tensor([pos])]
        ours = native.execute(inputs)[0].clone()   # ExecuTorch reuses its output memory
        (theirs,) = python.execute(inputs)
        assert rel_err(ours, theirs) <= 1e-5, pos
        assert native_lib.last_graph_call()["dispatches"] == python.graph_report()[0]["dispatches"], pos
