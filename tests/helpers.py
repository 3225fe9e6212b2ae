"""Shared test helpers: quantize with torchao, lower with our partitioner, fp64 goldens."""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from executorch.exir import to_edge_transform_and_lower
from torchao.quantization import IntxWeightOnlyConfig, quantize_
from torchao.quantization.granularity import PerGroup

from executorch_wgpu import WebGPUPartitioner


def quantize_q4(model: torch.nn.Module, group_size: int = 32, **config) -> torch.nn.Module:
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size), **config))
    return model


def dequantized_weight(linear: torch.nn.Linear) -> torch.Tensor:
    """fp64 W = codes * scale (zero point 0), straight from torchao's tensor, not from our packing."""
    w = linear.weight
    codes = w.qdata.double()
    scale = w.scale.double()
    assert bool((w.zero_point == 0).all()), "golden assumes symmetric quantization"
    gs = codes.shape[1] // scale.shape[1]
    return codes * scale.repeat_interleave(gs, dim=1)


def golden_linear(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """x.double() @ dequant(W).double().T + b in fp64."""
    y = x.double() @ dequantized_weight(linear).T
    if linear.bias is not None:
        y = y + linear.bias.double()
    return y


def rel_err(got: torch.Tensor, golden: torch.Tensor) -> float:
    """max |err| / max |golden|."""
    got, golden = got.detach().double(), golden.detach().double()
    return float((got - golden).abs().max() / golden.abs().max())


def lower(model: torch.nn.Module, example: torch.Tensor, dynamic_dims: Optional[dict] = None,
          **partitioner_options) -> bytes:
    """torch.export -> to_edge_transform_and_lower(WebGPUPartitioner) -> .pte bytes."""
    dynamic_shapes = None
    if dynamic_dims:
        dynamic_shapes = ({d: torch.export.Dim(f"d{d}", min=lo, max=hi) for d, (lo, hi) in dynamic_dims.items()},)
    ep = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
    edge = to_edge_transform_and_lower(ep, partitioner=[WebGPUPartitioner(**partitioner_options)])
    return edge.to_executorch().buffer


def single_linear(k: int, n: int, bias: bool = True, group_size: int = 32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return quantize_q4(torch.nn.Sequential(torch.nn.Linear(k, n, bias=bias)).eval(), group_size)


def blobs_in(pte: bytes):
    """Every delegate blob of a .pte, found through ExecuTorch's own deserializer."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte).program
    return [program.backend_delegate_data[d.processed.index].data for d in program.execution_plan[0].delegates]


def require_native_or_skip_module() -> None:
    """At a test module's top: skip it, saying why, when the native delegate is not built here.

    Fails instead when EXECUTORCH_WGPU_REQUIRE_NATIVE=1 (CI, which builds it): a
    skip there would hide a broken build.
    """
    import os

    import pytest

    from executorch_wgpu import native

    reason = native.unavailable_reason()
    if reason is None:
        return
    if os.environ.get("EXECUTORCH_WGPU_REQUIRE_NATIVE") == "1":
        pytest.fail(f"EXECUTORCH_WGPU_REQUIRE_NATIVE=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)
