"""Every exception executorch_wgpu raises on purpose derives from WebGPUDelegateError."""


class WebGPUDelegateError(Exception):
    """Base class of this package's errors."""


class BlobFormatError(WebGPUDelegateError):
    """A delegate blob is truncated, corrupted, or not one of ours."""


class BlobVersionError(BlobFormatError):
    """A delegate blob was written with a schema version this reader does not know."""


class ProgramFormatError(WebGPUDelegateError):
    """A .pte file is truncated, corrupted, or uses a feature this runtime lacks."""


class InputError(WebGPUDelegateError, ValueError):
    """Inputs to Method.execute do not match what the program was exported for."""


class NoAdapterError(WebGPUDelegateError):
    """wgpu found no usable GPU adapter (not even a software Vulkan such as lavapipe)."""


class UnsupportedOperatorError(WebGPUDelegateError):
    """The program calls an operator the Python runtime cannot run."""


class OperatorError(WebGPUDelegateError):
    """An operator of the program failed while the method ran, on inputs that passed the method's checks.

    Neither the input nor the file is known to be at fault: the message names the
    operator, the instruction and what the operator said."""
