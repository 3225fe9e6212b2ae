"""Graph mode of WebGPUPartitioner: maximal regions of supported ops, one delegate each.

A node is supported when it belongs to an accepted q4gsw linear or a rule of
ops.py covers it and its check passes (a dequantize_affine outside the linears:
ops_quantized.py's, the table of quantized embeddings). torch's CapabilityBasedPartitioner
merges supported nodes into the largest regions that create no cycle, as
ExecuTorch's Vulkan and XNNPACK partitioners do; ExecuTorch's tag helpers
then hand each region its constants and the mutable buffers (KV cache) it
reads, so the delegate owns them on the GPU across calls.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from typing import Dict, Iterable, List, Optional, Set

from executorch.exir.backend.partitioner import DelegationSpec
from executorch.exir.backend.utils import tag_constant_data, tag_mutated_buffer
import torch
from torch.export import ExportedProgram
from torch.fx import Node
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

from executorch_wgpu.backend.graph import ops
from executorch_wgpu.backend.graph.ops_transformer import _constant_placeholder_by_meta
from executorch_wgpu.backend.q4gsw_pattern import Q4LinearMatch

log = logging.getLogger("executorch_wgpu.backend.partitioner")

# Why a region that reads nothing but constants stays on the CPU (partition_graph).
CONSTANTS_ONLY = "its region reads only constants (a delegate needs an input)"
# Nodes that compute nothing on the device: symbols, checks, reading input_pos.
_HOST_OPS = {"aten.sym_size.int", "aten._assert_scalar.default", "aten._local_scalar_dense.default"}


def _wrapped_op(node: Node) -> str:
    """The op an auto_functionalized(_v2) node wraps, as RULES names it."""
    return str(node.args[0]) if node.args else ""


class GraphSupport(OperatorSupportBase):
    def __init__(self, q4_nodes: Set[Node]):
        super().__init__()
        self.q4_nodes = q4_nodes
        self.declined: Counter = Counter()   # (op, reason) -> nodes
        self.excluded: Dict[Node, str] = {}  # nodes a proposed region could not keep (partition_graph), and why

    def reason(self, node: Node) -> Optional[str]:
        if node in self.excluded:
            return self.excluded[node]
        if node in self.q4_nodes:
            return None
        name = ops.target_name(node)
        if name in ("auto_functionalized_v2", "auto_functionalized"):
            wrapped = _wrapped_op(node)
            return None if wrapped in ops.RULES else f"no graph rule for {wrapped}"
        if node.target is operator.getitem:
            src = node.args[0]
            return None if isinstance(src, Node) and self.reason(src) is None else "it reads an unsupported node"
        if name in ("aten.mm.default", "aten.linear.default", "aten.addmm.default"):
            return "not part of an accepted q4gsw linear (fp32 matmuls stay on the CPU)"
        # a dequantize_affine outside the q4 linears: ops_quantized.py's rule takes a quantized embedding table
        return ops.unsupported_reason(node)

    def is_node_supported(self, submodules, node: Node) -> bool:
        if node.op != "call_function":
            return False
        why = self.reason(node)
        if why is not None:
            self.declined[(ops.target_name(node), why)] += 1
        return why is None


def _reads_only_constants(nodes: Iterable[Node]) -> bool:
    """Do these nodes read nothing from outside but constants of the program (no input, no mutable state)?"""
    inside = set(nodes)
    outside = {a for n in nodes for a in n.all_input_nodes if a not in inside}
    return all(a.op == "placeholder" and _constant_placeholder_by_meta(a) for a in outside)


# What a graph delegate takes in and hands back (compile.py refuses anything else).
_INPUT_DTYPES = (torch.float32, torch.int64, torch.int32)


def _unpassable_edges(partition_nodes: Iterable[Node]) -> Dict[Node, str]:
    """Nodes of a region at an edge a graph delegate cannot pass, with why: a result read outside it that is
    not a float32 tensor (an integer or boolean tensor, a symbol: a delegate returns float32 only), a tensor
    read from outside it that is neither float32 nor an integer (a boolean mask made on the CPU), or a value
    computed outside it that is not a tensor (a symbol read from a tensor on the CPU)."""
    inside = set(partition_nodes)
    cut: Dict[Node, str] = {}
    for n in inside:
        val = n.meta.get("val")
        outside_user = next((u for u in n.users if u not in inside), None)
        if outside_user is not None and not (isinstance(val, torch.Tensor) and val.dtype == torch.float32):
            what = val.dtype if isinstance(val, torch.Tensor) else type(val).__name__
            cut[n] = (f"its {what} result is read outside the GPU region (by {outside_user.name}), and a graph "
                      "delegate returns float32 tensors only")
            continue
        for a in n.all_input_nodes:
            a_val = a.meta.get("val")
            if a in inside or (a.op == "placeholder" and _constant_placeholder_by_meta(a)):
                continue   # constants go into the delegate with their region (tag_constant_data)
            if isinstance(a_val, torch.Tensor) and a_val.dtype not in _INPUT_DTYPES:
                cut[n] = (f"it reads {a.name}, a {a_val.dtype} tensor from outside the GPU region; a graph "
                          "delegate takes float32 and integer tensors")
                break
            if not isinstance(a_val, torch.Tensor) and a.op == "call_function":
                cut[n] = (f"it reads {a.name}, a value computed outside the GPU region that is not a tensor; a "
                          "graph delegate takes tensors (and the sizes of its inputs)")
                break
    return cut


def propose_regions(ep: ExportedProgram, support: GraphSupport) -> list:
    """torch's capability-based regions of the supported nodes, with no edge a delegate cannot pass
    (_unpassable_edges). Support is decided node by node, so a region can end where an integer result
    (GPT-2's position ids, an arange) is still read on the other side: such a node is declined and the
    regions are proposed again, until none is left (each round declines at least one node)."""
    while True:
        support.declined.clear()
        partitions = CapabilityBasedPartitioner(ep.graph_module, support,
                                                allows_single_node_partition=True).propose_partitions()
        cut: Dict[Node, str] = {}
        for p in partitions:
            cut.update(_unpassable_edges(p.nodes))
        if not cut:
            return partitions
        support.excluded.update(cut)


def partition_graph(ep: ExportedProgram, accepted: List[Q4LinearMatch], spec: DelegationSpec,
                    tag_prefix: str = "webgpu_graph") -> Dict[str, DelegationSpec]:
    """Tag the regions of `ep` the GPU runs; returns {tag: spec}. Logs what stays on the CPU, once."""
    q4_nodes = {n for m in accepted for n in m.compute_nodes}
    support = GraphSupport(q4_nodes)
    partitions = propose_regions(ep, support)
    tags: Dict[str, DelegationSpec] = {}
    for p in partitions:
        device_work = [n for n in p.nodes if ops.target_name(n) not in _HOST_OPS
                       and getattr(n.target, "__module__", None) != "_operator"]
        if not device_work:
            continue   # only host arithmetic: leave it to the CPU
        if _reads_only_constants(p.nodes):
            # a region of constants only (e.g. a declined quantized table's dequantize, as ATen ops) would be a
            # delegate that takes no input, which the Python runtime refuses: the CPU computes it
            for n in device_work:
                support.declined[(ops.target_name(n), CONSTANTS_ONLY)] += 1
            continue
        tag = f"{tag_prefix}_{len(tags)}"
        for n in p.nodes:
            n.meta["delegation_tag"] = tag
        tags[tag] = spec
    tag_constant_data(ep)
    tag_mutated_buffer(ep)
    for (op, why), count in sorted(support.declined.items()):
        log.warning("WebGPUPartitioner: %d %s node(s) stay on the CPU: %s", count, op, why)
    log.info("WebGPUPartitioner: %d graph delegate(s), %d q4 linears inside", len(tags), len(accepted))
    return tags
