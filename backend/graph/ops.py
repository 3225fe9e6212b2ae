"""The graph delegate's op registry: one declaration per op drives both the partitioner and the lowering.

Each rule names the Edge ops it covers and gives
  * `check(node) -> Optional[str]`: None when the GPU runs this node, else why not
    (the partitioner logs the reason once per lowering and leaves the node on the CPU);
  * `lower(lw, node)`: what the node becomes in the blob -- a view of a buffer, a
    host-side symbol or check, or kernel steps (Lowerer.dispatch / Lowerer.linear).

Op semantics live in the kernel (shaders/*.wgsl) and the rule here; the
runtimes only interpret what the rules emitted.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import sympy
import torch
from torch.fx import Node

from executorch_wgpu.backend.graph import patterns
from executorch_wgpu.backend.graph.exprs import ExprError, IntExpr, ceildiv, sym
from executorch_wgpu.backend.graph.lowering import Lowerer, LoweringError, TensorRef
from executorch_wgpu.backend.q4gsw_pattern import op_name
from executorch_wgpu.shaders import registry

RANK = registry.ELEMENTWISE_RANK
OPS = registry.ELEMENTWISE_OPS
MAX_GROUPS = 65535       # WebGPU's guaranteed maxComputeWorkgroupsPerDimension
SDPA_MAX_HEAD_DIM = registry.kernel("sdpa").constants["MAX_D"]
# Prefill (S > 1) attention: the tiled kernel up to its head dim, sdpa above it.
SDPA_FLASH_MAX_HEAD_DIM = registry.kernel("sdpa_flash").constants["MAX_D"]
SDPA_FLASH_ROWS = registry.kernel("sdpa_flash").constants["ROWS"]


def f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", float(value)))[0]


@dataclass(frozen=True)
class OpRule:
    targets: Tuple[str, ...]
    lower: Callable[[Lowerer, Node], None]
    check: Callable[[Node], Optional[str]]


RULES: Dict[str, OpRule] = {}


def rule(*targets: str, check: Optional[Callable[[Node], Optional[str]]] = None):
    """Register `lower` for these op names (as q4gsw_pattern.op_name spells them)."""
    def register(lower: Callable[[Lowerer, Node], None]) -> Callable[[Lowerer, Node], None]:
        for t in targets:
            if t in RULES:
                raise RuntimeError(f"backend/graph/ops.py: {t} has two rules")
            RULES[t] = OpRule(targets, lower, check or _fp32_output)
        return lower
    return register


def target_name(node: Node) -> str:
    """The name RULES knows a node by: the op overload, or operator.<fn> for symbolic Python arithmetic."""
    if node.op == "call_function" and getattr(node.target, "__module__", None) == "_operator":
        return f"operator.{getattr(node.target, '__name__', '')}"
    return op_name(node) or str(node.target)


def args_of(node: Node) -> List[Any]:
    """A node's positional arguments (typed Any: fx types them as a union no rule can index)."""
    return list(node.args)


def _val(node: Node) -> Any:
    return node.meta.get("val")


def _fp32_output(node: Node) -> Optional[str]:
    val = _val(node)
    if not isinstance(val, torch.Tensor):
        return "its result is not a tensor"
    if val.dtype != torch.float32:
        return f"its result is {val.dtype}; the graph delegate computes float32"
    if val.dim() > RANK:
        return f"rank {val.dim()} is above the {RANK} dims the elementwise kernel indexes"
    return None


def _host(_node: Node) -> Optional[str]:
    return None


# ---- elementwise helpers ------------------------------------------------------------------------

def _pad(values: Sequence[IntExpr], fill: IntExpr) -> List[IntExpr]:
    return [fill] * (RANK - len(values)) + list(values)


def _grid_1d(n: IntExpr, threads: int) -> Tuple[IntExpr, IntExpr, IntExpr]:
    groups = ceildiv(n, threads)
    return (sympy.Min(groups, MAX_GROUPS) if isinstance(groups, sympy.Basic) else min(groups, MAX_GROUPS),
            ceildiv(groups, MAX_GROUPS), 1)


