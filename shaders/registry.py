"""The kernel registry: every WGSL kernel of shaders/ declared once.

An entry says what a kernel is called, which file holds it, the id blobs route
to it with, the bindings it uses, its workgroup size and the constants its
shader and the planners share. Everything else reads the entry:

  * the WGSL a device compiles is `wgsl_source(kernel)`: a header generated
    from the entry (constants, the Params struct, accessors of its indexed
    field families, the binding declarations),
    then the prelude files the entry names, then the kernel's own file;
  * the Python runtime builds pipelines and bind group layouts from it
    (runtime_py/gpu.py) and plans dispatches with its constants
    (runtime_py/q4_linear.py);
  * preprocess and the blob reader name routable kernels by `route_id`
    (backend/serialization/blob.py; schema.fbs stores the id);
  * bench, tune and bench_report list kernels from it;
  * the native delegate's build runs this file (`python shaders/registry.py
    <dir>`), which writes kernel_registry.h/.cpp: the same entries, constants
    and assembled WGSL as C++ (CMakeLists.txt).

Adding a kernel: write shaders/<name>.wgsl (no bindings, no Params, no
constants: the header declares them), add a `Kernel` below, and test it
against an fp64 golden. README.md, "Adding a kernel", walks through it.

This module imports nothing but the standard library: the build runs it with
only the interpreter.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

# The real folder of the WGSL files (resolved: the editable install links this file).
SHADER_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Binding:
    """One entry of a bind group layout."""

    name: str   # the WGSL variable the header declares
    kind: str   # wgpu's BufferBindingType: "uniform", "read-only-storage" or "storage"


_ADDRESS_SPACE = {"uniform": "uniform", "read-only-storage": "storage, read", "storage": "storage, read_write"}

# The uniform every q4gsw linear kernel reads, field by field (u32 each): the
# runtimes fill it by these names, the header declares it as `struct Params`.
# part1, part2: the first columns of a fused layer's second and third output parts
# (Q4_OUTPUT_PARTS); N where the layer has fewer parts (an unfused layer: part1 = part2 = N).
Q4_PARAMS = ("M", "K", "N", "n_stride", "group_size", "k_splits", "k_chunk", "part1", "part2", "_pad0", "_pad1",
             "_pad2")

# The bind group layout every q4gsw linear kernel shares (binding i = entry i),
# so one bind group per layer serves whichever kernel a call routes to.
Q4_LINEAR_LAYOUT = (
    Binding("params", "uniform"),            # Params (Q4_PARAMS)
    Binding("x", "read-only-storage"),       # activations [M][K] fp32
    Binding("qweight", "read-only-storage"),  # packed codes (schema.fbs)
    Binding("scales", "read-only-storage"),  # fp32 scales, blocked like qweight
    Binding("bias", "read-only-storage"),    # [n_stride] fp32, zeros without a bias
    Binding("y", "storage"),                 # outputs [M][N] fp32 (a fused layer: its first part [M][part1])
    Binding("partial", "storage"),           # split-K partial sums [k_splits][M][N]
    Binding("y1", "storage"),                # a fused layer's second part [M][part2 - part1]; else a placeholder
    Binding("y2", "storage"),                # a fused layer's third part [M][N - part2]; else a placeholder
)

# The bindings a q4gsw layer's output parts go to, in column order: a fused layer (sibling
# linears of one input, their columns concatenated by preprocess, backend/graph/) writes each
# part as its own contiguous [M][N_i] tensor; an unfused layer has one part, y. Its length is
# the most linears one fused layer holds.
Q4_OUTPUT_PARTS = ("y", "y1", "y2")

# How the runtimes issue a long call: its dispatches go in submits of this many (one compute
# pass each), so the GPU runs the first submits while the host still encodes the rest; queue
# order keeps them in sequence and a call still reads back once. Chosen so that a submit's
# fixed cost (tens of µs) stays small beside its dispatches' GPU and encoding time (~5 µs each).
DISPATCHES_PER_SUBMIT = 48


# ---- graph kernels' shared declarations ----

# elementwise.wgsl: out[o] = op(a[ia], b[ib]) over an iteration shape of RANK dims (leading
# dims padded with size 1), each operand addressed by its own offset and strides (in elements):
# broadcasts, permutes, slices, cats and cache writes are all this one kernel.
ELEMENTWISE_RANK = 6
ELEMENTWISE_OPS = {
    # binary: b from the buffer, or the f32 field `scalar` when b_is_scalar = 1
    "OP_ADD": 0, "OP_SUB": 1, "OP_MUL": 2, "OP_DIV": 3, "OP_POW": 4, "OP_MAX": 5, "OP_MIN": 6,
    # unary: b unused
    "OP_COPY": 16, "OP_NEG": 17, "OP_RSQRT": 18, "OP_SQRT": 19, "OP_EXP": 20, "OP_SIGMOID": 21,
    "OP_SILU": 22, "OP_TANH": 23, "OP_GELU_ERF": 24, "OP_GELU_TANH": 25, "OP_RECIPROCAL": 26, "OP_ABS": 27,
    "OP_LOG": 28, "OP_COS": 29, "OP_SIN": 30, "OP_RELU": 31,
    # fused binary: silu(a) * b (SwiGLU's gate times up)
    "OP_SILU_MUL": 7,
}


def rank_fields(*families: str) -> Tuple[str, ...]:
    """Params fields d0..d5, sa0..sa5, ...: a shape and strides of ELEMENTWISE_RANK dims, one field per dim.
    A kernel that lists a family in `indexed` reads them as d_at(i), sa_at(i), ... (the generated header)."""
    return tuple(f"{family}{i}" for family in families for i in range(ELEMENTWISE_RANK))


ELEMENTWISE_PARAMS = (("n", "op", "scalar_bits", "b_is_scalar", "a_off", "b_off", "out_off", "_pad0")
                      + rank_fields("d", "sa", "sb", "so"))
# reduce_rows.wgsl: one workgroup per row of a contiguous [rows][n] input.
REDUCE_OPS = {"REDUCE_SUM": 0, "REDUCE_MEAN": 1, "REDUCE_MAX": 2,
              "ROWS_SOFTMAX": 8,     # out[r][:] = softmax(a[r][:])
              "ROWS_RMS_NORM": 9,    # out[r][:] = a[r][:] * rsqrt(mean(a[r]^2) + eps) (* w when has_w)
              "ROWS_LAYER_NORM": 10,  # (a - mean) * rsqrt(var + eps) (* w[0:n] + w[n:2n] when has_w)
              "ROWS_ADD_RMS_NORM": 11}  # sum[r][:] = a[r][:] + b[r][:], out[r][:] = ROWS_RMS_NORM of that sum
ELEMENTWISE_LAYOUT = (Binding("params", "uniform"), Binding("a", "read-only-storage"),
                      Binding("b", "read-only-storage"), Binding("out", "storage"))
ROWS_LAYOUT = (Binding("params", "uniform"), Binding("a", "read-only-storage"),
               Binding("w", "read-only-storage"), Binding("out", "storage"))
# reduce_rows: ROWS_LAYOUT plus a second operand and a second output, for a residual add fused
# into the RMSNorm that reads it (ROWS_ADD_RMS_NORM); other ops leave them unbound.
REDUCE_ROWS_LAYOUT = ROWS_LAYOUT + (Binding("b", "read-only-storage"), Binding("sum", "storage"))
ROPE_LAYOUT = (Binding("params", "uniform"), Binding("x", "read-only-storage"),
               Binding("cos_t", "read-only-storage"), Binding("sin_t", "read-only-storage"),
               Binding("out", "storage"))
# rope_qk_cache: an attention layer's two RoPEs (q, k; one cos / sin) and its two cache writes (rotated k,
# v at start_pos) in one dispatch. Eight storage bindings: WebGPU's default maxStorageBuffersPerShaderStage.
ROPE_QK_CACHE_LAYOUT = (Binding("params", "uniform"), Binding("q", "read-only-storage"),
                        Binding("k", "read-only-storage"), Binding("v", "read-only-storage"),
                        Binding("cos_t", "read-only-storage"), Binding("sin_t", "read-only-storage"),
                        Binding("q_out", "storage"), Binding("k_cache", "storage"), Binding("v_cache", "storage"))
# The storage buffers one shader stage may bind on any WebGPU device (the spec's default limit).
MAX_STORAGE_BINDINGS = 8
SDPA_LAYOUT = (Binding("params", "uniform"), Binding("q", "read-only-storage"), Binding("k", "read-only-storage"),
               Binding("v", "read-only-storage"), Binding("out", "storage"))


@dataclass(frozen=True)
class Kernel:
    """One WGSL kernel and the facts about it that anything outside its file needs."""

    name: str                            # what routes, reports and bench call it
    wgsl: str                            # its file in shaders/
    layout: Tuple[Binding, ...]          # its bind group layout
    types: Mapping[str, str]             # WGSL type of each binding it declares (a subset of layout)
    workgroup_size: Tuple[int, int, int]  # WORKGROUP_X/Y/Z in its header
    constants: Mapping[str, int] = field(default_factory=dict)   # shared by shader and planners
    plan: Mapping[str, int] = field(default_factory=dict)        # planner-only knobs (not in the WGSL)
    route_id: Optional[int] = None       # the id blobs route with; None: not a routable kernel
    decode: bool = False                 # may run M == 1
    prefill: bool = False                # may run M > 1
    prelude: Tuple[str, ...] = ("q4gsw_prelude.wgsl",)
    params: Tuple[str, ...] = Q4_PARAMS  # fields of its `params` uniform (empty: none)
    indexed: Tuple[str, ...] = ()        # rank_fields families the header gives an accessor fn <family>_at(i)
    # A precision variant: the routable fp32 kernel whose prefill calls (M > 1) it runs where a blob asks for
    # prefill in `precision` (Q4Linear.prefill_precision) and the device has its features; it plans as that
    # kernel does, from its own constants. Not routable itself: routes, tables and tune name fp32 kernels only.
    variant_of: Optional[str] = None
    precision: str = "fp32"              # the arithmetic it computes in (one of PRECISIONS)
    features: Tuple[str, ...] = ()       # wgpu device features it needs; the header enables their WGSL extensions
    # A kernel the call dispatches before this one, on the same bind group (shmem_int8: quantize_int8, one
    # invocation per row and INT8_BLOCK of k; the planners size its grid and its part of the scratch buffer).
    prepass: Optional[str] = None

    def binding(self, name: str) -> int:
        return [b.name for b in self.layout].index(name)


def _q4(name: str, wgsl: str, **kw) -> Kernel:
    return Kernel(name=name, wgsl=wgsl, layout=Q4_LINEAR_LAYOUT, **kw)


VEC4_F32 = "array<vec4<f32>>"
VEC4_U32 = "array<vec4<u32>>"
F32 = "array<f32>"
U32 = "array<u32>"

# Prefill precisions a blob may ask for (schema.fbs Precision, in enum order): fp32, the default; f16 and int8
# run the kernels that have a variant of that precision (Kernel.variant_of, VARIANTS) where the device has the
# variant's features (f16: shader-f16; int8: none, dot4I8Packed is core WGSL).
PRECISIONS = ("fp32", "f16", "int8")
SHADER_F16 = "shader-f16"   # the wgpu feature f16 kernels need; both runtimes request it when the adapter has it
# ... unless this environment variable is "0": then an f16 blob runs fp32 there, as on an adapter without the
# feature (an A/B of one .pte, or a driver whose f16 misbehaves).
SHADER_F16_ENV = "EXECUTORCH_WGPU_SHADER_F16"
_WGSL_ENABLES = {SHADER_F16: "f16"}   # a feature -> the WGSL `enable` directive it allows

# The int8 prefill's k per activation scale: quantize_int8 writes blocks of it, shmem_int8 reads them.
_INT8_BLOCK = {"INT8_BLOCK": 32}

# The shared-memory GEMMs' split-K knobs (planner-only), one set for the fp32 kernel and its variants.
_SHMEM_PLAN = {"SPLITK_TARGET_WORKGROUPS": 256, "SPLITK_MIN_CHUNK": 256, "MAX_K_SPLITS": 8}

# Routable kernels first, in route-id order; then the helpers they dispatch.
KERNELS: Tuple[Kernel, ...] = (
    _q4("gemv", "q4gsw_gemv.wgsl", route_id=0, decode=True,
        types={"params": "Params", "x": VEC4_F32, "qweight": VEC4_U32, "scales": VEC4_F32,
               "bias": VEC4_F32, "y": F32, "partial": F32, "y1": F32, "y2": F32},
        workgroup_size=(4, 64, 1),
        constants={"QUADS": 4, "SLICES": 64},      # 4 column quads (16 columns) x 64 K slices
        plan={"MAX_K_SPLITS": 8}),
    _q4("regtiled", "q4gsw_gemm_regtiled.wgsl", route_id=1, decode=True, prefill=True,
        types={"params": "Params", "x": VEC4_F32, "qweight": VEC4_U32, "scales": VEC4_F32,
               "bias": VEC4_F32, "y": F32, "y1": F32, "y2": F32},
        workgroup_size=(8, 8, 1),
        constants={"TILE_M": 32, "TILE_N": 32}),   # 8 x 8 threads, 4 x 4 outputs each
    _q4("shmem", "q4gsw_gemm_shmem.wgsl", route_id=2, decode=True, prefill=True,
        types={"params": "Params", "x": VEC4_F32, "qweight": U32, "scales": F32,
               "bias": VEC4_F32, "y": F32, "partial": F32, "y1": F32, "y2": F32},
        workgroup_size=(16, 16, 1),
        constants={"TM": 128, "TN": 128, "TK": 16},
        prelude=("q4gsw_prelude.wgsl", "q4gsw_shmem_prelude.wgsl"),
        plan=_SHMEM_PLAN),
    _q4("skinny", "q4gsw_gemm_skinny.wgsl", route_id=3, decode=True, prefill=True,
        types={"params": "Params", "x": VEC4_F32, "qweight": VEC4_U32, "scales": VEC4_F32,
               "bias": VEC4_F32, "y": F32, "y1": F32, "y2": F32},
        workgroup_size=(4, 64, 1),
        constants={"QUADS": 4, "SLICES": 64, "ROWS": 4}),
    # shmem's f16 variant (q4gsw_gemm_shmem_f16.wgsl): products and 32-term sums in f16, K-long sums in f32.
    # TK = 32: f16 operands fit twice the k in shmem's 16 KiB of workgroup memory.
    _q4("shmem_f16", "q4gsw_gemm_shmem_f16.wgsl", variant_of="shmem", precision="f16", features=(SHADER_F16,),
        types={"params": "Params", "x": VEC4_F32, "qweight": VEC4_U32, "scales": VEC4_F32,
               "bias": VEC4_F32, "y": F32, "partial": F32, "y1": F32, "y2": F32},
        workgroup_size=(16, 16, 1),
        constants={"TM": 128, "TN": 128, "TK": 32},
        prelude=("q4gsw_prelude.wgsl", "q4gsw_shmem_prelude.wgsl"),
        plan=_SHMEM_PLAN),
    # shmem's int8 variant (q4gsw_gemm_shmem_int8.wgsl): x quantized to int8 per 32 k by its prepass
    # (quantize_int8, into the scratch buffer after the split-K sums), 32-k sums of dot4I8Packed in i32, scaled
    # into f32. 128 x 64 tiles: 32 integer and 32 float accumulators per thread; a K tile is two blocks.
    _q4("shmem_int8", "q4gsw_gemm_shmem_int8.wgsl", variant_of="shmem", precision="int8", prepass="quantize_int8",
        types={"params": "Params", "qweight": VEC4_U32, "scales": VEC4_F32,
               "bias": VEC4_F32, "y": F32, "partial": U32, "y1": F32, "y2": F32},
        workgroup_size=(16, 16, 1),
        constants={"TM": 128, "TN": 64, "TK": 64, **_INT8_BLOCK},
        prelude=("q4gsw_prelude.wgsl", "q4gsw_shmem_prelude.wgsl", "q4gsw_int8_prelude.wgsl"),
        plan=_SHMEM_PLAN),
    _q4("quantize_int8", "q4gsw_quantize_int8.wgsl",
        types={"params": "Params", "x": VEC4_F32, "partial": U32},
        workgroup_size=(256, 1, 1),
        constants=_INT8_BLOCK,
        prelude=("q4gsw_int8_prelude.wgsl",)),
    _q4("splitk_reduce", "q4gsw_splitk_reduce.wgsl",
        types={"params": "Params", "bias": F32, "y": F32, "partial": F32, "y1": F32, "y2": F32},
        workgroup_size=(256, 1, 1)),
    # ---- graph kernels (backend/graph/): the ops around the linears. Each reads the
    # Params fields it names; an f32 field holds the float's bits (bitcast<f32> in WGSL).
    # Every tensor is contiguous from element 0 of its own buffer unless a field says otherwise.
    Kernel("elementwise", "elementwise.wgsl", layout=ELEMENTWISE_LAYOUT,
           types={"params": "Params", "a": F32, "b": F32, "out": F32},
           workgroup_size=(256, 1, 1), prelude=("graph_prelude.wgsl",),
           constants={"RANK": ELEMENTWISE_RANK, **ELEMENTWISE_OPS},
           params=ELEMENTWISE_PARAMS, indexed=("d", "sa", "sb", "so")),
    Kernel("reduce_rows", "reduce_rows.wgsl", layout=REDUCE_ROWS_LAYOUT,
           types={"params": "Params", "a": F32, "w": F32, "out": F32, "b": F32, "sum": F32},
           workgroup_size=(256, 1, 1), prelude=("graph_prelude.wgsl",),
           constants=REDUCE_OPS,
           params=("rows", "n", "op", "eps_bits", "has_w", "_pad0", "_pad1", "_pad2")),
    Kernel("rope", "rope.wgsl", layout=ROPE_LAYOUT,
           types={"params": "Params", "x": F32, "cos_t": F32, "sin_t": F32, "out": F32},
           workgroup_size=(256, 1, 1), prelude=("graph_prelude.wgsl", "rope_prelude.wgsl"),
           params=("n_pairs", "d0", "d1", "d2", "d3", "c0", "c1", "c2", "c3", "s0", "s1", "s2", "s3",
                   "_pad0", "_pad1", "_pad2")),
    # rope_qk_cache (backend/graph/ops.py _lower_rope_qk_cache): q [B, S, Hq, D] -> q_out, rotated; k [B, S, Hkv,
    # D] rotated and v into the caches [B, C, Hkv, D] at start_pos. half = D / 2; c0..c3 / s0..s3: cos / sin
    # strides over [B, S, head, half]. One invocation per pair of the B x S x (Hq + Hkv) head rows.
    Kernel("rope_qk_cache", "rope_qk_cache.wgsl", layout=ROPE_QK_CACHE_LAYOUT,
           types={"params": "Params", "q": F32, "k": F32, "v": F32, "cos_t": F32, "sin_t": F32, "q_out": F32,
                  "k_cache": F32, "v_cache": F32},
           workgroup_size=(256, 1, 1), prelude=("graph_prelude.wgsl", "rope_prelude.wgsl"),
           params=("n_pairs", "S", "Hq", "Hkv", "half", "C", "start_pos", "_pad0", "c0", "c1", "c2", "c3",
                   "s0", "s1", "s2", "s3")),
    Kernel("embedding", "embedding.wgsl", layout=ROWS_LAYOUT,
           types={"params": "Params", "a": U32, "w": F32, "out": F32},
           workgroup_size=(256, 1, 1), prelude=("graph_prelude.wgsl",),
           params=("n_ids", "dim", "vocab", "_pad0")),
    Kernel("sdpa", "sdpa.wgsl", layout=SDPA_LAYOUT,
           types={"params": "Params", "q": F32, "k": F32, "v": F32, "out": F32},
           # custom_sdpa at S > 1 with D above sdpa_flash's MAX_D. 256 invocations: a dispatch of few query
           # rows has only Hq x S x B workgroups (docs/PERFORMANCE.md)
           workgroup_size=(256, 1, 1), prelude=("graph_prelude.wgsl", "attention_prelude.wgsl"),
           constants={"MAX_D": 256},
           params=("B", "S", "Hq", "Hkv", "D", "C", "start_pos", "causal", "scale_bits", "_pad0", "_pad1", "_pad2")),
    # sdpa_flash: custom_sdpa at S > 1 with D <= MAX_D (backend/graph/ops.py lower_custom_sdpa; larger D takes
    # sdpa), FlashAttention-2 tiling: grid (Hkv, ceil(S x Hq / Hkv / ROWS), B), a workgroup per ROWS
    # (position, query head) rows of one cache head, KEYS keys at a time through workgroup memory (sdpa_flash.wgsl).
    Kernel("sdpa_flash", "sdpa_flash.wgsl", layout=SDPA_LAYOUT,
           types={"params": "Params", "q": F32, "k": F32, "v": F32, "out": F32},
           workgroup_size=(128, 1, 1), prelude=("graph_prelude.wgsl",),
           constants={"ROWS": 32, "KEY_GROUPS": 4, "KEYS": 64, "CHUNK_QUADS": 4, "MAX_D": 128, "STAGE_VEC4": 512},
           params=("B", "S", "Hq", "Hkv", "D", "C", "start_pos", "causal", "scale_bits", "_pad0", "_pad1", "_pad2")),
    # ---- graph kernels of backend/graph/ops_transformer.py (BERT / Hugging Face decoders) ----
    # bmm: out[t] = a[t] @ b[t], fp32 operands read through offsets and strides, out contiguous.
    Kernel("bmm", "bmm.wgsl", layout=ELEMENTWISE_LAYOUT,
           types={"params": "Params", "a": F32, "b": F32, "out": F32},
           workgroup_size=(16, 16, 1), prelude=("graph_prelude.wgsl",),
           params=("batch", "M", "N", "K", "a_off", "b_off", "sa_b", "sa_m", "sa_k", "sb_b", "sb_k", "sb_n")),
    # compare_select: comparisons, logic, casts, where, fill, arange (booleans 1.0 / 0.0 in the graph).
    Kernel("compare_select", "compare_select.wgsl",
           layout=(Binding("params", "uniform"), Binding("a", "read-only-storage"),
                   Binding("b", "read-only-storage"), Binding("c", "read-only-storage"), Binding("out", "storage")),
           types={"params": "Params", "a": U32, "b": U32, "c": U32, "out": U32},
           workgroup_size=(256, 1, 1), prelude=("graph_prelude.wgsl",),
           constants={"RANK": ELEMENTWISE_RANK,
                      "SEL_EQ": 0, "SEL_NE": 1, "SEL_LT": 2, "SEL_LE": 3, "SEL_GT": 4, "SEL_GE": 5,
                      "SEL_AND": 8, "SEL_OR": 9, "SEL_XOR": 10,            # binary: b, or scalar
                      "SEL_NOT": 16, "SEL_TO_BOOL": 17, "SEL_FROM_I32": 18, "SEL_I32_TO_BOOL": 19,
                      "SEL_TRUNC": 20,                                   # unary on a
                      "SEL_WHERE": 32,                                   # c ? a : b
                      "SEL_FILL": 48, "SEL_ARANGE": 49},                 # no operand
           params=("n", "op", "scalar_bits", "step_bits", "b_is_scalar", "a_off", "b_off", "c_off", "out_off",
                   "_pad0") + rank_fields("d", "sa", "sb", "sc", "so"),
           indexed=("d", "sa", "sb", "sc", "so")),
    # gather: out[p] = a[p . sa + idx_b(p) * b_step + idx_c(p) * c_step], indices from b and c.
    Kernel("gather", "gather.wgsl",
           layout=(Binding("params", "uniform"), Binding("a", "read-only-storage"),
                   Binding("b", "read-only-storage"), Binding("c", "read-only-storage"), Binding("out", "storage")),
           types={"params": "Params", "a": U32, "b": U32, "c": U32, "out": U32},
           workgroup_size=(256, 1, 1), prelude=("graph_prelude.wgsl",),
           constants={"RANK": ELEMENTWISE_RANK},
           params=("n", "n_idx", "a_off", "b_off", "c_off", "b_i32", "c_i32", "b_wrap", "c_wrap", "b_step",
                   "c_step", "_pad0") + rank_fields("d", "sa", "sb", "sc"),
           indexed=("d", "sa", "sb", "sc")),
    # ---- graph kernels of backend/graph/ops_quantized.py (weight-only quantized embeddings) ----
    # embedding_q: out[t][d] = code(id, d) * scale(id, d / group_size), the table's int4 / int8 codes
    # packed 32 / bits per u32, row-major: a quantized nn.Embedding gathered with no fp32 table.
    Kernel("embedding_q", "embedding_q.wgsl",
           layout=(Binding("params", "uniform"), Binding("a", "read-only-storage"),
                   Binding("w", "read-only-storage"), Binding("scales", "read-only-storage"),
                   Binding("out", "storage")),
           types={"params": "Params", "a": U32, "w": U32, "scales": F32, "out": F32},
           workgroup_size=(256, 1, 1), prelude=("graph_prelude.wgsl",),
           params=("n_ids", "dim", "vocab", "bits", "group_size", "n_groups", "ids_f32", "_pad0")),
    # ---- flash-decoding: custom_sdpa at S == 1 (backend/graph/ops.py lower_custom_sdpa) ----
    # sdpa_split: grid (n_splits, Hq, B x S); each workgroup attends over KEYS_PER_SPLIT keys of one
    # query row and writes a partial record (max, sum of exp, D unnormalised accumulators) to
    # `partial`; sdpa_combine: grid (Hq, S, B), merges a row's n_splits records into out. Params as
    # sdpa's, plus n_splits = ceil(min(start_pos + S, C) / KEYS_PER_SPLIT) (layout: sdpa_split.wgsl)
    # and direct_out: 1 when one split covers the keys, and the split then writes the row's result
    # to `out` itself (the combine's grid is 0).
    Kernel("sdpa_split", "sdpa_split.wgsl",
           layout=(Binding("params", "uniform"), Binding("q", "read-only-storage"),
                   Binding("k", "read-only-storage"), Binding("v", "read-only-storage"),
                   Binding("partial", "storage"), Binding("out", "storage")),
           types={"params": "Params", "q": F32, "k": F32, "v": F32, "partial": F32, "out": F32},
           workgroup_size=(256, 1, 1), prelude=("graph_prelude.wgsl", "attention_prelude.wgsl"),
           constants={"MAX_D": 256, "KEYS_PER_SPLIT": 256},
           params=("B", "S", "Hq", "Hkv", "D", "C", "start_pos", "causal", "scale_bits", "n_splits", "direct_out",
                   "_pad1")),
    Kernel("sdpa_combine", "sdpa_combine.wgsl",
           layout=(Binding("params", "uniform"), Binding("partial", "read-only-storage"),
                   Binding("out", "storage")),
           types={"params": "Params", "partial": F32, "out": F32},
           workgroup_size=(64, 1, 1), prelude=("graph_prelude.wgsl",),
           params=("B", "S", "Hq", "Hkv", "D", "C", "start_pos", "causal", "scale_bits", "n_splits", "direct_out",
                   "_pad1")),
    # The bench's bandwidth probe: reads a buffer once. Not a model kernel.
    Kernel("stream_read", "stream_read.wgsl",
           layout=(Binding("data", "read-only-storage"), Binding("sink", "storage")),
           types={"data": VEC4_U32, "sink": U32},
           workgroup_size=(256, 1, 1), prelude=(), params=()),
)

BY_NAME: Dict[str, Kernel] = {k.name: k for k in KERNELS}
BY_ROUTE_ID: Dict[int, Kernel] = {k.route_id: k for k in KERNELS if k.route_id is not None}
ROUTABLE: Tuple[Kernel, ...] = tuple(BY_ROUTE_ID[i] for i in sorted(BY_ROUTE_ID))
ROUTABLE_NAMES: Tuple[str, ...] = tuple(k.name for k in ROUTABLE)                 # every kernel a blob may name
DECODE_KERNELS: Tuple[str, ...] = tuple(k.name for k in ROUTABLE if k.decode)     # may run M == 1
PREFILL_KERNELS: Tuple[str, ...] = tuple(k.name for k in ROUTABLE if k.prefill)   # may run M > 1
# (precision, routable kernel) -> the variant a prefill call of that kernel runs in that precision
VARIANTS: Dict[Tuple[str, str], str] = {(k.precision, k.variant_of): k.name for k in KERNELS if k.variant_of}


def variant(kernel_name: str, precision: str) -> str:
    """The kernel a prefill call routed to kernel_name runs in `precision`: its variant, or itself."""
    return VARIANTS.get((precision, kernel_name), kernel_name)


def kernel(name: str) -> Kernel:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no kernel named {name!r}; the registry has {sorted(BY_NAME)}") from None


def _check_registry() -> None:
    """Facts the runtimes rely on; a wrong entry fails at import, not on a GPU.

    A kernel's constants are facts its code is written for, not free knobs: the
    relations below are the ones its WGSL assumes (changing them means changing
    the shader too), so an edit here that breaks one fails now.
    """
    def require(ok: bool, problem: str) -> None:
        if not ok:
            raise RuntimeError(f"shaders/registry.py: {problem}")

    qw_block = 16   # columns per packed weight block (schema.fbs, blob.QW_BLOCK)
    for name in ("gemv", "skinny"):   # thread (quad, slice); a workgroup covers one 16-column block
        k = BY_NAME[name]
        require(k.workgroup_size == (k.constants["QUADS"], k.constants["SLICES"], 1),
                f"{name}: workgroup_size must be (QUADS, SLICES, 1)")
        require(4 * k.constants["QUADS"] == qw_block, f"{name}: 4 * QUADS columns must be one {qw_block}-column block")
    require(BY_NAME["skinny"].constants["ROWS"] == 4, "skinny: ROWS is 4 (four accumulators, row_starts is a vec4)")
    regtiled = BY_NAME["regtiled"]
    require((regtiled.constants["TILE_N"], regtiled.constants["TILE_M"]) ==
            (4 * regtiled.workgroup_size[0], 4 * regtiled.workgroup_size[1]),
            "regtiled: each thread computes 4 x 4 outputs, so TILE_N, TILE_M = 4 x the workgroup")
    shmem = BY_NAME["shmem"]
    require((shmem.constants["TM"], shmem.constants["TN"], shmem.constants["TK"], shmem.workgroup_size) ==
            (128, 128, 16, (16, 16, 1)), "shmem: its staging and 8 x 8 register tiles are written for "
                                         "TM = TN = 128, TK = 16 and a 16 x 16 workgroup")

    shmem_f16 = BY_NAME["shmem_f16"]
    require((shmem_f16.constants["TM"], shmem_f16.constants["TN"], shmem_f16.constants["TK"],
             shmem_f16.workgroup_size) == (128, 128, 32, (16, 16, 1)),
            "shmem_f16: its staging (one 4 x 4 x block and 4 k of a column quad per thread) and 8 x 8 register "
            "tiles are written for TM = TN = 128, TK = 32 and a 16 x 16 workgroup")
    shmem_int8, quantize_int8 = BY_NAME["shmem_int8"], BY_NAME["quantize_int8"]
    require((shmem_int8.constants["TM"], shmem_int8.constants["TN"], shmem_int8.constants["TK"],
             shmem_int8.constants["INT8_BLOCK"], shmem_int8.workgroup_size) == (128, 64, 64, 32, (16, 16, 1))
            and shmem_int8.prepass == quantize_int8.name,
            "shmem_int8: its staging (a slot of a row quad per thread in each of two blocks, a column quad's word "
            "per thread of 128..255) and 8 x 4 register tiles are written for TM = 128, TN = 64, TK = 64: two "
            "activation blocks of quantize_int8's INT8_BLOCK, 32 (8 slots), and a 16 x 16 workgroup")
    for k in KERNELS:
        require(k.precision in PRECISIONS, f"{k.name}: precision {k.precision!r} is not one of {PRECISIONS}")
        if k.variant_of is not None:
            base = BY_NAME.get(k.variant_of)
            require(base is not None and base.route_id is not None and k.route_id is None and k.layout == base.layout
                    and k.params == base.params and k.precision != "fp32"
                    and (k.precision != "f16" or SHADER_F16 in k.features),
                    f"{k.name}: a precision variant stands in for a routable kernel of its layout and Params, has a "
                    f"precision other than fp32 (f16 ones need {SHADER_F16}) and no route id of its own")
        unknown_features = set(k.features) - set(_WGSL_ENABLES)
        require(not unknown_features, f"{k.name}: features {sorted(unknown_features)} have no WGSL enable known here")

    split, combine = BY_NAME["sdpa_split"], BY_NAME["sdpa_combine"]
    require(split.workgroup_size[0] % 64 == 0 and split.constants["KEYS_PER_SPLIT"] % split.workgroup_size[0] == 0
            and split.constants["MAX_D"] == 256,
            "sdpa_split: WORKGROUP_X is a multiple of 64 (its key groups), KEYS_PER_SPLIT a multiple of "
            "WORKGROUP_X, MAX_D 256 (4 dims per invocation of a group)")
    require(combine.workgroup_size == (64, 1, 1), "sdpa_combine: 64 invocations, 4 output dims each (MAX_D 256)")
    flash = BY_NAME["sdpa_flash"]
    fc, flash_x = flash.constants, flash.workgroup_size[0]
    require(fc["KEY_GROUPS"] == 4 and flash.workgroup_size == (fc["ROWS"] * fc["KEY_GROUPS"], 1, 1)
            and fc["CHUNK_QUADS"] == fc["KEY_GROUPS"] and fc["KEYS"] == 16 * fc["KEY_GROUPS"]
            and fc["MAX_D"] == 32 * fc["KEY_GROUPS"]
            and (fc["ROWS"] + fc["KEYS"]) * fc["CHUNK_QUADS"] + flash_x <= fc["STAGE_VEC4"]
            and fc["STAGE_VEC4"] % (8 * fc["KEY_GROUPS"] * 4) == 0
            and 16 * fc["STAGE_VEC4"] + 4 * fc["KEYS"] * fc["ROWS"] <= 16384,
            "sdpa_flash: thread (row, key group) of ROWS x KEY_GROUPS (4) stages quad `key group` of its row's q "
            "(CHUNK_QUADS = KEY_GROUPS), holds 16 scores (KEYS = 16 x 4) and 8 output quads (MAX_D = 128); the "
            "stage holds the q and k chunks and a vec4 per invocation, then v chunks of a multiple of 4 keys at 16 "
            "or 32 quads a key; stage and probs fit WebGPU's default 16 KiB of workgroup memory")

    layout_names = [b.name for b in Q4_LINEAR_LAYOUT]
    require(all(p in layout_names and Q4_LINEAR_LAYOUT[layout_names.index(p)].kind == "storage"
                for p in Q4_OUTPUT_PARTS) and len(Q4_OUTPUT_PARTS) == 3 and {"part1", "part2"} <= set(Q4_PARAMS),
            "Q4_OUTPUT_PARTS: three storage bindings of Q4_LINEAR_LAYOUT, bounded by Params part1 and part2 "
            "(q4gsw_prelude.wgsl store_y)")
    for k in KERNELS:
        if "q4gsw_prelude.wgsl" in k.prelude:   # its store_y writes every part
            require(all(p in k.types for p in Q4_OUTPUT_PARTS), f"{k.name}: declare {Q4_OUTPUT_PARTS} (store_y)")

    ids = sorted(k.route_id for k in KERNELS if k.route_id is not None)
    require(ids == list(range(len(ids))), f"route ids must be 0..{len(ids) - 1}, each once, got {ids}")
    require(len(BY_NAME) == len(KERNELS), "kernel names must be unique")
    for k in KERNELS:
        missing = set(rank_fields(*k.indexed)) - set(k.params)
        require(not missing, f"{k.name}: indexed families need Params fields {sorted(missing)}")
        unknown = set(k.types) - {b.name for b in k.layout}
        require(not unknown, f"{k.name}: types for bindings not in its layout: {sorted(unknown)}")
        require(k.route_id is None or k.decode or k.prefill, f"{k.name}: a routable kernel must run some M")
        storage = [b for b in k.layout if b.kind != "uniform"]
        require(len(storage) <= MAX_STORAGE_BINDINGS,
                f"{k.name}: {len(storage)} storage bindings, above the {MAX_STORAGE_BINDINGS} every device allows")
        for f in (*k.prelude, k.wgsl):
            require((SHADER_DIR / f).is_file(), f"{k.name}: no shaders/{f}")


_check_registry()


# ---- WGSL ---------------------------------------------------------------------------------------

def _header(k: Kernel) -> str:
    # `enable` directives come first in a WGSL module, before any declaration.
    lines = [f"enable {_WGSL_ENABLES[f]};" for f in k.features]
    lines += [f"// {k.wgsl}, assembled by shaders/registry.py: this header, then "
              + (", ".join(k.prelude) + ", then " if k.prelude else "") + "the kernel's own file.", ""]
    sizes = dict(zip(("WORKGROUP_X", "WORKGROUP_Y", "WORKGROUP_Z"), k.workgroup_size))
    for const, value in {**sizes, **k.constants}.items():
        lines.append(f"const {const}: u32 = {value}u;")
    if k.params:
        lines += ["", "struct Params {"] + [f"    {f}: u32," for f in k.params] + ["}"]
    for family in k.indexed:   # a uniform struct's fields cannot be indexed by a variable: a switch can
        cases = " ".join(f"case {i}u: {{ return params.{family}{i}; }}" for i in range(ELEMENTWISE_RANK - 1))
        lines += ["", f"fn {family}_at(i: u32) -> u32 {{",
                  f"    switch i {{ {cases} default: {{ return params.{family}{ELEMENTWISE_RANK - 1}; }} }}", "}"]
    lines.append("")
    for i, b in enumerate(k.layout):
        if b.name in k.types:
            lines.append(f"@group(0) @binding({i}) var<{_ADDRESS_SPACE[b.kind]}> {b.name}: {k.types[b.name]};")
    return "\n".join(lines) + "\n\n"


def wgsl_source(name: str) -> str:
    """The WGSL a device compiles for a kernel: header, prelude, the kernel's file."""
    k = kernel(name)
    parts = [_header(k)] + [(SHADER_DIR / f).read_text() for f in (*k.prelude, k.wgsl)]
    return "\n".join(parts)


