"""Shape expressions: sympy (as torch.export writes them) to the blob's RPN tokens.

The symbols of an exported graph are the dynamic dims of its inputs (`s27`:
the token count) and the unbacked values `item()` reads from an input
(`u130 = input_pos[0]`). Every size, offset and grid the lowering computes is
a sympy expression of those; `to_rpn` writes it as graph.fbs's Expr tokens.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import sympy
import torch
from torch.utils._sympy.functions import CeilToInt, FloorDiv, FloorToInt, Mod, PythonMod

from executorch_wgpu.backend.serialization.graph_blob import EXPR_OPS, Expr

# An int or a sympy integer expression. Typed Any: sympy's operators are untyped, and mypy would
# reject every product of a size and a stride.
IntExpr = Any


class ExprError(ValueError):
    """An expression the blob cannot carry (a float, an unknown function, a symbol with no source)."""


def sym(value) -> IntExpr:
    """An int or the sympy expression behind a SymInt / SymBool (what node.meta['val'] and args hold)."""
    if isinstance(value, (torch.SymInt, torch.SymBool)):
        return value.node.expr
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, sympy.Basic):
        return value
    raise ExprError(f"{value!r} is not an integer expression")


def ceildiv(a: IntExpr, b: int) -> IntExpr:
    return FloorDiv(sympy.sympify(a) + (b - 1), b) if isinstance(a, sympy.Expr) else -(-a // b)


def _tok(name: str, arg: int = 0) -> Tuple[int, int]:
    return (EXPR_OPS[name][0], int(arg))


def to_rpn(expr: IntExpr, symbols: Dict[sympy.Symbol, int]) -> Expr:
    """RPN tokens of an integer expression over `symbols` (sympy symbol -> index in the blob)."""
    out: List[Tuple[int, int]] = []

    def binary_chain(name: str, args) -> None:
        walk(args[0])
        for a in args[1:]:
            walk(a)
            out.append(_tok(name))

    def walk(e) -> None:
        if isinstance(e, bool) or e is sympy.true or e is sympy.false:
            out.append(_tok("const", 1 if (e is True or e is sympy.true) else 0))
        elif isinstance(e, int):
            out.append(_tok("const", e))
        elif isinstance(e, sympy.Integer):
            out.append(_tok("const", int(e)))
        elif isinstance(e, sympy.Symbol):
            if e not in symbols:
                raise ExprError(f"symbol {e} has no source the runtime can read (not an input dim or element)")
            out.append(_tok("symbol", symbols[e]))
        elif isinstance(e, sympy.Add):
            binary_chain("add", e.args)
        elif isinstance(e, sympy.Mul):
            coeff, rest = e.as_coeff_Mul()
            if not coeff.is_Integer:
                raise ExprError(f"{e} is not an integer expression")
            binary_chain("mul", [*([coeff] if coeff != 1 else []), *sympy.Mul.make_args(rest)])
        elif isinstance(e, sympy.Pow) and e.exp.is_Integer and int(e.exp) > 0:
            binary_chain("mul", [e.base] * int(e.exp))
        elif isinstance(e, FloorDiv):
            binary_chain("floordiv", e.args)
        elif isinstance(e, (Mod, PythonMod)):
            binary_chain("mod", e.args)
        elif isinstance(e, (FloorToInt, CeilToInt)) and len(e.args) == 1:
            walk(e.args[0])
        elif isinstance(e, sympy.Min):
            binary_chain("min", e.args)
        elif isinstance(e, sympy.Max):
            binary_chain("max", e.args)
        elif isinstance(e, sympy.StrictLessThan):
            binary_chain("lt", e.args)
        elif isinstance(e, sympy.LessThan):
            binary_chain("le", e.args)
        elif isinstance(e, sympy.StrictGreaterThan):
            binary_chain("lt", e.args[::-1])
        elif isinstance(e, sympy.GreaterThan):
            binary_chain("le", e.args[::-1])
        elif isinstance(e, sympy.Equality):
            binary_chain("eq", e.args)
        elif isinstance(e, sympy.Unequality):
            binary_chain("ne", e.args)
        elif isinstance(e, sympy.And):
            binary_chain("and", e.args)
        elif isinstance(e, sympy.Or):
            binary_chain("or", e.args)
        elif isinstance(e, sympy.Not):
            walk(e.args[0])
            out.append(_tok("not"))
        else:
            raise ExprError(f"{e} ({type(e).__name__}) is not an expression the graph blob carries")

    walk(expr)
    return tuple(out)