def broadcast_strides(t: TensorRef, shape: Sequence[IntExpr]) -> List[IntExpr]:
    """Strides that read `t` broadcast to `shape` (numpy rules: right-aligned, size-1 dims repeat)."""
    strides = list(t.strides())
    out: List[IntExpr] = []
    offset = len(shape) - len(t.shape)
    if offset < 0:
        raise LoweringError(f"cannot broadcast shape {t.shape} to {tuple(shape)}")
    for i, d in enumerate(shape):
        j = i - offset
        if j < 0:
            out.append(0)
        elif sympy.sympify(t.shape[j]) == 1 and sympy.sympify(d) != 1:
            out.append(0)
        else:
            out.append(strides[j])
    return out


def elementwise(lw: Lowerer, node: Node, op: str, out: TensorRef, shape: Sequence[IntExpr],
                a: Tuple[TensorRef, IntExpr, Sequence[IntExpr]],
                b: Optional[Tuple[TensorRef, IntExpr, Sequence[IntExpr]]] = None, scalar: Optional[float] = None,
                out_off: IntExpr = 0, out_strides: Optional[Sequence[IntExpr]] = None, pattern: str = "") -> None:
    """One elementwise step: out[out_off + i . out_strides] = op(a[...], b[...] or scalar) over `shape`."""
    if len(shape) > RANK:
        raise LoweringError(f"{node.name}: rank {len(shape)} is above {RANK}")
    n: IntExpr = 1
    for d in shape:
        n = n * d
    so = out_strides if out_strides is not None else TensorRef(out.buffer, tuple(shape)).strides()
    params: Dict[str, IntExpr] = {"n": n, "op": OPS[op], "a_off": a[1], "out_off": out_off}
    for i, (d, sa, sob) in enumerate(zip(_pad(shape, 1), _pad(a[2], 0), _pad(so, 0))):
        params[f"d{i}"], params[f"sa{i}"], params[f"so{i}"] = d, sa, sob
    bindings = {"a": a[0].buffer, "out": out.buffer}
    if b is not None:
        bindings["b"] = b[0].buffer
        params["b_off"] = b[1]
        for i, sb in enumerate(_pad(b[2], 0)):
            params[f"sb{i}"] = sb
    elif scalar is not None:
        params["b_is_scalar"] = 1
        params["scalar_bits"] = f32_bits(scalar)
    lw.dispatch(node, "elementwise", bindings, params, _grid_1d(n, registry.kernel("elementwise").workgroup_size[0]),
                pattern)


def copy_strided(lw: Lowerer, node: Node, src: TensorRef, src_off: IntExpr, src_strides: Sequence[IntExpr],
                 shape: Sequence[IntExpr]) -> TensorRef:
    out = lw.out_tensor(node)
    elementwise(lw, node, "OP_COPY", out, shape, (src, src_off, src_strides))
    return out


def _meta_shape(node: Node) -> Tuple[IntExpr, ...]:
    return tuple(sym(d) for d in _val(node).shape)


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# ---- symbols and checks (host side) --------------------------------------------------------------

@rule("aten.sym_size.int", "operator.add", "operator.sub", "operator.mul", "operator.floordiv", "operator.mod",
      "operator.le", "operator.lt", "operator.ge", "operator.gt", "operator.eq", "operator.ne", "operator.neg",
      check=_host)
def lower_symbolic(lw: Lowerer, node: Node) -> None:
    lw.values[node] = sym(_val(node))


@rule("aten._assert_scalar.default", check=_host)
def lower_assert(lw: Lowerer, node: Node) -> None:
    cond = args_of(node)[0]
    expr = sym(_val(cond)) if isinstance(cond, Node) else sym(cond)
    if expr is sympy.true or expr == 1:
        return
    message = str(args_of(node)[1]) if len(node.args) > 1 else f"assertion {expr}"
    lw.checks.append((expr, f"{message} ({expr})"))


def _input_element(node: Node) -> Optional[Tuple[Node, int]]:
    """(user input placeholder, flat index) when node is select_copy(input, 0, i) of a 1-D integer input."""
    if target_name(node) != "aten.select_copy.int":
        return None
    src, dim, index = args_of(node)[0], args_of(node)[1], args_of(node)[2]
    if not (isinstance(src, Node) and src.op == "placeholder" and isinstance(index, int)):
        return None
    val = _val(src)
    if not isinstance(val, torch.Tensor) or val.dim() != 1 or isinstance(val.shape[0], torch.SymInt):
        return None
    n = int(val.shape[0])
    return (src, index + n if index < 0 else index) if dim == 0 and -n <= index < n else None


