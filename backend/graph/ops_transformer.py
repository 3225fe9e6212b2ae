"""Graph-mode op coverage for encoders and Hugging Face decoders (BERT / MiniLM, Llama, Qwen2).

ops.py covers ExecuTorch's Llama; the graphs of transformers' models add what
torch decomposes their attention and masks into. This module registers it in
ops.RULES (ops.py imports it last):

  * attention as torch decomposes scaled_dot_product_attention: `bmm` of two graph
    tensors (kernel bmm), `_softmax` over the last dim (reduce_rows ROWS_SOFTMAX), the
    mask (comparisons, logic, `where`: kernel compare_select) and the guard for fully
    masked rows (`any` over the last dim: reduce_rows REDUCE_MAX, `full_like`);
  * `native_layer_norm` (reduce_rows ROWS_LAYER_NORM: weight and bias concatenated into
    one constant at preprocess) and the getitem that takes its output;
  * integer and boolean tensors (ids, positions, masks), `arange`, `full`, casts
    (`_to_dim_order_copy`), `gather`, `index.Tensor` and an `embedding` whose ids the
    graph computes (kernel gather);
  * constant folding: a node whose value the export fixes (it reads only weights,
    constant buffers and lifted constants, and its shape is static) is computed at
    preprocess with torch and becomes a constant of the blob -- e.g. a static decoder's
    whole causal mask and rotary tables, and ops no kernel runs (cumsum).

Representation of integers and booleans. Every tensor of the graph has 4-byte
elements. A boolean the graph computes is 1.0 or 0.0 in f32; an integer is its
value in f32, exact while |value| <= 2**24 (ids, positions and sizes are far
below: a folded or uploaded integer constant outside that range is refused at
preprocess). So arithmetic, views and copies of integers are ops.py's fp32
rules, reused here with the dtype check relaxed. The one exception: an
integer *input* of the delegate holds i32 in its buffer (the runtime writes it
so, and the embedding kernel reads ids that way); any other reader gets an f32
copy, made once per input by compare_select SEL_FROM_I32 (or the gather kernel
reads its i32 indices directly). A delegate returns float32 only, so a node
with an integer or boolean result is claimed only when every reader is too,
down to the float results they give (_stays_inside): such a value never leaves
the delegate.

How rules combine. install() (at the end) makes every rule of RULES a chain of
ways, the first whose check passes lowers the node: folding a static node of
at most FOLD_FIRST_MAX elements (a view is never folded: it costs nothing),
then ops.py's rule (or this module's own), then this module's ways for the
target (`also`: integers in ops.py's views, copies and arithmetic), then
folding up to FOLD_MAX elements. So what ops.py lowers today lowers the same
way, except that a small static subgraph is folded. A target in UNFOLDED is
never folded (a quantized embedding's table: ops_quantized.py, whose rules join
after install()). At partition time a
placeholder counts as constant by its export metadata (a parameter, a buffer
no mutation reads, a lifted constant); preprocess checks that against the
program's signature before folding, and takes the next way when it disagrees.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch.export.graph_signature import InputKind
from torch.fx import Graph, Node
from torch.fx.node import map_arg

from executorch_wgpu.backend.graph.exprs import IntExpr, ceildiv
from executorch_wgpu.backend.graph.lowering import Lowerer, LoweringError, TensorRef
from executorch_wgpu.backend.graph.ops import (
    MAX_GROUPS,
    RANK,
    RULES,
    OpRule,
    _dim,
    _grid_1d,
    _meta_shape,
    _pad,
    _rows,
    _val,
    args_of,
    broadcast_strides,
    f32_bits,
    rule,
    target_name,
    unsupported_reason,
)
from executorch_wgpu.backend.q4gsw_pattern import constant_value
from executorch_wgpu.shaders import registry

FOLD_MAX = 1 << 20          # elements: a static node up to this size may be folded into a constant
FOLD_FIRST_MAX = 1 << 16    # up to this size a static node is folded even when a kernel could run it
F32_EXACT = 1 << 24         # integers up to this magnitude are exact in f32

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
HELD_DTYPES = (torch.float32, torch.bool) + INT_DTYPES   # what the graph holds (as f32 values)
SEL = registry.kernel("compare_select").constants
BMM_TILE = registry.kernel("bmm").workgroup_size[0]

Check = Callable[[Node], Optional[str]]
Lower = Callable[[Lowerer, Node], None]


# ---- per-lowering state ------------------------------------------------------------------------------

@dataclass
class _State:
    folded: Dict[Node, Any] = field(default_factory=dict)      # node -> its value (torch), computed at preprocess
    static: Dict[Node, bool] = field(default_factory=dict)     # node -> fixed by the export (by the signature)
    f32_inputs: Dict[int, TensorRef] = field(default_factory=dict)   # i32 input buffer -> its f32 copy
    dummy: Optional[TensorRef] = None                          # a 1-element constant for unused bindings


_STATES: "weakref.WeakKeyDictionary[Lowerer, _State]" = weakref.WeakKeyDictionary()


def _state(lw: Lowerer) -> _State:
    st = _STATES.get(lw)
    if st is None:
        st = _STATES[lw] = _State()
    return st


# ---- what the export fixes ------------------------------------------------------------------------------

_MUTATING = ("auto_functionalized", "index_put", "copy_", "update_cache", "slice_scatter", "scatter")
_RANDOM = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial", "empty")   # never folded
_SHAPE_ONLY = {"aten.full_like.default": None, "aten.zeros_like.default": 0.0, "aten.ones_like.default": 1.0}


def _desc_kind(node: Node) -> str:
    desc = node.meta.get("desc")
    return type(desc).__name__ if desc is not None else ""


def _constant_placeholder_by_meta(node: Node) -> bool:
    """A placeholder the export fixes, judged from the node alone (partition time): a parameter, a buffer no
    op mutates, a lifted constant. preprocess checks the verdict against the signature (_constant_by_signature)."""
    kind = _desc_kind(node)
    if kind == "ParamAOTInput":
        return True
    if kind == "BufferAOTInput":
        return not any(m in target_name(u) for u in node.users for m in _MUTATING)
    if kind:
        return False    # PlainAOTInput: an input of the program
    return node.name.startswith(("_lifted_tensor_constant", "c_", "p_", "b_"))


def _constant_by_signature(lw: Lowerer, node: Node) -> bool:
    spec = next((s for s in lw.ep.graph_signature.input_specs if s.arg.name == node.name), None)
    if spec is None:
        return False
    if spec.kind in (InputKind.PARAMETER, InputKind.CONSTANT_TENSOR):
        return True
    return spec.kind == InputKind.BUFFER and spec.target not in lw.ep.graph_signature.buffers_to_mutate.values()


def _static_val(val: Any) -> bool:
    if isinstance(val, (tuple, list)):
        return all(v is None or _static_val(v) for v in val)
    if not isinstance(val, torch.Tensor) or val.dtype not in HELD_DTYPES + (torch.float64, torch.float16,
                                                                            torch.bfloat16):
        return False
    return not any(isinstance(d, torch.SymInt) for d in val.shape) and val.numel() <= FOLD_MAX


def _node_inputs(node: Node) -> List[Node]:
    found: List[Node] = []

    def visit(n: Node) -> Node:
        found.append(n)
        return n

    map_arg((node.args, node.kwargs), visit)
    return found


def _static_map(graph: Graph, constant_placeholder: Callable[[Node], bool]) -> Dict[Node, bool]:
    """For every node of the graph: is its value fixed by the export (and small enough to fold)?"""
    out: Dict[Node, bool] = {}
    for n in graph.nodes:
        if n.op == "placeholder":
            out[n] = isinstance(_val(n), torch.Tensor) and _static_val(_val(n)) and constant_placeholder(n)
        elif n.op == "call_function":
            name = target_name(n)
            ok = (name in RULES or name == "operator.getitem") and _static_val(_val(n)) \
                and not any(r in name for r in _RANDOM)
            if ok and name not in _SHAPE_ONLY:
                ok = all(out.get(a, False) for a in _node_inputs(n))
            out[n] = ok
        else:
            out[n] = False
    return out


_META_STATIC: "weakref.WeakKeyDictionary[Graph, Tuple[int, Dict[Node, bool]]]" = weakref.WeakKeyDictionary()


def is_static(node: Node) -> bool:
    """The node's value is fixed by the export, judged from the graph's metadata (partition time)."""
    graph = node.graph
    cached = _META_STATIC.get(graph)
    if cached is None or cached[0] != len(graph.nodes) or node not in cached[1]:
        cached = (len(graph.nodes), _static_map(graph, _constant_placeholder_by_meta))
        _META_STATIC[graph] = cached
    return cached[1].get(node, False)


def _static_lw(lw: Lowerer, node: Node) -> bool:
    """The same, judged by the program's signature (preprocess)."""
    st = _state(lw)
    if node not in st.static:
        st.static.update(_static_map(node.graph, lambda p: _constant_by_signature(lw, p)))
    return st.static.get(node, False)