# ---- C++ (the native delegate's build) ----------------------------------------------------------

_CPP_BINDING_KIND = {"uniform": "WGPUBufferBindingType_Uniform",
                     "read-only-storage": "WGPUBufferBindingType_ReadOnlyStorage",
                     "storage": "WGPUBufferBindingType_Storage"}


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _cpp_const(name: str) -> str:
    return "k" + _camel(name.lower())


def cpp_header() -> str:
    """kernel_registry.h: the registry as C++ declarations."""
    out = ["// Generated by shaders/registry.py (the native build runs it): do not edit.",
           "#pragma once", "", "#include <cstddef>", "#include <cstdint>", "", "#include <webgpu.h>", "",
           "namespace wgq4_native {", "",
           "// Routable kernels by route id: the ids blobs name (schema.fbs Route).",
           "enum class Kernel : uint8_t { "
           + ", ".join(f"{_camel(k.name)} = {k.route_id}" for k in ROUTABLE) + " };",
           f"constexpr int kRoutableKernelCount = {len(ROUTABLE)};", "",
           "struct KernelInfo {",
           "  const char* name;",
           "  const char* wgsl_file;",
           "  const char* source;                   // the WGSL a device compiles (shaders/registry.py wgsl_source)",
           "  int route_id;                         // -1: not routable",
           "  bool decode, prefill;                 // may run M == 1 / M > 1",
           "  uint32_t workgroup_size[3];",
           "  const WGPUBufferBindingType* layout;  // binding i of its bind group layout (shared arrays: equal",
           "                                        // pointers, one layout)",
           "  int binding_count;",
           "  bool needs_shader_f16;                // runs only on a device with shader-f16",
           "  uint32_t tile[3];                     // a shared-memory GEMM's output tile and K tile (TM, TN, TK);",
           "                                        // 0 for other kernels",
           "  const char* prepass;                  // a kernel the call dispatches before it (Kernel.prepass), or nullptr",
           "};", "",
           "// A long call's dispatches go in submits of this many (DISPATCHES_PER_SUBMIT).",
           f"constexpr size_t kDispatchesPerSubmit = {DISPATCHES_PER_SUBMIT};", "",
           f"constexpr int kKernelCount = {len(KERNELS)};",
           "extern const KernelInfo kKernels[kKernelCount];", "",
           "// The entry of a kernel name, or nullptr.",
           "const KernelInfo* find_kernel(const char* name);",
           "// The entry of a routable kernel.",
           "const KernelInfo& kernel_info(Kernel k);",
           "inline const char* kernel_name(Kernel k) { return kernel_info(k).name; }",
           "// The variant of a routable kernel in a precision (an index into kPrecisionNames; VARIANTS: what a",
           "// blob's prefill in that precision runs), or nullptr.",
           "const KernelInfo* precision_variant(Kernel k, int precision);", "",
           "// The wgpu feature f16 kernels need is not requested when this environment variable is \"0\".",
           f'constexpr const char* kShaderF16Env = "{SHADER_F16_ENV}";',
           "// Prefill precisions a blob may ask for (PRECISIONS; schema.fbs Precision, in enum order).",
           f"constexpr int kPrecisionCount = {len(PRECISIONS)};",
           "extern const char* const kPrecisionNames[kPrecisionCount];", "",
           "// Binding indices of the layout every q4gsw linear kernel shares.",
           "enum Q4Binding : uint32_t { "
           + ", ".join(f"kBind{_camel(b.name)} = {i}" for i, b in enumerate(Q4_LINEAR_LAYOUT))
           + f", kQ4BindingCount = {len(Q4_LINEAR_LAYOUT)} }};",
           "// The bindings of a layer's output parts, in column order (Q4_OUTPUT_PARTS: a fused layer's parts).",
           f"constexpr size_t kQ4OutputPartCount = {len(Q4_OUTPUT_PARTS)};",
           "constexpr Q4Binding kQ4OutputParts[kQ4OutputPartCount] = {"
           + ", ".join(f"kBind{_camel(p)}" for p in Q4_OUTPUT_PARTS) + "};", "",
           "// The Params uniform of the q4gsw linear kernels, field by field.",
           "struct Q4Params {"]
    out += [f"  uint32_t {f};" for f in Q4_PARAMS]
    out += ["};", f"static_assert(sizeof(Q4Params) == {4 * len(Q4_PARAMS)}, \"Params is {len(Q4_PARAMS)} u32\");", ""]
    for k in KERNELS:
        consts = {**k.constants, **k.plan}
        if consts:
            out.append(f"namespace {k.name} {{")
            out += [f"constexpr uint32_t {_cpp_const(c)} = {v};" for c, v in consts.items()]
            out.append(f"}}  // namespace {k.name}")
    out += ["", "}  // namespace wgq4_native", ""]
    return "\n".join(out)


