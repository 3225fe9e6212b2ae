"""The Python runtime's public API, shaped like `executorch.runtime`:

    from executorch_wgpu.runtime import Runtime
    method = Runtime.get().load_program("model.pte").load_method("forward")

The implementation lives in runtime_py/ (executorch_wgpu.runtime_py).
"""

from executorch_wgpu.runtime_py.program import Method, Program, Runtime

__all__ = ["Runtime", "Program", "Method"]