def _evaluate(lw: Lowerer, node: Node) -> Any:
    """The value of a static node, computed with torch at preprocess."""
    st = _state(lw)
    if node in st.folded:
        return st.folded[node]
    if not _static_lw(lw, node):
        raise LoweringError(f"{node.name} is not fixed by the export: it reads an input or a mutable buffer")
    if node.op == "placeholder":
        value = constant_value(lw.ep, node)
        if value is None:
            raise LoweringError(f"placeholder {node.name} has no constant value")
    else:
        name = target_name(node)
        val = _val(node)
        if name in _SHAPE_ONLY:
            fill = _SHAPE_ONLY[name]
            fill = args_of(node)[1] if fill is None else fill
            value = torch.full(tuple(int(d) for d in val.shape), fill, dtype=val.dtype)
        else:
            args, kwargs = map_arg((node.args, node.kwargs), lambda n: _evaluate(lw, n))
            with torch.no_grad():
                value = node.target(*args, **kwargs)  # type: ignore[operator]
    st.folded[node] = value
    return value


def _as_f32(name: str, value: torch.Tensor) -> torch.Tensor:
    """A constant in the graph's representation: f32, booleans 1.0 / 0.0, integers exact."""
    t = value.detach()
    if t.dtype in INT_DTYPES and t.numel() and int(t.abs().max()) > F32_EXACT:
        raise LoweringError(f"integer constant {name} holds {int(t.abs().max())}, beyond the +-2**24 the graph "
                            "delegate's f32 integers hold exactly")
    return t.to(torch.float32).contiguous()


def _materialize(lw: Lowerer, node: Node, value: Any) -> Any:
    """A folded value as the constant(s) a kernel reads."""
    if isinstance(value, (tuple, list)):
        return [None if v is None else _new_constant(lw, f"{node.name}.{i}", v) for i, v in enumerate(value)]
    return _new_constant(lw, node.name, value)


def _new_constant(lw: Lowerer, name: str, value: torch.Tensor) -> TensorRef:
    t = _as_f32(name, value)
    data = t.numpy().tobytes()
    ref = TensorRef(-1, tuple(int(d) for d in t.shape))
    ref.buffer = lw.new_buffer("constant", len(data), name, data)
    return ref


