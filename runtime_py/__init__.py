"""Python runtime: loads a .pte and runs it, delegate blobs on wgpu, other ops on the CPU.

Users import it as `executorch_wgpu.runtime` (runtime.py), shaped like `executorch.runtime`.
"""
