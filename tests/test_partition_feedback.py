"""What the partitioner tells a user: one summary per lowering, and for each layer it leaves on the CPU the fix.

The exact message lists are linears-only mode's (linears_only=True); graph mode, the default, adds a line per
kind of op it leaves on the CPU and one counting its graph delegates, and ends with the same summary where the
model has q4 linears (test_to_edge_then_to_backend_gives_the_same_summary).
"""

from __future__ import annotations

import logging

import pytest
import torch
from executorch.exir import to_edge
from torchao.quantization import IntxWeightOnlyConfig, MappingType, quantize_
from torchao.quantization.granularity import PerGroup

from executorch_wgpu import WebGPUPartitioner


def two_linears() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval()


def partitioner_messages(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.name.startswith("executorch_wgpu")]


def test_a_fully_delegated_model_gets_one_summary_line(caplog, lower):
    model = two_linears()
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    with caplog.at_level(logging.INFO, logger="executorch_wgpu"):
        lower(model, torch.randn(2, 64), linears_only=True)
    assert partitioner_messages(caplog) == ["WebGPUPartitioner: 2 of 2 q4 linears delegated"]


@pytest.mark.parametrize("config, fix", [
    (dict(weight_dtype=torch.int4, granularity=PerGroup(16)), "multiple of 32"),
    (dict(weight_dtype=torch.int4, granularity=PerGroup(32), mapping_type=MappingType.ASYMMETRIC),
     "MappingType.SYMMETRIC"),
])
def test_a_declined_layer_is_logged_with_its_fix_and_counted_in_the_summary(caplog, lower, config, fix):
    model = two_linears()
    quantize_(model, IntxWeightOnlyConfig(**config), filter_fn=lambda m, fqn: fqn == "2")
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
              filter_fn=lambda m, fqn: fqn == "0")
    with caplog.at_level(logging.INFO, logger="executorch_wgpu"):
        lower(model, torch.randn(2, 64), linears_only=True)
    messages = partitioner_messages(caplog)
    declines = [m for m in messages if "stays on the CPU" in m and "to delegate it:" in m]
    assert len(declines) == 1 and fix in declines[0], messages
    assert messages[-1].startswith("WebGPUPartitioner: 1 of 2 q4 linears delegated; 1 stay on the CPU: "), messages


def test_a_model_without_q4_linears_is_told_how_to_quantize(caplog, lower):
    with caplog.at_level(logging.INFO, logger="executorch_wgpu"):
        lower(two_linears(), torch.randn(2, 64), linears_only=True)
    (message,) = partitioner_messages(caplog)
    assert "no int4 weight-only linears" in message and "IntxWeightOnlyConfig(weight_dtype=torch.int4" in message
    assert "nothing is delegated" in message


def test_a_model_without_q4_linears_in_graph_mode_is_told_what_was_delegated_and_how_to_quantize(caplog, lower):
    """Graph mode (the default) delegates the ReLU between the fp32 linears: the summary says so, not 'nothing'."""
    with caplog.at_level(logging.INFO, logger="executorch_wgpu"):
        lower(two_linears(), torch.randn(2, 64))
    message = partitioner_messages(caplog)[-1]
    assert "no int4 weight-only linears" in message and "IntxWeightOnlyConfig(weight_dtype=torch.int4" in message
    assert "only its other ops are delegated (1 graph delegate(s))" in message and "nothing" not in message


def test_to_edge_then_to_backend_gives_the_same_summary(caplog):
    model = two_linears()
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    edge = to_edge(torch.export.export(model, (torch.randn(2, 64),)))
    with caplog.at_level(logging.INFO, logger="executorch_wgpu"):
        edge.to_backend(WebGPUPartitioner())
    assert partitioner_messages(caplog)[-1] == "WebGPUPartitioner: 2 of 2 q4 linears delegated"
