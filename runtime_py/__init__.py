"""Python runtime: loads a .pte and runs it, delegate blobs on wgpu, other ops on the CPU."""

from executorch_wgpu.runtime.program import Method, Program, Runtime

__all__ = ["Runtime", "Program", "Method"]
