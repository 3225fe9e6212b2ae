"""Graph mode on transformer models: MiniLM (BERT), transformers' LlamaForCausalLM and Qwen2ForCausalLM.

Each model lowers to ONE graph delegate (WebGPUPartitioner(linears_only=False)) and matches eager torch
running the same int4 model: MiniLM's sentence embeddings to cosine >= 0.9999, the decoders' logits to a
relative error <= 1e-4. The kernels the models added (bmm, compare_select, gather) are checked first, one
dispatch each, against fp64 goldens on odd shapes; small modules then exercise the lowering rules of
backend/graph/ops_transformer.py (dynamic masks from an integer input, folded static masks, an integer
result that must stay on the CPU, a mutable buffer that must not be folded). The op-set tests fail when a
model's Edge graph gains an op no graph rule covers.

Each model is exported once per module (fixtures): lowering is what costs time here.
"""

from __future__ import annotations

import logging
import math
import types
from typing import Dict, List, Mapping, Sequence, Union

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from executorch_wgpu.backend.graph import ops
from executorch_wgpu.runtime import Runtime
from executorch_wgpu.runtime_py.graph_delegate import GraphDelegate
from executorch_wgpu.shaders import registry
from executorch_wgpu.tools import demo, models
from executorch_wgpu.tools.reference import rel_err, run_registry_kernel

from executorch_wgpu.tools.models import SMALL_HF, hf_inputs, quantize_q4, transformers_model

BAR = 1e-4


