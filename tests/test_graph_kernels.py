"""The graph kernels (elementwise, reduce_rows, embedding, sdpa, sdpa_flash, sdpa_split + sdpa_combine), one
dispatch each, against fp64 goldens.

Each test fills the kernel's Params by the registry's field names, binds numpy arrays in the registry's
layout order and dispatches one grid (run_kernel below), as the graph delegate's lowering will. Shapes
are small and odd (lavapipe runs these on the CPU): partial workgroups, n below and above 256, D not a
power of two. sdpa is checked against ExecuTorch's own llama::custom_sdpa as well as fp64.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from executorch_wgpu.shaders import registry
from executorch_wgpu.tools.reference import f32_bits, rel_err, run_registry_kernel

BAR = 1e-4                            # relative error bar of every comparison with a golden
OPS = registry.ELEMENTWISE_OPS
REDUCE = registry.REDUCE_OPS
RANK = registry.ELEMENTWISE_RANK
WG = registry.kernel("elementwise").workgroup_size[0]   # invocations per workgroup of the 1-D kernels
SENTINEL = 12345.0                    # what `out` holds where a kernel must not write

Grid = Tuple[int, int, int]
ParamValue = Union[int, float]
Golden = Callable[..., torch.Tensor]


# ---- running one kernel once ---------------------------------------------------------------------

def groups(n: int) -> int:
    return -(-n // WG)


def tensor(shape: Sequence[int], seed: int, low: Optional[float] = None, high: Optional[float] = None) -> torch.Tensor:
    """float32 N(0, 1) values, or uniform in [low, high)."""
    g = torch.Generator().manual_seed(seed)
    if low is None or high is None:
        return torch.randn(*shape, generator=g)
    return torch.rand(*shape, generator=g) * (high - low) + low


def np32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


# ---- elementwise ---------------------------------------------------------------------------------

def elementwise_params(op: str, shape: Sequence[int], a_strides: Sequence[int],
                       b_strides: Optional[Sequence[int]] = None, out_strides: Optional[Sequence[int]] = None,
                       **fields: ParamValue) -> Dict[str, ParamValue]:
    """Params of one elementwise dispatch over `shape` (padded to RANK with leading 1s, strides 0);
    out contiguous unless out_strides says otherwise; fields: the rest (offsets, scalar_bits, ...)."""
    pad = RANK - len(shape)
    out_strides = out_strides if out_strides is not None else torch.empty(*shape).stride()
    p: Dict[str, ParamValue] = {"n": math.prod(shape), "op": OPS[op], **fields}
    for prefix, values in (("d", shape), ("sa", a_strides), ("sb", b_strides or [0] * len(shape)),
                           ("so", out_strides)):
        assert len(values) == len(shape)
        for i, v in enumerate([1 if prefix == "d" else 0] * pad + list(values)):
            p[f"{prefix}{i}"] = v
    return p


def broadcast_strides(operand: torch.Tensor, shape: Sequence[int]) -> Tuple[int, ...]:
    """The strides that read a contiguous `operand` broadcast to `shape` (0 on broadcast dims)."""
    return operand.contiguous().broadcast_to(tuple(shape)).stride()


def _silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b


BINARY_GOLDEN: Dict[str, Golden] = {
    "OP_ADD": torch.add, "OP_SUB": torch.sub, "OP_MUL": torch.mul, "OP_DIV": torch.div, "OP_POW": torch.pow,
    "OP_MAX": torch.maximum, "OP_MIN": torch.minimum, "OP_SILU_MUL": _silu_mul,
}


def binary_operands(op: str, a_shape: Sequence[int], b_shape: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Operands in the op's domain: pow of a positive base; no division by values near 0."""
    if op == "OP_POW":
        return tensor(a_shape, 1, 0.5, 2.0), tensor(b_shape, 2, -2.0, 2.0)
    b = tensor(b_shape, 2)
    if op == "OP_DIV":
        b = torch.where(b < 0, -1.0, 1.0) * tensor(b_shape, 3, 0.5, 2.0)
    return tensor(a_shape, 1), b


@pytest.mark.parametrize("op", list(BINARY_GOLDEN))
def test_binary_op_broadcasts_both_operands_through_zero_strides(op):
    shape = (3, 5, 37)                               # 555 outputs: three workgroups, the last partial
    a, b = binary_operands(op, (3, 1, 37), (5, 1))   # a broadcast over dim 1, b over dims 0 and 2
    params = elementwise_params(op, shape, broadcast_strides(a, shape), broadcast_strides(b, shape))
    got = run_registry_kernel("elementwise", (groups(555), 1, 1), params, {"a": np32(a), "b": np32(b)}, np.zeros(shape))
    assert rel_err(torch.from_numpy(got), BINARY_GOLDEN[op](a.double(), b.double())) < BAR


