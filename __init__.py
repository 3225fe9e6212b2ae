"""executorch_wgpu: an ExecuTorch backend delegate that runs int4 group-quantized models on WebGPU (wgpu).

Lowering:  from executorch_wgpu import WebGPUPartitioner
Running:   from executorch_wgpu.runtime import Runtime
Native:    import executorch_wgpu.native_backend   # registers WebGPUBackend with ExecuTorch's own runtime
"""

import typing as _typing

__version__ = "0.1.0"

if _typing.TYPE_CHECKING:   # what type checkers see; at run time __getattr__ imports them
    from executorch_wgpu.backend.partitioner import WebGPUPartitioner
    from executorch_wgpu.backend.prepare import make_q4_ready
    from executorch_wgpu.backend.preprocess import WebGPUBackend

# Public name -> the module that defines it. They are imported on first use: the
# partitioner and preprocess pull in torch.export/ExecuTorch's exporter (seconds),
# which `import executorch_wgpu` and `executorch_wgpu.runtime` do not need.
_LAZY = {
    "WebGPUPartitioner": "executorch_wgpu.backend.partitioner",
    "WebGPUBackend": "executorch_wgpu.backend.preprocess",
    "make_q4_ready": "executorch_wgpu.backend.prepare",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value   # later lookups skip this function
        return value
    raise AttributeError(f"module 'executorch_wgpu' has no attribute {name!r}")


def __dir__():
    # The lazy names too, so dir() and completion list the API before first use.
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["WebGPUPartitioner", "WebGPUBackend", "make_q4_ready", "__version__"]
