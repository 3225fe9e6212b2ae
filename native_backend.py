"""Importing this module registers WebGPUBackend, the native delegate, with ExecuTorch's runtime.

    import executorch_wgpu.native_backend  # noqa: F401
    from executorch.runtime import Runtime
    method = Runtime.get().load_program("model.pte").load_method("forward")

As ExecuTorch's own add-ons do (`import executorch.kernels.quantized` registers
its kernels), the import loads libexecutorch_wgpu_native.so into the process:
executorch_wgpu.native.register(). Where it cannot, the import raises
NativeUnavailableError saying how to build the library or where to point
EXECUTORCH_WGPU_NATIVE_LIB, rather than leaving ExecuTorch to say later only
"Backend WebGPUBackend is not registered".
"""

from executorch_wgpu.native import NativeLibrary, register

library: NativeLibrary = register()   # its C API: route report (take_calls), adapter, ...

__all__ = ["library"]
