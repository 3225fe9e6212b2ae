"""make_q4_ready: get a model, transformers' included, into the shape q4gsw quantization and lowering need.

Three things keep a model's linears off the GPU, each fixed here in place:
  * GPT-2 (and other OpenAI-GPT-style transformers models) compute their
    projections with `transformers.pytorch_utils.Conv1D` (weight [in, out],
    y = x @ W + b), which torchao's quantize_ does not touch: each becomes the
    equivalent `nn.Linear` (weight transposed; same outputs);
  * a bfloat16 or float16 checkpoint quantizes to scales of that dtype, which
    the partitioner declines: floating parameters and buffers of those dtypes
    become float32;
  * a linear whose in_features is not a multiple of the group size cannot be
    quantized per group: the returned filter_fn leaves it out of quantize_, so
    it stays a plain (fp32, CPU) linear instead of failing.

    import torch
    from torchao.quantization import quantize_, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from transformers import GPT2LMHeadModel
    from executorch_wgpu.backend.prepare import make_q4_ready

    model = GPT2LMHeadModel.from_pretrained("gpt2", dtype=torch.bfloat16).eval()
    filter_fn = make_q4_ready(model, group_size=32)     # Conv1D -> nn.Linear, bf16 -> fp32
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
              filter_fn=filter_fn)
    # then torch.export + to_edge_transform_and_lower(..., partitioner=[WebGPUPartitioner()]) (README, Use)
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, List, Optional, Tuple, cast

import torch

from executorch_wgpu.backend.serialization.blob import GROUP_ALIGN

log = logging.getLogger(__name__)

HALF_DTYPES = (torch.bfloat16, torch.float16)


def make_q4_ready(model: torch.nn.Module, group_size: int = 32) -> Callable[[torch.nn.Module, str], bool]:
    """Prepares `model` in place for q4gsw quantization at `group_size`; returns the filter_fn for quantize_.

    In place: every transformers `Conv1D` becomes an `nn.Linear` computing the same
    function, and every bfloat16/float16 parameter and buffer becomes float32 (tied
    parameters stay tied). The returned filter_fn(module, fqn) accepts exactly the
    `nn.Linear` modules whose in_features is a multiple of `group_size`; pass it to
    torchao's quantize_ with IntxWeightOnlyConfig(weight_dtype=torch.int4,
    granularity=PerGroup(group_size)). Layers it skips are logged (INFO) and stay fp32.

    Raises ValueError (before touching the model) when group_size is not a positive
    multiple of 32, the group sizes the kernels run.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or group_size % GROUP_ALIGN:
        raise ValueError(f"group_size must be a positive multiple of {GROUP_ALIGN}, the group sizes the kernels run, "
                         f"got {group_size!r}: use make_q4_ready(model, group_size=32) (or 64, 128) and the same "
                         f"PerGroup(group_size) in quantize_")
    converted = conv1d_to_linear(model)
    cast_tensors = cast_half_to_fp32(model)
    if converted or cast_tensors:
        log.info("make_q4_ready: %d Conv1D layers made nn.Linear, %d bf16/fp16 tensors cast to fp32",
                 len(converted), cast_tensors)

    def filter_fn(module: torch.nn.Module, fqn: str) -> bool:
        if not isinstance(module, torch.nn.Linear):
            return False
        if module.in_features % group_size:
            log.info("make_q4_ready: %s stays unquantized (fp32, on the CPU): in_features %d is not a multiple of "
                     "group size %d", fqn or "<model>", module.in_features, group_size)
            return False
        return True

    return filter_fn


def conv1d_to_linear(model: torch.nn.Module) -> List[str]:
    """Replaces every transformers Conv1D under `model` with the equivalent nn.Linear; returns their names.

    Conv1D(nf, nx) computes y = x @ W + b with W of shape [nx, nf] (in, out); nn.Linear
    computes y = x @ weight.T + bias, so weight = W.T ([out, in]), bias = b.
    """
    # Only a model built by transformers can hold its Conv1D, and then transformers is already imported:
    # without it in sys.modules there is nothing to convert, and nothing to import.
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    if pytorch_utils is None:
        return []
    conv1d = pytorch_utils.Conv1D
    found: List[Tuple[torch.nn.Module, str, str, torch.nn.Module]] = [
        (parent, child_name, f"{parent_name}.{child_name}" if parent_name else child_name, child)
        for parent_name, parent in model.named_modules()
        for child_name, child in parent.named_children()
        if isinstance(child, conv1d)
    ]
    for parent, child_name, _, conv in found:
        setattr(parent, child_name, linear_from_conv1d(conv))
    return [name for _, _, name, _ in found]


def linear_from_conv1d(conv: torch.nn.Module) -> torch.nn.Linear:
    weight = cast(torch.Tensor, conv.weight)                             # [in, out]
    bias = cast(Optional[torch.Tensor], getattr(conv, "bias", None))
    in_features, out_features = weight.shape
    linear = torch.nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device,
                             dtype=weight.dtype)
    with torch.no_grad():
        linear.weight = torch.nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
        if bias is not None:
            linear.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    linear.train(conv.training)
    return linear


def cast_half_to_fp32(model: torch.nn.Module) -> int:
    """bfloat16/float16 parameters and buffers -> float32, in place; returns how many were cast.

    Parameters keep their identity (their .data is replaced), so tied weights stay tied.
    Other dtypes (fp64, integer, bool) are left as they are. A transformers config's
    dtype is set to float32 too, so the model describes itself as what it now is.
    """
    count = 0
    for param in model.parameters():
        if param.dtype in HALF_DTYPES:
            param.data = param.data.to(torch.float32)
            count += 1
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.dtype in HALF_DTYPES:
                module._buffers[name] = buf.to(torch.float32)
                count += 1
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "dtype", None) in HALF_DTYPES:   # transformers >= 4.56: `dtype`
        config.dtype = torch.float32
    return count
