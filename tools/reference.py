"""Random q4gsw layers and fp64 references: goldens, relative error -- for bench, tune and the tests;
and one registry kernel run once on given buffers (run_registry_kernel), for the graph kernels' tests.

A golden is computed in fp64 from what a layer *is* -- its int4 codes and
per-group scales, or torchao's quantized weight tensor -- never from our
packing or kernels, so that it can judge them.

    layer = random_q4_layer(k=256, n=64, group_size=32, bias=True, seed=0)
    gpu = Q4LinearGPU(gpu_context(), layer.record("probe", RouteOptions(prefill_route="shmem")))
    y, call = gpu(x)
    assert rel_err(y, layer.golden(x)) < 1e-4

    model = quantize_q4(torch.nn.Sequential(torch.nn.Linear(256, 64)))
    assert rel_err(y, golden_linear(x, model[0])) < 1e-4
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from executorch_wgpu.backend.packing import pack_q4gsw_scales, pack_q4gsw_weights
from executorch_wgpu.backend.routing import RouteOptions, decide_route
from executorch_wgpu.backend.serialization.blob import N_ALIGN, Q4LinearRecord, round_up
from executorch_wgpu.shaders import registry

# Output columns per block of a golden: lm_head's W (128256 x 2048) would be 2 GB in fp64 at once.
GOLDEN_COLUMN_BLOCK = 8192


@dataclass
class RandomQ4Layer:
    """A q4gsw layer's truth: int4 codes, per-group scales (symmetric: zero point 0), an optional bias."""

    codes: torch.Tensor            # int8 [N, K] in [-8, 7]
    scales: torch.Tensor           # fp32 [N, K / group_size]
    bias: Optional[torch.Tensor]   # fp32 [N], or None
    group_size: int

    @property
    def K(self) -> int:
        return int(self.codes.shape[1])

    @property
    def N(self) -> int:
        return int(self.codes.shape[0])

    def dequantized(self, cols: slice = slice(None), dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """W[cols] = codes * scale of the group, [columns, K], in fp64 unless asked otherwise."""
        codes = self.codes[cols].to(dtype)
        return codes * self.scales[cols].to(dtype).repeat_interleave(self.group_size, dim=1)

    def golden(self, x: torch.Tensor, column_block: int = GOLDEN_COLUMN_BLOCK) -> torch.Tensor:
        """fp64 x @ W^T + b (x: [..., K]), computed a block of output columns at a time."""
        blocks = [x.double() @ self.dequantized(slice(c, c + column_block)).T for c in range(0, self.N, column_block)]
        y = torch.cat(blocks, dim=-1)
        return y if self.bias is None else y + self.bias.double()

    def record(self, name: str = "layer", routes: RouteOptions = RouteOptions(), m_min: int = 1,
               m_max: int = 4096) -> Q4LinearRecord:
        """The layer packed as a delegate blob's record, routed as a lowering with these route options routes it."""
        return Q4LinearRecord(
            name=name, in_features=self.K, out_features=self.N, group_size=self.group_size,
            n_stride=round_up(self.N, N_ALIGN), m_min=m_min, m_max=m_max,
            qweight=pack_q4gsw_weights(self.codes), scales=pack_q4gsw_scales(self.scales),
            bias=None if self.bias is None else self.bias.numpy(),
            route=decide_route(self.K, self.N, self.group_size, routes),
            prefill_precision=routes.prefill_precision,
        )


def random_q4_layer(k: int, n: int, group_size: int = 32, bias: bool = False, seed: int = 0) -> RandomQ4Layer:
    """A layer of K inputs and N outputs with uniform int4 codes, scales in [0.005, 0.055), N(0, 1) bias."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, k // group_size, generator=g) * 0.05 + 0.005
    return RandomQ4Layer(codes, scales, torch.randn(n, generator=g) if bias else None, group_size)


def dequantized_weight(linear: torch.nn.Linear) -> torch.Tensor:
    """fp64 W = codes * scale of a torchao-quantized Linear, read from torchao's own tensor (not our packing)."""
    w: Any = linear.weight   # torchao's IntxUnpackedToInt8Tensor: int codes in .qdata, .scale, .zero_point
    assert bool((w.zero_point == 0).all()), "the golden assumes symmetric quantization (zero point 0)"
    codes, scales = w.qdata.double(), w.scale.double()
    return codes * scales.repeat_interleave(codes.shape[1] // scales.shape[1], dim=1)


def golden_linear(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """fp64 x @ W^T + b of a torchao-quantized Linear."""
    y = x.double() @ dequantized_weight(linear).T
    return y if linear.bias is None else y + linear.bias.double()


# The bar of an f16 kernel (registry VARIANTS: shmem_f16), where the fp32 kernels keep 1e-4. It rounds x and
# the dequantized weights to f16 once each (relative error 2^-12 each) and sums 32 products at a time in f16 (each
# add rounds to 2^-12 of the running sum), those sums in f32. On random layers (uniform int4 codes, scales in
# [0.005, 0.055), x ~ N(0, 1)) that measures 2-4e-4 from the rounded inputs alone and 0.7-1.2e-3 in all, in
# rel_err's metric; 2e-3 leaves under 2x headroom, so an f16 sum over a whole K or a second rounding would fail it.
F16_TOLERANCE = 2e-3

# The bar of an int8 kernel (registry VARIANTS: shmem_int8). Its integer sums are exact; its error is that of
# rounding x to int8 per block of 32 k (up to max |x| / 254 an element): on random layers (as above) 4.8-6.6e-3
# in rel_err's metric, on the tests' shapes and the 1b model's alike (lavapipe, M 2-257); 1.5e-2 leaves over 2x
# headroom. Against the int8 math's own emulation (int8_activations) it keeps INT8_EMULATION_TOLERANCE.
INT8_TOLERANCE = 1.5e-2
# ... which is the fp32 bar's order: the kernel's sums are the emulation's up to f32 rounding (~1e-7), except
# that a device's x * (127 / max) may round an element in a million to the code beside the emulation's (its
# division need not be IEEE's: lavapipe multiplies by a reciprocal), each such row then 1-3e-4 off.
INT8_EMULATION_TOLERANCE = 1e-3

# The error bar of a kernel computing in each precision (registry Kernel.precision), against the fp64 golden.
TOLERANCES = {"fp32": 1e-4, "f16": F16_TOLERANCE, "int8": INT8_TOLERANCE}

# The int8 prefill's block of k per activation scale (quantize_int8).
INT8_BLOCK = registry.kernel("quantize_int8").constants["INT8_BLOCK"]


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x as an int8 prefill kernel (registry VARIANTS: shmem_int8) sees it, in fp64: each row's block of
    INT8_BLOCK k quantized symmetrically to codes -127..127 (scale max |x| / 127, round half to even) and
    dequantized. The codes are chosen in f32, as the kernel computes x * (127 / max) (an fp64 product rounds a
    few elements in a million to the other side of a half); the rest is fp64. A layer's
    golden(int8_activations(x)) is then the int8 math's exact result (its integer sums are exact), up to a
    device whose f32 division differs from IEEE's in the last place (WGSL allows 2.5 ulp)."""
    xf = x.detach().float()
    blocks = xf.reshape(*xf.shape[:-1], xf.shape[-1] // INT8_BLOCK, INT8_BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    codes = torch.round(blocks * inv).clamp(-127, 127)
    return (codes.double() * (amax.double() / 127.0)).reshape(xf.shape)


def rel_err(got: torch.Tensor, golden: torch.Tensor) -> float:
    """max |got - golden| / max |golden|, in fp64."""
    got, golden = got.detach().double(), golden.detach().double()
    return float((got - golden).abs().max() / golden.abs().max())


# ---- one registry kernel, once: the graph kernels against their goldens ------------------------------

def f32_bits(x: float) -> int:
    """The bits of x as an f32: what a Params field declared f32 carries."""
    return int(np.array(x, dtype=np.float32).view(np.uint32))


def _kernel_buffer(data: np.ndarray, usage: int):
    """A buffer holding `data`, its size rounded up to a multiple of 16 bytes (never 0)."""
    from executorch_wgpu.runtime_py.gpu import gpu_context

    raw = np.ascontiguousarray(data).view(np.uint8).ravel()
    padded = np.zeros(max(16, -(-raw.size // 16) * 16), dtype=np.uint8)
    padded[: raw.size] = raw
    return gpu_context().device.create_buffer_with_data(data=padded, usage=usage)


_resized_pipelines: Dict[Tuple[str, int], Any] = {}


def _kernel_pipeline(name: str, workgroup_x: Optional[int]):
    """The kernel's pipeline; with workgroup_x, compiled with that WORKGROUP_X instead of the registry's."""
    from executorch_wgpu.runtime_py.gpu import gpu_context
    from executorch_wgpu.shaders import registry

    ctx = gpu_context()
    registered = registry.kernel(name).workgroup_size[0]
    if workgroup_x is None or workgroup_x == registered:
        return ctx.pipeline(name)
    if (name, workgroup_x) not in _resized_pipelines:
        const = "const WORKGROUP_X: u32 = {}u;"
        source = registry.wgsl_source(name)
        assert const.format(registered) in source
        module = ctx.device.create_shader_module(code=source.replace(const.format(registered),
                                                                     const.format(workgroup_x)))
        layout = ctx.device.create_pipeline_layout(bind_group_layouts=[ctx.bind_group_layout(name)])
        _resized_pipelines[name, workgroup_x] = ctx.device.create_compute_pipeline(
            layout=layout, compute={"module": module, "entry_point": "main"})
    return _resized_pipelines[name, workgroup_x]


def run_registry_kernel(name: str, grid: Sequence[int], params: Mapping[str, Union[int, float]],
                        inputs: Mapping[str, np.ndarray], out: np.ndarray,
                        workgroup_x: Optional[int] = None,
                        other_outputs: Optional[Mapping[str, np.ndarray]] = None) -> np.ndarray:
    """Dispatch registry kernel `name` once on `grid` workgroups and return its storage binding (`out`,
    or sdpa_split's `partial`).

    params: Params fields by name (a float is written as its f32 bits; fields not named are 0);
    inputs: arrays (float32 or uint32) for the read-only bindings by name, absent ones get 16 zero bytes;
    out: the initial contents of the storage binding (float32), read back, of the same size, after the dispatch;
    workgroup_x: compile the kernel with this WORKGROUP_X rather than the registry's;
    other_outputs: float32 arrays for further storage bindings by name (initial contents in, results
    written back in place); storage bindings not named get a copy of `out`.
    """
    import wgpu

    from executorch_wgpu.runtime_py.gpu import gpu_context
    from executorch_wgpu.shaders import registry

    kernel = registry.kernel(name)
    unknown = set(params) - set(kernel.params)
    assert not unknown, f"{name} has no Params fields {sorted(unknown)}"
    words = [f32_bits(v) if isinstance(v, float) else int(v) for v in (params.get(f, 0) for f in kernel.params)]
    ctx = gpu_context()
    dev = ctx.device
    out = np.ascontiguousarray(out, dtype=np.float32)
    buffers: Dict[str, Any] = {}
    for b in kernel.layout:
        if b.kind == "uniform":
            buffers[b.name] = _kernel_buffer(np.array(words, dtype=np.uint32), wgpu.BufferUsage.UNIFORM)
        elif b.kind == "storage":
            initial = (other_outputs or {}).get(b.name, out)
            buffers[b.name] = _kernel_buffer(initial, wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC)
        else:
            buffers[b.name] = _kernel_buffer(inputs.get(b.name, np.zeros(4, np.uint32)), wgpu.BufferUsage.STORAGE)
    assert set(inputs) <= set(buffers), f"{name} has no bindings {sorted(set(inputs) - set(buffers))}"
    bind_group = dev.create_bind_group(layout=ctx.bind_group_layout(name), entries=[
        {"binding": i, "resource": {"buffer": buffers[b.name], "offset": 0, "size": buffers[b.name].size}}
        for i, b in enumerate(kernel.layout)])
    encoder = dev.create_command_encoder()
    cpass = encoder.begin_compute_pass()
    cpass.set_pipeline(_kernel_pipeline(name, workgroup_x))
    cpass.set_bind_group(0, bind_group)
    cpass.dispatch_workgroups(*grid)
    cpass.end()
    dev.queue.submit([encoder.finish()])
    for name, array in (other_outputs or {}).items():
        array[...] = np.frombuffer(dev.queue.read_buffer(buffers[name]), dtype=np.float32)[: array.size].reshape(
            array.shape)
    written = next(b.name for b in kernel.layout if b.kind == "storage")
    result = np.frombuffer(dev.queue.read_buffer(buffers[written]), dtype=np.float32)
    return result[: out.size].reshape(out.shape).copy()