# ---- how a node is lowered: ways, tried in order ------------------------------------------------------

@dataclass(frozen=True)
class Way:
    check: Check                                          # from the node alone (partition and preprocess)
    lower: Lower
    ready: Callable[[Lowerer, Node], bool] = lambda lw, node: True   # preprocess's final word
    reported: bool = True    # False: when no way runs the node, another reason is the one logged


def _fold_check(limit: int, views: bool) -> Check:
    def check(node: Node) -> Optional[str]:
        if not is_static(node):
            return "its value depends on the inputs"
        if not views and target_name(node) in _VIEWS:
            return "a view is not folded"
        if _numel(_val(node)) > limit:
            return f"above {limit} elements to fold"
        return None
    return check


def _numel(val: Any) -> int:
    if isinstance(val, (tuple, list)):
        return sum(_numel(v) for v in val if v is not None)
    return int(val.numel()) if isinstance(val, torch.Tensor) else 0


def _fold(lw: Lowerer, node: Node) -> None:
    value = _evaluate(lw, node)
    if all(_folds(lw, u) for u in node.users):
        lw.values[node] = None   # only folded nodes read it, from the preprocess-side value
    else:
        lw.values[node] = _materialize(lw, node, value)


def _fold_ready(lw: Lowerer, node: Node) -> bool:
    return _static_lw(lw, node)


FOLD_FIRST = Way(_fold_check(FOLD_FIRST_MAX, views=False), _fold, _fold_ready)
FOLD_LAST = Way(_fold_check(FOLD_MAX, views=True), _fold, _fold_ready)

_BEFORE: Dict[str, List[Way]] = {}   # ways tried before ops.py's rule, the latest registered first
_AFTER: Dict[str, List[Way]] = {}    # ... after it, in the order registered
UNFOLDED: Set[str] = set()           # targets whose value is never folded (ops_quantized.py: a packed table)


def also(*targets: str, check: Check, first: bool = False, reported: bool = True) -> Callable[[Lower], Lower]:
    """Another way to lower `targets`, beside their rule: tried after it (first=True: before it, and before
    the ways registered earlier). reported=False: its check's reason is not the one logged when no way runs
    the node (a way for a special case only). Registered after install() (ops_quantized.py, imported last),
    it joins the installed rule."""
    def register(lower: Lower) -> Lower:
        for t in targets:
            way = Way(check, lower, reported=reported)
            if first:
                _BEFORE.setdefault(t, []).insert(0, way)
            else:
                _AFTER.setdefault(t, []).append(way)
            owner = getattr(RULES[t].lower, "__self__", None) if t in RULES else None
            if isinstance(owner, _Combined):
                owner.ways = owner.chain()
        return lower
    return register


class _Combined:
    """ops.py's rule for a target and this module's ways, as one rule."""

    def __init__(self, target: str, base: OpRule):
        self.target = target
        self.base = base
        self.ways: List[Way] = self.chain()

    def chain(self) -> List[Way]:
        folds = self.target not in UNFOLDED
        return [*([FOLD_FIRST] if folds else []), *_BEFORE.get(self.target, []),
                Way(self.base.check, self.base.lower), *_AFTER.get(self.target, []), *([FOLD_LAST] if folds else [])]

    def check(self, node: Node) -> Optional[str]:
        first: Optional[str] = None
        for w in self.ways:
            why = w.check(node)
            if why is None:
                return _stays_inside(node)
            if first is None and w.reported and w not in (FOLD_FIRST, FOLD_LAST):
                first = why
        return first or "no way to run it"

    def choose(self, lw: Lowerer, node: Node) -> Way:
        for w in self.ways:
            if w.check(node) is None and w.ready(lw, node):
                return w
        raise LoweringError(f"{node.name} ({self.target}) cannot run in the graph delegate: "
                            f"{self.check(node) or 'its value depends on the inputs'}")

    def lower(self, lw: Lowerer, node: Node) -> None:
        self.choose(lw, node).lower(lw, node)


_STAYS: "weakref.WeakKeyDictionary[Graph, Tuple[int, Dict[Node, Optional[str]]]]" = weakref.WeakKeyDictionary()


def _stays_inside(node: Node) -> Optional[str]:
    """An integer or boolean result must be read inside the delegate: it would leave it as float32 (the
    graph's representation). None when every reader runs on the GPU too (checked down to the float results
    they give), else why not. (The partitioner could still cut between such a node and a reader, to avoid a
    cycle; the CPU would then get float32 values for it.)"""
    val = _val(node)
    if not isinstance(val, torch.Tensor) or val.dtype == torch.float32:
        return None
    graph = node.graph
    cached = _STAYS.get(graph)
    if cached is None or cached[0] != len(graph.nodes):
        cached = (len(graph.nodes), {})
        _STAYS[graph] = cached
    memo = cached[1]
    if node not in memo:
        memo[node] = None   # a cycle cannot occur; this only guards re-entry
        why: Optional[str] = None
        for u in node.users:
            if u.op != "call_function":
                why = f"its {val.dtype} result is an output of the program (the graph delegate returns float32)"
            elif target_name(u) != "operator.getitem" and unsupported_reason(u) is not None:
                why = f"its {val.dtype} result is read by {u.name}, which stays on the CPU"
            if why:
                break
        memo[node] = why
    return memo[node]


def _folds(lw: Lowerer, node: Node) -> bool:
    """Will preprocess fold this node (so it reads its inputs' values on the host)?"""
    if node.op != "call_function":
        return False
    r = RULES.get(target_name(node))
    combined = getattr(r, "lower", None)
    owner = getattr(combined, "__self__", None)
    if not isinstance(owner, _Combined):
        return False
    try:
        return owner.choose(lw, node).lower is _fold
    except LoweringError:
        return False