@pytest.mark.parametrize("op,scalar", [("OP_ADD", 0.75), ("OP_SUB", -1.5), ("OP_MUL", 2.5), ("OP_DIV", 3.0),
                                       ("OP_POW", 0.5), ("OP_MAX", 0.25), ("OP_MIN", -0.25),
                                       ("OP_SILU_MUL", -1.25)])
def test_binary_op_takes_b_from_the_scalar_field(op, scalar):
    a = tensor((7, 41), 4, 0.1, 3.0) if op == "OP_POW" else tensor((7, 41), 4)
    params = elementwise_params(op, (7, 41), a.stride(), scalar_bits=scalar, b_is_scalar=1)
    got = run_registry_kernel("elementwise", (groups(287), 1, 1), params, {"a": np32(a)}, np.zeros((7, 41)))
    golden = BINARY_GOLDEN[op](a.double(), torch.tensor(scalar, dtype=torch.float64))
    assert rel_err(torch.from_numpy(got), golden) < BAR


@pytest.mark.parametrize("exponent", [2.0, 3.0, -1.0, 0.0, 1.0, 0.5])
def test_pow_of_any_base_with_an_integer_exponent_follows_torch(exponent):
    # x.pow(2) of a signed activation is common (norms, variances); WGSL's pow is undefined for a
    # negative base, the kernel's must not be. A fractional exponent of a negative base is NaN in both.
    a = torch.cat([tensor((61,), 5, -3.0, 3.0), torch.tensor([0.0, -0.0, 1.0, -1.0, -2.0])])
    if exponent < 0:
        a = torch.where(a.abs() < 0.1, 0.5, a)        # keep 1/x away from 0
    params = elementwise_params("OP_POW", (a.numel(),), (1,), scalar_bits=exponent, b_is_scalar=1)
    got = torch.from_numpy(run_registry_kernel("elementwise", (1, 1, 1), params, {"a": np32(a)}, np.zeros(a.numel())))
    golden = torch.pow(a.double(), exponent)
    nan = golden.isnan()
    assert torch.equal(got.isnan(), nan)
    assert rel_err(got[~nan], golden[~nan]) < BAR


def _gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _relu(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x)


POSITIVE = (0.05, 6.0)
WIDE = (-12.0, 12.0)
# Each unary op: its fp64 golden and the range its inputs are drawn from (its domain).
UNARY: Dict[str, Tuple[Golden, Tuple[float, float]]] = {
    "OP_COPY": (torch.clone, WIDE), "OP_NEG": (torch.neg, WIDE), "OP_RSQRT": (torch.rsqrt, POSITIVE),
    "OP_SQRT": (torch.sqrt, POSITIVE), "OP_EXP": (torch.exp, (-10.0, 10.0)), "OP_SIGMOID": (torch.sigmoid, WIDE),
    "OP_SILU": (F.silu, WIDE), "OP_TANH": (torch.tanh, WIDE), "OP_GELU_ERF": (_gelu_erf, WIDE),
    "OP_GELU_TANH": (_gelu_tanh, WIDE), "OP_RECIPROCAL": (torch.reciprocal, POSITIVE), "OP_ABS": (torch.abs, WIDE),
    "OP_LOG": (torch.log, POSITIVE), "OP_COS": (torch.cos, WIDE), "OP_SIN": (torch.sin, WIDE),
    "OP_RELU": (_relu, WIDE),
}


def test_every_op_of_the_registry_is_tested():
    assert set(BINARY_GOLDEN) == {name for name, code in OPS.items() if code < OPS["OP_COPY"]}
    assert set(UNARY) == {name for name, code in OPS.items() if code >= OPS["OP_COPY"]}


@pytest.mark.parametrize("op", list(UNARY))
def test_unary_op_matches_torch_in_fp64(op):
    golden_fn, (low, high) = UNARY[op]
    shape = (7, 41)
    a = tensor(shape, 6, low, high)
    params = elementwise_params(op, shape, a.stride())
    got = run_registry_kernel("elementwise", (groups(a.numel()), 1, 1), params, {"a": np32(a)}, np.zeros(shape))
    assert rel_err(torch.from_numpy(got), golden_fn(a.double())) < BAR


