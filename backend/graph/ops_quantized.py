"""Graph mode: weight-only quantized embeddings, gathered from their codes (kernel embedding_q).

torchao's IntxWeightOnlyConfig(weight_dtype=torch.int4 or torch.int8, granularity=PerGroup(gs) or
PerAxis(0)) on an nn.Embedding leaves in the Edge graph

    table = torchao.dequantize_affine(codes [V, D] int8, [1, gs], scales [V, D / gs], zero_point, int8, qmin, qmax)
    out   = aten.embedding(table, ids)

Run as it stands, the fp32 table is computed whole on every call. Here the dequantize node
produces no step: its rule checks the scheme and records it, and the embedding's way (tried
before ops.py's rule: ops_transformer.also) gathers the rows it needs straight from the codes,
packed 32 / bits per u32 row-major (pack_codes), and the fp32 scales, one per (row, group):
out[t][d] = code * scale. The blob holds the packed codes and the scales; never an fp32 table.

Accepted (table_problem says why not, and the dequantize then stays on the CPU):
  * codes and scales constants of the program (placeholders with values), codes int8 [V, D];
  * int4 codes (quant range -8..7) or int8 (-128..127);
  * symmetric: zero point None or all zero;
  * blocks [1, gs] with gs dividing D (gs = D: one scale per row, as PerAxis(0) gives);
  * float32 scales and result;
  * every reader an aten.embedding of the table whose ids are an integer tensor.

Who judges a dequantize node, each with table_problem:
  * the partitioner's pre-decomposition transform (graph mode), with the program's values: an
    accepted one is kept whole; a declined one is lowered to ATen ops as any dequantize that is
    not a q4gsw linear's, and logged once with the reason;
  * the partition: the rule's check, from the graph's metadata (constants are fake there);
  * preprocess: the rule's lowering checks the values again.
The dequantize is never folded into a constant (a Llama's table is FOLD_MAX elements): its rule is
registered after ops_transformer.install(), so it is no combined rule, and its target is in
ops_transformer.UNFOLDED should install() run again.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.export import ExportedProgram
from torch.fx import Node

from executorch_wgpu.backend.graph.lowering import Lowerer, LoweringError, TensorRef
from executorch_wgpu.backend.graph.ops import _grid_1d, _val, args_of, rule, target_name
from executorch_wgpu.backend.graph.ops_transformer import (
    INT_DTYPES,
    UNFOLDED,
    _constant_placeholder_by_meta,
    _held,
    _raw,
    also,
)
from executorch_wgpu.backend.q4gsw_pattern import DEQUANTIZE_AFFINE, constant_value
from executorch_wgpu.shaders import registry

EMBEDDING = "aten.embedding.default"
BITS = {(-8, 7): 4, (-128, 127): 8}     # quant range -> bits per code
KERNEL = "embedding_q"


@dataclass(frozen=True)
class Scheme:
    """How a dequantize_affine node's table is quantized, as embedding_q reads it."""

    codes: Node
    scales: Node
    bits: int           # 4 or 8
    vocab: int
    dim: int
    group_size: int     # dim: one scale per row

    @property
    def n_groups(self) -> int:
        return self.dim // self.group_size


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _constant(node: Any, ep: Optional[ExportedProgram]) -> Union[torch.Tensor, str]:
    """The constant behind a placeholder (its meta value when ep is None), or why it is not one."""
    if not (isinstance(node, Node) and node.op == "placeholder"):
        return f"{getattr(node, 'name', node)} is computed in the graph, not a constant of the program"
    if ep is not None:
        value = constant_value(ep, node)
    else:
        value = _val(node) if _constant_placeholder_by_meta(node) else None
    if not isinstance(value, torch.Tensor):
        return f"{node.name} is not a constant of the program"
    return value