def install() -> None:
    """Every rule of RULES becomes a _Combined one (ops.py's rule first, then this module's ways)."""
    for target, base in list(RULES.items()):
        if isinstance(getattr(base.lower, "__self__", None), _Combined):
            continue
        combined = _Combined(target, base)
        RULES[target] = OpRule(base.targets, combined.lower, combined.check)


# ---- operands ---------------------------------------------------------------------------------------------

def _input_dtype(lw: Lowerer, ref: TensorRef) -> Optional[str]:
    for r, _, _ in lw.inputs:
        if r.buffer == ref.buffer:
            return r.dtype
    return None


def _dummy(lw: Lowerer) -> TensorRef:
    st = _state(lw)
    if st.dummy is None:
        st.dummy = TensorRef(lw.new_buffer("constant", 4, "ops_transformer.unused", bytes(4)), (1,))
    return st.dummy


def _raw(lw: Lowerer, arg: Node) -> Tuple[TensorRef, bool]:
    """(the tensor of arg, whether its buffer holds i32: an integer input of the delegate). An integer
    constant (compile.py uploads float32 ones only) or a folded value is uploaded here, once."""
    if arg not in lw.values:
        if arg.op != "placeholder":
            raise LoweringError(f"{arg.name} was not lowered before its use")
        value = constant_value(lw.ep, arg)
        if value is None:
            raise LoweringError(f"{arg.name} was not lowered")
        lw.values[arg] = _new_constant(lw, arg.name, value)
    elif lw.values[arg] is None and _static_lw(lw, arg):
        lw.values[arg] = _materialize(lw, arg, _evaluate(lw, arg))   # folded, and now a kernel reads it
    ref = lw.tensor(arg)
    return ref, _input_dtype(lw, ref) in ("i64", "i32")


def f32_operand(lw: Lowerer, arg: Node, node: Node) -> TensorRef:
    """The tensor of arg as f32 values (an integer input: its f32 copy, made once)."""
    ref, is_i32 = _raw(lw, arg)
    if not is_i32:
        return ref
    st = _state(lw)
    if ref.buffer not in st.f32_inputs:
        copy = lw.new_tensor(ref.shape, f"{arg.name}.f32")
        select_step(lw, node, "SEL_FROM_I32", copy, ref.shape, a=(ref, 0, ref.strides()))
        st.f32_inputs[ref.buffer] = copy
    return TensorRef(st.f32_inputs[ref.buffer].buffer, ref.shape, "f32")


def _with_f32_operands(base: Lower) -> Lower:
    """ops.py's lowering of a node, its operands given as f32 values (integer inputs and constants)."""
    def lower(lw: Lowerer, node: Node) -> None:
        swapped: Dict[Node, Any] = {}
        for arg in _node_inputs(node):
            if arg in swapped or not isinstance(_val(arg), torch.Tensor):
                continue
            ref = f32_operand(lw, arg, node)
            held = lw.values[arg]
            if isinstance(held, TensorRef) and held.buffer != ref.buffer:   # an integer input: read its copy
                swapped[arg] = held
                lw.values[arg] = ref
        try:
            base(lw, node)
        finally:
            lw.values.update(swapped)
    return lower


# ---- checks ---------------------------------------------------------------------------------------------

def _held(val: Any) -> Optional[str]:
    if not isinstance(val, torch.Tensor):
        return "its result is not a tensor"
    if val.dtype not in HELD_DTYPES:
        return f"its result is {val.dtype}"
    if val.dim() > RANK:
        return f"rank {val.dim()} is above the {RANK} dims the kernels index"
    return None


def _held_node(node: Node) -> Optional[str]:
    why = _held(_val(node))
    if why is not None:
        return why
    for a in _node_inputs(node):
        v = _val(a)
        if isinstance(v, torch.Tensor) and v.dtype not in HELD_DTYPES:
            return f"operand {a.name} is {v.dtype}"
    return None


def _fp32(node: Node, *operands: Any) -> Optional[str]:
    val = _val(node)
    if not isinstance(val, torch.Tensor) or val.dtype != torch.float32:
        return "its result is not float32"
    for a in operands:
        if not (isinstance(a, Node) and isinstance(_val(a), torch.Tensor) and _val(a).dtype == torch.float32):
            return f"operand {a} is not a float32 tensor"
    return _held(val)


def _last_dim(node: Node, dims: Any) -> Optional[str]:
    x = _val(args_of(node)[0])
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(x, torch.Tensor) or dims is None or len(dims) != 1 or _dim(dims[0], x.dim()) != x.dim() - 1:
        return "only the last dim is reduced on the GPU"
    return None


def _is_user_input(node: Any) -> bool:
    return isinstance(node, Node) and node.op == "placeholder" and not _constant_placeholder_by_meta(node)


# ---- kernel steps -------------------------------------------------------------------------------------------

Operand = Tuple[TensorRef, IntExpr, Sequence[IntExpr]]