def test_gelu_erf_matches_torch_exact_gelu_pointwise_near_zero_and_in_the_tails():
    a = torch.cat([torch.linspace(-6.0, 6.0, 241), torch.tensor([-30.0, -9.0, 1e-3, -1e-3, 9.0, 30.0])])
    params = elementwise_params("OP_GELU_ERF", (a.numel(),), (1,))
    got = torch.from_numpy(run_registry_kernel("elementwise", (groups(a.numel()), 1, 1), params, {"a": np32(a)},
                                      np.zeros(a.numel()))).double()
    golden = F.gelu(a.double())
    assert ((got - golden).abs() <= 1e-6 + 1e-4 * golden.abs()).all()


@pytest.mark.parametrize("op", ["OP_EXP", "OP_SIGMOID", "OP_SILU", "OP_TANH", "OP_GELU_ERF", "OP_GELU_TANH"])
def test_saturating_unary_op_stays_finite_for_large_inputs(op):
    # exp(-x) or tanh's inner term overflows f32 here: the result must saturate, not turn NaN.
    large = [-1000.0, -100.0, -88.0, -40.0, 40.0, 88.0, 100.0, 1000.0]
    a = torch.tensor([x for x in large if op != "OP_EXP" or x <= 88.0])   # exp(88) is f32's largest power of e
    params = elementwise_params(op, (a.numel(),), (1,))
    got = torch.from_numpy(run_registry_kernel("elementwise", (1, 1, 1), params, {"a": np32(a)}, np.zeros(a.numel())))
    golden = UNARY[op][0](a.double())
    assert torch.isfinite(got).all()
    assert ((got.double() - golden).abs() <= 1e-4 * golden.abs() + 1e-30).all()


def test_copy_permutes_a_strided_input():
    x = tensor((4, 6, 5), 7)
    view = x.permute(2, 0, 1)                        # [5, 4, 6], strides (1, 30, 5)
    params = elementwise_params("OP_COPY", view.shape, view.stride())
    got = run_registry_kernel("elementwise", (groups(view.numel()), 1, 1), params, {"a": np32(x)}, np.zeros(view.shape))
    assert np.array_equal(got, view.contiguous().numpy())


def test_copy_reads_a_slice_from_a_offset():
    x = tensor((9, 11), 8)
    view = x[2:7, 3:10]                              # storage offset 2 * 11 + 3
    params = elementwise_params("OP_COPY", view.shape, view.stride(), a_off=int(view.storage_offset()))
    got = run_registry_kernel("elementwise", (1, 1, 1), params, {"a": np32(x)}, np.zeros(view.shape))
    assert np.array_equal(got, view.contiguous().numpy())


def test_copy_writes_new_rows_into_a_cache_at_out_off_and_nothing_else():
    C, H, D, start_pos = 10, 3, 7, 4
    new = tensor((H, 3, D), 9)                       # [H][S][D], as a transposed projection lays it out
    cache = tensor((C, H, D), 10)
    src = new.permute(1, 0, 2)                       # iterate [S][H][D] over the cache's rows
    params = elementwise_params("OP_COPY", src.shape, src.stride(), out_strides=cache.stride(),
                                out_off=start_pos * H * D)
    got = run_registry_kernel("elementwise", (1, 1, 1), params, {"a": np32(new)}, np32(cache))
    expected = cache.clone()
    expected[start_pos:start_pos + 3] = src
    assert np.array_equal(got, expected.numpy())


def test_flat_index_covers_a_grid_split_over_y_and_writes_nothing_past_n():
    n = 3 * WG * 2 - 77                              # grid (3, 2, 1) holds 1536 invocations; 1459 run
    a = tensor((n,), 11)
    params = elementwise_params("OP_NEG", (n,), (1,))
    got = run_registry_kernel("elementwise", (3, 2, 1), params, {"a": np32(a)}, np.full(n + 100, SENTINEL))
    assert np.array_equal(got[:n], -a.numpy())
    assert (got[n:] == SENTINEL).all()


# ---- reduce_rows ---------------------------------------------------------------------------------

ROWS = 5
ROWS_GRID = (3, 2, 1)   # 6 workgroups for 5 rows over a 2-D grid: row = wid.x + wid.y * 3; the last returns


def run_rows(op: str, a: torch.Tensor, out_shape: Sequence[int], w: Optional[torch.Tensor] = None,
             eps: float = 0.0) -> np.ndarray:
    rows, n = a.shape
    params = {"rows": rows, "n": n, "op": REDUCE[op], "eps_bits": f32_bits(eps), "has_w": int(w is not None)}
    inputs = {"a": np32(a)} if w is None else {"a": np32(a), "w": np32(w)}
    return run_registry_kernel("reduce_rows", ROWS_GRID, params, inputs, np.full(out_shape, SENTINEL))