def q4(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    return quantize_q4(module.eval())
RANK = registry.ELEMENTWISE_RANK
SEL = registry.kernel("compare_select").constants
Q4_OPS = {"torchao.dequantize_affine.default", "aten.mm.default", "aten.addmm.default"}   # q4gsw linears


# ---- running one kernel -------------------------------------------------------------------------------

def run_kernel(name: str, grid: Sequence[int], params: Mapping[str, Union[int, float]],
               inputs: Mapping[str, np.ndarray], out_size: int) -> np.ndarray:
    """Dispatch registry kernel `name` once; returns `out` (float32 words, 12345.0 where nothing was written)."""
    return run_registry_kernel(name, grid, params, inputs, np.full(out_size, 12345.0, np.float32))


def strided_params(shape: Sequence[int], **strides: Sequence[int]) -> Dict[str, int]:
    """d0..d5 and the named stride sets (sa, sb, ...) of a RANK-dim kernel, padded with leading 1s / 0s."""
    pad = RANK - len(shape)
    p = {f"d{i}": v for i, v in enumerate([1] * pad + list(shape))}
    for prefix, values in strides.items():
        p.update({f"{prefix}{i}": v for i, v in enumerate([0] * pad + list(values))})
    return p


def contiguous(shape: Sequence[int]) -> List[int]:
    return list(torch.empty(*shape).stride())


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def grid_1d(n: int) -> tuple:
    return (-(-n // 256), 1, 1)


# ---- bmm ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,m,k,n", [(3, 17, 33, 19), (1, 1, 5, 40), (2, 31, 1, 3)])
def test_bmm_matches_fp64_on_odd_shapes(batch, m, k, n):
    a, b = randn(batch, m, k, seed=1), randn(batch, k, n, seed=2)
    got = run_kernel("bmm", (-(-n // 16), -(-m // 16), batch),
                     {"batch": batch, "M": m, "N": n, "K": k, "sa_b": m * k, "sa_m": k, "sa_k": 1,
                      "sb_b": k * n, "sb_k": n, "sb_n": 1},
                     {"a": a.numpy(), "b": b.numpy()}, batch * m * n)
    assert rel_err(torch.from_numpy(got).reshape(batch, m, n), a.double() @ b.double()) <= BAR


def test_bmm_reads_operands_through_offsets_and_strides():
    """b read transposed from a [N, K] buffer past an offset of 7; a's batch broadcast (stride 0)."""
    m, k, n = 9, 21, 13
    a, bt = randn(m, k, seed=3), randn(n, k, seed=4)
    b_buf = torch.cat([torch.zeros(7), bt.reshape(-1)])
    got = run_kernel("bmm", (1, 1, 2), {"batch": 2, "M": m, "N": n, "K": k, "b_off": 7, "sa_b": 0, "sa_m": k,
                                         "sa_k": 1, "sb_b": 0, "sb_k": 1, "sb_n": k},
                     {"a": a.numpy(), "b": b_buf.numpy()}, 2 * m * n)
    want = (a.double() @ bt.double().T).expand(2, m, n)
    assert rel_err(torch.from_numpy(got).reshape(2, m, n), want) <= BAR


# ---- compare_select ------------------------------------------------------------------------------------

GOLDEN_BINARY = {"SEL_EQ": torch.eq, "SEL_NE": torch.ne, "SEL_LT": torch.lt, "SEL_LE": torch.le,
                 "SEL_GT": torch.gt, "SEL_GE": torch.ge, "SEL_AND": torch.logical_and,
                 "SEL_OR": torch.logical_or, "SEL_XOR": torch.logical_xor}


@pytest.mark.parametrize("op", sorted(GOLDEN_BINARY))
def test_compare_and_logic_broadcast_and_with_a_scalar(op):
    shape = (3, 5, 37)
    a = torch.randint(-2, 3, shape, generator=torch.Generator().manual_seed(5)).float()
    b = torch.randint(-2, 3, (5, 1), generator=torch.Generator().manual_seed(6)).float()
    a[0, 0, :3] = torch.tensor([float("-inf"), float("inf"), -0.0])
    n = a.numel()
    got = run_kernel("compare_select", grid_1d(n),
                     {"n": n, "op": SEL[op], **strided_params(shape, sa=contiguous(shape), sb=[0, 1, 0],
                                                             so=contiguous(shape))},
                     {"a": a.numpy(), "b": b.numpy()}, n)
    assert torch.equal(torch.from_numpy(got).reshape(shape), GOLDEN_BINARY[op](a, b).float())
    for scalar in (1.0, float("-inf")):
        got = run_kernel("compare_select", grid_1d(n),
                         {"n": n, "op": SEL[op], "scalar_bits": scalar, "b_is_scalar": 1,
                          **strided_params(shape, sa=contiguous(shape), so=contiguous(shape))},
                         {"a": a.numpy()}, n)
        assert torch.equal(torch.from_numpy(got).reshape(shape), GOLDEN_BINARY[op](a, torch.tensor(scalar)).float())


def test_unary_casts_where_fill_and_arange():
    shape = (2, 3, 301)   # n = 1806: several workgroups, the last partial
    n = math.prod(shape)
    x = randn(*shape, seed=7) * 3
    x[0, 0, :4] = torch.tensor([0.0, -0.0, 2.5, -2.5])
    ints = torch.randint(-(2**23), 2**23, shape, dtype=torch.int32, generator=torch.Generator().manual_seed(8))
    ints[0, 0, :2] = 0
    flat = dict(strided_params(shape, sa=contiguous(shape), so=contiguous(shape)), n=n)
    cases = [("SEL_NOT", x, (x == 0).float()), ("SEL_TO_BOOL", x, (x != 0).float()),
             ("SEL_TRUNC", x, torch.trunc(x)), ("SEL_FROM_I32", ints, ints.float()),
             ("SEL_I32_TO_BOOL", ints, (ints != 0).float())]
    for op, src, want in cases:
        got = run_kernel("compare_select", grid_1d(n), {**flat, "op": SEL[op]}, {"a": src.numpy()}, n)
        assert torch.equal(torch.from_numpy(got).reshape(shape), want), op
    # where: c broadcast over the last dim, a and b full; -inf and nan pass through untouched
    cond = (randn(2, 3, 1, seed=9) > 0).float()
    y = randn(*shape, seed=10)
    x[1, 2, 5], y[1, 2, 6] = float("-inf"), float("nan")
    got = run_kernel("compare_select", grid_1d(n),
                     {"n": n, "op": SEL["SEL_WHERE"], **strided_params(shape, sa=contiguous(shape),
                                                                       sb=contiguous(shape), sc=[3, 1, 0],
                                                                       so=contiguous(shape))},
                     {"a": x.numpy(), "b": y.numpy(), "c": cond.numpy()}, n)
    torch.testing.assert_close(torch.from_numpy(got).reshape(shape), torch.where(cond != 0, x, y), rtol=0, atol=0,
                               equal_nan=True)
    # fill, and arange written through output strides (a [n] range into every other element)
    got = run_kernel("compare_select", grid_1d(n), {**flat, "op": SEL["SEL_FILL"], "scalar_bits": float("-inf")},
                     {}, n)
    assert np.all(got == -np.inf)
    m = 1001
    got = run_kernel("compare_select", grid_1d(m), {"n": m, "op": SEL["SEL_ARANGE"], "scalar_bits": -3.0,
                                                    "step_bits": 2.0, "out_off": 1,
                                                    **strided_params([m], so=[2])}, {}, 2 * m + 1)
    assert torch.equal(torch.from_numpy(got[1::2]), torch.arange(-3, -3 + 2 * m, 2).float())
    assert np.all(got[0::2] == 12345.0)   # untouched


# ---- gather ----------------------------------------------------------------------------------------------

def test_gather_rows_by_f32_and_i32_ids():
    """embedding: table [V, D], ids [2, 5] -> out [2, 5, D]; ids as the graph's f32 and as an input's i32."""
    vocab, dim = 11, 37
    table = randn(vocab, dim, seed=11)
    ids = torch.tensor([[0, 10, 3, 3, 7], [1, 2, 9, 10, 0]])
    shape = (2, 5, dim)
    n = math.prod(shape)
    for data, is_i32 in ((ids.float(), 0), (ids.to(torch.int32), 1)):
        got = run_kernel("gather", grid_1d(n),
                         {"n": n, "n_idx": 1, "b_i32": is_i32, "b_step": dim, "b_wrap": vocab,
                          **strided_params(shape, sa=[0, 0, 1], sb=[5, 1, 0])},
                         {"a": table.numpy(), "b": data.numpy()}, n)
        assert torch.equal(torch.from_numpy(got).reshape(shape), F.embedding(ids, table))


def test_gather_by_two_broadcast_index_tensors_and_along_a_middle_dim():
    x = randn(4, 6, 5, seed=12)
    i0 = torch.tensor([[0], [3], [-1]])            # [3, 1]: a negative index counts from the end
    i1 = torch.tensor([[1, 5, -6, 2]])             # [1, 4]
    want = x[i0, i1]                               # [3, 4, 5]
    shape = tuple(want.shape)
    n = want.numel()
    got = run_kernel("gather", grid_1d(n),
                     {"n": n, "n_idx": 2, "b_step": 30, "b_wrap": 4, "c_step": 5, "c_wrap": 6,
                      **strided_params(shape, sa=[0, 0, 1], sb=[1, 0, 0], sc=[0, 1, 0])},
                     {"a": x.numpy(), "b": i0.float().numpy(), "c": i1.float().numpy()}, n)
    assert torch.equal(torch.from_numpy(got).reshape(shape), want)
    index = torch.randint(0, 6, (4, 3, 5), generator=torch.Generator().manual_seed(13))
    want = torch.gather(x, 1, index)
    n = want.numel()
    got = run_kernel("gather", grid_1d(n),
                     {"n": n, "n_idx": 1, "b_step": 5, "b_wrap": 6,
                      **strided_params(index.shape, sa=[30, 0, 1], sb=contiguous(index.shape))},
                     {"a": x.numpy(), "b": index.float().numpy()}, n)
    assert torch.equal(torch.from_numpy(got).reshape(want.shape), want)


# ---- lowering rules on small modules ---------------------------------------------------------------------

class _Declines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "stay on the CPU" in record.getMessage():
            self.messages.append(record.getMessage())


class recording:
    """The graph partitioner's 'N op node(s) stay on the CPU: why' lines of the lowering inside."""

    def __enter__(self) -> List[str]:
        self.handler = _Declines()
        logging.getLogger("executorch_wgpu").addHandler(self.handler)
        return self.handler.messages

    def __exit__(self, *exc) -> None:
        logging.getLogger("executorch_wgpu").removeHandler(self.handler)


def lower(module: torch.nn.Module, example: tuple, dynamic=None) -> tuple:
    with recording() as declines:
        pte = models.lower_to_pte(module, example, dynamic, linears_only=False)
    return Runtime.get().load_program(pte).load_method("forward"), declines


def delegate_kernels(method) -> List[str]:
    return [s.kernel or "linear" for d in method._delegates for s in d.record.steps]


class EncoderOps(torch.nn.Module):
    """What surrounds a BERT layer's linears: positions and token types from buffers sliced to the token count,
    embeddings of computed ids, LayerNorm, a padding mask from an int input, sdpa with a boolean mask, GELU;
    and a few more rules on the way (sum and any over the last dim, a float -> int cast)."""

    def __init__(self, dim: int = 24, heads: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.word, self.pos, self.types = (torch.nn.Embedding(50, dim), torch.nn.Embedding(40, dim),
                                          torch.nn.Embedding(2, dim))
        self.norm = torch.nn.LayerNorm(dim)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)
        self.register_buffer("position_ids", torch.arange(40).unsqueeze(0), persistent=False)
        self.register_buffer("token_type_ids", (torch.arange(40) % 2).unsqueeze(0), persistent=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s = ids.shape[1]
        positions = self.position_ids[:, :s]
        types = torch.gather(self.token_type_ids.expand(1, -1), 1, positions)
        h = self.norm(self.word(ids) + self.pos(positions) + self.types(types))
        q = h.view(1, s, self.heads, -1).transpose(1, 2)
        keep = mask[:, None, None, :].to(torch.bool).expand(1, 1, s, s)
        a = F.scaled_dot_product_attention(q, q * 0.5, q, attn_mask=keep).transpose(1, 2).reshape(1, s, -1)
        extras = (torch.arange(s) >= 2).float()[None, :, None] * ids[..., None].float() * 0.01   # int input -> f32
        extras = extras + h.sum(-1, keepdim=True) * 0.1 + h.any(-1, keepdim=True) + (h * 3).long() * 0.01
        return F.gelu(a) + extras


def test_encoder_ops_with_a_dynamic_token_count_lower_to_one_delegate_and_match_eager():
    model = EncoderOps().eval()
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(14))
    mask = torch.ones(1, 9, dtype=torch.long)
    tokens = torch.export.Dim("tokens", min=1, max=16)
    method, declines = lower(model, (ids, mask), ({1: tokens}, {1: tokens}))
    assert declines == [] and len(method._delegates) == 1 and isinstance(method._delegates[0], GraphDelegate)
    assert {"bmm", "compare_select", "gather", "reduce_rows"} <= set(delegate_kernels(method))
    for s, padded in ((9, 0), (9, 4), (1, 0), (16, 7)):
        ids = torch.randint(0, 50, (1, s), generator=torch.Generator().manual_seed(s))
        mask = torch.ones(1, s, dtype=torch.long)
        mask[0, s - padded:] = 0
        (got,) = method.execute([ids, mask])
        with torch.no_grad():
            assert rel_err(got, model(ids, mask)) <= BAR, (s, padded)


class StaticMasks(torch.nn.Module):
    """A static decoder's positions and masks (packed sequences by cumsum, causal by tril): all fixed by the
    export, so folded at preprocess; only the attention runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # [1, 2, 7, 8]
        s = x.shape[2]
        pos = torch.arange(s)
        seq = torch.cumsum((pos == 3).long() + (pos == 5).long(), 0)
        keep = torch.ones(s, s).tril().bool() & (seq[:, None] == seq[None, :])
        scores = (x @ x.transpose(-1, -2) * 0.3).masked_fill(~keep, float("-inf"))
        return scores.softmax(-1) @ x


def test_static_masks_are_folded_and_only_the_attention_runs():
    model = StaticMasks().eval()
    x = randn(1, 2, 7, 8, seed=15)
    method, declines = lower(model, (x,))
    assert declines == [] and len(method._delegates) == 1
    kernels = delegate_kernels(method)
    assert set(kernels) <= {"bmm", "reduce_rows", "elementwise", "compare_select"}, kernels
    assert kernels.count("compare_select") <= 1   # the where of the mask: its condition is a constant
    for seed in (15, 16):
        x = randn(1, 2, 7, 8, seed=seed)
        (got,) = method.execute([x])
        assert rel_err(got, model(x)) <= BAR


class IntegerResult(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return (x > 0).long() + 1, x * 2 + 1


def test_an_integer_result_leaving_the_program_stays_on_the_cpu_with_its_dtype():
    x = randn(3, 5, seed=17)
    method, declines = lower(IntegerResult().eval(), (x,))
    counts, doubled = method.execute([x])
    assert counts.dtype == torch.int64 and torch.equal(counts, (x > 0).long() + 1)
    assert rel_err(doubled, x * 2 + 1) <= BAR
    assert any("result is an output of the program" in d for d in declines), declines


class Counter(torch.nn.Module):
    """A mutable buffer fed by constants only: never folded (its value changes from call to call)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count.add_(1.0)
        return x * self.count


def test_a_mutable_buffer_is_not_folded():
    method, _ = lower(Counter().eval(), (torch.ones(4),))
    got = [method.execute([torch.ones(4)])[0].clone() for _ in range(3)]
    assert [float(g[0]) for g in got] == [1.0, 2.0, 3.0]


# ---- MiniLM ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    tokenizer, fp32 = models.load_minilm()
    q4model = models.quantize_minilm(fp32)
    with recording() as declines:
        pte = models.export_minilm_pte(q4model, linears_only=False)
    method = Runtime.get().load_program(pte).load_method("forward")
    return types.SimpleNamespace(tokenizer=tokenizer, q4=q4model, method=method, declines=declines, pte=pte)


def test_minilm_lowers_to_one_graph_delegate(minilm):
    method = minilm.method
    assert minilm.declines == []
    assert len(method._delegates) == 1 and isinstance(method._delegates[0], GraphDelegate)
    assert [type(i.instr_args).__name__ for c in method._plan.chains for i in c.instructions] == ["DelegateCall"]
    linears = method._delegates[0].record.linears   # q/k/v fused into one linear of three parts
    assert sum(max(1, len(lin.parts)) for lin in linears) == len(models.minilm_linear_names(minilm.q4))


def eager_embeddings(model: torch.nn.Module, tokenizer, sentences: Sequence[str], pad_to: int) -> torch.Tensor:
    """The eager int4 model's sentence embeddings, in one batch padded to pad_to tokens (torchao's int4 eager path
    costs about a second a call on a CPU): the mask keeps the pad tokens out of every real token's attention and
    out of the mean, so these are the unpadded sentences' embeddings too."""
    enc = tokenizer(list(sentences), return_tensors="pt", padding="max_length", max_length=pad_to, truncation=True)
    with torch.no_grad():
        hidden = models.MiniLMEncoder(model).eval()(enc["input_ids"], enc["attention_mask"])
    return F.normalize(models.mean_pool(hidden, enc["attention_mask"]), dim=-1)


def test_minilm_embeddings_match_the_same_int4_model_in_eager(minilm):
    theirs = eager_embeddings(minilm.q4, minilm.tokenizer, demo.SENTENCES, pad_to=24)
    run = models.method_runner(minilm.method)
    for pad_to in (None, 24):   # padded: the attention mask from the input masks the pad tokens' keys
        ours = models.embed(run, minilm.tokenizer, demo.SENTENCES, pad_to=pad_to)
        cosines = (ours * theirs).sum(-1)
        assert cosines.min() >= 0.9999, (pad_to, cosines)


# ---- transformers' Llama and Qwen2 (random weights, no KV cache) -------------------------------------------

HF = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Config")}


def hf_model(name: str) -> torch.nn.Module:
    return q4(transformers_model(*HF[name], **SMALL_HF, num_key_value_heads=2, max_position_embeddings=32))


@pytest.fixture(scope="module", params=sorted(HF))
def hf(request):
    model = hf_model(request.param)
    with recording() as declines:
        pte = models.lower_to_pte(model, hf_inputs(), None, linears_only=False)
    method = Runtime.get().load_program(pte).load_method("forward")
    return types.SimpleNamespace(name=request.param, model=model, method=method, declines=declines, pte=pte)


def test_hf_decoder_lowers_to_one_delegate_and_its_logits_match_eager(hf):
    method = hf.method
    assert hf.declines == []
    assert len(method._delegates) == 1 and isinstance(method._delegates[0], GraphDelegate)
    assert [type(i.instr_args).__name__ for c in method._plan.chains for i in c.instructions] == ["DelegateCall"]
    for seed in (1, 2):
        (ids,) = hf_inputs() if seed == 1 else (torch.randint(0, 128, (1, 6),
                                                              generator=torch.Generator().manual_seed(seed)),)
        (got,) = method.execute([ids])
        with torch.no_grad():
            want = hf.model(ids).logits
        assert rel_err(got, want) <= BAR, (hf.name, seed)


# ---- the same programs in ExecuTorch's runtime, through the native delegate ------------------------------

def et_method(pte: bytes):
    """The program's forward in ExecuTorch's own runtime: the native delegate interprets the graph blob."""
    from executorch.runtime import Runtime as EtRuntime

    return EtRuntime.get().load_program(pte).load_method("forward")


@pytest.mark.native
def test_minilm_in_executorchs_runtime_gives_the_python_runtimes_hidden_states(native_lib, minilm):
    native = et_method(minilm.pte)
    for sentence in demo.SENTENCES[:3]:
        enc = minilm.tokenizer(sentence, return_tensors="pt")
        inputs = [enc["input_ids"], enc["attention_mask"]]
        (theirs,) = minilm.method.execute(inputs)
        (ours,) = native.execute(inputs)
        assert ours.shape == theirs.shape and rel_err(ours, theirs) <= 1e-5, sentence


@pytest.mark.native
def test_hf_decoder_in_executorchs_runtime_gives_the_python_runtimes_logits_and_tokens(native_lib, hf):
    native = et_method(hf.pte)
    for seed in (1, 2):
        (ids,) = hf_inputs() if seed == 1 else (torch.randint(0, 128, (1, 6),
                                                              generator=torch.Generator().manual_seed(seed)),)
        (theirs,) = hf.method.execute([ids])
        (ours,) = native.execute([ids])
        assert ours.shape == theirs.shape and rel_err(ours, theirs) <= 1e-5, (hf.name, seed)
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1)), (hf.name, seed)   # the greedy next tokens


# ---- op sets: a new op no graph rule covers fails here ---------------------------------------------------

def edge_ops(module: torch.nn.Module, example: tuple, dynamic=None) -> set:
    from executorch.exir import to_edge

    with torch.no_grad():
        ep = torch.export.export(module, example, dynamic_shapes=dynamic, strict=False)
        graph = to_edge(ep).exported_program().graph
    return {ops.target_name(n) for n in graph.nodes if n.op == "call_function"}


def uncovered(names: set) -> List[str]:
    return sorted(names - Q4_OPS - set(ops.RULES))


def test_every_op_of_the_minilm_edge_graph_has_a_graph_rule():
    """MiniLM's architecture (its config, one layer, random weights)."""
    import transformers

    config = transformers.BertConfig.from_pretrained(str(models.minilm_path()), num_hidden_layers=1,
                                                     attn_implementation="sdpa")
    torch.manual_seed(0)
    bert = models.quantize_minilm(transformers.BertModel(config).eval())
    example = torch.ones(1, 8, dtype=torch.long)
    seq = torch.export.Dim("seq", min=1, max=models.MINILM_MAX_SEQ)
    names = edge_ops(models.MiniLMEncoder(bert).eval(), (example, example), ({1: seq}, {1: seq}))
    assert uncovered(names) == []


@pytest.mark.parametrize("name", sorted(HF))
def test_every_op_of_the_hf_decoder_edge_graph_has_a_graph_rule(name):
    assert uncovered(edge_ops(hf_model(name), hf_inputs())) == []