def select_step(lw: Lowerer, node: Node, op: str, out: TensorRef, shape: Sequence[IntExpr],
                a: Optional[Operand] = None, b: Optional[Operand] = None, c: Optional[Operand] = None,
                scalar: Optional[float] = None, step: Optional[float] = None, out_off: IntExpr = 0,
                out_strides: Optional[Sequence[IntExpr]] = None) -> None:
    """One compare_select step over `shape` (registry: kernel compare_select)."""
    if len(shape) > RANK:
        raise LoweringError(f"{node.name}: rank {len(shape)} is above {RANK}")
    n: IntExpr = 1
    for d in shape:
        n = n * d
    so = out_strides if out_strides is not None else TensorRef(out.buffer, tuple(shape)).strides()
    params: Dict[str, IntExpr] = {"n": n, "op": SEL[op], "out_off": out_off}
    bindings = {"out": out.buffer, "a": (a[0] if a is not None else _dummy(lw)).buffer}
    for i, d in enumerate(_pad(shape, 1)):
        params[f"d{i}"] = d
    for i, s in enumerate(_pad(so, 0)):
        params[f"so{i}"] = s
    for name, operand in (("a", a), ("b", b), ("c", c)):
        if operand is None:
            continue
        bindings[name] = operand[0].buffer
        params[f"{name}_off"] = operand[1]
        for i, s in enumerate(_pad(operand[2], 0)):
            params[f"s{name}{i}"] = s
    if scalar is not None:
        params["scalar_bits"] = f32_bits(scalar)
        if b is None:
            params["b_is_scalar"] = 1
    if step is not None:
        params["step_bits"] = f32_bits(step)
    lw.dispatch(node, "compare_select", bindings, params,
                _grid_1d(n, registry.kernel("compare_select").workgroup_size[0]))


def gather_step(lw: Lowerer, node: Node, out: TensorRef, src: Operand,
                indices: Sequence[Tuple[TensorRef, bool, Sequence[IntExpr], IntExpr, IntExpr]]) -> None:
    """out[p] = src[p . strides + sum_k idx_k(p) * step_k] (registry: kernel gather). An index is
    (tensor, holds i32, its strides over out's shape, source step, source dim size)."""
    shape = out.shape
    if len(shape) > RANK or len(indices) > 2:
        raise LoweringError(f"{node.name}: rank {len(shape)} or {len(indices)} index tensors above the kernel's")
    n = out.numel
    params: Dict[str, IntExpr] = {"n": n, "n_idx": len(indices), "a_off": src[1]}
    for i, (d, s) in enumerate(zip(_pad(shape, 1), _pad(src[2], 0))):
        params[f"d{i}"], params[f"sa{i}"] = d, s
    bindings = {"a": src[0].buffer, "out": out.buffer}
    for name, (ref, is_i32, strides, step, wrap) in zip(("b", "c"), indices):
        bindings[name] = ref.buffer
        params[f"{name}_i32"] = int(is_i32)
        params[f"{name}_step"] = step
        params[f"{name}_wrap"] = wrap
        for i, s in enumerate(_pad(strides, 0)):
            params[f"s{name}{i}"] = s
    lw.dispatch(node, "gather", bindings, params, _grid_1d(n, registry.kernel("gather").workgroup_size[0]))


def _operand(lw: Lowerer, node: Node, arg: Node, shape: Sequence[IntExpr]) -> Operand:
    ref = f32_operand(lw, arg, node)
    return (ref, 0, broadcast_strides(ref, shape))


# ---- integers and booleans in ops.py's rules: views, copies, arithmetic -----------------------------------

_VIEWS = ("aten.view_copy.default", "aten.squeeze_copy.dims", "aten.squeeze_copy.dim", "aten.squeeze_copy.default",
          "aten.unsqueeze_copy.default", "aten.alias_copy.default", "aten.clone.default",
          "aten._clone_dim_order.default", "dim_order_ops._clone_dim_order.default")
_COPIES = ("aten.permute_copy.default", "aten.slice_copy.Tensor", "aten.select_copy.int", "aten.cat.default",
           "aten.expand_copy.default")
_ARITH = ("aten.add.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.add.Scalar", "aten.sub.Scalar",
          "aten.mul.Scalar")


def _check_dim_order(node: Node) -> Optional[str]:
    dim_order: Any = node.kwargs.get("dim_order")
    if dim_order is not None and list(dim_order) != list(range(len(dim_order))):
        return f"dim order {list(dim_order)} is not contiguous"
    return None


def _check_held_copy(node: Node) -> Optional[str]:
    return _check_dim_order(node) or _held_node(node)


def _check_held_arith(node: Node) -> Optional[str]:
    alpha = node.kwargs.get("alpha", 1)
    if alpha != 1:
        return f"alpha={alpha}"
    if _val(node) is not None and getattr(_val(node), "dtype", None) == torch.bool and \
            target_name(node).startswith(("aten.add", "aten.sub")):
        return "a boolean sum"
    return _held_node(node)


def _relax(targets: Sequence[str], check: Check) -> None:
    for t in targets:
        base = RULES.get(t)
        if base is not None:
            _AFTER.setdefault(t, []).append(Way(check, _with_f32_operands(base.lower)))


_relax(_VIEWS + _COPIES, _check_held_copy)
_relax(_ARITH, _check_held_arith)


@rule("dim_order_ops._clone_dim_order.default", check=_check_held_copy)
def lower_clone_dim_order(lw: Lowerer, node: Node) -> None:
    src = f32_operand(lw, args_of(node)[0], node)
    lw.values[node] = TensorRef(src.buffer, _meta_shape(node), src.dtype)


@rule("operator.getitem", check=lambda node: None)
def lower_getitem(lw: Lowerer, node: Node) -> None:
    src = lw.value(args_of(node)[0])
    item = src[args_of(node)[1]] if isinstance(src, (list, tuple)) else None
    if item is None:
        raise LoweringError(f"{node.name} reads output {args_of(node)[1]} of {args_of(node)[0]}, which the graph "
                            "delegate does not compute")
    lw.values[node] = item


# ---- casts ------------------------------------------------------------------------------------------------

def _check_cast(node: Node) -> Optional[str]:
    if node.kwargs.get("memory_format") not in (None, torch.preserve_format, torch.contiguous_format):
        return f"memory format {node.kwargs.get('memory_format')}"
    return _check_dim_order(node) or _held_node(node)


