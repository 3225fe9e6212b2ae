"""The Python runtime's public API, shaped like `executorch.runtime`:

    from executorch_wgpu.runtime import Runtime
    method = Runtime.get().load_program("model.pte").load_method("forward")

The implementation lives in runtime_py/ (executorch_wgpu.runtime_py). Importing
this module is light (no torch, no ExecuTorch): the first load_program, or the
first use of Program or Method, imports the runtime proper (runtime_py/entry.py says why).
"""

import typing as _typing

from executorch_wgpu.runtime_py.entry import Runtime

if _typing.TYPE_CHECKING:   # what type checkers see; at run time __getattr__ imports them
    from executorch_wgpu.runtime_py.program import Method, Program


def __getattr__(name):
    if name in ("Program", "Method"):
        from executorch_wgpu.runtime_py import program

        return getattr(program, name)
    raise AttributeError(f"module 'executorch_wgpu.runtime' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"Program", "Method"})


__all__ = ["Runtime", "Program", "Method"]
