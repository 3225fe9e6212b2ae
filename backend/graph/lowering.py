"""Compile one partition (an Edge ExportedProgram) into a graph blob.

The Lowerer walks the graph in order. Every tensor is contiguous from element
0 of a buffer; a view (view_copy, squeeze, unsqueeze, a clone) shares its
source's buffer, every other op writes a fresh one through a kernel step that
its lowering rule (ops.py) emits. Sizes are sympy expressions of the graph's
symbols; each becomes an entry of the blob's expression table.

After the walk: steps whose results nothing reads are dropped, and the
intermediate buffers -- one per tensor so far -- are packed onto as few GPU
buffers as liveness allows (a greedy best fit in step order, each sized for
the largest shapes the export allows).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import sympy
import torch
from torch.export import ExportedProgram
from torch.fx import Node
from torch.utils._sympy.value_ranges import bound_sympy

from executorch_wgpu.backend.graph.exprs import ExprError, IntExpr, sym, to_rpn
from executorch_wgpu.backend.q4gsw_pattern import constant_value
from executorch_wgpu.backend.serialization import graph_blob as gb
from executorch_wgpu.shaders import registry

# Buffers are allocated in multiples of this: every binding of a vec4 array sees whole vec4s.
BUFFER_ALIGN = 256
DTYPE_NAMES = {torch.float32: "f32", torch.int32: "i32", torch.int64: "i64", torch.bool: "bool"}


class LoweringError(RuntimeError):
    """A node the graph blob cannot express; the partitioner's checks should have kept it out."""


@dataclass
class TensorRef:
    """A tensor of the graph: which (virtual) buffer holds it, contiguous from element 0."""

    buffer: int
    shape: Tuple[IntExpr, ...]
    dtype: str = "f32"

    @property
    def numel(self) -> IntExpr:
        n: IntExpr = 1
        for d in self.shape:
            n = n * d
        return n

    def strides(self) -> Tuple[IntExpr, ...]:
        out: List[IntExpr] = []
        s: IntExpr = 1
        for d in reversed(self.shape):
            out.append(s)
            s = s * d
        return tuple(reversed(out))


@dataclass
class _VBuffer:
    kind: str          # gb.BUFFER_KINDS
    bytes: int
    name: str
    data_key: str = ""


@dataclass(frozen=True)
class _LinearStep:
    """A q4gsw linear step: its WGQ4 blob's key, the virtual buffers of x and of each output part, M."""

    key: str
    x: int
    ys: Tuple[int, ...]             # one per output part (one: an unfused linear)
    m: IntExpr
    columns: Tuple[int, ...] = ()   # a fused linear's part widths; empty when unfused
    names: Tuple[str, ...] = ()     # the linears its parts were


@dataclass
class _Step:
    kernel: str = ""
    bindings: Dict[str, int] = field(default_factory=dict)    # binding name -> virtual buffer
    params: Dict[str, IntExpr] = field(default_factory=dict)
    groups: Tuple[IntExpr, IntExpr, IntExpr] = (1, 1, 1)
    linear: Optional[_LinearStep] = None
    node: str = ""

    def reads(self) -> List[int]:
        if self.linear is not None:
            return [self.linear.x]
        k = registry.kernel(self.kernel)
        return [self.bindings[b.name] for b in k.layout if b.kind == "read-only-storage" and b.name in self.bindings]

    def writes(self) -> List[int]:
        if self.linear is not None:
            return list(self.linear.ys)
        k = registry.kernel(self.kernel)
        return [self.bindings[b.name] for b in k.layout if b.kind == "storage" and b.name in self.bindings]