@rule("dim_order_ops._to_dim_order_copy.default", "aten._to_copy.default", check=_check_cast)
def lower_cast(lw: Lowerer, node: Node) -> None:
    arg = args_of(node)[0]
    src, is_i32 = _raw(lw, arg)
    to, shape = _val(node).dtype, _meta_shape(node)
    from_float = _val(arg).dtype.is_floating_point
    if is_i32:
        op: Optional[str] = "SEL_I32_TO_BOOL" if to == torch.bool else "SEL_FROM_I32"
    elif to == torch.bool:
        op = "SEL_TO_BOOL"
    elif from_float and not to.is_floating_point:
        op = "SEL_TRUNC"
    else:
        op = None   # the f32 values stand for the new dtype as they are
    if op is None:
        lw.values[node] = TensorRef(src.buffer, shape, src.dtype)
        return
    out = lw.out_tensor(node)
    select_step(lw, node, op, out, shape, a=(src, 0, src.strides()))
    lw.values[node] = out


# ---- comparisons, logic, where ------------------------------------------------------------------------

_COMPARE = {"eq": "SEL_EQ", "ne": "SEL_NE", "lt": "SEL_LT", "le": "SEL_LE", "gt": "SEL_GT", "ge": "SEL_GE"}
_LOGIC = {"aten.logical_and.default": "SEL_AND", "aten.logical_or.default": "SEL_OR",
          "aten.logical_xor.default": "SEL_XOR", "aten.bitwise_and.Tensor": "SEL_AND",
          "aten.bitwise_or.Tensor": "SEL_OR", "aten.bitwise_xor.Tensor": "SEL_XOR"}
_SCALAR_OPS = {f"aten.{k}.Scalar": v for k, v in _COMPARE.items()}
_TENSOR_OPS = {**{f"aten.{k}.Tensor": v for k, v in _COMPARE.items()}, **_LOGIC}


def _check_binary_logic(node: Node) -> Optional[str]:
    name = target_name(node)
    if name.startswith("aten.bitwise") and any(isinstance(a, Node) and _val(a).dtype != torch.bool
                                               for a in args_of(node)[:2]):
        return "a bitwise op of integers (only booleans are held bit-exact)"
    if name in _SCALAR_OPS and isinstance(args_of(node)[1], Node):
        return "a symbolic scalar"
    if name in _TENSOR_OPS and not all(isinstance(a, Node) for a in args_of(node)[:2]):
        return "a Python operand"
    return _held_node(node)


@rule(*_SCALAR_OPS, *_TENSOR_OPS, check=_check_binary_logic)
def lower_compare(lw: Lowerer, node: Node) -> None:
    name = target_name(node)
    shape = _meta_shape(node)
    out = lw.out_tensor(node)
    x, y = args_of(node)[0], args_of(node)[1]
    if name in _SCALAR_OPS:
        select_step(lw, node, _SCALAR_OPS[name], out, shape, a=_operand(lw, node, x, shape), scalar=float(y))
    else:
        select_step(lw, node, _TENSOR_OPS[name], out, shape, a=_operand(lw, node, x, shape),
                    b=_operand(lw, node, y, shape))
    lw.values[node] = out


@rule("aten.logical_not.default", "aten.bitwise_not.default",
      check=lambda node: ("a bitwise not of integers" if target_name(node) == "aten.bitwise_not.default"
                          and _val(node).dtype != torch.bool else _held_node(node)))
def lower_not(lw: Lowerer, node: Node) -> None:
    shape = _meta_shape(node)
    out = lw.out_tensor(node)
    select_step(lw, node, "SEL_NOT", out, shape, a=_operand(lw, node, args_of(node)[0], shape))
    lw.values[node] = out


def _check_where(node: Node) -> Optional[str]:
    if not all(isinstance(a, Node) for a in args_of(node)[:3]):
        return "a Python operand"
    return _held_node(node)


@rule("aten.where.self", check=_check_where)
def lower_where(lw: Lowerer, node: Node) -> None:
    shape = _meta_shape(node)
    out = lw.out_tensor(node)
    cond, x, y = args_of(node)[0], args_of(node)[1], args_of(node)[2]
    select_step(lw, node, "SEL_WHERE", out, shape, a=_operand(lw, node, x, shape), b=_operand(lw, node, y, shape),
                c=_operand(lw, node, cond, shape))
    lw.values[node] = out


# ---- fills and ranges ------------------------------------------------------------------------------------

def _fill_value(node: Node) -> Any:
    name = target_name(node)
    if name in _SHAPE_ONLY:
        fill = _SHAPE_ONLY[name]
        return args_of(node)[1] if fill is None else fill
    if name == "aten.scalar_tensor.default":
        return args_of(node)[0]
    if name in ("aten.zeros.default", "aten.ones.default"):
        return 0.0 if name == "aten.zeros.default" else 1.0
    return args_of(node)[1]


def _check_fill(node: Node) -> Optional[str]:
    if isinstance(_fill_value(node), Node):
        return "a fill value computed in the graph"
    return _held(_val(node))


@rule("aten.full.default", "aten.full_like.default", "aten.zeros_like.default", "aten.ones_like.default",
      "aten.scalar_tensor.default", "aten.zeros.default", "aten.ones.default", check=_check_fill)
def lower_fill(lw: Lowerer, node: Node) -> None:
    shape = _meta_shape(node)
    out = lw.out_tensor(node)
    select_step(lw, node, "SEL_FILL", out, shape, scalar=float(_fill_value(node)))
    lw.values[node] = out


