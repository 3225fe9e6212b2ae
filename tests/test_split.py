"""Layers beyond the binding and grid limits: split over N into parts and over M into row chunks.

The device's real limits (128 MiB bindings, 65535 workgroups per dimension on
lavapipe) would need layers far too big for a CPU test, so these tests lower the
limits the runtime plans against with capped_plan_limits() and run small layers
through the split paths; every result is checked against the fp64 golden.
"""

import pytest
import torch

from executorch_wgpu.backend.routing import RouteOptions
from executorch_wgpu.backend.serialization.blob import N_ALIGN, round_up
from executorch_wgpu.errors import WebGPUDelegateError
from executorch_wgpu.runtime_py.gpu import capped_plan_limits, gpu_context
from executorch_wgpu.runtime_py.split_linear import Q4Linear, column_parts
from executorch_wgpu.tools.reference import random_q4_layer, rel_err


def make_record(k, n, gs, bias, decode="gemv", prefill="skinny", seed=0, m_min=1):
    """(the layer's record with both kernels forced, its fp64 golden: x -> x @ W^T + b)."""
    weights = random_q4_layer(k, n, gs, bias=bias, seed=seed)
    return weights.record("big", RouteOptions(decode_route=decode, prefill_route=prefill), m_min=m_min), weights.golden


def test_column_parts_cover_every_column_in_16_wide_blocks_within_the_binding_limit():
    rec, _ = make_record(256, 100, 32, False)
    with capped_plan_limits(max_binding_bytes=4096):
        parts = column_parts(rec, gpu_context().plan_limits())
    assert parts == [(0, 32), (32, 64), (64, 96), (96, 112)]   # 16 columns of K=256 pack to 2048 bytes
    assert parts[-1][1] == rec.n_stride


def test_column_parts_keep_whole_shmem_tiles_when_they_fit():
    rec, _ = make_record(64, 1000, 32, False)
    with capped_plan_limits(max_binding_bytes=40_000):
        parts = column_parts(rec, gpu_context().plan_limits())
    assert all(n0 % 128 == 0 for n0, _ in parts) and parts[-1][1] == round_up(1000, N_ALIGN)


@pytest.mark.parametrize("decode,prefill", [("gemv", "skinny"), ("gemv", "regtiled"), ("skinny", "shmem")])
@pytest.mark.parametrize("m", [1, 7, 40])
def test_layer_over_the_binding_limit_runs_split_and_matches_the_golden(decode, prefill, m):
    rec, golden = make_record(256, 100, 32, True, decode, prefill)
    with capped_plan_limits(max_binding_bytes=4096):     # x rows of K=256 are 1 KiB: 4 rows per chunk
        layer = Q4Linear(gpu_context(), rec)
        x = torch.randn(m, 256)
        y, call = layer(x)
    assert len(layer.parts) == 4
    assert y.shape == (m, 100)
    assert rel_err(y, golden(x)) < 1e-4
    assert "split into 4 column part(s)" in call.reason and call.kernel == rec.route_for_adapter(gpu_context().adapter_class)[0].kernel_for(m)


def test_grid_limit_splits_columns_and_rows():
    rec, golden = make_record(128, 200, 32, False, "gemv", "skinny")
    with capped_plan_limits(max_workgroups_per_dim=3):   # 48 columns per part, 12 rows per chunk
        layer = Q4Linear(gpu_context(), rec)
        x = torch.randn(30, 128)
        y, call = layer(x)
        y1, _ = layer(x[:1])
    assert [p.rec.n_stride for p in layer.parts] == [48, 48, 48, 48, 16]
    assert "x 3 row chunk(s)" in call.reason
    assert rel_err(y, golden(x)) < 1e-4 and rel_err(y1, golden(x[:1])) < 1e-4


def test_split_and_unsplit_layers_give_bit_identical_results_for_kernels_without_split_k():
    rec, _ = make_record(256, 100, 32, True, "gemv", "skinny", seed=4)
    whole = Q4Linear(gpu_context(), rec)
    with capped_plan_limits(max_binding_bytes=4096):
        split = Q4Linear(gpu_context(), rec)
    for m in (1, 9):
        x = torch.randn(m, 256)
        assert torch.equal(whole(x)[0], split(x)[0])


def test_row_chunks_may_be_smaller_than_the_exported_minimum_of_m():
    rec, golden = make_record(256, 40, 32, False, "gemv", "skinny", m_min=10)
    with capped_plan_limits(max_binding_bytes=4096):
        layer = Q4Linear(gpu_context(), rec)
        x = torch.randn(10, 256)
        y, _ = layer(x)
    assert rel_err(y, golden(x)) < 1e-4


def test_a_layer_whose_16_columns_exceed_the_limit_is_refused_clearly():
    rec, _ = make_record(1024, 16, 32, False)
    with capped_plan_limits(max_binding_bytes=1024), pytest.raises(WebGPUDelegateError, match="binding limit"):
        Q4Linear(gpu_context(), rec)