def _check_scalar_read(node: Node) -> Optional[str]:
    src = args_of(node)[0]
    if isinstance(src, Node) and _input_element(src) is not None:
        return None
    return "it reads a value computed on the device back to the host (only elements of an input can be read)"


@rule("aten._local_scalar_dense.default", check=_check_scalar_read)
def lower_scalar_read(lw: Lowerer, node: Node) -> None:
    source = _input_element(args_of(node)[0])
    assert source is not None
    placeholder, index = source
    symbol = sym(_val(node))
    if not isinstance(symbol, sympy.Symbol):
        lw.values[node] = symbol
        return
    lw.add_symbol(symbol, "input-element", lw.user_inputs.index(placeholder), index, lo=-(2**62))
    lw.values[node] = symbol


# ---- views ----------------------------------------------------------------------------------------

def _alias(lw: Lowerer, node: Node) -> None:
    src = lw.tensor(args_of(node)[0])
    lw.values[node] = TensorRef(src.buffer, _meta_shape(node), src.dtype)


def _check_clone(node: Node) -> Optional[str]:
    dim_order: Any = node.kwargs.get("dim_order")
    if dim_order is not None and list(dim_order) != list(range(len(dim_order))):
        return f"dim order {list(dim_order)} is not contiguous"
    return _fp32_output(node)


rule(*patterns.VIEW_OPS)(_alias)
rule("aten.clone.default", check=_check_clone)(_alias)   # dim_order_ops._clone_dim_order: ops_transformer.py


# ---- copies: permute, slice, select, cat, expand ---------------------------------------------------

@rule("aten.permute_copy.default")
def lower_permute(lw: Lowerer, node: Node) -> None:
    # permute(permute(x)) that restores x's order is x itself (the LLM transforms write such pairs).
    restored = patterns.undone_permute(node)
    if restored is not None:
        src = lw.tensor(restored)
        lw.values[node] = TensorRef(src.buffer, _meta_shape(node), src.dtype)
        return
    dims = [_dim(d, len(args_of(node)[1])) for d in args_of(node)[1]]
    src = lw.tensor(args_of(node)[0])
    strides = src.strides()
    lw.values[node] = copy_strided(lw, node, src, 0, [strides[d] for d in dims], _meta_shape(node))


def _start(value, size: IntExpr) -> IntExpr:
    if value is None:
        return 0
    v = sym(value)
    return v + size if isinstance(v, int) and v < 0 else v


@rule("aten.slice_copy.Tensor")
def lower_slice(lw: Lowerer, node: Node) -> None:
    src = lw.tensor(args_of(node)[0])
    dim = _dim(args_of(node)[1] if len(node.args) > 1 else 0, len(src.shape))
    start_arg = args_of(node)[2] if len(node.args) > 2 else None
    step = args_of(node)[4] if len(node.args) > 4 else 1
    start = _start(lw.value(start_arg) if isinstance(start_arg, Node) else start_arg, src.shape[dim])
    strides = list(src.strides())
    offset = start * strides[dim]
    strides[dim] = strides[dim] * step
    lw.values[node] = copy_strided(lw, node, src, offset, strides, _meta_shape(node))


def _check_select(node: Node) -> Optional[str]:
    if _input_element(node) is not None:
        return None   # an element the host reads (input_pos[0])
    return _fp32_output(node)


@rule("aten.select_copy.int", check=_check_select)
def lower_select(lw: Lowerer, node: Node) -> None:
    if _input_element(node) is not None:
        lw.values[node] = None   # read on the host by _local_scalar_dense
        return
    src = lw.tensor(args_of(node)[0])
    dim = _dim(args_of(node)[1], len(src.shape))
    index = sym(lw.value(args_of(node)[2]) if isinstance(args_of(node)[2], Node) else args_of(node)[2])
    if isinstance(index, int) and index < 0:
        index = index + src.shape[dim]
    strides = list(src.strides())
    offset = index * strides[dim]
    del strides[dim]
    lw.values[node] = copy_strided(lw, node, src, offset, strides, _meta_shape(node))


