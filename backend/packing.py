"""Pack a q4gsw linear layer into the layout shaders/*.wgsl read (see schema.fbs).

q4gsw: int4 codes c in [-8, 7], one fp32 scale per group of `group_size`
consecutive input channels of an output column, zero point 0;
W[n, k] = c[n, k] * scale[n, k // group_size].
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from executorch_wgpu.backend.serialization.blob import GROUP_ALIGN, N_ALIGN, QW_BLOCK, round_up


def q4gsw_shape_problem(in_features: int, out_features: int, group_size: int) -> Optional[str]:
    """Why the packing and kernels cannot take this shape, or None when they can.

    The one place the shape preconditions live:
      * group_size is a multiple of 32: a packed u32 word (8 nibbles) never
        straddles two groups, and the GEMV reads a group 4 words (32 k) at a time;
      * K % group_size == 0 (torchao's PerGroup needs it too);
      * any N >= 1: columns are padded to a multiple of 16 (N_ALIGN) at pack time.
    """
    if group_size <= 0 or group_size % GROUP_ALIGN:
        return f"group size {group_size} is not a multiple of {GROUP_ALIGN}"
    if in_features % group_size:
        return f"in_features {in_features} is not a multiple of group size {group_size}"
    if out_features < 1:
        return f"out_features {out_features} < 1"
    return None


def pack_q4gsw_weights(codes: torch.Tensor) -> np.ndarray:
    """int codes [N, K] in [-8, 7] -> uint32 [n_stride / 16][K / 8][16].

    Word (k8, n) holds k = 8*k8 + j in nibble j as code + 8 and sits at
    (n / 16) * (K / 8) * 16 + k8 * 16 + n % 16: blocks of 16 columns, each one
    contiguous run over K, so a GEMV workgroup (16 columns) streams its
    weights in order. Padded columns hold code 0 (nibble 8): exactly 0.
    """
    n, k = codes.shape
    if k % 8:
        raise ValueError(f"in_features {k} is not a multiple of 8")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < -8 or c.max() > 7):
        raise ValueError("int4 codes must lie in [-8, 7]")
    n_stride = round_up(n, N_ALIGN)
    nibbles = torch.full((n_stride, k), 8, dtype=torch.int64)
    nibbles[:n] = c + 8
    shifts = torch.arange(8, dtype=torch.int64) * 4
    words = (nibbles.view(n_stride, k // 8, 8) << shifts).sum(dim=-1)  # [n_stride, K/8]
    blocks = words.view(n_stride // QW_BLOCK, QW_BLOCK, k // 8).transpose(1, 2)   # [blocks, K/8, 16]
    return blocks.contiguous().numpy().astype(np.uint32).reshape(-1)


def pack_q4gsw_scales(scales: torch.Tensor) -> np.ndarray:
    """fp32 scales [N, K / gs] -> float32 [n_stride / 16][K / gs][16], blocked like the weights; padding 0."""
    n, groups = scales.shape
    n_stride = round_up(n, N_ALIGN)
    out = np.zeros((n_stride, groups), dtype=np.float32)
    out[:n] = scales.detach().to(torch.float32).numpy()
    return np.ascontiguousarray(out.reshape(n_stride // QW_BLOCK, QW_BLOCK, groups).transpose(0, 2, 1)).reshape(-1)


def unpack_q4gsw_weights(words: np.ndarray, in_features: int, out_features: int) -> torch.Tensor:
    """Inverse of pack_q4gsw_weights: int8 codes [N, K]."""
    n_stride = round_up(out_features, N_ALIGN)
    blocks = torch.from_numpy(words.astype(np.int64).reshape(n_stride // QW_BLOCK, in_features // 8, QW_BLOCK))
    w = blocks.transpose(1, 2).reshape(n_stride, in_features // 8)      # [n_stride, K/8]
    shifts = torch.arange(8, dtype=torch.int64) * 4
    nibbles = (w.unsqueeze(-1) >> shifts) & 0xF                        # [n_stride, K/8, 8]
    codes = nibbles.reshape(n_stride, in_features) - 8
    return codes[:out_features].to(torch.int8)
