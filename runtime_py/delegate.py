"""Delegate handles: what a DelegateCall instruction of the .pte runs.

The runtime knows one backend, ours; a program delegating to any other
backend is refused at load with a clear error.
"""

from __future__ import annotations

import time
from typing import List, Sequence

from executorch_wgpu.backend.serialization.blob import BACKEND_ID, deserialize_q4linear
from executorch_wgpu.errors import ProgramFormatError
from executorch_wgpu.runtime_py.gpu import gpu_context
from executorch_wgpu.runtime_py.q4_linear import LinearCall
from executorch_wgpu.runtime_py.split_linear import Q4Linear


class WebGPUDelegate:
    """One q4gsw linear blob, loaded onto the shared GPU device: 1 input tensor -> 1 output tensor."""

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


def load_delegate(backend_id: str, blob: bytes) -> WebGPUDelegate:
    if backend_id != BACKEND_ID:
        raise ProgramFormatError(
            f"the program delegates to backend {backend_id!r}; this runtime runs only {BACKEND_ID!r} delegates"
        )
    return WebGPUDelegate(blob)
