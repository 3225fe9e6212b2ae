"""executorch_wgpu: an ExecuTorch backend delegate that runs int4 group-quantized linears on WebGPU (wgpu).

Lowering:  from executorch_wgpu import WebGPUPartitioner
Running:   from executorch_wgpu.runtime import Runtime
"""

__version__ = "0.1.0"


def __getattr__(name):
    # The partitioner pulls in torch.export/ExecuTorch machinery; import it on
    # first use so `executorch_wgpu.runtime` stays light.
    if name == "WebGPUPartitioner":
        from executorch_wgpu.backend.partitioner import WebGPUPartitioner

        return WebGPUPartitioner
    if name == "WebGPUBackend":
        from executorch_wgpu.backend.preprocess import WebGPUBackend

        return WebGPUBackend
    raise AttributeError(f"module 'executorch_wgpu' has no attribute {name!r}")


__all__ = ["WebGPUPartitioner", "WebGPUBackend", "__version__"]