@pytest.mark.parametrize("n", [37, 700])             # below one workgroup; 2.7 elements per invocation
@pytest.mark.parametrize("op,golden", [("REDUCE_SUM", lambda x: x.sum(-1)), ("REDUCE_MEAN", lambda x: x.mean(-1)),
                                       ("REDUCE_MAX", lambda x: x.amax(-1))])
def test_reduce_rows_reduces_each_row(op, golden, n):
    a = tensor((ROWS, n), 12) - 3.0                  # the max of a row is not >= 0 by chance
    got = run_rows(op, a, (ROWS + 1,))
    assert rel_err(torch.from_numpy(got[:ROWS]), golden(a.double())) < BAR
    assert got[ROWS] == SENTINEL


@pytest.mark.parametrize("n", [37, 700])
def test_softmax_rows_match_fp64_with_large_logits(n):
    a = tensor((ROWS, n), 13) * 30.0                 # exp overflows f32 unless the row max is subtracted
    got = run_rows("ROWS_SOFTMAX", a, (ROWS + 1, n))
    assert rel_err(torch.from_numpy(got[:ROWS]), torch.softmax(a.double(), -1)) < BAR
    assert (got[ROWS] == SENTINEL).all()


@pytest.mark.parametrize("n", [37, 700])
@pytest.mark.parametrize("has_w", [False, True])
def test_rms_norm_rows_with_and_without_weight(has_w, n):
    a = tensor((ROWS, n), 14) * 4.0 + 1.0
    w = tensor((n,), 15) if has_w else None
    eps = 1e-5
    got = run_rows("ROWS_RMS_NORM", a, (ROWS + 1, n), w, eps)
    x = a.double()
    golden = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        golden = golden * w.double()
    assert rel_err(torch.from_numpy(got[:ROWS]), golden) < BAR
    assert (got[ROWS] == SENTINEL).all()


@pytest.mark.parametrize("n", [37, 700])
@pytest.mark.parametrize("has_w", [False, True])
def test_layer_norm_rows_with_and_without_weight_and_bias(has_w, n):
    a = tensor((ROWS, n), 16) * 2.0 + 5.0            # a large mean: the variance must come from centred values
    weight, bias = tensor((n,), 17), tensor((n,), 18)
    eps = 1e-5
    got = run_rows("ROWS_LAYER_NORM", a, (ROWS + 1, n), torch.cat([weight, bias]) if has_w else None, eps)
    golden = F.layer_norm(a.double(), (n,), weight.double() if has_w else None, bias.double() if has_w else None,
                          eps)
    assert rel_err(torch.from_numpy(got[:ROWS]), golden) < BAR
    assert (got[ROWS] == SENTINEL).all()


# ---- embedding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [(2, 1, 1), (1, 2, 1)])   # 259 outputs, over x, or split over y
def test_embedding_gathers_rows_including_the_last(grid):
    vocab, dim = 11, 37
    table = tensor((vocab, dim), 19)
    ids = np.array([vocab - 1, 0, 3, vocab - 1, 5, 7, 1], dtype=np.uint32)
    params = {"n_ids": ids.size, "dim": dim, "vocab": vocab}
    got = run_registry_kernel("embedding", grid, params, {"a": ids, "w": np32(table)}, np.full((ids.size + 1, dim), SENTINEL))
    assert np.array_equal(got[:ids.size], table.numpy()[ids])
    assert (got[ids.size] == SENTINEL).all()


# ---- sdpa ----------------------------------------------------------------------------------------

def sdpa_golden(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int, causal: bool,
                scale: float) -> torch.Tensor:
    """fp64 attention of q [B][S][Hq][D] over caches [B][C][Hkv][D]: query s sees keys
    j <= start_pos + s when causal, j < start_pos + S otherwise, and j < C; GQA repeats each cache head."""
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    visible = min(start_pos + S, k.shape[1])     # and j < C
    keys = k[:, :visible].double().repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2)    # [B][Hq][visible][D]
    values = v[:, :visible].double().repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2)
    scores = q.double().transpose(1, 2) @ keys.transpose(-1, -2) * scale                   # [B][Hq][S][visible]
    if causal:
        j = torch.arange(visible)
        s = torch.arange(S)[:, None]
        scores = scores.masked_fill(j > start_pos + s, float("-inf"))
    return (torch.softmax(scores, -1) @ values).transpose(1, 2)                             # [B][S][Hq][D]


@pytest.fixture(scope="module")
def custom_sdpa():
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers torch.ops.llama)

    return torch.ops.llama.custom_sdpa


