"""Graph mode: weight-only quantized embeddings (torchao int4 / int8 on nn.Embedding) gathered from their codes.

torchao leaves `torchao.dequantize_affine(codes, [1, gs], scales, zero_point, ...)` feeding `aten.embedding`;
backend/graph/ops_quantized.py runs the pair as one embedding_q dispatch that reads the packed codes (8 nibbles
or 4 bytes per u32) and the fp32 scales, so the blob never holds an fp32 table. Checked here:

  * the kernel against fp64 goldens: int4 and int8, per group and per row, odd dims, ids of an input (i32)
    and computed ones (f32), the grid split over y;
  * a small model (int4 gs 32 embedding + a q4 linear; int8 per-row embedding read twice, once with computed
    ids) lowers to ONE delegate with no fp32 table in its named data and matches eager torchao to 1e-5;
  * an asymmetric embedding is declined, once, with the reason, and still runs;
  * ExecuTorch's Llama (small) with its token embedding int8 or int4: one delegate, the same 16 greedy tokens
    as eager, a smaller .pte; and (native) ExecuTorch's runtime gives our Python runtime's outputs.
"""

from __future__ import annotations

import types
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pytest
import torch

from executorch_wgpu.backend.graph.ops_quantized import pack_codes
from executorch_wgpu.runtime import Runtime
from executorch_wgpu.runtime_py.graph_delegate import GraphDelegate
from executorch_wgpu.shaders import registry
from executorch_wgpu.tools import models
from executorch_wgpu.tools.reference import rel_err, run_registry_kernel

SENTINEL = 12345.0
WG = registry.kernel("embedding_q").workgroup_size[0]
PROMPT = [1, 57, 300, 9, 1000, 77, 2048, 5, 4000, 12]
NEW_TOKENS = 16
MAX_TOKENS = 64


# ---- the kernel ---------------------------------------------------------------------------------------

def run_kernel(name: str, grid: Sequence[int], params: Mapping[str, Union[int, float]],
               inputs: Mapping[str, np.ndarray], out_size: int) -> np.ndarray:
    """Dispatch registry kernel `name` once; returns `out` (float32 words, SENTINEL where nothing was written)."""
    return run_registry_kernel(name, grid, params, inputs, np.full(out_size, SENTINEL, np.float32))


def test_codes_pack_row_major_from_the_low_bits_up():
    codes = np.array([[1, -1, 2, -8, 7], [0, 3, -2, 5, -3]], dtype=np.int8)   # 10 codes: a partial last word
    assert pack_codes(codes, 4) == bytes([0xF1, 0x82, 0x07, 0xE3, 0xD5, 0, 0, 0])
    assert pack_codes(codes, 8) == codes.tobytes() + bytes(2)
    assert pack_codes(torch.from_numpy(codes), 8) == pack_codes(codes, 8)