def scheme_of(dq: Node, ep: Optional[ExportedProgram] = None) -> Union[Scheme, str]:
    """The scheme of a dequantize_affine node, or why embedding_q cannot run it. With ep (the pre-decomposition
    transform, preprocess) the values are checked too where the program has them (at partition they are fake)."""
    codes_node, block, scales_node = _arg(dq, 0, "input"), _arg(dq, 1, "block_size"), _arg(dq, 2, "scale")
    zp_node = _arg(dq, 3, "zero_point")
    qrange = (_arg(dq, 5, "quant_min"), _arg(dq, 6, "quant_max"))
    codes, scales = _constant(codes_node, ep), _constant(scales_node, ep)
    if isinstance(codes, str) or isinstance(scales, str):
        return f"its codes or scales are not constants ({codes if isinstance(codes, str) else scales})"
    if codes.dtype != torch.int8 or codes.dim() != 2:
        return f"its codes are {codes.dtype} of rank {codes.dim()}, not int8 [vocab, dim]"
    if qrange == (None, None) and _arg(dq, 4, "input_dtype") == torch.int8:
        qrange = (-128, 127)
    if qrange not in BITS:
        return f"quant range [{qrange[0]}, {qrange[1]}] is neither int4 [-8, 7] nor int8 [-128, 127]"
    vocab, dim = (int(d) for d in codes.shape)
    gs = list(block)[1] if isinstance(block, (list, tuple)) and len(block) == 2 and list(block)[0] == 1 else None
    if not isinstance(gs, int) or gs <= 0 or dim % gs:
        return f"block size {block} is not [1, gs] with gs dividing the dim {dim} (PerGroup(gs) or PerAxis(0))"
    if scales.dtype != torch.float32 or scales.numel() != vocab * (dim // gs) or \
            scales.dim() not in (1, 2) or scales.shape[0] != vocab:
        return (f"its scales are {scales.dtype} {tuple(scales.shape)}, not float32 "
                f"{(vocab, dim // gs)} (one per row and group)")
    if dq.kwargs.get("output_dtype", torch.float32) != torch.float32:
        return f"the dequantized table is {dq.kwargs.get('output_dtype')}, not float32"
    has_values = ep is not None and not isinstance(codes, FakeTensor)
    if zp_node is not None:
        zp = _constant(zp_node, ep)
        if isinstance(zp, str):
            return f"its zero point is not a constant ({zp})"
        if has_values and not isinstance(zp, FakeTensor) and bool((zp != 0).any()):
            return "its zero points are not all zero (asymmetric quantization: quantize with MappingType.SYMMETRIC)"
    if has_values and codes.numel() and (int(codes.min()) < qrange[0] or int(codes.max()) > qrange[1]):
        return f"its codes fall outside [{qrange[0]}, {qrange[1]}]"
    return Scheme(codes_node, scales_node, BITS[qrange], vocab, dim, gs)


def _ids_problem(embedding: Node) -> Optional[str]:
    ids = args_of(embedding)[1]
    val = _val(ids) if isinstance(ids, Node) else None
    if not isinstance(val, torch.Tensor) or val.dtype not in INT_DTYPES:
        return f"its ids are {getattr(val, 'dtype', type(ids).__name__)}, not an integer tensor"
    return _held(_val(embedding))


def feeds_embeddings(dq: Node) -> bool:
    """Is every reader of this dequantize_affine node an embedding of the table (so no linear's)?"""
    return bool(dq.users) and all(target_name(u) == EMBEDDING and args_of(u)[0] is dq and dq not in args_of(u)[1:]
                                  for u in dq.users)


def table_problem(dq: Node, ep: Optional[ExportedProgram] = None) -> Optional[str]:
    """None when the graph delegate runs this dequantize_affine as a quantized embedding table, else why not."""
    if not feeds_embeddings(dq):
        readers = sorted({target_name(u) or u.op for u in dq.users})
        return (f"not part of an accepted q4gsw linear (fp32 matmuls stay on the CPU), nor a quantized "
                f"embedding table (it feeds {', '.join(readers) or 'nothing'})")
    scheme = scheme_of(dq, ep)
    if isinstance(scheme, str):
        return f"a quantized embedding table the GPU cannot gather from: {scheme}"
    for u in dq.users:
        why = _ids_problem(u)
        if why is not None:
            return f"its embedding {u.name} stays on the CPU: {why}"
    return None


# ---- packing --------------------------------------------------------------------------------------------

def pack_codes(codes: Union[torch.Tensor, np.ndarray], bits: int) -> bytes:
    """A [V, D] table's codes as embedding_q reads them: row-major, 32 / bits per u32 from the low bits up
    (int4: element 2k in the low nibble of byte k; int8: a byte each), two's complement, padded to whole u32s."""
    flat = np.asarray(codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else codes)
    flat = flat.astype(np.int8).reshape(-1)
    if bits == 8:
        raw = flat.tobytes()
    elif bits == 4:
        nibbles = flat.view(np.uint8) & 0xF
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        raw = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
    else:
        raise ValueError(f"embedding_q packs 4- or 8-bit codes, not {bits}")
    return raw + bytes(-len(raw) % 4)


# ---- the rules ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Table:
    """What a dequantize node lowers to: its scheme (the embeddings that read it emit the steps)."""

    scheme: Scheme


# codes placeholder -> its packed buffer, per lowering: every dequantize of one table (a module called
# twice gives one per call) and every embedding reading them share one upload
_PACKED: "weakref.WeakKeyDictionary[Lowerer, Dict[Node, TensorRef]]" = weakref.WeakKeyDictionary()


def _packed_codes(lw: Lowerer, s: Scheme) -> TensorRef:
    packed = _PACKED.setdefault(lw, {})
    if s.codes not in packed:
        codes = constant_value(lw.ep, s.codes)
        if codes is None:
            raise LoweringError(f"the codes {s.codes.name} have no value in the program")
        data = pack_codes(codes, s.bits)
        packed[s.codes] = TensorRef(lw.new_buffer("constant", len(data), f"{s.codes.name}.packed", data),
                                    (len(data) // 4,), "u32")
    return packed[s.codes]


def _check_dequantize(node: Node) -> Optional[str]:
    return table_problem(node)


def lower_dequantize(lw: Lowerer, node: Node) -> None:
    """No step: the embeddings read the codes and scales (packed at the first of them)."""
    scheme = scheme_of(node, lw.ep)
    if isinstance(scheme, str):
        raise LoweringError(f"{node.name}: a quantized embedding table the GPU cannot gather from: {scheme}")
    lw.values[node] = _Table(scheme)


def _check_embedding(node: Node) -> Optional[str]:
    table = args_of(node)[0]
    if not (isinstance(table, Node) and target_name(table) == DEQUANTIZE_AFFINE):
        return "its table is not a quantized one (torchao dequantize_affine)"
    return table_problem(table)


def lower_embedding_q(lw: Lowerer, node: Node) -> None:
    table = lw.value(args_of(node)[0])
    if not isinstance(table, _Table):
        raise LoweringError(f"{node.name}: its table {args_of(node)[0]} was not lowered as a quantized table")
    s = table.scheme
    codes = _packed_codes(lw, s)
    scales = lw.tensor(s.scales)   # compile.py uploaded the fp32 scales: [V, groups] (or [V]), contiguous
    ids_node = args_of(node)[1]
    ids, is_i32 = _raw(lw, ids_node)
    if is_i32:
        lw.bound_input(ids_node, s.vocab)   # an input's ids: the runtime checks them against the vocabulary
    out = lw.out_tensor(node)
    n_ids = ids.numel
    lw.dispatch(node, KERNEL, {"a": ids.buffer, "w": codes.buffer, "scales": scales.buffer,
                               "out": out.buffer},
                {"n_ids": n_ids, "dim": s.dim, "vocab": s.vocab, "bits": s.bits, "group_size": s.group_size,
                 "n_groups": s.n_groups, "ids_f32": int(not is_i32)},
                _grid_1d(n_ids * s.dim, registry.kernel(KERNEL).workgroup_size[0]))
    lw.values[node] = out


UNFOLDED.add(DEQUANTIZE_AFFINE)
rule(DEQUANTIZE_AFFINE, check=_check_dequantize)(lower_dequantize)
# first: before ops_transformer's embedding of computed ids, which would take the table for an fp32 one;
# not reported: an embedding of any other table is declined for ops.py's reasons (a quantized table's problem
# is logged with its dequantize node)
also(EMBEDDING, check=_check_embedding, first=True, reported=False)(lower_embedding_q)

__all__: List[str] = ["Scheme", "feeds_embeddings", "pack_codes", "scheme_of", "table_problem"]
