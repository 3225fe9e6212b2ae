"""Find q4gsw linear layers in an exported graph, and say why one is declined.

A q4gsw linear is torchao's weight-only int4 group-symmetric quantization:

    w = torchao.dequantize_affine(codes[int8 N x K], [1, gs], scale[N x K/gs],
                                  zero_point (None or all zero), int8, -8, 7)
    y = aten.linear(x, w, bias)                      # kept whole (ops_to_not_decompose)
      | aten.addmm(bias, x2d, permute_copy(w, [1, 0]))  # decomposed forms
      | aten.mm(x2d, permute_copy(w, [1, 0]))

Matching works the same on ATen graphs (before decomposition) and Edge graphs
(where targets are EdgeOpOverloads wrapping the same ATen overloads). The
partitioner, its pre-decomposition transform and preprocess all use
match_q4gsw_linear, so they never disagree about what is a q4gsw layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch
from torch._export.utils import get_buffer, get_lifted_tensor_constant, get_param
from torch._subclasses.fake_tensor import FakeTensor
from torch.export import ExportedProgram
from torch.fx import Node

from executorch_wgpu.backend.packing import q4gsw_shape_problem

DEQUANTIZE_AFFINE = "torchao.dequantize_affine.default"
LINEAR = "aten.linear.default"
ADDMM = "aten.addmm.default"
MM = "aten.mm.default"
PERMUTE = "aten.permute_copy.default"


def op_name(node: Node) -> str:
    """'aten.linear.default' for a node calling that op (ATen or Edge dialect), '' otherwise."""
    if node.op != "call_function":
        return ""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        target = getattr(target, "_op", target)   # EdgeOpOverload wraps the ATen OpOverload
    return str(target)


def constant_value(ep: ExportedProgram, node: Node) -> Optional[torch.Tensor]:
    """The tensor behind a parameter / buffer / lifted-constant placeholder, else None."""
    if node.op != "placeholder":
        return None
    for getter in (get_param, get_buffer, get_lifted_tensor_constant):
        value = getter(ep, node)
        if value is not None:
            return value.data if isinstance(value, torch.nn.Parameter) else value
    return None


def layer_name(node: Node) -> str:
    """The fully qualified module name of the layer a node came from (e.g. 'layers.0.fc1')."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        fqn = list(stack.values())[-1][0]
        if fqn:
            return fqn.replace("L['self'].", "")
    return node.name


@dataclass
class Q4LinearMatch:
    """An accepted q4gsw linear: the nodes to delegate and what preprocess needs."""

    name: str
    output: Node               # the linear / addmm / mm node
    dequant: Node
    permute: Optional[Node]
    activation: Node           # x as the linear consumes it
    codes: torch.Tensor        # int8 [N, K] in [-8, 7]
    scales: torch.Tensor       # fp32 [N, K / gs]
    bias: Optional[torch.Tensor]
    bias_node: Optional[Node]
    group_size: int

    @property
    def compute_nodes(self) -> List[Node]:
        return [n for n in (self.dequant, self.permute, self.output) if n is not None]


@dataclass
class Decline:
    """A torchao dequantize node we will not run, why, and what a user can do about it ("" when nothing)."""

    name: str
    dequant: Node
    reason: str
    fix: str = ""

    def describe(self) -> str:
        return f"{self.reason}; to delegate it: {self.fix}" if self.fix else self.reason


# What to change in the quantization for a layer to be delegated (the README's "Use" has the whole recipe).
FIX_SYMMETRIC = "quantize with mapping_type=MappingType.SYMMETRIC (zero point 0)"
FIX_INT4 = "quantize with weight_dtype=torch.int4"
FIX_FP32 = "quantize the float32 model (a bfloat16 or float16 model gives scales and outputs of that dtype)"
FIX_PER_GROUP = "quantize with granularity=PerGroup(32), PerGroup(64) or PerGroup(128)"
FIX_GROUP_SIZE = ("use a group size that is a multiple of 32 and divides in_features (PerGroup(32), 64 or 128), "
                  "or leave this layer out of quantize_ with filter_fn")


