"""make_q4_ready: a transformers model (GPT-2's Conv1D, a bf16 checkpoint) made ready for q4gsw and delegated."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torchao.quantization import IntxWeightOnlyConfig, quantize_
from torchao.quantization.granularity import PerGroup

from executorch_wgpu.backend.prepare import make_q4_ready
from executorch_wgpu.runtime import Runtime
from executorch_wgpu.tools.models import lower_to_pte
from executorch_wgpu.tools.reference import rel_err

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

# GPT-2's projections per block: attn.c_attn (64 -> 192), attn.c_proj, mlp.c_fc (64 -> 256), mlp.c_proj (256 -> 64).
CONV1D_PER_BLOCK = 4


def tiny_gpt2(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32, use_cache=False)
    return transformers.GPT2LMHeadModel(cfg).eval().to(dtype)


class Logits(torch.nn.Module):
    """The LM's logits only: one tensor out, for export and for comparing."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids).logits


def token_ids(length: int = 6) -> torch.Tensor:
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(1))


def q4_config(group_size: int = 32) -> IntxWeightOnlyConfig:
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))


def test_conv1d_becomes_an_equivalent_linear_with_the_same_fp32_weights_and_outputs():
    model = tiny_gpt2()
    before = copy.deepcopy(model)
    make_q4_ready(model)
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, torch.nn.Linear) and (c_attn.in_features, c_attn.out_features) == (64, 192)
    assert torch.equal(c_attn.weight, before.transformer.h[0].attn.c_attn.weight.t())
    # The same weights, transposed bit for bit; the matmul sums in another order (its operand is laid out
    # [out, in] now), so the logits agree to fp32 rounding (~1 ulp), not bitwise.
    with torch.no_grad():
        ids = token_ids()
        assert rel_err(model(ids).logits, before(ids).logits) < 1e-6


def test_gpt2_made_ready_delegates_its_projections_and_matches_eager_int4(caplog):
    """Linears-only: each projection its own delegate, in the route report."""
    model = tiny_gpt2()
    quantize_(model, q4_config(), filter_fn=make_q4_ready(model))
    ids = token_ids()
    with caplog.at_level(logging.INFO, logger="executorch_wgpu"):
        pte = lower_to_pte(Logits(model), (ids,), None, linears_only=True)
    summary = [r.getMessage() for r in caplog.records if "q4 linears delegated" in r.getMessage()]
    layers = 2 * CONV1D_PER_BLOCK + 1   # and lm_head
    assert summary == [f"WebGPUPartitioner: {layers} of {layers} q4 linears delegated"]
    method = Runtime.get().load_program(pte).load_method("forward")
    (logits,) = method.execute([ids])
    assert len(method.route_report()) == layers
    with torch.no_grad():
        eager = model(ids).logits
    assert logits.shape == eager.shape and rel_err(logits, eager) < 1e-4


def test_a_bf16_model_comes_out_fp32_with_its_ties_kept():
    model = tiny_gpt2(torch.bfloat16)
    model.config.dtype = torch.bfloat16   # as from_pretrained(..., dtype=torch.bfloat16) sets it
    model.register_buffer("half_buffer", torch.ones(3, dtype=torch.float16))
    model.register_buffer("index_buffer", torch.arange(3))
    make_q4_ready(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.half_buffer.dtype == torch.float32 and model.index_buffer.dtype == torch.int64
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} == {torch.float32}
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.config.dtype == torch.float32


def test_the_filter_skips_layers_whose_k_is_not_a_multiple_of_the_group_size(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32),
                                torch.nn.Linear(96, 8)).eval()
    filter_fn = make_q4_ready(model, group_size=64)
    assert [filter_fn(m, name) for name, m in model.named_children()] == [False, False, True, False]
    with caplog.at_level(logging.INFO, logger="executorch_wgpu"):
        quantize_(model, q4_config(64), filter_fn=filter_fn)
    assert type(model[0].weight) is torch.nn.Parameter and type(model[3].weight) is torch.nn.Parameter
    assert type(model[2].weight.data) is not torch.Tensor   # a torchao quantized tensor
    skipped = [r.getMessage() for r in caplog.records if "stays unquantized" in r.getMessage()]
    assert len(skipped) == 2 and "in_features 48 is not a multiple of group size 64" in skipped[0]


@pytest.mark.parametrize("group_size", [16, 48, 0, -32])
def test_a_group_size_the_kernels_do_not_run_is_refused_before_touching_the_model(group_size):
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="multiple of 32.*group_size=32"):
        make_q4_ready(model, group_size=group_size)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)


def test_gpt2_made_ready_lowers_in_graph_mode_the_default_and_matches_eager_int4():
    model = tiny_gpt2()
    quantize_(model, q4_config(), filter_fn=make_q4_ready(model))
    ids = token_ids()
    pte = lower_to_pte(Logits(model), (ids,), None)
    (logits,) = Runtime.get().load_program(pte).load_method("forward").execute([ids])
    with torch.no_grad():
        eager = model(ids).logits
    assert logits.shape == eager.shape and rel_err(logits, eager) < 1e-4