def _arange_args(node: Node) -> Tuple[Any, Any]:
    """(start, step) of an arange node."""
    args = args_of(node)
    name = target_name(node)
    if name == "aten.arange.default":
        return 0, 1
    step = args[2] if len(args) > 2 else node.kwargs.get("step", 1)
    return args[0], step


def _check_arange(node: Node) -> Optional[str]:
    start, step = _arange_args(node)
    if isinstance(start, Node) or isinstance(step, Node):
        return "a symbolic start or step"
    return _held(_val(node))


@rule("aten.arange.start_step", "aten.arange.default", "aten.arange.start", check=_check_arange)
def lower_arange(lw: Lowerer, node: Node) -> None:
    start, step = _arange_args(node)
    out = lw.out_tensor(node)
    n = out.numel
    if not _val(node).dtype.is_floating_point and max(abs(start), abs(start + step * lw.upper(n))) > F32_EXACT:
        raise LoweringError(f"{node.name}: arange reaches beyond the +-2**24 the graph's f32 integers hold exactly")
    select_step(lw, node, "SEL_ARANGE", out, out.shape, scalar=float(start), step=float(step))
    lw.values[node] = out


# ---- reductions: softmax, any, sum over the last dim -----------------------------------------------------

def _check_softmax(node: Node) -> Optional[str]:
    if args_of(node)[2]:
        return "half_to_float"
    return _last_dim(node, args_of(node)[1]) or _fp32(node, args_of(node)[0])


@rule("aten._softmax.default", check=_check_softmax)
def lower_softmax(lw: Lowerer, node: Node) -> None:
    out = lw.out_tensor(node)
    _rows(lw, node, "ROWS_SOFTMAX", lw.tensor(args_of(node)[0]), out)
    lw.values[node] = out


def _check_any(node: Node) -> Optional[str]:
    return _last_dim(node, args_of(node)[1] if len(node.args) > 1 else None) or _held_node(node)


@rule("aten.any.dim", check=_check_any)
def lower_any(lw: Lowerer, node: Node) -> None:
    arg = args_of(node)[0]
    src = f32_operand(lw, arg, node)
    if _val(arg).dtype != torch.bool:   # any = max over the row of (x != 0)
        flags = lw.new_tensor(src.shape, f"{node.name}.nonzero")
        select_step(lw, node, "SEL_TO_BOOL", flags, src.shape, a=(src, 0, src.strides()))
        src = flags
    out = lw.out_tensor(node)
    _rows(lw, node, "REDUCE_MAX", src, out)
    lw.values[node] = out


def _check_sum(node: Node) -> Optional[str]:
    if node.kwargs.get("dtype") not in (None, torch.float32):
        return f"dtype={node.kwargs.get('dtype')}"
    return _last_dim(node, args_of(node)[1] if len(node.args) > 1 else None) or _fp32(node, args_of(node)[0])


@rule("aten.sum.dim_IntList", check=_check_sum)
def lower_sum(lw: Lowerer, node: Node) -> None:
    out = lw.out_tensor(node)
    _rows(lw, node, "REDUCE_SUM", lw.tensor(args_of(node)[0]), out)
    lw.values[node] = out


# ---- layer norm ----------------------------------------------------------------------------------------

def _check_layer_norm(node: Node) -> Optional[str]:
    args = args_of(node) + [None] * 5
    x, shape, weight, bias = args[0], args[1], args[2], args[3]
    if not isinstance(_val(x), torch.Tensor) or list(shape) != [_val(x).shape[-1]] or \
            isinstance(_val(x).shape[-1], torch.SymInt):
        return f"normalized shape {list(shape)} is not the (static) last dim"
    for p in (weight, bias):
        if p is not None and not is_static(p):
            return "its weight or bias is computed from the inputs (the kernel takes constants)"
    for u in node.users:
        if target_name(u) != "operator.getitem" or args_of(u)[1] != 0:
            return "its mean or rstd output is read"
    if _val(x).dtype != torch.float32 or _val(x).dim() > RANK:
        return "its input is not a float32 tensor of rank <= 6"
    return None


@rule("aten.native_layer_norm.default", check=_check_layer_norm)
def lower_layer_norm(lw: Lowerer, node: Node) -> None:
    args = args_of(node) + [None] * 5
    x = lw.tensor(args[0])
    weight, bias, eps = args[2], args[3], args[4]
    n = int(x.shape[-1])
    w: Optional[TensorRef] = None
    if weight is not None or bias is not None:
        wv = _evaluate(lw, weight).reshape(-1) if weight is not None else torch.ones(n)
        bv = _evaluate(lw, bias).reshape(-1) if bias is not None else torch.zeros(n)
        w = _new_constant(lw, f"{node.name}.weight_bias", torch.cat([wv.float(), bv.float()]))
    out = lw.new_tensor(x.shape, node.name)
    _rows(lw, node, "ROWS_LAYER_NORM", x, out, w, eps=float(eps if eps is not None else 1e-5))
    lw.values[node] = [out, None, None]


# ---- bmm -----------------------------------------------------------------------------------------------

def _check_bmm(node: Node) -> Optional[str]:
    a, b = args_of(node)[0], args_of(node)[1]
    why = _fp32(node, a, b)
    if why is not None:
        return why
    if _val(a).dim() != 3 or _val(b).dim() != 3:
        return "bmm takes [B, M, K] x [B, K, N]"
    return None


