"""Python runtime: loads a .pte and runs it, delegate blobs on wgpu, other ops on the CPU."""
