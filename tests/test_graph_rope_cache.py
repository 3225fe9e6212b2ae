"""An attention layer's RoPE of q and of k and its two KV-cache writes run as one dispatch (rope_qk_cache).

In ExecuTorch's Llama (custom_sdpa + update_cache) each layer rotates q and k by one cos / sin, then
llama::update_cache writes the rotated k and v into the caches at start_pos: four dispatches, one after
another. Graph mode lowers them to one step of kernel rope_qk_cache (patterns.match_rope_cache finds the
layer; ops._lower_rope_qk_cache emits it and supersedes the four), in prefill and decode alike. The spec:

  * the kernel writes rotated q, and rotated k and v into the caches at start_pos, within 1e-5 of fp64
    (odd shapes: B > 1, S > 1 and S == 1, start_pos > 0, Hq != Hkv), and nothing else of the caches;
  * the small Llama's layers each take three dispatches fewer per decode step and per prefill, and its
    greedy tokens still equal eager torch's in both runtimes;
  * where the pattern does not hold (the rotated k read by something else first), the layer keeps its
    rope and update_cache steps and the outputs still equal eager torch's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from executorch_wgpu.shaders import registry
from executorch_wgpu.tools.reference import rel_err, run_registry_kernel

SENTINEL = -7.0


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
                                np.full((b, s, hq, d), SENTINEL), other_outputs={"k_cache": k_cache, "v_cache": v_cache})
    assert rel_err(torch.from_numpy(q_out), rope_fp64(q, cos, sin)) < 1e-5
    written = slice(start, start + s)
    assert rel_err(torch.from_numpy(k_cache[:, written]), rope_fp64(k, cos, sin)) < 1e-5
    assert (v_cache[:, written] == v.numpy()).all()
    for cache in (k_cache, v_cache):   # the other positions are untouched
        assert (cache[:, :start] == SENTINEL).all() and (cache[:, start + s:] == SENTINEL).all()
