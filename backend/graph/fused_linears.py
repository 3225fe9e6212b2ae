"""Sibling q4gsw linears -- several reading the same input -- fused into one layer: one dispatch, not one each.

A decode step on a GPU is bound by a fixed cost per dispatch rather than by the
bytes its linears read (on an H200: about 21 µs per GEMV in one compute pass,
where the bytes need 1-3 µs), so a Llama layer's q/k/v projections (one input:
the attention norm's output) and its gate/up projections (the FFN norm's) run
as one linear dispatch each: 7 linear dispatches per layer become 4.

The rule, decided here at preprocess and nowhere else: accepted q4gsw linears
that read the same activation node with the same group size (so the same K
and the same M) are grouped in graph order, at most len(registry.Q4_OUTPUT_PARTS)
to a group and only while the fused weights fit FUSED_MAX_BINDING_BYTES. A
group's int4 codes, scales and biases are concatenated along N (a member
without a bias contributes zeros) and packed as ONE WGQ4 blob, routed by M as
any layer is. Its output stays one contiguous tensor per member: the graph
blob lists the parts (graph.fbs LinearPart) and the kernels write each part
to its own buffer (q4gsw_prelude.wgsl store_y), so nothing downstream changes.
The route report still has one entry per linear of the model: each member by
its own name and N, with the fused layer's kernel and a reason naming the
fused layer ("...; fused: one layer layers.0.attention.wq+wk+wv"); graph_report()
counts the one dispatch. compile_graph(fuse_linears=False), the compile spec
preprocess.FUSE_LINEARS_SPEC = b"0", lowers every linear on its own.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

import torch
from torch.fx import Node

from executorch_wgpu.backend.q4gsw_pattern import Q4LinearMatch
from executorch_wgpu.backend.serialization.blob import N_ALIGN, round_up
from executorch_wgpu.shaders import registry

# WebGPU's default maxStorageBufferBindingSize (128 MiB): a fused layer's packed weights stay within it,
# so fusing never makes a model's layers too large for a device its unfused layers fit.
FUSED_MAX_BINDING_BYTES = 1 << 27
MAX_PARTS = len(registry.Q4_OUTPUT_PARTS)


def packed_weight_bytes(k: int, n: int) -> int:
    """Bytes of a K x N layer's packed codes (the larger of its two weight buffers: scales are K/gs per column)."""
    return k // 8 * round_up(n, N_ALIGN) * 4


def sibling_groups(matches: Sequence[Q4LinearMatch]) -> List[List[Q4LinearMatch]]:
    """The groups of 2 or more linears (in graph order, as `matches` are) that fuse into one layer each."""
    by_input: Dict[Tuple[Node, int], List[Q4LinearMatch]] = {}
    for m in matches:
        by_input.setdefault((m.activation, m.group_size), []).append(m)
    groups: List[List[Q4LinearMatch]] = []
    for siblings in by_input.values():
        group: List[Q4LinearMatch] = []
        for m in siblings:
            k = int(m.codes.shape[1])
            n = sum(int(g.codes.shape[0]) for g in group) + int(m.codes.shape[0])
            if group and (len(group) == MAX_PARTS or packed_weight_bytes(k, n) > FUSED_MAX_BINDING_BYTES):
                if len(group) > 1:
                    groups.append(group)
                group = []
            group.append(m)
        if len(group) > 1:
            groups.append(group)
    return groups


def fused_name(names: Sequence[str]) -> str:
    """The fused layer's name: its members' names after their common dotted prefix, joined with '+'
    ("layers.0.attention.wq+wk+wv"); the graph blob names each part in full (LinearPart.name)."""
    split = [n.split(".") for n in names]
    common = 0
    while common < min(len(s) for s in split) - 1 and len({s[common] for s in split}) == 1:
        common += 1
    head = ".".join(split[0][:common])
    return (head + "." if head else "") + "+".join(".".join(s[common:]) for s in split)


def fused_match(group: Sequence[Q4LinearMatch]) -> Q4LinearMatch:
    """The group as one linear of their concatenated columns, named by fused_name."""
    bias = None
    if any(m.bias is not None for m in group):
        bias = torch.cat([m.bias.detach().to(torch.float32) if m.bias is not None
                          else torch.zeros(int(m.codes.shape[0]), dtype=torch.float32) for m in group])
    return dataclasses.replace(
        group[0], name=fused_name([m.name for m in group]), codes=torch.cat([m.codes for m in group]),
        scales=torch.cat([m.scales.to(torch.float32) for m in group]), bias=bias, bias_node=None)