SDPA_CASES = {
    # name: (B, S, Hq, Hkv, D, C, start_pos, causal, scale or None for 1/sqrt(D))
    "decode_first_token_gqa": (1, 1, 8, 2, 64, 16, 0, True, None),
    "decode_gqa_d64": (1, 1, 8, 2, 64, 16, 9, True, None),
    "prefill_from_0_mha_d48": (1, 5, 4, 4, 48, 8, 0, True, None),
    "prefill_after_start_pos_gqa_d48": (1, 4, 8, 2, 48, 16, 6, True, None),
    "prefill_not_causal_gqa": (1, 3, 8, 2, 64, 12, 5, False, None),
    "decode_not_causal_mha": (1, 1, 4, 4, 48, 12, 7, False, None),
    "batch_of_two": (2, 3, 4, 2, 32, 10, 2, True, None),
    "d_not_a_multiple_of_8_explicit_scale": (1, 3, 4, 2, 50, 9, 3, True, 0.4),
    "long_cache_partial_last_chunk": (1, 2, 8, 2, 64, 330, 270, True, None),
    "d130_three_dims_per_invocation": (1, 2, 4, 1, 130, 40, 30, True, None),
    "d256": (1, 2, 2, 1, 256, 80, 69, True, None),
    "peaked_softmax": (1, 2, 4, 2, 32, 200, 150, True, 4.0),
}


# The registry's workgroup size, and 64 and 256: the kernel is written for any multiple of 64 (its
# key groups of 64 combine at the end), and 256 is the size measured fastest for decode on an H200.
SDPA_WORKGROUPS = sorted({registry.kernel("sdpa").workgroup_size[0], 64, 256})


@pytest.mark.parametrize("workgroup_x", SDPA_WORKGROUPS)
@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_sdpa_matches_custom_sdpa_and_fp64(case, workgroup_x, custom_sdpa):
    B, S, Hq, Hkv, D, C, start_pos, causal, scale = SDPA_CASES[case]
    q = tensor((B, S, Hq, D), 20)
    k, v = tensor((B, C, Hkv, D), 21), tensor((B, C, Hkv, D), 22)
    # Cache rows past start_pos + S are not attention's to read: NaN there shows if they are read.
    k[:, start_pos + S:] = float("nan")
    v[:, start_pos + S:] = float("nan")
    golden = sdpa_golden(q, k, v, start_pos, causal, scale if scale is not None else D ** -0.5)
    expected = custom_sdpa(q, k, v, start_pos, None, 0.0, causal, scale)
    assert rel_err(expected, golden) < 1e-5        # the golden states custom_sdpa's semantics
    params = {"B": B, "S": S, "Hq": Hq, "Hkv": Hkv, "D": D, "C": C, "start_pos": start_pos, "causal": int(causal),
              "scale_bits": f32_bits(scale if scale is not None else D ** -0.5)}
    got = torch.from_numpy(run_registry_kernel("sdpa", (Hq, S, B), params, {"q": np32(q), "k": np32(k), "v": np32(v)},
                                      np.zeros(q.shape), workgroup_x))
    assert not got.isnan().any()
    assert rel_err(got, golden) < BAR
    assert rel_err(got, expected) < BAR


# ---- prefill: sdpa_flash (FlashAttention-2 tiles of ROWS (position, query head) rows, D <= MAX_D) -------------

FLASH = registry.kernel("sdpa_flash").constants
FLASH_ROWS, FLASH_KEYS = FLASH["ROWS"], FLASH["KEYS"]


