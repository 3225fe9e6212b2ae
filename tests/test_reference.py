"""The references that the tests and the bench judge our kernels by (executorch_wgpu.tools.reference)."""

import numpy as np
import torch

from executorch_wgpu.backend.packing import unpack_q4gsw_weights
from executorch_wgpu.tools.models import quantize_q4
from executorch_wgpu.tools.reference import dequantized_weight, golden_linear, random_q4_layer, rel_err


def test_golden_is_computed_in_column_blocks_without_changing_the_answer():
    layer = random_q4_layer(64, 40, 32, bias=True)
    x = torch.randn(3, 64)
    whole = x.double() @ layer.dequantized().T + layer.bias.double()
    assert torch.allclose(layer.golden(x, column_block=16), whole, rtol=0, atol=1e-12)


def test_a_random_layers_record_packs_the_codes_and_bias_its_golden_uses():
    layer = random_q4_layer(64, 40, 32, bias=True, seed=5)
    rec = layer.record("probe", m_max=64)
    assert (rec.in_features, rec.out_features, rec.group_size, rec.n_stride, rec.m_max) == (64, 40, 32, 48, 64)
    assert torch.equal(unpack_q4gsw_weights(rec.qweight, 64, 40), layer.codes)
    assert np.array_equal(rec.bias, layer.bias.numpy())
    assert rec.route.source == "default-rule"


def test_torchao_golden_reads_the_weight_torchao_dequantizes_and_agrees_with_eager_torch():
    torch.manual_seed(0)
    model = quantize_q4(torch.nn.Sequential(torch.nn.Linear(96, 40)).eval())
    assert torch.allclose(dequantized_weight(model[0]), model[0].weight.dequantize().double(), rtol=0, atol=1e-7)
    x = torch.randn(5, 96)
    with torch.no_grad():
        assert rel_err(model(x), golden_linear(x, model[0])) < 1e-5


def test_rel_err_is_the_largest_error_over_the_largest_golden_magnitude():
    assert rel_err(torch.tensor([1.5, -2.0]), torch.tensor([1.0, -2.0], dtype=torch.float64)) == 0.25
