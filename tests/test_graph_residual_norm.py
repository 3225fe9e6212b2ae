"""A residual add feeding an RMSNorm runs as one reduce_rows step (ROWS_ADD_RMS_NORM) that writes both
the sum and the normalised sum: in ExecuTorch's Llama every residual add is such an add, so each layer
takes two dispatches fewer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from executorch_wgpu.runtime import Runtime
from executorch_wgpu.shaders import registry
from executorch_wgpu.tools import models
from executorch_wgpu.tools.reference import f32_bits, rel_err, run_registry_kernel

SENTINEL = -7.0


@pytest.mark.parametrize("n,has_w", [(37, True), (700, True), (300, False)])
def test_add_rms_norm_writes_the_sum_and_its_norm_against_fp64(n, has_w):
    rows, eps = 5, 1e-5
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(rows, n, generator=g), torch.randn(rows, n, generator=g) * 0.5
    w = torch.rand(n, generator=g) + 0.5
    params = {"rows": rows, "n": n, "op": registry.REDUCE_OPS["ROWS_ADD_RMS_NORM"], "eps_bits": f32_bits(eps),
              "has_w": int(has_w)}
    inputs = {"a": a.numpy(), "b": b.numpy(), **({"w": w.numpy()} if has_w else {})}
    total = np.full((rows + 1, n), SENTINEL, np.float32)
    out = run_registry_kernel("reduce_rows", (3, 2, 1), params, inputs, np.full((rows + 1, n), SENTINEL),
                              other_outputs={"sum": total})
    x = a.double() + b.double()
    golden = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (w.double() if has_w else 1.0)
    assert rel_err(torch.from_numpy(total[:rows]), x) < 1e-6
    assert rel_err(torch.from_numpy(out[:rows]), golden) < 1e-4
    assert (out[rows] == SENTINEL).all() and (total[rows] == SENTINEL).all()   # the grid's spare workgroup


def test_llama_residual_adds_fold_into_the_norms_and_tokens_still_equal_eager():
    model = models.build_llama("small", seed=2, llm_ops=True, n_layers=2)
    pte = models.export_llama_pte(model, max_tokens=8, linears_only=False)
    method = Runtime.get().load_program(pte).load_method("forward")
    steps = method._delegates[0].record.steps
    kernels = [(st.kernel, st.node) for st in steps]
    fused = [node for kernel, node in kernels if node.startswith("add_rms_norm@")]
    # Each layer's residual adds feed the next norm, but the last one: the final norm reads only the last
    # token's row of it (a select), so that add stays an elementwise step.
    adds = [node for kernel, node in kernels if kernel == "elementwise" and node.startswith("aten_add_tensor")]
    assert len(fused) == 2 * 2 - 1 and len(adds) == 1

    prompt = [5, 300, 17, 4000, 42]
    models.reset_kv_cache(model)
    eager = models.greedy_generate(models.eager_runner(model), prompt, 6)
    method.reset_state()
    ours = models.greedy_generate(models.method_runner(method), prompt, 6)
    assert ours == eager