def run_flash_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int, causal: bool, scale: float,
                   extra: int = 0) -> torch.Tensor:
    """sdpa_flash on the grid lower_custom_sdpa gives it, (Hkv, ceil(S x G / ROWS), B), G = Hq / Hkv; `out` holds
    SENTINEL before, plus `extra` floats past q's shape that must keep it (returned flat when extra > 0)."""
    B, S, Hq, D = q.shape
    C, Hkv = k.shape[1], k.shape[2]
    params = {"B": B, "S": S, "Hq": Hq, "Hkv": Hkv, "D": D, "C": C, "start_pos": start_pos, "causal": int(causal),
              "scale_bits": f32_bits(scale)}
    grid = (Hkv, -(-S * (Hq // Hkv) // FLASH_ROWS), B)
    out = np.full(q.numel() + extra, SENTINEL)
    got = run_registry_kernel("sdpa_flash", grid, params, {"q": np32(q), "k": np32(k), "v": np32(v)}, out)
    return torch.from_numpy(got if extra else got.reshape(q.shape))


FLASH_CASES = {
    # name: (B, S, Hq, Hkv, D, C, start_pos, causal, scale or None for 1/sqrt(D)); S x G rows in tiles of ROWS (32),
    # keys in tiles of KEYS (64)
    "mha_d64_from_0_one_key_tile": (1, 45, 4, 4, 64, 64, 0, True, None),
    "gqa4_d64_chunked_prefill_batch_of_two": (2, 37, 8, 2, 64, 160, 70, True, None),
    "gqa4_d64_llama_1b_heads": (1, 19, 32, 8, 64, 40, 0, True, None),
    "gqa8_d128_chunked_prefill": (1, 29, 16, 2, 128, 100, 40, True, None),
    "gqa8_d64_many_key_tiles": (1, 70, 8, 1, 64, 300, 200, True, None),
    "gqa4_d100_not_causal_batch_of_two": (2, 19, 8, 2, 100, 90, 50, False, None),
    "mha_d128_not_causal_partial_key_tile": (1, 40, 2, 2, 128, 200, 133, False, None),
    "gqa4_d128_batch_of_two": (2, 23, 8, 2, 128, 64, 9, True, None),
    "mha_d100_one_row_into_a_second_tile": (1, 33, 2, 2, 100, 48, 15, True, None),
    "gqa4_d68_just_past_64": (1, 13, 8, 2, 68, 30, 4, True, None),
    "d50_explicit_scale": (1, 9, 4, 2, 50, 12, 3, True, 0.4),
    "d4_tiny": (1, 7, 4, 1, 4, 16, 5, True, None),
    "two_tokens": (1, 2, 8, 2, 64, 8, 0, True, None),
    "peaked_softmax": (1, 33, 4, 2, 32, 140, 80, True, 4.0),
    # C limits: a cache shorter than start_pos + S (keys j < C only)
    "cache_ends_inside_the_prompt_causal": (1, 20, 8, 2, 64, 40, 30, True, None),
    "cache_ends_inside_the_prompt_not_causal": (2, 20, 8, 2, 100, 40, 30, False, None),
}


@pytest.mark.parametrize("case", list(FLASH_CASES))
def test_flash_sdpa_matches_custom_sdpa_and_fp64(case, custom_sdpa):
    B, S, Hq, Hkv, D, C, start_pos, causal, scale = FLASH_CASES[case]
    q = tensor((B, S, Hq, D), 40)
    k, v = tensor((B, C, Hkv, D), 41), tensor((B, C, Hkv, D), 42)
    k[:, start_pos + S:] = float("nan")     # not attention's to read
    v[:, start_pos + S:] = float("nan")
    scale_f = scale if scale is not None else D ** -0.5
    golden = sdpa_golden(q, k, v, start_pos, causal, scale_f)
    extra = D * Hq   # one row of out past the last: the kernel must not write it
    got = run_flash_sdpa(q, k, v, start_pos, causal, scale_f, extra)
    assert (got[q.numel():] == SENTINEL).all()
    got = got[: q.numel()].reshape(q.shape)
    assert not got.isnan().any()
    assert rel_err(got, golden) < BAR
    if start_pos + S <= C:                   # custom_sdpa takes a cache that holds every position
        expected = custom_sdpa(q, k, v, start_pos, None, 0.0, causal, scale)
        assert rel_err(expected, golden) < 1e-5
        assert rel_err(got, expected) < BAR


@pytest.mark.parametrize("G", [1, 4, 8])
def test_flash_sdpa_tile_reads_no_key_past_its_last_rows(G):
    """Causal: tile 0's rows (the first ROWS / G positions, every head) see keys j <= start_pos + ROWS / G - 1.
    Keys past them are NaN: tile 0's rows stay exact (the later tiles read those keys, and go NaN here)."""
    B, Hkv, D, start_pos = 1, 2, 64, 70
    S, Hq = 3 * FLASH_ROWS // G + 5, Hkv * G
    positions = FLASH_ROWS // G            # tile 0's
    C = start_pos + S
    q, k, v = tensor((B, S, Hq, D), 43), tensor((B, C, Hkv, D), 44), tensor((B, C, Hkv, D), 45)
    golden = sdpa_golden(q, k, v, start_pos, True, D ** -0.5)[:, :positions]
    k[:, start_pos + positions:] = float("nan")
    v[:, start_pos + positions:] = float("nan")
    got = run_flash_sdpa(q, k, v, start_pos, True, D ** -0.5)
    assert rel_err(got[:, :positions], golden) < BAR
    assert got[:, positions:].isnan().all()   # the NaN keys were theirs to read


class CacheAttention(torch.nn.Module):
    """custom_sdpa of q [1, S, Hq, D] over fixed caches [1, C, Hkv, D] from position 0, causal."""

    def __init__(self, hq: int, hkv: int, d: int, c: int):
        super().__init__()
        self.register_buffer("k_cache", tensor((1, c, hkv, d), 46))
        self.register_buffer("v_cache", tensor((1, c, hkv, d), 47))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, 0, None, 0.0, True, None)


@pytest.mark.parametrize("d, prefill_kernel", [(64, "sdpa_flash"), (FLASH["MAX_D"] + 32, "sdpa")])
def test_lowering_runs_prefill_on_sdpa_flash_up_to_its_head_dim_and_decode_on_split(d, prefill_kernel, custom_sdpa):
    from executorch_wgpu.runtime import Runtime
    from executorch_wgpu.tools import models

    model = CacheAttention(8, 2, d, 48).eval()
    tokens = torch.export.Dim("tokens", min=1, max=40)
    pte = models.lower_to_pte(model, (tensor((1, 5, 8, d), 48),), ({1: tokens},), linears_only=False)
    method = Runtime.get().load_program(pte).load_method("forward")
    kernels = [s.kernel for dg in method._delegates for s in dg.record.steps]
    assert kernels == [prefill_kernel, "sdpa_split", "sdpa_combine"]   # the combine's grid is 0 with one split
    for s in (1, 2, 37):
        q = tensor((1, s, 8, d), 49 + s)
        (got,) = method.execute([q])
        assert rel_err(got, sdpa_golden(q, model.k_cache, model.v_cache, 0, True, d ** -0.5)) < BAR, s


# ---- flash-decoding: sdpa_split then sdpa_combine ----------------------------------------------------

KEYS_PER_SPLIT = registry.kernel("sdpa_split").constants["KEYS_PER_SPLIT"]


def run_split_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int, causal: bool, scale: float,
                   workgroup_x: Optional[int] = None) -> Tuple[torch.Tensor, np.ndarray]:
    """(out, partial records) of sdpa_split on its grid (n_splits, Hq, B x S), then sdpa_combine on (Hq, S, B),
    as lower_custom_sdpa dispatches them: n_splits = ceil(min(start_pos + S, C) / KEYS_PER_SPLIT); with one
    split (direct_out) the split writes out itself and no combine runs."""
    B, S, Hq, D = q.shape
    C, Hkv = k.shape[1], k.shape[2]
    n_splits = -(-min(start_pos + S, C) // KEYS_PER_SPLIT)
    direct = int(n_splits == 1)
    params = {"B": B, "S": S, "Hq": Hq, "Hkv": Hkv, "D": D, "C": C, "start_pos": start_pos, "causal": int(causal),
              "scale_bits": f32_bits(scale), "n_splits": n_splits, "direct_out": direct}
    # one record more than the grid writes: it must keep its sentinel
    records = np.full((B * S * Hq * n_splits + 1, D + 2), SENTINEL)
    out = np.full(q.shape, SENTINEL, np.float32)
    inputs = {"q": np32(q), "k": np32(k), "v": np32(v)}
    partial = run_registry_kernel("sdpa_split", (n_splits, Hq, B * S), params, inputs, records, workgroup_x,
                                  other_outputs={"out": out})
    if direct:
        assert (partial == SENTINEL).all()   # no record: the result went straight to out
    else:
        assert (out == SENTINEL).all()
        out = run_registry_kernel("sdpa_combine", (Hq, S, B), params, {"partial": partial}, out)
    return torch.from_numpy(out), partial


SPLIT_CASES = {
    # name: (B, S, Hq, Hkv, D, C, start_pos, causal, scale or None for 1/sqrt(D)); S == 1 is what the lowering
    # dispatches; start_pos + 1 keys are visible, so start_pos = KEYS_PER_SPLIT - 2 fills one split less one key
    "first_token_gqa_d64": (1, 1, 8, 2, 64, 16, 0, True, None),
    "few_keys_mha_d48": (1, 1, 4, 4, 48, 16, 6, True, None),
    "one_key_short_of_a_split_gqa_d64": (1, 1, 8, 2, 64, KEYS_PER_SPLIT + 8, KEYS_PER_SPLIT - 2, True, None),
    "exactly_one_split_mha_d128": (1, 1, 4, 4, 128, KEYS_PER_SPLIT + 8, KEYS_PER_SPLIT - 1, True, None),
    "one_key_into_a_second_split_gqa_d48": (1, 1, 8, 2, 48, 2 * KEYS_PER_SPLIT, KEYS_PER_SPLIT, True, None),
    "splits_partial_last_gqa_d64": (1, 1, 8, 2, 64, 4 * KEYS_PER_SPLIT, 3 * KEYS_PER_SPLIT + 40, True, None),
    "splits_partial_last_mha_d128": (1, 1, 4, 4, 128, 3 * KEYS_PER_SPLIT + 9, 2 * KEYS_PER_SPLIT + 70, True, None),
    "full_cache_gqa_d48": (1, 1, 8, 4, 48, 2 * KEYS_PER_SPLIT + 7, 2 * KEYS_PER_SPLIT + 6, True, None),
    "not_causal_batch_of_two_d50": (2, 1, 4, 2, 50, KEYS_PER_SPLIT + 20, KEYS_PER_SPLIT + 3, False, 0.4),
    "d256_peaked": (1, 1, 2, 1, 256, 2 * KEYS_PER_SPLIT, KEYS_PER_SPLIT + 30, True, 4.0),
    # S > 1 is not lowered to this path, but the kernels take it: a causal row's last split may be empty
    "prefill_across_a_split_boundary": (1, 3, 4, 2, 64, 2 * KEYS_PER_SPLIT, KEYS_PER_SPLIT - 2, True, None),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_split_sdpa_matches_custom_sdpa_and_fp64(case, custom_sdpa):
    B, S, Hq, Hkv, D, C, start_pos, causal, scale = SPLIT_CASES[case]
    q = tensor((B, S, Hq, D), 30)
    k, v = tensor((B, C, Hkv, D), 31), tensor((B, C, Hkv, D), 32)
    k[:, start_pos + S:] = float("nan")     # not attention's to read
    v[:, start_pos + S:] = float("nan")
    scale_f = scale if scale is not None else D ** -0.5
    golden = sdpa_golden(q, k, v, start_pos, causal, scale_f)
    expected = custom_sdpa(q, k, v, start_pos, None, 0.0, causal, scale)
    assert rel_err(expected, golden) < 1e-5
    got, partial = run_split_sdpa(q, k, v, start_pos, causal, scale_f)
    assert not got.isnan().any()
    assert rel_err(got, golden) < BAR
    assert rel_err(got, expected) < BAR
    assert (partial[-1] == SENTINEL).all()          # nothing written past the grid's records


def test_split_records_hold_each_splits_max_sum_and_unnormalised_sum():
    """The record layout sdpa_combine reads: (m, l, acc[0:D]) per (b, s, h, split), in fp64 terms."""
    B, S, Hq, Hkv, D = 1, 1, 4, 2, 48
    start_pos = 2 * KEYS_PER_SPLIT + 10
    C = start_pos + 5
    q, k, v = tensor((B, S, Hq, D), 33), tensor((B, C, Hkv, D), 34), tensor((B, C, Hkv, D), 35)
    scale = D ** -0.5
    _, partial = run_split_sdpa(q, k, v, start_pos, True, scale)
    n_splits = 3
    records = torch.from_numpy(partial[:-1].reshape(Hq, n_splits, D + 2)).double()
    for h in range(Hq):
        keys, values = k[0, :start_pos + 1, h // 2].double(), v[0, :start_pos + 1, h // 2].double()
        scores = keys @ q[0, 0, h].double() * scale
        for i in range(n_splits):
            sl = slice(i * KEYS_PER_SPLIT, (i + 1) * KEYS_PER_SPLIT)
            m = scores[sl].max()
            w = torch.exp(scores[sl] - m)
            assert abs(records[h, i, 0] - m) < 1e-5 * max(1.0, abs(float(m)))
            assert abs(records[h, i, 1] - w.sum()) < 1e-5 * float(w.sum())
            assert rel_err(records[h, i, 2:], w @ values[sl]) < BAR


@pytest.mark.parametrize("workgroup_x", sorted({64, registry.kernel("sdpa_split").workgroup_size[0]}))
def test_split_sdpa_at_other_workgroup_sizes(workgroup_x):
    """The kernel is written for any WORKGROUP_X that is a multiple of 64 and divides KEYS_PER_SPLIT."""
    B, S, Hq, Hkv, D, C = 1, 1, 8, 2, 64, 3 * KEYS_PER_SPLIT
    start_pos = 2 * KEYS_PER_SPLIT + 17
    q, k, v = tensor((B, S, Hq, D), 36), tensor((B, C, Hkv, D), 37), tensor((B, C, Hkv, D), 38)
    k[:, start_pos + 1:] = float("nan")
    v[:, start_pos + 1:] = float("nan")
    got, _ = run_split_sdpa(q, k, v, start_pos, True, D ** -0.5, workgroup_x)
    assert rel_err(got, sdpa_golden(q, k, v, start_pos, True, D ** -0.5)) < BAR