def _arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def match_q4gsw_linear(ep: ExportedProgram, dq: Node) -> Union[Q4LinearMatch, Decline]:
    """Decide whether the dequantize_affine node dq and the linear it feeds form a q4gsw layer."""
    users = list(dq.users)
    consumer = users[0] if len(users) == 1 else None
    name = layer_name(consumer if consumer is not None else dq)

    def decline(reason: str, fix: str = "") -> Decline:
        return Decline(name, dq, reason, fix)

    if consumer is None:
        return decline(f"the dequantized weight has {len(users)} users; a q4gsw linear has exactly one")

    # The consuming linear, in its whole or decomposed form.
    permute = None
    if op_name(consumer) == LINEAR and consumer.args[1] is dq:
        out, x_node, bias_node = consumer, consumer.args[0], _arg(consumer, 2, "bias")
    elif (op_name(consumer) == PERMUTE and isinstance(consumer.args[1], (list, tuple))
          and list(consumer.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0])):
        permute = consumer
        if len(consumer.users) != 1:
            return decline("the transposed weight has more than one user")
        out = next(iter(consumer.users))
        if op_name(out) == ADDMM and out.args[2] is permute:
            if out.kwargs.get("beta", 1) != 1 or out.kwargs.get("alpha", 1) != 1:
                return decline("addmm with beta/alpha != 1")
            x_node, bias_node = out.args[1], out.args[0]
        elif op_name(out) == MM and out.args[1] is permute:
            x_node, bias_node = out.args[0], None
        else:
            return decline(f"the transposed weight feeds {op_name(out) or out.op}, not addmm/mm")
    else:
        return decline(f"the dequantized weight feeds {op_name(consumer) or consumer.op}, not a linear")
    name = layer_name(out)

    # The quantization scheme: int4 codes, [1, gs] blocks, fp32 scales, zero point 0.
    codes_node, block_arg, scale_node = dq.args[0], dq.args[1], dq.args[2]
    if not isinstance(block_arg, (list, tuple)):
        return decline(f"block size {block_arg!r} is not a list")
    block_size = list(block_arg)
    zp_node = _arg(dq, 3, "zero_point")
    quant_min, quant_max = _arg(dq, 5, "quant_min"), _arg(dq, 6, "quant_max")
    output_dtype = dq.kwargs.get("output_dtype", torch.float32)
    codes = constant_value(ep, codes_node) if isinstance(codes_node, Node) else None
    scales = constant_value(ep, scale_node) if isinstance(scale_node, Node) else None
    if codes is None or scales is None:
        return decline("weight codes or scales are not constants of the program")
    if codes.dtype != torch.int8 or codes.dim() != 2:
        return decline(f"weight codes are {codes.dtype} of rank {codes.dim()}, expected int8 of rank 2")
    if (quant_min, quant_max) != (-8, 7):
        return decline(f"quant range [{quant_min}, {quant_max}] is not int4 [-8, 7]", FIX_INT4)
    n, k = codes.shape
    if len(block_size) != 2 or block_size[0] != 1:
        return decline(f"block size {block_size} is not per-group [1, gs]", FIX_PER_GROUP)
    gs = block_size[1]
    if scales.dtype != torch.float32 or tuple(scales.shape) not in ((n, k // gs),):
        return decline(f"scales are {scales.dtype} {tuple(scales.shape)}, expected float32 {(n, k // gs)}",
                       FIX_FP32 if scales.dtype != torch.float32 else FIX_PER_GROUP)
    # ExecuTorch hands partition() a program whose constants are FakeTensors: value
    # checks run where real values exist (the pre-decomposition transform and preprocess).
    has_values = not isinstance(codes, FakeTensor)
    if zp_node is not None:
        zp = constant_value(ep, zp_node) if isinstance(zp_node, Node) else None
        if zp is None:
            return decline("zero point is not a constant of the program")
        if has_values and bool((zp != 0).any()):
            return decline("zero points are not all zero (asymmetric quantization)", FIX_SYMMETRIC)
    if output_dtype != torch.float32:
        return decline(f"dequantized dtype is {output_dtype}, expected torch.float32", FIX_FP32)
    if has_values and (int(codes.min()) < -8 or int(codes.max()) > 7):
        return decline("weight codes fall outside [-8, 7]")
    problem = q4gsw_shape_problem(k, n, gs)
    if problem:
        return decline(problem, FIX_GROUP_SIZE)

    # Activation and bias.
    x_val = x_node.meta.get("val") if isinstance(x_node, Node) else None
    if not isinstance(x_node, Node) or x_val is None or x_val.dtype != torch.float32:
        return decline(f"activation dtype is {getattr(x_val, 'dtype', None)}, expected torch.float32",
                       "run the model in float32")
    bias = None
    if bias_node is not None:
        bias = constant_value(ep, bias_node) if isinstance(bias_node, Node) else None
        if bias is None:
            return decline("bias is not a constant of the program")
        if bias.dtype != torch.float32 or tuple(bias.shape) != (n,):
            return decline(f"bias is {bias.dtype} {tuple(bias.shape)}, expected float32 ({n},)")
    return Q4LinearMatch(name, out, dq, permute, x_node, codes, scales, bias, bias_node, gs)


def find_q4gsw_linears(ep: ExportedProgram) -> List[Union[Q4LinearMatch, Decline]]:
    """match_q4gsw_linear for every dequantize_affine node of the graph, in graph order."""
    return [match_q4gsw_linear(ep, n) for n in ep.graph.nodes if op_name(n) == DEQUANTIZE_AFFINE]