def cpp_source() -> str:
    """kernel_registry.cpp: the entries, with each kernel's assembled WGSL as a raw string."""
    out = ["// Generated by shaders/registry.py (the native build runs it): do not edit.",
           '#include "kernel_registry.h"', "", "#include <cstring>", "", "namespace wgq4_native {", "",
           "namespace {", ""]
    # One array per distinct layout: kernels that share a layout share the pointer (and so a bind group).
    layout_names: Dict[Tuple[Binding, ...], str] = {}
    for k in KERNELS:
        if k.layout not in layout_names:
            layout_names[k.layout] = f"kLayout{len(layout_names)}"
            kinds = ", ".join(_CPP_BINDING_KIND[b.kind] for b in k.layout)
            out.append(f"const WGPUBufferBindingType {layout_names[k.layout]}[] = {{{kinds}}};")
    for k in KERNELS:
        source = wgsl_source(k.name)
        if ')wgsl"' in source:
            raise ValueError(f"{k.wgsl} contains the raw-string delimiter )wgsl\"")
        out.append(f'const char k{_camel(k.name)}Source[] = R"wgsl({source})wgsl";')
    out += ["", "}  // namespace", "", "const KernelInfo kKernels[kKernelCount] = {"]
    for k in KERNELS:
        layout_array = layout_names[k.layout]
        wg = ", ".join(str(v) for v in k.workgroup_size)
        rid = -1 if k.route_id is None else k.route_id
        out.append(f'    {{"{k.name}", "{k.wgsl}", k{_camel(k.name)}Source, {rid}, {str(k.decode).lower()}, '
                   f"{str(k.prefill).lower()}, {{{wg}}}, {layout_array}, {len(k.layout)}, "
                   f"{str(SHADER_F16 in k.features).lower()}, "
                   f"{{{k.constants.get('TM', 0)}, {k.constants.get('TN', 0)}, {k.constants.get('TK', 0)}}}, "
                   + (f'"{k.prepass}"' if k.prepass else "nullptr") + "},")
    out += ["};", "",
            "const KernelInfo* find_kernel(const char* name) {",
            "  for (const KernelInfo& k : kKernels)",
            "    if (std::strcmp(k.name, name) == 0) return &k;",
            "  return nullptr;",
            "}", "",
            "const KernelInfo& kernel_info(Kernel k) {",
            "  static const KernelInfo* by_route_id[kRoutableKernelCount] = {"
            + ", ".join(f"&kKernels[{KERNELS.index(k)}]" for k in ROUTABLE) + "};",
            "  return *by_route_id[static_cast<int>(k)];",
            "}", "",
            "const KernelInfo* precision_variant(Kernel k, int precision) {"]
    out += [f"  if (k == Kernel::{_camel(base)} && precision == {PRECISIONS.index(precision)}) "
            f"return &kKernels[{KERNELS.index(BY_NAME[name])}];"
            for (precision, base), name in VARIANTS.items()]
    out += ["  return nullptr;",
            "}", "",
            "const char* const kPrecisionNames[kPrecisionCount] = {" + ", ".join(f'"{p}"' for p in PRECISIONS) + "};",
            "", "}  // namespace wgq4_native", ""]
    return "\n".join(out)


def write_cpp(out_dir: Path) -> None:
    """Write kernel_registry.h and .cpp (always: the build reruns this only when the registry or a shader changed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("kernel_registry.h", cpp_header()), ("kernel_registry.cpp", cpp_source())):
        (out_dir / name).write_text(text)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python shaders/registry.py",
                                     description="Write the kernel registry as C++ (kernel_registry.h/.cpp) "
                                                 "for the native delegate's build.")
    parser.add_argument("out_dir", type=Path, help="folder for kernel_registry.h and kernel_registry.cpp")
    args = parser.parse_args(argv)
    write_cpp(args.out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
