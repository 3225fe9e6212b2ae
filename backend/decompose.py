"""Lower declined torchao.dequantize_affine nodes to plain ATen ops.

ExecuTorch never decomposes torchao's dequantize_affine, and the op has no
out variant, so a dequantize node left outside every delegate makes
to_executorch() fail ("Missing out variants"). For each dequantize node the
partitioner declines, we trace torchao's own implementation of the op (its
CompositeImplicitAutograd kernel) with make_fx and inline the resulting ATen
ops in its place: the declined layer then runs exactly as torchao defines it,
through ordinary ATen kernels on the CPU.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, GraphModule, Node, map_arg
from torch.fx.experimental.proxy_tensor import make_fx


def _example(value):
    """A concrete stand-in for a placeholder's fake value (shapes are static for weights)."""
    return torch.zeros(tuple(int(s) for s in value.shape), dtype=value.dtype)


def inline_dequantize_affine(graph_module: GraphModule, dq: Node) -> None:
    """Replace dq by the ATen ops torchao's dequantize_affine decomposes into."""
    tensor_args = [a for a in dq.args if isinstance(a, Node)]
    tensor_kwargs = {k: v for k, v in dq.kwargs.items() if isinstance(v, Node)}
    if tensor_kwargs:
        raise NotImplementedError(f"dequantize_affine with tensor kwargs {list(tensor_kwargs)}")
    target = dq.target
    if not callable(target):   # a call_function node's target is the op; a str names a method or module
        raise NotImplementedError(f"dequantize_affine node with target {target!r}")

    def call(*tensors):
        it = iter(tensors)
        args = [next(it) if isinstance(a, Node) else a for a in dq.args]
        return target(*args, **dq.kwargs)

    examples = [_example(a.meta["val"]) for a in tensor_args]
    traced = make_fx(call, tracing_mode="fake")(*examples)
    graph: Graph = graph_module.graph
    env = {}
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    for placeholder, arg in zip(placeholders, tensor_args):
        env[placeholder] = arg
    with graph.inserting_before(dq):
        for node in traced.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                result = map_arg(node.args[0], lambda n: env[n])
                break
            if node.op != "call_function":
                raise NotImplementedError(f"unexpected {node.op} node in torchao's dequantize_affine")
            new = graph.node_copy(node, lambda n: env[n])
            new.meta = {k: v for k, v in dq.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
            env[node] = new
    dq.replace_all_uses_with(result)
    graph.erase_node(dq)
