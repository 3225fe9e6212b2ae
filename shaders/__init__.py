"""WGSL kernels, one per file, shipped as package data (read with importlib.resources)."""
