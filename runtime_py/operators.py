"""Run the .pte's KernelCall instructions on the CPU with the matching torch op.

The program names each operator as in ExecuTorch ("aten::relu" overload
"out"); torch.ops has the same overload, so we call it directly. Arguments
arrive in schema order followed by the return value ids (that is how
ExecuTorch's emitter lays out KernelCall.args). Out arguments get a fresh
empty tensor of the planned dtype, which the op resizes; the result lands in
the out and return value slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List

import torch

# Registers executorch_prim::* (symbolic int arithmetic) and dim_order_ops::* with torch.ops.
import executorch.exir.passes.dim_order_ops_registry  # noqa: F401
import executorch.exir.passes.executorch_prim_ops_registry  # noqa: F401
from executorch.exir.tensor import layout_enum, memory_format_enum, scalar_type_enum

from executorch_wgpu.errors import UnsupportedOperatorError

_DTYPES = {int(scalar_type_enum(d)): d for d in (
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
    torch.float64, torch.bool, torch.bfloat16, torch.complex64, torch.complex128,
)}
_MEMORY_FORMATS = {int(memory_format_enum(f)): f for f in (
    torch.contiguous_format, torch.preserve_format,
)}
_LAYOUTS = {int(layout_enum(torch.strided)): torch.strided}


def dtype_of(scalar_type: int) -> torch.dtype:
    try:
        return _DTYPES[int(scalar_type)]
    except KeyError:
        raise UnsupportedOperatorError(f"scalar type {scalar_type} is not supported by this runtime") from None


def convert_int(value: int, type_name: str) -> Any:
    """Ints stand for dtypes, memory formats and layouts in ExecuTorch programs."""
    if "ScalarType" in type_name:
        return dtype_of(value)
    if "MemoryFormat" in type_name:
        return _MEMORY_FORMATS[value]
    if "Layout" in type_name:
        return _LAYOUTS[value]
    return value


@dataclass
class ArgSpec:
    name: str
    type_name: str
    kwarg_only: bool
    is_out: bool


@dataclass
class CompiledKernelCall:
    """A KernelCall with its op and schema resolved once, at load."""

    op: Callable[..., Any]
    schema_args: List[ArgSpec]
    arg_ids: List[int]
    ret_ids: List[int]
    name: str = ""   # "aten::addmm.out", as the program names it (for messages)


def _et_view(self: torch.Tensor, size: List[int]) -> torch.Tensor:
    return self.view(size)


# Instructions the ExecuTorch emitter writes that exist only in its C++ runtime,
# with no torch.ops registration: "name.overload" -> (function, its arguments).
RUNTIME_ONLY_OPS = {
    "executorch_prim::et_view.default": (
        _et_view, [ArgSpec("self", "Tensor", False, False), ArgSpec("size", "List[int]", False, False)]
    ),
}


def resolve_operator(name: str, overload: str) -> tuple:
    """(callable, [ArgSpec]) for an operator named in the program."""
    qualified = f"{name}.{overload or 'default'}"
    if qualified in RUNTIME_ONLY_OPS:
        return RUNTIME_ONLY_OPS[qualified]
    namespace, _, op_name = name.partition("::")
    try:
        op = getattr(getattr(getattr(torch.ops, namespace), op_name), overload or "default")
    except (AttributeError, RuntimeError) as e:
        raise UnsupportedOperatorError(
            f"operator {qualified} has no torch implementation in this process (a custom op runs once the library "
            "that registers it with torch is loaded, before the method)"
        ) from e
    return op, [ArgSpec(a.name, str(a.real_type), a.kwarg_only, a.is_out) for a in op._schema.arguments]


def compile_kernel_call(operator: tuple, args: List[int], name: str = "") -> CompiledKernelCall:
    op, specs = operator
    if len(args) < len(specs):
        raise UnsupportedOperatorError(f"{name or op}: {len(args)} args for a schema of {len(specs)}")
    return CompiledKernelCall(op, specs, list(args[: len(specs)]), list(args[len(specs):]), name or str(op))


def run_kernel_call(call: CompiledKernelCall, read: Callable[[int, str], Any], write: Callable[[int, Any], None],
                    new_out: Callable[[int], Any]) -> None:
    """Call the op; new_out(vid) gives an out argument (a tensor, or a list of them for a Tensor[] out)."""
    positional, keywords, outs = [], {}, []
    for spec, vid in zip(call.schema_args, call.arg_ids):
        if spec.is_out:
            value = new_out(vid)
            outs.append((vid, value))
        else:
            value = read(vid, spec.type_name)
        if spec.kwarg_only:
            keywords[spec.name] = value
        else:
            positional.append(value)
    result = call.op(*positional, **keywords)
    for vid, value in outs:
        write(vid, value)
    if call.ret_ids:
        if outs:
            results = [v for _, v in outs]
        else:
            results = list(result) if isinstance(result, (tuple, list)) else [result]
        if len(call.ret_ids) == 1 and len(results) == 1:
            write(call.ret_ids[0], results[0])
        else:
            for vid, value in zip(call.ret_ids, results):
                write(vid, value)
