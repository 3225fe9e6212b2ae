"""Delegate handles: what a DelegateCall instruction of the .pte runs.

The runtime knows one backend, ours; a program delegating to any other
backend is refused at load with a clear error.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, List, Sequence, Union

from executorch_wgpu.backend.serialization.blob import BACKEND_ID, deserialize_q4linear
from executorch_wgpu.backend.serialization.graph_blob import is_graph_blob
from executorch_wgpu.errors import ProgramFormatError
from executorch_wgpu.runtime_py.gpu import gpu_context
from executorch_wgpu.runtime_py.q4_linear import LinearCall
from executorch_wgpu.runtime_py.split_linear import Q4Linear

if TYPE_CHECKING:
    from executorch_wgpu.runtime_py.graph_delegate import GraphDelegate


class WebGPUDelegate:
    """One q4gsw linear blob, loaded onto the shared GPU device: 1 input tensor -> 1 output tensor."""

    n_outputs = 1

    def __init__(self, blob: bytes):
        self.record = deserialize_q4linear(blob)
        self.layer = Q4Linear(gpu_context(), self.record)

    def execute(self, inputs: Sequence, calls: List[LinearCall]) -> list:
        """The delegate's outputs for its inputs; appends what the call did to calls."""
        if len(inputs) != 1:
            raise ProgramFormatError(f"delegate {self.record.name!r} takes 1 input, the program passes {len(inputs)}")
        start = time.perf_counter()
        y, call = self.layer(inputs[0])
        call.wall_us = (time.perf_counter() - start) * 1e6
        calls.append(call)
        return [y]

    def reset_state(self) -> None:
        """A linear holds no state."""


def load_delegate(backend_id: str, blob: bytes, named_data: Callable[[str], bytes]) -> Union[WebGPUDelegate, "GraphDelegate"]:
    """The delegate of a blob: a graph (WGGR) or one q4gsw linear (WGQ4); named_data(key) reads the program's named data."""
    if backend_id != BACKEND_ID:
        raise ProgramFormatError(
            f"the program delegates to backend {backend_id!r}; this runtime runs only {BACKEND_ID!r} delegates"
        )
    if is_graph_blob(blob):
        from executorch_wgpu.runtime_py.graph_delegate import GraphDelegate

        return GraphDelegate(blob, named_data)
    return WebGPUDelegate(blob)
