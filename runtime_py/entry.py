"""Runtime, the process-wide entry point (as executorch.runtime.Runtime), apart from the runtime proper.

`from executorch_wgpu.runtime import Runtime` imports this module only: no torch, no
wgpu, no ExecuTorch. The first load_program imports the rest (program.py). It has
to import ExecuTorch's .pte schema and reader, and those live in executorch.exir,
whose package __init__ imports ExecuTorch's whole exporter (to_edge, torch.export,
dynamo, torchao: seconds) -- as `import executorch.runtime` does, for the same reason.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:
    from executorch_wgpu.runtime_py.program import Program


class Runtime:
    """Process-wide entry point, as executorch.runtime.Runtime."""

    _instance: Optional["Runtime"] = None

    @classmethod
    def get(cls) -> "Runtime":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def load_program(self, data: Union[str, os.PathLike, bytes, bytearray, memoryview]) -> Program:
        from executorch_wgpu.runtime_py.program import Program

        if isinstance(data, (str, os.PathLike)):
            with open(data, "rb") as f:
                data = f.read()
        return Program(bytes(data))