CASES = {   # (bits, vocab, dim, group size)
    "int4 gs 8, odd vocab": (4, 13, 40, 8),
    "int4 per row, odd dim": (4, 11, 37, 37),
    "int8 gs 15, odd dim": (8, 9, 45, 15),
    "int8 per row, odd dim": (8, 7, 33, 33),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("ids_f32", [0, 1])
def test_embedding_q_matches_fp64_on_odd_shapes(case, ids_f32):
    bits, vocab, dim, gs = CASES[case]
    g = torch.Generator().manual_seed(bits * 100 + dim)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (vocab, dim), generator=g, dtype=torch.int8)
    codes[0, 0], codes[-1, -1] = lo, hi                           # the range's ends
    scales = torch.rand(vocab, dim // gs, generator=g) + 0.01
    ids = np.array([vocab - 1, 0, 3, vocab - 1, 5, 2, 1, 0], dtype=np.int32)
    golden = codes.double() * scales.double().repeat_interleave(gs, dim=1)    # [vocab, dim], fp64
    expected = golden[torch.from_numpy(ids).long()].float().numpy().ravel()
    n = ids.size * dim
    id_words = ids.astype(np.float32).view(np.uint32) if ids_f32 else ids.view(np.uint32)
    params = {"n_ids": ids.size, "dim": dim, "vocab": vocab, "bits": bits, "group_size": gs,
              "n_groups": dim // gs, "ids_f32": ids_f32}
    inputs = {"a": id_words, "w": np.frombuffer(pack_codes(codes, bits), np.uint32),
              "scales": scales.numpy()}
    for grid in ((-(-n // WG), 1, 1), (1, -(-n // WG), 1)):       # over x, or split over y
        got = run_kernel("embedding_q", grid, params, inputs, n + dim)
        # a code times an f32 scale is exact in fp64: the f32 product is the golden rounded once
        assert np.array_equal(got[:n], expected), (case, grid)
        assert (got[n:] == SENTINEL).all()


def test_embedding_q_clamps_a_bad_id_into_the_table():
    codes = torch.arange(12, dtype=torch.int8).reshape(3, 4) - 6
    params = {"n_ids": 2, "dim": 4, "vocab": 3, "bits": 8, "group_size": 4, "n_groups": 1, "ids_f32": 0}
    got = run_kernel("embedding_q", (1, 1, 1), params,
                     {"a": np.array([-5, 7], np.int32).view(np.uint32), "w": np.frombuffer(pack_codes(codes, 8),
                                                                                           np.uint32),
                      "scales": np.ones(3, np.float32)}, 8)
    assert got.tolist() == codes[[0, 2]].float().ravel().tolist()


# ---- small models -------------------------------------------------------------------------------------

class EmbedThenLinear(torch.nn.Module):
    def __init__(self, vocab: int = 67, dim: int = 64, out: int = 48):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.lin = torch.nn.Linear(dim, out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(ids))


class EmbedTwice(torch.nn.Module):
    """One table read twice: by the input's ids and by ids the graph computes."""

    def __init__(self, vocab: int = 29, dim: int = 45):
        super().__init__()
        torch.manual_seed(1)
        self.emb = torch.nn.Embedding(vocab, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids) * 2.0 + self.emb(ids + 1)


SMALL = {   # name: (module, weight dtype, group size or None for per row)
    "int4 gs 32 + q4 linear": (EmbedThenLinear, "int4", 32),
    "int8 per row, read twice": (EmbedTwice, "int8", None),
}


def lower_small(name: str):
    build, dtype, gs = SMALL[name]
    model = models.quantize_embeddings(build().eval(), dtype, gs)
    models.quantize_q4(model, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear))
    example = torch.tensor([[1, 5, 0]])
    with models.recording_declines() as declines:
        pte = models.lower_to_pte(model, (example,), ({1: torch.export.Dim("tokens", min=1, max=16)},),
                                  linears_only=False)
    return types.SimpleNamespace(model=model, pte=pte, declines=declines, vocab=model.emb.num_embeddings,
                                 dim=model.emb.embedding_dim)


def constant_buffers(method) -> List[Tuple[str, int]]:
    """(name, bytes) of every constant buffer of the program's delegates (what named data holds for them)."""
    return [(b.name, b.bytes) for d in method._delegates for b in d.record.buffers if b.kind == "constant"]


def load(pte: bytes):
    return Runtime.get().load_program(pte).load_method("forward")


@pytest.mark.parametrize("name", list(SMALL))
def test_a_quantized_embedding_lowers_into_one_delegate_with_no_fp32_table(name):
    lowered = lower_small(name)
    bits = 4 if SMALL[name][1] == "int4" else 8
    method = load(lowered.pte)
    assert len(method._delegates) == 1 and isinstance(method._delegates[0], GraphDelegate)
    assert lowered.declines == []
    steps = [s.kernel or "linear" for s in method._delegates[0].record.steps]
    assert "embedding_q" in steps and "embedding" not in steps and "gather" not in steps
    # the table is there as packed codes (and fp32 scales), never as V x D floats
    consts = constant_buffers(method)
    table = lowered.vocab * lowered.dim
    packed = [size for n, size in consts if n.endswith(".packed")]
    assert packed == [-(-table * bits // 32) * 4]     # once, however many embeddings read the table
    sizes = [size for _, size in consts]
    assert max(sizes) < 4 * table and sum(sizes) < 4 * table
    for ids in ([[1, 5, 0]], [[lowered.vocab - 2]], [list(range(16))]):
        x = torch.tensor(ids) % (lowered.vocab - 1)
        (got,) = method.execute([x])
        with torch.no_grad():
            expected = lowered.model(x)
        assert got.shape == expected.shape and rel_err(got, expected) <= 1e-5, ids


def test_an_asymmetric_embedding_stays_on_the_cpu_saying_why_once():
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, quantize_
    from torchao.quantization.granularity import PerAxis

    model = EmbedTwice().eval()
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0),
                                          mapping_type=MappingType.ASYMMETRIC),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Embedding))
    with models.recording_declines() as declines:
        pte = models.lower_to_pte(model, (torch.tensor([[1, 5, 0]]),), None, linears_only=False)
    why = [d for d in declines if "zero points are not all zero" in d]
    assert len(why) == 1 and "emb" in why[0] and "stays on the CPU" in why[0], why
    method = load(pte)
    assert not any(s.kernel == "embedding_q" for d in method._delegates for s in d.record.steps)
    x = torch.tensor([[1, 5, 0]])
    with torch.no_grad():
        expected = model(x)
    assert rel_err(method.execute([x])[0], expected) <= 1e-5


# ---- ExecuTorch's Llama --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llamas():
    """Llama small lowered in graph mode, its token embedding fp32 (None), int8 (per row) or int4 (gs 32)."""
    cache: Dict[Optional[str], types.SimpleNamespace] = {}

    def get(kind: Optional[str]) -> types.SimpleNamespace:
        if kind not in cache:
            model = models.build_llama("small", seed=0, llm_ops=True, quantize_embedding=kind)
            with models.recording_declines() as declines:
                pte = models.export_llama_pte(model, max_tokens=MAX_TOKENS, linears_only=False)
            cache[kind] = types.SimpleNamespace(model=model, pte=pte, declines=declines)
        return cache[kind]
    return get


def eager_tokens(model) -> List[int]:
    models.reset_kv_cache(model)
    return models.greedy_generate(models.eager_runner(model), PROMPT, NEW_TOKENS)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_llama_with_a_quantized_token_embedding_is_one_delegate_decoding_eagers_tokens(llamas, kind):
    llama = llamas(kind)
    method = load(llama.pte)
    assert len(method._delegates) == 1 and isinstance(method._delegates[0], GraphDelegate)
    assert llama.declines == []
    plan = method._plan
    assert [type(i.instr_args).__name__ for c in plan.chains for i in c.instructions] == ["DelegateCall"]
    assert "embedding_q" in [s.kernel for s in method._delegates[0].record.steps]
    args = llama.model.args
    table = 4 * args.vocab_size * args.dim    # bytes of the fp32 table
    assert max(size for _, size in constant_buffers(method)) < table
    ours = models.greedy_generate(models.method_runner(method), PROMPT, NEW_TOKENS)
    assert ours == eager_tokens(llama.model) and len(set(ours)) > 4
    # the .pte shrinks by the fp32 table, less the packed codes (1 or 1/2 byte a value) and the fp32 scales
    # (one a row for int8, one per 32 values for int4)
    fp32 = len(llamas(None).pte)
    packed = table // 4 if kind == "int8" else table // 8
    scales = 4 * args.vocab_size * (1 if kind == "int8" else args.dim // models.GROUP_SIZE)
    assert abs((fp32 - len(llama.pte)) - (table - packed - scales)) < 64 * 1024, (fp32, len(llama.pte))


@pytest.mark.native
@pytest.mark.parametrize("kind", ["int4"])
def test_llama_with_a_quantized_token_embedding_runs_the_same_in_executorchs_runtime(native_lib, llamas, kind):
    from executorch.runtime import Runtime as EtRuntime

    llama = llamas(kind)
    native = EtRuntime.get().load_program(llama.pte).load_method("forward")
    python = load(llama.pte)
    for tokens, pos in ((PROMPT, 0), ([PROMPT[3]], 10), ([4, 4095, 0], 11)):
        (ours,) = native.execute([torch.tensor([tokens]), torch.tensor([pos])])
        (theirs,) = python.execute([torch.tensor([tokens]), torch.tensor([pos])])
        assert rel_err(ours.clone(), theirs) <= 1e-5, (tokens, pos)