@rule("aten.cat.default")
def lower_cat(lw: Lowerer, node: Node) -> None:
    if _lower_rope(lw, node):
        return
    parts = [lw.tensor(p) for p in args_of(node)[0]]
    out = lw.out_tensor(node)
    dim = _dim(args_of(node)[1] if len(node.args) > 1 else 0, len(out.shape))
    out_strides = out.strides()
    offset: IntExpr = 0
    for p in parts:
        if len(p.shape) != len(out.shape):
            continue   # a legacy empty [0] part
        elementwise(lw, node, "OP_COPY", out, p.shape, (p, 0, p.strides()), out_off=offset * out_strides[dim],
                    out_strides=out_strides)
        offset = offset + p.shape[dim]
    lw.values[node] = out


@rule("aten.expand_copy.default")
def lower_expand(lw: Lowerer, node: Node) -> None:
    src = lw.tensor(args_of(node)[0])
    shape = _meta_shape(node)
    lw.values[node] = copy_strided(lw, node, src, 0, broadcast_strides(src, shape), shape)


# ---- arithmetic -------------------------------------------------------------------------------------

_BINARY = {"aten.add.Tensor": "OP_ADD", "aten.sub.Tensor": "OP_SUB", "aten.mul.Tensor": "OP_MUL",
           "aten.div.Tensor": "OP_DIV", "aten.pow.Tensor_Tensor": "OP_POW", "aten.maximum.default": "OP_MAX",
           "aten.minimum.default": "OP_MIN"}
_SCALAR = {"aten.add.Scalar": "OP_ADD", "aten.sub.Scalar": "OP_SUB", "aten.mul.Scalar": "OP_MUL",
           "aten.div.Scalar": "OP_DIV", "aten.pow.Tensor_Scalar": "OP_POW"}
_UNARY = {"aten.neg.default": "OP_NEG", "aten.rsqrt.default": "OP_RSQRT", "aten.sqrt.default": "OP_SQRT",
          "aten.exp.default": "OP_EXP", "aten.sigmoid.default": "OP_SIGMOID", "aten.tanh.default": "OP_TANH",
          "aten.reciprocal.default": "OP_RECIPROCAL", "aten.abs.default": "OP_ABS", "aten.log.default": "OP_LOG",
          "aten.cos.default": "OP_COS", "aten.sin.default": "OP_SIN", "aten.relu.default": "OP_RELU",
          "aten.silu.default": "OP_SILU"}


def _check_arith(node: Node) -> Optional[str]:
    alpha = node.kwargs.get("alpha", 1)
    if alpha != 1:
        return f"alpha={alpha}"
    for a in node.args:
        if isinstance(a, Node) and isinstance(_val(a), torch.Tensor) and _val(a).dtype != torch.float32:
            return f"operand {a.name} is {_val(a).dtype}"
    return _fp32_output(node)


@rule(*_BINARY, check=_check_arith)
def lower_binary(lw: Lowerer, node: Node) -> None:
    if target_name(node) == "aten.mul.Tensor" and (_lower_rms_norm(lw, node) or _lower_silu_mul(lw, node)):
        return
    shape = _meta_shape(node)
    out = lw.out_tensor(node)
    x, y = args_of(node)[0], args_of(node)[1]
    if not isinstance(y, Node):   # add.Tensor(x, 2.0) after decomposition
        a = lw.tensor(x)
        elementwise(lw, node, _BINARY[target_name(node)], out, shape, (a, 0, broadcast_strides(a, shape)),
                    scalar=float(y))
    else:
        a, b = lw.tensor(x), lw.tensor(y)
        elementwise(lw, node, _BINARY[target_name(node)], out, shape, (a, 0, broadcast_strides(a, shape)),
                    (b, 0, broadcast_strides(b, shape)))
    lw.values[node] = out


@rule(*_SCALAR, check=_check_arith)
def lower_scalar(lw: Lowerer, node: Node) -> None:
    shape = _meta_shape(node)
    out = lw.out_tensor(node)
    a = lw.tensor(args_of(node)[0])
    elementwise(lw, node, _SCALAR[target_name(node)], out, shape, (a, 0, broadcast_strides(a, shape)),
                scalar=float(args_of(node)[1]))
    lw.values[node] = out


@rule(*_UNARY)
def lower_unary(lw: Lowerer, node: Node) -> None:
    shape = _meta_shape(node)
    out = lw.out_tensor(node)
    a = lw.tensor(args_of(node)[0])
    elementwise(lw, node, _UNARY[target_name(node)], out, shape, (a, 0, a.strides()))
    lw.values[node] = out


