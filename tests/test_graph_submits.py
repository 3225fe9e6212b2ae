"""A long graph call goes to the GPU in several submits (registry.DISPATCHES_PER_SUBMIT dispatches
each), so the GPU starts while the host still encodes; the result must not depend on the split."""

from __future__ import annotations

import torch

from executorch_wgpu.runtime import Runtime
from executorch_wgpu.runtime_py import direct_calls
from executorch_wgpu.tools import models

PROMPT = [[3, 141, 59, 26, 535]]


def test_a_call_split_over_many_submits_equals_one_pass_through_wgpu_py(monkeypatch):
    model = models.build_llama("small", seed=1, llm_ops=True, n_layers=1)
    pte = models.export_llama_pte(model, max_tokens=8, linears_only=False)
    inputs = [torch.tensor(PROMPT), torch.tensor([0])]

    monkeypatch.setattr(direct_calls, "DISPATCHES_PER_SUBMIT", 4)
    method = Runtime.get().load_program(pte).load_method("forward")
    (split,) = method.execute(inputs)
    report = method.graph_report()[0]
    assert report["dispatches"] > 3 * 4   # several submits, the last one partial or not
    if report["gpu_us"] is not None:      # timestamps: first pass's start to the last pass's end
        assert report["gpu_us"] > 0

    monkeypatch.setenv("EXECUTORCH_WGPU_DIRECT", "0")   # one pass, one submit, through wgpu-py
    one_pass = Runtime.get().load_program(pte).load_method("forward")
    assert one_pass._delegates[0].direct is None
    (reference,) = one_pass.execute(inputs)
    assert torch.equal(split, reference)