class Lowerer:
    """State of one partition's compilation; ops.py's rules call its methods."""

    def __init__(self, ep: ExportedProgram, named_data: Callable[[bytes], str]):
        self.ep = ep
        self.add_named_data = named_data            # bytes -> key in the program's named data
        self.ranges = {s: vr for s, vr in ep.range_constraints.items() if isinstance(s, sympy.Symbol)}
        self.values: Dict[Node, object] = {}          # node -> TensorRef, IntExpr, or a list of them
        self.vbuffers: List[_VBuffer] = []
        self.steps: List[_Step] = []
        self.symbols: List[gb.Symbol] = []
        self.symbol_index: Dict[sympy.Symbol, int] = {}
        self.checks: List[Tuple[IntExpr, str]] = []
        self.inputs: List[Tuple[TensorRef, str, int]] = []    # (tensor, name, max_value)
        self.outputs: List[Tuple[TensorRef, str]] = []
        self.user_inputs: List[Node] = []
        self.state_buffers: Dict[str, int] = {}                 # buffer FQN -> virtual buffer

    # ---- sizes ----

    def upper(self, expr: IntExpr) -> int:
        """The largest value an expression takes over the export's ranges."""
        if isinstance(expr, int):
            return expr
        if expr.is_number:
            return int(expr)
        bound = bound_sympy(expr, self.ranges).upper
        if not isinstance(bound, sympy.Integer):
            raise LoweringError(f"{expr} has no upper bound in the export's ranges: give the dynamic dim a max")
        return int(bound)

    def new_buffer(self, kind: str, nbytes: int, name: str, data: Optional[bytes] = None) -> int:
        key = self.add_named_data(data) if data is not None else ""
        # a buffer with initial data is as long as its data (the runtime pads it); others round up
        size = nbytes if data is not None else max(BUFFER_ALIGN, -(-nbytes // BUFFER_ALIGN) * BUFFER_ALIGN)
        self.vbuffers.append(_VBuffer(kind, size, name, key))
        return len(self.vbuffers) - 1

    def new_tensor(self, shape: Sequence[IntExpr], name: str, dtype: str = "f32") -> TensorRef:
        ref = TensorRef(-1, tuple(shape), dtype)
        ref.buffer = self.new_buffer("work", 4 * self.upper(ref.numel), name)
        return ref

    def out_tensor(self, node: Node) -> TensorRef:
        """A fresh tensor of the node's shape (its meta value)."""
        val = node.meta["val"]
        return self.new_tensor([sym(d) for d in val.shape], node.name, DTYPE_NAMES.get(val.dtype, "f32"))

    def constant(self, node: Node, value: torch.Tensor) -> TensorRef:
        if node not in self.values:
            t = value.detach().contiguous()
            if t.dtype != torch.float32:
                raise LoweringError(f"constant {node.name} is {t.dtype}; the graph delegate takes fp32 constants")
            data = t.numpy().tobytes()
            ref = TensorRef(-1, tuple(int(d) for d in t.shape))
            ref.buffer = self.new_buffer("constant", len(data), node.name, data)
            self.values[node] = ref
        return self.values[node]  # type: ignore[return-value]

    def bound_input(self, node: Node, max_value: int) -> None:
        """An integer input's values must lie in [0, max_value) (token ids of an embedding): the runtime checks."""
        for i, (ref, name, old) in enumerate(self.inputs):
            if name == node.name:
                self.inputs[i] = (ref, name, min(old, max_value) if old else max_value)

    # ---- steps ----

    def dispatch(self, node: Node, kernel: str, bindings: Dict[str, int], params: Dict[str, IntExpr],
                 groups: Tuple[IntExpr, IntExpr, IntExpr], pattern: str = "") -> None:
        """A kernel step for `node` (a fused `pattern` names the step "pattern@node" in profiles)."""
        k = registry.kernel(kernel)
        unknown = set(params) - set(k.params)
        if unknown:
            raise LoweringError(f"{kernel} has no params {sorted(unknown)}")
        label = f"{pattern}@{node.name}" if pattern else node.name
        self.steps.append(_Step(kernel, dict(bindings), dict(params), groups, node=label))

    def supersede(self, node: Node) -> None:
        """Drop the steps emitted so far for `node` (its own, and a pattern's "pattern@node"): a fused step
        emitted later computes its value (into the same buffer). The caller makes sure nothing between them
        reads that value but steps that die."""
        self.steps = [st for st in self.steps if st.node != node.name and not st.node.endswith("@" + node.name)]

    def linear(self, node: Node, blob: bytes, x: TensorRef, y: TensorRef, m: IntExpr) -> None:
        self.steps.append(_Step(linear=_LinearStep(self.add_named_data(blob), x.buffer, (y.buffer,), m),
                                node=node.name))

    def fused_linear(self, label: str, blob: bytes, x: TensorRef, parts: Sequence[Tuple[TensorRef, int, str]],
                     m: IntExpr) -> None:
        """One linear step computing sibling linears of x at once (their columns concatenated in `blob`): each
        (y, columns, name) of `parts`, in column order, gets its own contiguous [M][columns] tensor y."""
        step = _LinearStep(self.add_named_data(blob), x.buffer, tuple(y.buffer for y, _, _ in parts), m,
                           tuple(c for _, c, _ in parts), tuple(n for _, _, n in parts))
        self.steps.append(_Step(linear=step, node=label))

    # ---- symbols ----

    def add_symbol(self, symbol: sympy.Symbol, source: str, input_index: int, index: int, lo: int) -> None:
        if symbol in self.symbol_index:
            return
        vr = self.ranges.get(symbol)
        hi = int(vr.upper) if vr is not None and isinstance(vr.upper, sympy.Integer) else 2**62
        if vr is not None and isinstance(vr.lower, sympy.Integer):
            # to_edge's 0/1 specialization raises a user's Dim(min=1) to 2; every kernel runs a dim of 1
            # (decode), so a dynamic dim keeps lower bound `lo` = 1 then (as preprocess.m_range does)
            lo = lo if source == "input-dim" and int(vr.lower) == 2 else max(lo, int(vr.lower))
        self.symbol_index[symbol] = len(self.symbols)
        self.symbols.append(gb.Symbol(str(symbol), source, input_index, index, lo, hi))

    def value(self, arg):
        """The lowered value of an argument: a TensorRef, an int expression, a list, or a plain constant."""
        if isinstance(arg, Node):
            if arg not in self.values and arg.op == "placeholder":
                value = constant_value(self.ep, arg)   # a weight: uploaded when a step first reads it
                if value is not None and value.dtype == torch.float32:
                    return self.constant(arg, value)
            if arg not in self.values:
                raise LoweringError(f"{arg.name} ({arg.op} {arg.target}) was not lowered before its use")
            return self.values[arg]
        if isinstance(arg, (list, tuple)):
            return [self.value(a) for a in arg]
        return arg

    def tensor(self, arg) -> TensorRef:
        v = self.value(arg)
        if not isinstance(v, TensorRef):
            raise LoweringError(f"{arg} is not a tensor the graph holds")
        return v

    # ---- the blob ----

    def finish(self) -> gb.GraphRecord:
        self._drop_dead_steps()
        physical = self._plan_memory()
        rec = gb.GraphRecord(symbols=list(self.symbols))
        expr_index: Dict[object, int] = {}

        def expr(e: IntExpr) -> int:
            e = sympy.sympify(e)
            if e not in expr_index:
                try:
                    rec.exprs.append(to_rpn(e, self.symbol_index))
                except ExprError as err:
                    raise LoweringError(str(err)) from err
                expr_index[e] = len(rec.exprs) - 1
            return expr_index[e]

        for cond, message in self.checks:
            rec.checks.append(gb.Check(expr(cond), message))
        rec.buffers = physical["buffers"]
        buf = physical["map"]
        for ref, name, max_value in self.inputs:
            rec.inputs.append(gb.IO(buf[ref.buffer], ref.dtype, tuple(expr(d) for d in ref.shape), max_value, name))
        for ref, name in self.outputs:
            rec.outputs.append(gb.IO(buf[ref.buffer], ref.dtype, tuple(expr(d) for d in ref.shape), 0, name))
        for st in self.steps:
            if st.linear is not None:
                lin = st.linear
                parts = tuple(gb.LinearPart(buf[y], c, name) for y, c, name in zip(lin.ys, lin.columns, lin.names))
                rec.linears.append(gb.Linear(lin.key, buf[lin.x], buf[lin.ys[0]], expr(lin.m), parts))
                rec.steps.append(gb.Step(linear=len(rec.linears) - 1, node=st.node))
                continue
            k = registry.kernel(st.kernel)
            bindings = tuple(0 if b.kind == "uniform" else
                             buf[st.bindings[b.name] if b.name in st.bindings else st.bindings[_fallback(k, b)]]
                             for b in k.layout)
            params = tuple(expr(st.params.get(f, 0)) for f in k.params)
            rec.steps.append(gb.Step(st.kernel, bindings, params, tuple(expr(g) for g in st.groups), node=st.node))
        return rec

    def _drop_dead_steps(self) -> None:
        live = {ref.buffer for ref, _ in self.outputs} | {
            i for i, b in enumerate(self.vbuffers) if b.kind == "state"}
        kept: List[_Step] = []
        for st in reversed(self.steps):
            if any(w in live for w in st.writes()):
                kept.append(st)
                live.update(st.reads())
        self.steps = kept[::-1]

    def _plan_memory(self) -> dict:
        """Virtual buffers onto physical ones: constants and state keep their own; work buffers are reused
        once their last reader has run (inputs live from the start, outputs to the end)."""
        n_steps = len(self.steps)
        first: Dict[int, int] = {}
        last: Dict[int, int] = {}
        for ref, _, _ in self.inputs:
            first[ref.buffer] = -1
        for i, st in enumerate(self.steps):
            for v in st.writes() + st.reads():
                first.setdefault(v, i)
                last[v] = i
        for ref, _ in self.outputs:
            first.setdefault(ref.buffer, -1)
            last[ref.buffer] = n_steps
        buffers: List[gb.Buffer] = []
        mapping: Dict[int, int] = {}
        for v, b in enumerate(self.vbuffers):
            if b.kind != "work":
                mapping[v] = len(buffers)
                buffers.append(gb.Buffer(b.kind, b.bytes, b.data_key, b.name))
        free: List[int] = []   # physical work buffers whose tensor is dead
        ends: Dict[int, List[int]] = {}
        order = sorted((v for v, b in enumerate(self.vbuffers) if b.kind == "work" and v in first),
                       key=lambda v: (first[v], v))
        for v in order:
            ends.setdefault(last.get(v, first[v]), []).append(v)
        sizes: Dict[int, int] = {}
        pending = list(order)
        for step in range(-1, n_steps + 1):
            # tensors defined at this step take a free buffer (best fit) or a new one
            while pending and first[pending[0]] == step:
                v = pending.pop(0)
                need = self.vbuffers[v].bytes
                fits = [p for p in free if sizes[p] >= need]
                if fits:
                    p = min(fits, key=lambda p: sizes[p])
                    free.remove(p)
                elif free:   # grow the largest free one rather than add a buffer
                    p = max(free, key=lambda p: sizes[p])
                    free.remove(p)
                    sizes[p] = need
                else:
                    p = len(buffers)
                    buffers.append(gb.Buffer("work", need, "", self.vbuffers[v].name))
                    sizes[p] = need
                mapping[v] = p
            for v in ends.get(step, []):
                free.append(mapping[v])
        buffers = [gb.Buffer(b.kind, sizes.get(i, b.bytes), b.data_key, b.name) for i, b in enumerate(buffers)]
        return {"buffers": buffers, "map": mapping}


def _fallback(k: registry.Kernel, b: registry.Binding) -> str:
    """An unused binding is bound to a buffer of the step's own: a read-only one to the kernel's first input
    (`a` or `q`), which it reads anyway; a writable one (reduce_rows' `sum` outside ROWS_ADD_RMS_NORM) to
    its first output, which the kernel then never writes through that binding."""
    if b.kind == "uniform":
        raise LoweringError(f"{k.name}: binding {b.name} is not bound")
    return next(x.name for x in k.layout if x.kind == b.kind)


def named_data_key(data: bytes) -> str:
    """Named data is keyed by content: equal weights are stored once per program."""
    return "executorch_wgpu/" + hashlib.sha256(data).hexdigest()
