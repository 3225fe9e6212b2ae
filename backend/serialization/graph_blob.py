"""Write and read the graph delegate blob described by graph.fbs.

A graph blob is what preprocess compiled one region of a model into: GPU
buffers, the delegate's inputs and outputs, and a list of steps (kernel
dispatches and q4gsw linears). Every size, parameter and grid is an integer
expression of a few symbols (the dynamic token count, input_pos), kept once
in a table of expressions; a runtime evaluates the table once per call and
reads every value from it.

The reader trusts nothing: the flatbuffer is verified (fbverify.py) before a
field is read, and every index, kernel name, parameter count and expression
is checked, so a runtime can follow the record without checking it again.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import flatbuffers

from executorch_wgpu.backend.serialization import fbverify
from executorch_wgpu.backend.serialization.generated.wggr import Buffer as fb_buffer
from executorch_wgpu.backend.serialization.generated.wggr import Check as fb_check
from executorch_wgpu.backend.serialization.generated.wggr import Expr as fb_expr
from executorch_wgpu.backend.serialization.generated.wggr import Graph as fb_graph
from executorch_wgpu.backend.serialization.generated.wggr import IO as fb_io
from executorch_wgpu.backend.serialization.generated.wggr import Linear as fb_linear
from executorch_wgpu.backend.serialization.generated.wggr import LinearPart as fb_linear_part
from executorch_wgpu.backend.serialization.generated.wggr import Step as fb_step
from executorch_wgpu.backend.serialization.generated.wggr import Symbol as fb_symbol
from executorch_wgpu.errors import BlobFormatError, BlobVersionError
from executorch_wgpu.shaders import registry

# The versions and what each changed: graph.fbs's header. Version 2: fused linears (Linear.parts).
GRAPH_SCHEMA_VERSION = 2                # what the writer writes
OLDEST_READABLE_GRAPH_VERSION = 1       # the readers read every version from this one to GRAPH_SCHEMA_VERSION
GRAPH_FILE_IDENTIFIER = b"WGGR"

SYMBOL_SOURCES = ("input-dim", "input-element")   # schema enum order (SymbolSource)
BUFFER_KINDS = ("work", "constant", "state")       # schema enum order (BufferKind)
DTYPES = ("f32", "i32", "i64", "bool")             # schema enum order (DType)

# Expression tokens: name -> (code, operands popped). CONST and SYMBOL take their argument.
EXPR_OPS: Dict[str, Tuple[int, int]] = {
    "const": (0, 0), "symbol": (1, 0),
    "add": (2, 2), "mul": (3, 2), "floordiv": (4, 2), "mod": (5, 2), "min": (6, 2), "max": (7, 2),
    "neg": (8, 1), "lt": (9, 2), "le": (10, 2), "eq": (11, 2), "ne": (12, 2), "and": (13, 2), "or": (14, 2),
    "not": (15, 1),
}
_OP_BY_CODE = {code: (name, arity) for name, (code, arity) in EXPR_OPS.items()}
# How each operator reads as Python, for the evaluator compile_exprs() builds.
_PYTHON = {"add": "({} + {})", "mul": "({} * {})", "floordiv": "({} // {})", "mod": "({} % {})",
           "min": "min({}, {})", "max": "max({}, {})", "neg": "(-{})", "lt": "int({} < {})", "le": "int({} <= {})",
           "eq": "int({} == {})", "ne": "int({} != {})", "and": "int(bool({}) and bool({}))",
           "or": "int(bool({}) or bool({}))", "not": "int(not {})"}

Expr = Tuple[Tuple[int, int], ...]   # RPN tokens (op code, argument)


@dataclass(frozen=True)
class Symbol:
    name: str
    source: str     # SYMBOL_SOURCES
    input: int
    index: int
    min: int
    max: int


@dataclass(frozen=True)
class Check:
    expr: int
    message: str


@dataclass(frozen=True)
class Buffer:
    kind: str       # BUFFER_KINDS
    bytes: int
    data_key: str = ""
    name: str = ""


@dataclass(frozen=True)
class IO:
    buffer: int
    dtype: str      # DTYPES
    shape: Tuple[int, ...]   # expr indices
    max_value: int = 0
    name: str = ""


@dataclass(frozen=True)
class Step:
    kernel: str = ""
    bindings: Tuple[int, ...] = ()
    params: Tuple[int, ...] = ()
    groups: Tuple[int, ...] = ()
    linear: int = -1
    node: str = ""


@dataclass(frozen=True)
class LinearPart:
    y: int          # buffer of the part's outputs [M][columns]
    columns: int
    name: str = ""


@dataclass(frozen=True)
class Linear:
    blob_key: str
    x: int
    y: int          # a fused linear: parts[0].y
    m: int
    parts: Tuple[LinearPart, ...] = ()   # a fused linear's output parts in column order; empty: one output, y


@dataclass
class GraphRecord:
    symbols: List[Symbol] = field(default_factory=list)
    exprs: List[Expr] = field(default_factory=list)
    checks: List[Check] = field(default_factory=list)
    buffers: List[Buffer] = field(default_factory=list)
    inputs: List[IO] = field(default_factory=list)
    outputs: List[IO] = field(default_factory=list)
    steps: List[Step] = field(default_factory=list)
    linears: List[Linear] = field(default_factory=list)


# ---- expressions ----------------------------------------------------------------------------------

def expr_python(expr: Expr, symbol_names: Sequence[str]) -> str:
    """An expression as Python source over the variables `symbol_names`."""
    stack: List[str] = []
    for code, arg in expr:
        name, arity = _OP_BY_CODE[code]
        if name == "const":
            stack.append(f"({arg})")
        elif name == "symbol":
            stack.append(symbol_names[arg])
        else:
            operands = stack[len(stack) - arity:]
            del stack[len(stack) - arity:]
            stack.append(_PYTHON[name].format(*operands))
    return stack[0]


def compile_exprs(exprs: Sequence[Expr], n_symbols: int) -> Callable[[Sequence[int]], List[int]]:
    """One Python function evaluating the whole table: values(symbol_values) -> [value of expr i]."""
    names = [f"s{i}" for i in range(n_symbols)]
    body = ", ".join(expr_python(e, names) for e in exprs)
    unpack = f"({', '.join(names)},) = symbols\n    " if names else ""
    source = f"def values(symbols):\n    {unpack}return [{body}]\n"
    scope: dict = {}
    exec(compile(source, "<graph blob expressions>", "exec"), scope)   # source built from checked tokens only
    return scope["values"]


def _check_expr(expr: Expr, n_symbols: int, where: str) -> None:
    depth = 0
    for code, arg in expr:
        if code not in _OP_BY_CODE:
            raise BlobFormatError(f"graph blob is corrupted: {where} has unknown operator code {code}")
        name, arity = _OP_BY_CODE[code]
        if name == "symbol" and not 0 <= arg < n_symbols:
            raise BlobFormatError(f"graph blob is corrupted: {where} refers to symbol {arg} of {n_symbols}")
        if depth < arity:
            raise BlobFormatError(f"graph blob is corrupted: {where} is not a well-formed expression")
        depth += 1 - arity
    if depth != 1:
        raise BlobFormatError(f"graph blob is corrupted: {where} is not a well-formed expression")


# ---- writing --------------------------------------------------------------------------------------

def _strings(b: flatbuffers.Builder, *values: str) -> List[int]:
    return [b.CreateString(v) for v in values]


def _uvector(b: flatbuffers.Builder, values: Sequence[int]) -> int:
    b.StartVector(4, len(values), 4)
    for v in reversed(values):
        b.PrependUint32(v)
    return b.EndVector()


def _tables(b: flatbuffers.Builder, offsets: Sequence[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


def serialize_graph(rec: GraphRecord) -> bytes:
    b = flatbuffers.Builder(1 << 16)
    symbols = []
    for s in rec.symbols:
        (name,) = _strings(b, s.name)
        fb_symbol.Start(b)
        fb_symbol.AddName(b, name)
        fb_symbol.AddSource(b, SYMBOL_SOURCES.index(s.source))
        fb_symbol.AddInput(b, s.input)
        fb_symbol.AddIndex(b, s.index)
        fb_symbol.AddMin(b, s.min)
        fb_symbol.AddMax(b, s.max)
        symbols.append(fb_symbol.End(b))
    exprs = []
    for e in rec.exprs:
        b.StartVector(1, len(e), 1)
        for code, _ in reversed(e):
            b.PrependUint8(code)
        ops = b.EndVector()
        b.StartVector(8, len(e), 8)
        for _, arg in reversed(e):
            b.PrependInt64(arg)
        args = b.EndVector()
        fb_expr.Start(b)
        fb_expr.AddOps(b, ops)
        fb_expr.AddArgs(b, args)
        exprs.append(fb_expr.End(b))
    checks = []
    for c in rec.checks:
        (message,) = _strings(b, c.message)
        fb_check.Start(b)
        fb_check.AddExpr(b, c.expr)
        fb_check.AddMessage(b, message)
        checks.append(fb_check.End(b))
    buffers = []
    for buf in rec.buffers:
        key, name = _strings(b, buf.data_key, buf.name)
        fb_buffer.Start(b)
        fb_buffer.AddKind(b, BUFFER_KINDS.index(buf.kind))
        fb_buffer.AddBytes(b, buf.bytes)
        fb_buffer.AddDataKey(b, key)
        fb_buffer.AddName(b, name)
        buffers.append(fb_buffer.End(b))

    def io(items: Sequence[IO]) -> List[int]:
        out = []
        for x in items:
            shape = _uvector(b, x.shape)
            (name,) = _strings(b, x.name)
            fb_io.Start(b)
            fb_io.AddBuffer(b, x.buffer)
            fb_io.AddDtype(b, DTYPES.index(x.dtype))
            fb_io.AddShape(b, shape)
            fb_io.AddMaxValue(b, x.max_value)
            fb_io.AddName(b, name)
            out.append(fb_io.End(b))
        return out

    inputs, outputs = io(rec.inputs), io(rec.outputs)
    steps = []
    for st in rec.steps:
        kernel, node = _strings(b, st.kernel, st.node)
        bindings, params, groups = _uvector(b, st.bindings), _uvector(b, st.params), _uvector(b, st.groups)
        fb_step.Start(b)
        fb_step.AddKernel(b, kernel)
        fb_step.AddBindings(b, bindings)
        fb_step.AddParams(b, params)
        fb_step.AddGroups(b, groups)
        fb_step.AddLinear(b, st.linear)
        fb_step.AddNode(b, node)
        steps.append(fb_step.End(b))
    linears = []
    for lin in rec.linears:
        parts = []
        for part in lin.parts:
            (name,) = _strings(b, part.name)
            fb_linear_part.Start(b)
            fb_linear_part.AddY(b, part.y)
            fb_linear_part.AddColumns(b, part.columns)
            fb_linear_part.AddName(b, name)
            parts.append(fb_linear_part.End(b))
        part_vector = _tables(b, parts) if parts else None
        (key,) = _strings(b, lin.blob_key)
        fb_linear.Start(b)
        fb_linear.AddBlobKey(b, key)
        fb_linear.AddX(b, lin.x)
        fb_linear.AddY(b, lin.y)
        fb_linear.AddM(b, lin.m)
        if part_vector is not None:
            fb_linear.AddParts(b, part_vector)
        linears.append(fb_linear.End(b))
    vectors = {name: _tables(b, items) for name, items in (
        ("symbols", symbols), ("exprs", exprs), ("checks", checks), ("buffers", buffers), ("inputs", inputs),
        ("outputs", outputs), ("steps", steps), ("linears", linears))}
    fb_graph.Start(b)
    fb_graph.AddSchemaVersion(b, GRAPH_SCHEMA_VERSION)
    fb_graph.AddSymbols(b, vectors["symbols"])
    fb_graph.AddExprs(b, vectors["exprs"])
    fb_graph.AddChecks(b, vectors["checks"])
    fb_graph.AddBuffers(b, vectors["buffers"])
    fb_graph.AddInputs(b, vectors["inputs"])
    fb_graph.AddOutputs(b, vectors["outputs"])
    fb_graph.AddSteps(b, vectors["steps"])
    fb_graph.AddLinears(b, vectors["linears"])
    b.Finish(fb_graph.End(b), file_identifier=GRAPH_FILE_IDENTIFIER)
    return bytes(b.Output())


# ---- reading --------------------------------------------------------------------------------------

_schema: Optional[fbverify.Schema] = None


def _graph_schema() -> fbverify.Schema:
    global _schema
    if _schema is None:
        _schema = fbverify.schema_from_package("executorch_wgpu.backend.serialization", "graph.fbs")
    return _schema


def is_graph_blob(data: bytes) -> bool:
    return len(data) >= 8 and bytes(data[4:8]) == GRAPH_FILE_IDENTIFIER


def _enum(values: Tuple[str, ...], code: int, what: str) -> str:
    if not 0 <= code < len(values):
        raise BlobFormatError(f"graph blob is corrupted: unknown {what} enum value {code}")
    return values[code]


def _vec(getter, length: int) -> Tuple[int, ...]:
    return tuple(int(getter(i)) for i in range(length))


def deserialize_graph(data: bytes) -> GraphRecord:
    """Parse and check a graph blob; raises BlobFormatError (or BlobVersionError)."""
    data = bytes(data)
    if not is_graph_blob(data):
        raise BlobFormatError(f"not an executorch_wgpu graph blob: magic {data[4:8]!r}, expected "
                              f"{GRAPH_FILE_IDENTIFIER!r}")
    try:
        root = fb_graph.Graph.GetRootAs(data, 0)
        version = root.SchemaVersion()
    except (IndexError, struct.error, ValueError, TypeError, OverflowError) as e:
        raise BlobFormatError(f"graph blob is truncated or corrupted: cannot read its header ({e})") from e
    if not OLDEST_READABLE_GRAPH_VERSION <= version <= GRAPH_SCHEMA_VERSION:
        raise BlobVersionError(
            f"graph blob has schema version {version}; this executorch_wgpu reads versions "
            f"{OLDEST_READABLE_GRAPH_VERSION} to {GRAPH_SCHEMA_VERSION}: "
            + ("upgrade executorch_wgpu, or re-export the model with this one" if version > GRAPH_SCHEMA_VERSION
               else "re-export the model with this version of executorch_wgpu"))
    try:
        fbverify.verify(_graph_schema(), data, check_identifier=False)
    except fbverify.FlatbufferVerifyError as e:
        raise BlobFormatError(f"graph blob is truncated or corrupted: {e}") from e
    try:
        rec = _read(root)
    except (IndexError, struct.error, ValueError, UnicodeDecodeError, TypeError, OverflowError) as e:
        raise BlobFormatError(f"graph blob is truncated or corrupted: {e}") from e
    check_graph(rec)
    return rec


def _text(value) -> str:
    return value.decode("utf-8") if value is not None else ""


def _read(root: fb_graph.Graph) -> GraphRecord:
    rec = GraphRecord()
    for i in range(root.SymbolsLength()):
        s = root.Symbols(i)
        rec.symbols.append(Symbol(_text(s.Name()), _enum(SYMBOL_SOURCES, s.Source(), "SymbolSource"), s.Input(),
                                  s.Index(), s.Min(), s.Max()))
    for i in range(root.ExprsLength()):
        e = root.Exprs(i)
        if e.OpsLength() != e.ArgsLength():
            raise BlobFormatError(f"graph blob is corrupted: expression {i} has {e.OpsLength()} operators and "
                                  f"{e.ArgsLength()} arguments")
        rec.exprs.append(tuple((int(e.Ops(j)), int(e.Args(j))) for j in range(e.OpsLength())))
    for i in range(root.ChecksLength()):
        c = root.Checks(i)
        rec.checks.append(Check(c.Expr(), _text(c.Message())))
    for i in range(root.BuffersLength()):
        buf = root.Buffers(i)
        rec.buffers.append(Buffer(_enum(BUFFER_KINDS, buf.Kind(), "BufferKind"), buf.Bytes(), _text(buf.DataKey()),
                                  _text(buf.Name())))
    for getter, length, out in ((root.Inputs, root.InputsLength(), rec.inputs),
                                (root.Outputs, root.OutputsLength(), rec.outputs)):
        for i in range(length):
            x = getter(i)
            out.append(IO(x.Buffer(), _enum(DTYPES, x.Dtype(), "DType"), _vec(x.Shape, x.ShapeLength()),
                          x.MaxValue(), _text(x.Name())))
    for i in range(root.StepsLength()):
        st = root.Steps(i)
        rec.steps.append(Step(_text(st.Kernel()), _vec(st.Bindings, st.BindingsLength()),
                              _vec(st.Params, st.ParamsLength()), _vec(st.Groups, st.GroupsLength()), st.Linear(),
                              _text(st.Node())))
    for i in range(root.LinearsLength()):
        lin = root.Linears(i)
        parts = tuple(LinearPart(p.Y(), p.Columns(), _text(p.Name()))
                      for p in (lin.Parts(j) for j in range(lin.PartsLength())))
        rec.linears.append(Linear(_text(lin.BlobKey()), lin.X(), lin.Y(), lin.M(), parts))
    return rec


def check_graph(rec: GraphRecord) -> None:
    """Every index in range, every kernel known with the right counts, every expression well formed."""
    def fail(what: str) -> None:
        raise BlobFormatError(f"graph blob is corrupted: {what}")

    n_buf, n_expr = len(rec.buffers), len(rec.exprs)
    for i, tokens in enumerate(rec.exprs):
        _check_expr(tokens, len(rec.symbols), f"expression {i}")

    def expr_ok(index: int, where: str) -> None:
        if not 0 <= index < n_expr:
            fail(f"{where} refers to expression {index} of {n_expr}")

    for i, s in enumerate(rec.symbols):
        if not 0 <= s.input < len(rec.inputs):
            fail(f"symbol {s.name!r} reads input {s.input} of {len(rec.inputs)}")
        if s.min > s.max:
            fail(f"symbol {s.name!r} has range [{s.min}, {s.max}]")
    for c in rec.checks:
        expr_ok(c.expr, "a check")
    for what, items in (("input", rec.inputs), ("output", rec.outputs)):
        for x in items:
            if not 0 <= x.buffer < n_buf:
                fail(f"{what} {x.name!r} refers to buffer {x.buffer} of {n_buf}")
            for d in x.shape:
                expr_ok(d, f"{what} {x.name!r}")
    for st in rec.steps:
        where = f"step {st.node!r}"
        if st.linear >= 0:
            if st.linear >= len(rec.linears):
                fail(f"{where} refers to linear {st.linear} of {len(rec.linears)}")
            continue
        if st.kernel not in registry.BY_NAME:
            fail(f"{where} names kernel {st.kernel!r}, which this executorch_wgpu does not have")
        k = registry.BY_NAME[st.kernel]
        if len(st.bindings) != len(k.layout) or len(st.params) != len(k.params) or len(st.groups) != 3:
            fail(f"{where}: kernel {k.name} takes {len(k.layout)} bindings, {len(k.params)} params and a 3-D grid; "
                 f"the step has {len(st.bindings)}, {len(st.params)} and {len(st.groups)}")
        for b in st.bindings[1:]:
            if not 0 <= b < n_buf:
                fail(f"{where} binds buffer {b} of {n_buf}")
        for index in (*st.params, *st.groups):
            expr_ok(index, where)
    for lin in rec.linears:
        if not (0 <= lin.x < n_buf and 0 <= lin.y < n_buf):
            fail(f"linear {lin.blob_key!r} refers to buffers {lin.x}, {lin.y} of {n_buf}")
        expr_ok(lin.m, f"linear {lin.blob_key!r}")
        if lin.parts:
            if not 2 <= len(lin.parts) <= len(registry.Q4_OUTPUT_PARTS):
                fail(f"linear {lin.blob_key!r} has {len(lin.parts)} parts; a fused linear has 2 to "
                     f"{len(registry.Q4_OUTPUT_PARTS)}")
            if lin.parts[0].y != lin.y:
                fail(f"linear {lin.blob_key!r} writes its first part to buffer {lin.parts[0].y}, not its y {lin.y}")
            for part in lin.parts:
                if not 0 <= part.y < n_buf:
                    fail(f"linear {lin.blob_key!r}: part {part.name!r} refers to buffer {part.y} of {n_buf}")
                if part.columns < 1:
                    fail(f"linear {lin.blob_key!r}: part {part.name!r} has no columns")
            if len({part.y for part in lin.parts}) != len(lin.parts):
                fail(f"linear {lin.blob_key!r}: two of its parts share a buffer")