def _check_gelu(node: Node) -> Optional[str]:
    approximate = node.kwargs.get("approximate", "none")
    return f"approximate={approximate!r}" if approximate not in ("none", "tanh") else _fp32_output(node)


@rule("aten.gelu.default", check=_check_gelu)
def lower_gelu(lw: Lowerer, node: Node) -> None:
    shape = _meta_shape(node)
    out = lw.out_tensor(node)
    a = lw.tensor(args_of(node)[0])
    op = "OP_GELU_TANH" if node.kwargs.get("approximate", "none") == "tanh" else "OP_GELU_ERF"
    elementwise(lw, node, op, out, shape, (a, 0, a.strides()))
    lw.values[node] = out


# ---- fused patterns (patterns.py): the anchor's rule emits one step; the chain's steps go unread ----

def _lower_rms_norm(lw: Lowerer, node: Node) -> bool:
    m = patterns.match_rms_norm(lw.ep, node)
    if m is None:
        return False
    out = lw.out_tensor(node)
    w = lw.tensor(m.weight) if m.weight is not None else None
    residual = patterns.match_residual_add(lw.ep, m, node)
    if residual is None:
        _rows(lw, node, "ROWS_RMS_NORM", lw.tensor(m.x), out, w, eps=m.eps, pattern="rms_norm")
    else:   # the add's own step goes: this one writes its sum (same buffer) and the norm
        lw.supersede(residual.add)
        _rows(lw, node, "ROWS_ADD_RMS_NORM", lw.tensor(residual.a), out, w, eps=m.eps, pattern="add_rms_norm",
              b=lw.tensor(residual.b), total=lw.tensor(residual.add))
    lw.values[node] = out
    return True


def _lower_silu_mul(lw: Lowerer, node: Node) -> bool:
    m = patterns.match_silu_mul(node)
    if m is None:
        return False
    shape = _meta_shape(node)
    gate, up = lw.tensor(m.gate), lw.tensor(m.up)
    out = lw.out_tensor(node)
    elementwise(lw, node, "OP_SILU_MUL", out, shape, (gate, 0, broadcast_strides(gate, shape)),
                (up, 0, broadcast_strides(up, shape)), pattern="silu_mul")
    lw.values[node] = out
    return True