@rule("aten.bmm.default", check=_check_bmm)
def lower_bmm(lw: Lowerer, node: Node) -> None:
    a, b = lw.tensor(args_of(node)[0]), lw.tensor(args_of(node)[1])
    batch, m, k = a.shape
    n = b.shape[2]
    if lw.upper(batch) > MAX_GROUPS:
        raise LoweringError(f"{node.name}: a batch of {lw.upper(batch)} matrices is above {MAX_GROUPS} workgroups")
    sa, sb = a.strides(), b.strides()
    out = lw.out_tensor(node)
    lw.dispatch(node, "bmm", {"a": a.buffer, "b": b.buffer, "out": out.buffer},
                {"batch": batch, "M": m, "N": n, "K": k, "sa_b": sa[0], "sa_m": sa[1], "sa_k": sa[2],
                 "sb_b": sb[0], "sb_k": sb[1], "sb_n": sb[2]},
                (ceildiv(n, BMM_TILE), ceildiv(m, BMM_TILE), batch))
    lw.values[node] = out


# ---- gathers: embedding of computed ids, gather, index.Tensor ------------------------------------------

def _index_dtype(arg: Any) -> Optional[str]:
    if not isinstance(arg, Node) or not isinstance(_val(arg), torch.Tensor):
        return "an index that is not a tensor"
    if _val(arg).dtype not in INT_DTYPES:
        return f"an index of {_val(arg).dtype} (a boolean mask gives a data-dependent shape)"
    return None


def _check_embedding_ids(node: Node) -> Optional[str]:
    weight, ids = args_of(node)[0], args_of(node)[1]
    if _is_user_input(ids):
        return "its ids are an input (ops.py's rule reads them)"
    if not (isinstance(weight, Node) and isinstance(_val(weight), torch.Tensor) and
            _val(weight).dtype == torch.float32 and _val(weight).dim() == 2):
        return "its table is not a float32 matrix"
    return _index_dtype(ids) or _held(_val(node))


@also("aten.embedding.default", check=_check_embedding_ids, first=True)
def lower_embedding_ids(lw: Lowerer, node: Node) -> None:
    table = lw.tensor(args_of(node)[0])
    ids, is_i32 = _raw(lw, args_of(node)[1])
    vocab, dim = table.shape
    out = lw.out_tensor(node)
    shape = out.shape
    id_strides = list(ids.strides()) + [0]
    src_strides = [0] * len(ids.shape) + [1]
    gather_step(lw, node, out, (table, 0, src_strides), [(ids, is_i32, id_strides, dim, vocab)])
    lw.values[node] = TensorRef(out.buffer, shape, out.dtype)


def _check_gather(node: Node) -> Optional[str]:
    args = args_of(node)
    if len(args) > 3 and args[3]:
        return "sparse_grad"
    return _index_dtype(args[2]) or _held_node(node)


@rule("aten.gather.default", check=_check_gather)
def lower_gather(lw: Lowerer, node: Node) -> None:
    x = f32_operand(lw, args_of(node)[0], node)
    index, is_i32 = _raw(lw, args_of(node)[2])
    dim = _dim(args_of(node)[1], len(x.shape))
    out = lw.out_tensor(node)
    xs = list(x.strides())
    src_strides = [0 if d == dim else s for d, s in enumerate(xs)]
    gather_step(lw, node, out, (x, 0, src_strides), [(index, is_i32, index.strides(), xs[dim], x.shape[dim])])
    lw.values[node] = out


def _index_layout(node: Node) -> Tuple[int, List[Node]]:
    """(the first indexed dim, the index tensors) of index.Tensor: consecutive dims, at most 2."""
    indices = list(args_of(node)[1])
    present = [i for i, t in enumerate(indices) if t is not None]
    if not present or present != list(range(present[0], present[-1] + 1)) or len(present) > 2:
        raise ValueError("indices that are not 1 or 2 consecutive tensors")
    return present[0], [indices[i] for i in present]


def _check_index(node: Node) -> Optional[str]:
    try:
        _, idx = _index_layout(node)
    except ValueError as e:
        return str(e)
    for t in idx:
        why = _index_dtype(t)
        if why is not None:
            return why
    return _held_node(node)


@rule("aten.index.Tensor", check=_check_index)
def lower_index(lw: Lowerer, node: Node) -> None:
    x = f32_operand(lw, args_of(node)[0], node)
    first, idx_nodes = _index_layout(node)
    out = lw.out_tensor(node)
    xs = list(x.strides())
    k = len(idx_nodes)
    b_rank = len(out.shape) - (len(x.shape) - k)
    b_shape = out.shape[first:first + b_rank]
    src_strides = xs[:first] + [0] * b_rank + xs[first + k:]
    indices = []
    for i, arg in enumerate(idx_nodes):
        ref, is_i32 = _raw(lw, arg)
        strides = [0] * first + broadcast_strides(ref, b_shape) + [0] * (len(x.shape) - first - k)
        indices.append((ref, is_i32, strides, xs[first + i], x.shape[first + i]))
    gather_step(lw, node, out, (x, 0, src_strides), indices)
    lw.values[node] = out


# ---- folded only: ops no kernel runs, when the export fixes their value ---------------------------------

@rule("aten.cumsum.default", "aten.tril.default", "aten.triu.default",
      check=lambda node: f"no graph rule for {target_name(node)} (a value the export fixes is folded at preprocess)")
def lower_fold_only(lw: Lowerer, node: Node) -> None:
    raise LoweringError(f"{node.name}: no kernel runs {target_name(node)}")


install()

# Quantized embeddings: registered after install(), as a module imported on its own would be (see also()).
from executorch_wgpu.backend.graph import ops_quantized  # noqa: E402,F401  (registers its rules)

__all__ = ["FOLD_FIRST_MAX", "FOLD_MAX", "UNFOLDED", "Way", "also", "f32_operand", "gather_step", "install",
           "is_static", "select_step"]
