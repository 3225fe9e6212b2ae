"""Graph mode's regions end where a delegate cannot pass a value (backend/graph/partition.py): it returns
float32 tensors and takes float32 and integer tensors. Models whose integer position ids, boolean masks or
input_pos symbol cross between GPU and CPU ops still lower -- in several delegates -- and match eager."""

from __future__ import annotations

import logging

import torch

from executorch_wgpu.runtime import Runtime
from executorch_wgpu.runtime_py.graph_delegate import GraphDelegate
from executorch_wgpu.tools import models
from executorch_wgpu.tools.models import SMALL_HF, hf_inputs, quantize_q4, transformers_model
from executorch_wgpu.tools.reference import rel_err


def test_gpt_neox_position_ids_stay_on_the_cpu_and_the_rest_matches_eager_int4(caplog):
    model = quantize_q4(transformers_model("GPTNeoXForCausalLM", "GPTNeoXConfig", **SMALL_HF))
    (ids,) = hf_inputs()
    with caplog.at_level(logging.WARNING, logger="executorch_wgpu.backend.partitioner"):
        pte = models.lower_to_pte(model, (ids,), None)
    assert "result is read outside the GPU region" in caplog.text   # the cut is logged with its reason
    method = Runtime.get().load_program(pte).load_method("forward")
    (logits,) = method.execute([ids])
    assert any(isinstance(d, GraphDelegate) for d in method._delegates)
    with torch.no_grad():
        eager = model(ids).logits
    assert rel_err(logits, eager) < 1e-4


def test_llama_without_llm_transforms_lowers_in_several_delegates_and_matches_eager():
    model = models.build_llama("small", seed=0, llm_ops=False, n_layers=1)
    pte = models.export_llama_pte(model, max_tokens=8)
    method = Runtime.get().load_program(pte).load_method("forward")
    ids = torch.tensor([[1, 5, 9, 30]])
    (logits,) = method.execute([ids, torch.tensor([0])])
    assert sum(isinstance(d, GraphDelegate) for d in method._delegates) > 1
    models.reset_kv_cache(model)
    with torch.no_grad():
        eager = model(ids, torch.tensor([0]))
    assert rel_err(logits, eager) < 1e-4