def _lower_rope(lw: Lowerer, node: Node) -> bool:
    m = patterns.match_rope(node)
    if m is None:
        return False
    x, cos, sin = lw.tensor(m.x), lw.tensor(m.cos), lw.tensor(m.sin)
    if len(x.shape) > 4 or not isinstance(x.shape[-1], int) or x.shape[-1] % 2:
        return False
    pairs = [*([1] * (4 - len(x.shape))), *x.shape[:-1], x.shape[-1] // 2]
    half_shape = [*x.shape[:-1], x.shape[-1] // 2]
    n_pairs: IntExpr = 1
    for d in pairs:
        n_pairs = n_pairs * d
    params: Dict[str, IntExpr] = {"n_pairs": n_pairs}
    for name, t in (("c", cos), ("s", sin)):
        strides = [0] * (4 - len(half_shape)) + broadcast_strides(t, half_shape)
        for i, st in enumerate(strides):
            params[f"{name}{i}"] = st
    for i, d in enumerate(pairs[-4:]):
        params[f"d{i}"] = d
    out = lw.new_tensor(x.shape, node.name)   # [..., D]: the view after the cat only renames it
    lw.dispatch(node, "rope", {"x": x.buffer, "cos_t": cos.buffer, "sin_t": sin.buffer, "out": out.buffer}, params,
                _grid_1d(n_pairs, registry.kernel("rope").workgroup_size[0]), pattern="rope")
    lw.values[node] = TensorRef(out.buffer, _meta_shape(node))
    return True


# ---- reductions -------------------------------------------------------------------------------------

def _check_mean(node: Node) -> Optional[str]:
    x = _val(args_of(node)[0])
    dims = args_of(node)[1] if len(node.args) > 1 else None
    if not isinstance(x, torch.Tensor) or dims is None or len(dims) != 1 or _dim(dims[0], x.dim()) != x.dim() - 1:
        return "only a mean over the last dim runs on the GPU"
    if node.kwargs.get("dtype") not in (None, torch.float32):
        return f"dtype={node.kwargs.get('dtype')}"
    return _fp32_output(node)


def _rows(lw: Lowerer, node: Node, kernel_op: str, src: TensorRef, out: TensorRef, w: Optional[TensorRef] = None,
          eps: float = 0.0, pattern: str = "", b: Optional[TensorRef] = None,
          total: Optional[TensorRef] = None) -> None:
    """A reduce_rows step over src's rows; ROWS_ADD_RMS_NORM also takes b (src + b is normalised) and
    total, where that sum is written."""
    n = src.shape[-1]
    rows: IntExpr = 1
    for d in src.shape[:-1]:
        rows = rows * d
    bindings = {"a": src.buffer, "out": out.buffer}
    if w is not None:
        bindings["w"] = w.buffer
    if b is not None and total is not None:
        bindings.update(b=b.buffer, sum=total.buffer)
    params = {"rows": rows, "n": n, "op": registry.REDUCE_OPS[kernel_op], "eps_bits": f32_bits(eps),
              "has_w": int(w is not None)}
    lw.dispatch(node, "reduce_rows", bindings, params,
                (sympy.Min(rows, MAX_GROUPS) if isinstance(rows, sympy.Basic) else min(rows, MAX_GROUPS),
                 ceildiv(rows, MAX_GROUPS), 1), pattern)


@rule("aten.mean.dim", check=_check_mean)
def lower_mean(lw: Lowerer, node: Node) -> None:
    out = lw.out_tensor(node)
    _rows(lw, node, "REDUCE_MEAN", lw.tensor(args_of(node)[0]), out)
    lw.values[node] = out


# ---- embedding ----------------------------------------------------------------------------------------

def _check_embedding(node: Node) -> Optional[str]:
    weight, ids = args_of(node)[0], args_of(node)[1]
    if not (isinstance(ids, Node) and ids.op == "placeholder"):
        return "its indices are computed in the graph (the GPU gathers rows by the ids of an input)"
    if not (isinstance(weight, Node) and weight.op == "placeholder"):
        return "its table is computed in the graph"
    return _fp32_output(node)


@rule("aten.embedding.default", check=_check_embedding)
def lower_embedding(lw: Lowerer, node: Node) -> None:
    table = lw.tensor(args_of(node)[0])
    ids_node = args_of(node)[1]
    ids = lw.tensor(ids_node)
    vocab, dim = table.shape
    lw.bound_input(ids_node, int(vocab))
    out = lw.out_tensor(node)
    n_ids = ids.numel
    lw.dispatch(node, "embedding", {"a": ids.buffer, "w": table.buffer, "out": out.buffer},
                {"n_ids": n_ids, "dim": dim, "vocab": vocab},
                _grid_1d(n_ids * dim, registry.kernel("embedding").workgroup_size[0]))
    lw.values[node] = out


# ---- the LLM custom ops: KV cache and attention ------------------------------------------------------

def _check_update_cache(node: Node) -> Optional[str]:
    value, cache = _val(args_of(node)[0]), _val(args_of(node)[1])
    if not (isinstance(value, torch.Tensor) and isinstance(cache, torch.Tensor)) or value.dim() != 4:
        return "update_cache takes [B, S, H, D] values"
    if value.dtype != torch.float32 or cache.dtype != torch.float32:
        return "the cache is not float32"
    return None


@rule("llama.update_cache.default", check=_check_update_cache)
def lower_update_cache(lw: Lowerer, node: Node) -> None:
    if _lower_rope_qk_cache(lw, node):
        return
    value, cache = lw.tensor(args_of(node)[0]), lw.tensor(args_of(node)[1])
    start = sym(lw.value(args_of(node)[2]) if isinstance(args_of(node)[2], Node) else args_of(node)[2])
    strides = cache.strides()
    elementwise(lw, node, "OP_COPY", cache, value.shape, (value, 0, value.strides()), out_off=start * strides[1],
                out_strides=strides)
    lw.values[node] = None   # update_cache returns a placeholder tensor nothing reads


def _same_shape(a: Sequence[IntExpr], b: Sequence[IntExpr]) -> bool:
    return len(a) == len(b) and all(sympy.sympify(x) == sympy.sympify(y) for x, y in zip(a, b))


def _shared_strides(t: TensorRef, shapes: Sequence[Sequence[IntExpr]]) -> Optional[List[IntExpr]]:
    """Strides that read `t` broadcast to each of `shapes` alike (a dim of size 1 in a shape is never stepped,
    so any stride serves it), or None where two shapes need different ones (cos with a head dim of its own
    read over q's and k's different head counts)."""
    merged: List[Optional[IntExpr]] = [None] * len(shapes[0])
    for shape in shapes:
        for i, (d, st) in enumerate(zip(shape, broadcast_strides(t, shape))):
            if sympy.sympify(d) == 1:
                continue
            if merged[i] is not None and sympy.sympify(merged[i]) != sympy.sympify(st):
                return None
            merged[i] = st
    return [0 if st is None else st for st in merged]


def _lower_rope_qk_cache(lw: Lowerer, node: Node) -> bool:
    """node = the later update_cache of an attention layer (patterns.match_rope_cache): one rope_qk_cache step
    rotates q into its rope's tensor, and k and v into their caches at start_pos; the ropes' and the earlier
    update's steps go. False (nothing emitted) where the layer's tensors are not the kernel's layout."""
    m = patterns.match_rope_cache(node)
    if m is None:
        return False
    q, k, v = lw.tensor(m.q.x), lw.tensor(m.k.x), lw.tensor(m.v)
    cos, sin = lw.tensor(m.k.cos), lw.tensor(m.k.sin)
    q_out, k_value = lw.tensor(m.q_rope), lw.tensor(args_of(m.k_update)[0])
    k_cache, v_cache = lw.tensor(args_of(m.k_update)[1]), lw.tensor(args_of(m.v_update)[1])
    if len(q.shape) != 4 or len(k_cache.shape) != 4:
        return False
    b, s, hq, d = q.shape
    c, hkv = k_cache.shape[1], k_cache.shape[2]
    if not all(isinstance(x, int) for x in (b, hq, hkv, d, c)) or d % 2:
        return False
    # [B, S, H, D] values and [B, C, H, D] caches, each contiguous (every TensorRef is); the update reads the
    # rope's own tensor (views keep its element order); v and the caches are separate from what the step writes
    if not (_same_shape(k.shape, (b, s, hkv, d)) and _same_shape(v.shape, k.shape)
            and _same_shape(k_value.shape, k.shape) and _same_shape(v_cache.shape, k_cache.shape)
            and k_value.buffer == lw.tensor(m.k_rope).buffer
            and len({q_out.buffer, k_cache.buffer, v_cache.buffer, v.buffer}) == 4):
        return False
    # The ropes' and the earlier update's work moves to this step: their inputs must still hold those values
    # here, which only state (written in place) could break.
    if any(lw.vbuffers[t.buffer].kind == "state" for t in (q, k, v, cos, sin)):
        return False
    half = d // 2
    angles = [[b, s, h, half] for h in (hq, hkv)]
    c_strides, s_strides = _shared_strides(cos, angles), _shared_strides(sin, angles)
    if c_strides is None or s_strides is None:
        return False
    start = sym(lw.value(args_of(node)[2]) if isinstance(args_of(node)[2], Node) else args_of(node)[2])
    n_pairs = b * s * (hq + hkv) * half
    params: Dict[str, IntExpr] = {"n_pairs": n_pairs, "S": s, "Hq": hq, "Hkv": hkv, "half": half, "C": c,
                                  "start_pos": start}
    for i in range(4):
        params[f"c{i}"], params[f"s{i}"] = c_strides[i], s_strides[i]
    for superseded in (m.q_rope, m.k_rope, m.first):
        lw.supersede(superseded)
    lw.dispatch(node, "rope_qk_cache", {"q": q.buffer, "k": k.buffer, "v": v.buffer, "cos_t": cos.buffer,
                                        "sin_t": sin.buffer, "q_out": q_out.buffer, "k_cache": k_cache.buffer,
                                        "v_cache": v_cache.buffer},
                params, _grid_1d(n_pairs, registry.kernel("rope_qk_cache").workgroup_size[0]), pattern="rope_qk_cache")
    lw.values[node] = None   # update_cache returns a placeholder tensor nothing reads
    return True


def _check_sdpa(node: Node) -> Optional[str]:
    q = _val(args_of(node)[0])
    args = args_of(node) + [None] * 8
    mask, dropout = args[4], args[5]
    if mask is not None or node.kwargs.get("attn_mask") is not None:
        return "an explicit attention mask"
    if dropout not in (None, 0, 0.0):
        return f"dropout {dropout}"
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        return "custom_sdpa takes [B, S, H, D] queries"
    d = q.shape[3]
    if isinstance(d, torch.SymInt) or int(d) > SDPA_MAX_HEAD_DIM:
        return f"head dim {d} is above the sdpa kernel's {SDPA_MAX_HEAD_DIM}"
    k = _val(args_of(node)[1])
    heads = (q.shape[2], k.shape[2]) if isinstance(k, torch.Tensor) and k.dim() == 4 else None
    if heads is None or any(isinstance(h, torch.SymInt) for h in heads) or int(heads[0]) % int(heads[1]):
        return f"query heads {q.shape[2]} are not a fixed multiple of the cache's heads"
    return _fp32_output(node)


@rule("llama.custom_sdpa.default", check=_check_sdpa)
def lower_custom_sdpa(lw: Lowerer, node: Node) -> None:
    args = args_of(node) + [None] * 8
    q, k, v = lw.tensor(args[0]), lw.tensor(args[1]), lw.tensor(args[2])
    start = sym(lw.value(args[3]) if isinstance(args[3], Node) else args[3])
    is_causal = bool(node.kwargs.get("is_causal", args[6] or False))
    scale = node.kwargs.get("scale", args[7])
    b, s, hq, d = q.shape
    hkv, c = k.shape[2], k.shape[1]
    out = lw.out_tensor(node)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(int(d))
    params = {"B": b, "S": s, "Hq": hq, "Hkv": hkv, "D": d, "C": c, "start_pos": start, "causal": int(is_causal),
              "scale_bits": f32_bits(scale)}
    # S > 1: one sdpa_flash dispatch (D <= its MAX_D), a workgroup per ROWS (position, query head) rows of one
    # cache head, which share each tile of keys and values; above that head dim, one sdpa dispatch, a workgroup
    # per (head, query row). S == 1 (decode): flash-decoding, the keys split over workgroups (sdpa_split) and
    # their partial results merged (sdpa_combine). S is the dynamic token count, so both paths are emitted and
    # the grid of the one that does not apply is 0 (the runtimes skip empty grids); a static S emits one.
    prefill_on, decode_on = sympy.Min(1, sym(s) - 1), sympy.Max(0, 2 - sym(s))    # 1 / 0 each
    bindings = {"q": q.buffer, "k": k.buffer, "v": v.buffer, "out": out.buffer}
    if prefill_on != 0 and int(d) <= SDPA_FLASH_MAX_HEAD_DIM:
        group = int(hq) // int(hkv)       # query heads per cache head
        lw.dispatch(node, "sdpa_flash", bindings, params,
                    (hkv, ceildiv(sym(s) * group, SDPA_FLASH_ROWS) * prefill_on, b))
    elif prefill_on != 0:
        lw.dispatch(node, "sdpa", bindings, params, (hq * prefill_on, s, b))
    if decode_on != 0:
        keys_per_split = registry.kernel("sdpa_split").constants["KEYS_PER_SPLIT"]
        n_splits = ceildiv(sympy.Min(start + s, c), keys_per_split)
        # records (max, sum, D accumulators) per (b, s, h, split), sized for S == 1 and the whole cache
        partial = lw.new_tensor((b, hq, ceildiv(c, keys_per_split), d + 2), f"{node.name}_splits")
        # one split (up to KEYS_PER_SPLIT keys): it writes out itself and the combine's grid is 0
        one_split = sympy.Max(0, 2 - n_splits)
        split_params = {**params, "n_splits": n_splits, "direct_out": one_split}
        lw.dispatch(node, "sdpa_split", {"q": q.buffer, "k": k.buffer, "v": v.buffer, "partial": partial.buffer,
                                         "out": out.buffer},
                    split_params, (n_splits * decode_on, hq, b * s))
        lw.dispatch(node, "sdpa_combine", {"partial": partial.buffer, "out": out.buffer}, split_params,
                    (hq * decode_on * (1 - one_split), s, b))
    lw.values[node] = out


def unsupported_reason(node: Node) -> Optional[str]:
    """None when a rule covers the node and its check passes; else why the node stays on the CPU."""
    name = target_name(node)
    r = RULES.get(name)
    if r is None:
        return f"no graph rule for {name}"
    try:
        return r.check(node)
    except (ExprError, LoweringError, TypeError, ValueError) as e:
        return str(e)

from executorch_wgpu.backend.graph import ops_transformer  # noqa: E402,F401  (registers its rules)
