"""Our runtime runs what ExecuTorch's runtime runs, with the same outputs.

A corpus of programs -- plain and quantized, a declined layer, static and
dynamic shapes, Tensor[] outs (chunk/split, as fused qkv and gate_up
projections export), elided views of an input, aliased outputs, a mutable
buffer, two methods, and real transformers architectures with random weights
(GPT-2, OPT, GPT-NeoX, GPTBigCode, Phi-3, Llama, Qwen2, ModernBERT, the SigLIP
vision tower) -- each run by `executorch_wgpu.runtime` and by
`executorch.runtime` with our native delegate registered. ExecuTorch's runtime
is the golden: same output shapes and dtypes, values within float rounding of
its portable CPU kernels. An operator neither can run is refused at load_method.
The programs are lowered linears-only (WebGPUPartitioner(linears_only=True)), so
their non-linear ops are the .pte's own, which both runtimes interpret; graph
mode, the default, would move most of them into its delegate.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Sequence

import pytest
import torch
from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
from executorch.runtime import Runtime as EtRuntime

from executorch_wgpu import WebGPUPartitioner
from executorch_wgpu.errors import OperatorError, UnsupportedOperatorError
from executorch_wgpu.runtime import Runtime
from executorch_wgpu.tools.models import SMALL_HF, hf_inputs, quantize_q4, transformers_model

pytestmark = pytest.mark.native

# ATen (ours) and ExecuTorch's portable kernels may round fp32 sums differently.
RTOL, ATOL = 1e-5, 1e-6


class Case(NamedTuple):
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], tuple]                 # example inputs (also the first call's)
    dynamic_shapes: Callable[[], object] = lambda: None
    calls: int = 1                              # execute() calls in a row (state carries over)


class GatedFFN(torch.nn.Module):
    """gate and up fused into one projection, split with chunk: a Tensor[] out in the .pte."""

    def __init__(self, dim: int = 64, hidden: int = 128):
        super().__init__()
        self.gate_up = torch.nn.Linear(dim, 2 * hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(torch.nn.functional.silu(gate) * up)


class FusedQKV(torch.nn.Module):
    """qkv in one projection, split with unequal sizes (split_with_sizes), three outputs."""

    def __init__(self, dim: int = 64, kv: int = 32):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, dim + 2 * kv)
        self.sizes = [dim, kv, kv]

    def forward(self, x):
        q, k, v = self.qkv(x).split(self.sizes, dim=-1)
        return q, k * 2, v


class Mlp(torch.nn.Module):
    """Linear on a [B, T, K] input: the emitter elides the views around addmm, one of them of the input."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))

    def forward(self, x):
        return self.net(x)


class Aliased(torch.nn.Module):
    """Outputs that alias: the input itself, a view of it, and the same result twice."""

    def forward(self, x):
        y = torch.relu(x)
        return x, x.view(-1), y, y


class Accumulator(torch.nn.Module):
    """A mutable buffer carried across calls."""

    def __init__(self):
        super().__init__()
        self.register_buffer("total", torch.zeros(4, 32))
        self.proj = torch.nn.Linear(32, 32)

    def forward(self, x):
        self.total.add_(self.proj(x))
        return self.total.clone()


def images(size: int = 32) -> tuple:
    return (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2)),)


def randn(*shape: int) -> Callable[[], tuple]:
    return lambda: (torch.randn(*shape, generator=torch.Generator().manual_seed(0)),)


def q4(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    return quantize_q4(module.eval())


SMALL_GPT = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32)   # GPT-2's names for the same

CORPUS: Dict[str, Case] = {
    "plain-static-3d": Case(lambda: Mlp().eval(), randn(2, 3, 64)),
    "q4-static-3d": Case(lambda: q4(Mlp()), randn(2, 3, 64)),
    "q4-dynamic-tokens": Case(lambda: q4(Mlp()), randn(1, 5, 64),
                              lambda: ({1: torch.export.Dim("tokens", min=1, max=32)},)),
    "declined-group-size-16": Case(lambda: quantize_q4(Mlp().eval(), group_size=16), randn(1, 4, 64)),
    "q4-fused-gate-up-chunk": Case(lambda: q4(GatedFFN()), randn(1, 7, 64)),
    "q4-fused-qkv-split": Case(lambda: q4(FusedQKV()), randn(1, 5, 64)),
    "aliased-outputs": Case(lambda: Aliased(), randn(3, 8)),
    "mutable-buffer": Case(lambda: q4(Accumulator()), randn(4, 32), calls=3),
    "hf-gpt2": Case(lambda: transformers_model("GPT2LMHeadModel", "GPT2Config", vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                               n_positions=32), hf_inputs),
    "hf-phi3-q4": Case(lambda: q4(transformers_model("Phi3ForCausalLM", "Phi3Config", **SMALL_HF, num_key_value_heads=2,
                                                     pad_token_id=0)), hf_inputs),
    # Learned positions from a cumsum of the mask; project_in/project_out around a narrower embedding.
    "hf-opt-q4": Case(lambda: q4(transformers_model("OPTForCausalLM", "OPTConfig", **SMALL_HF, ffn_dim=128,
                                                    max_position_embeddings=32, word_embed_proj_dim=32)), hf_inputs),
    # Fused query_key_value (split), partial rotary (rotary_pct 0.25), parallel residual.
    "hf-gpt-neox-q4": Case(lambda: q4(transformers_model("GPTNeoXForCausalLM", "GPTNeoXConfig", **SMALL_HF,
                                                         max_position_embeddings=32)), hf_inputs),
    # Multi-query attention: c_attn split into unequal q, k, v (split_with_sizes).
    "hf-gpt-bigcode-q4": Case(lambda: q4(transformers_model("GPTBigCodeForCausalLM", "GPTBigCodeConfig", **SMALL_GPT,
                                                            bos_token_id=0, eos_token_id=0)), hf_inputs),
    # Grouped-query attention, RMSNorm, rotary, SwiGLU; Qwen2 adds qkv biases.
    "hf-llama-q4": Case(lambda: q4(transformers_model("LlamaForCausalLM", "LlamaConfig", **SMALL_HF, num_key_value_heads=2,
                                                      max_position_embeddings=32)), hf_inputs),
    "hf-qwen2-q4": Case(lambda: q4(transformers_model("Qwen2ForCausalLM", "Qwen2Config", **SMALL_HF, num_key_value_heads=2,
                                                      max_position_embeddings=32)), hf_inputs),
    # An encoder: fused Wqkv (unbind), GeGLU Wi (chunk), a global layer then a sliding-window one (window 4 of 8
    # tokens), the masked-LM head.
    "hf-modernbert-mlm-q4": Case(lambda: q4(transformers_model(
        "ModernBertForMaskedLM", "ModernBertConfig", **SMALL_HF, max_position_embeddings=32, local_attention=4,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)), lambda: hf_inputs(length=8)),
    # A vision tower: patch convolution, learned positions, the attention-pooling head (nn.MultiheadAttention:
    # its packed in_proj weight is split in the graph and stays on the CPU).
    "hf-siglip-vision-q4": Case(lambda: q4(transformers_model(
        "SiglipVisionModel", "SiglipVisionConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, image_size=32, patch_size=8)), images),
}


def export_program(case: Case) -> bytes:
    model = case.build()
    with torch.no_grad():
        ep = torch.export.export(model, case.inputs(), dynamic_shapes=case.dynamic_shapes(), strict=False)
    edge = to_edge_transform_and_lower(ep, partitioner=[WebGPUPartitioner(linears_only=True)])
    return edge.to_executorch(ExecutorchBackendConfig()).buffer


def outputs_of(method, inputs: Sequence, calls: int) -> List[List[torch.Tensor]]:
    return [[o.clone() if isinstance(o, torch.Tensor) else o for o in method.execute(list(inputs))]
            for _ in range(calls)]


def assert_same_outputs(ours: List[List], golden: List[List]) -> None:
    assert len(ours) == len(golden)
    for call, (got_call, want_call) in enumerate(zip(ours, golden)):
        assert len(got_call) == len(want_call), f"call {call}: {len(got_call)} outputs, ExecuTorch gives {len(want_call)}"
        for i, (got, want) in enumerate(zip(got_call, want_call)):
            assert isinstance(got, torch.Tensor) == isinstance(want, torch.Tensor), (call, i)
            if not isinstance(want, torch.Tensor):
                assert got == want, (call, i)
                continue
            assert got.shape == want.shape and got.dtype == want.dtype, (call, i, got.shape, want.shape)
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=f"call {call}, output {i}")


@pytest.mark.parametrize("name", list(CORPUS))
def test_our_runtime_gives_what_executorch_runtime_gives(name, native_lib):
    case = CORPUS[name]
    pte = export_program(case)
    inputs = case.inputs()
    golden = outputs_of(EtRuntime.get().load_program(pte).load_method("forward"), inputs, case.calls)
    ours = outputs_of(Runtime.get().load_program(pte).load_method("forward"), inputs, case.calls)
    assert_same_outputs(ours, golden)


def test_two_methods_of_one_program_each_match_executorch(native_lib):
    mlp, ffn = q4(Mlp()), q4(GatedFFN())
    x = randn(1, 3, 64)()
    programs = {"mlp": torch.export.export(mlp, x), "ffn": torch.export.export(ffn, x)}
    edge = to_edge_transform_and_lower(programs, partitioner=[WebGPUPartitioner(linears_only=True)])
    pte = edge.to_executorch().buffer
    ours, theirs = Runtime.get().load_program(pte), EtRuntime.get().load_program(pte)
    assert sorted(ours.method_names) == ["ffn", "mlp"]
    for method in ("mlp", "ffn"):
        assert_same_outputs(outputs_of(ours.load_method(method), x, 1),
                            outputs_of(theirs.load_method(method), x, 1))


def test_an_operator_failing_on_checked_inputs_is_an_operator_error_naming_it_and_the_method_recovers():
    """A token id beyond the vocabulary passes the input checks (dtype, shape) and fails inside aten.embedding:
    the error names that operator rather than blaming the file or the input's shape."""
    model = torch.nn.Embedding(10, 8).eval()
    ids = torch.tensor([[1, 2, 3]])
    pte = to_edge_transform_and_lower(torch.export.export(model, (ids,))).to_executorch().buffer
    method = Runtime.get().load_program(pte).load_method("forward")
    with pytest.raises(OperatorError, match="embedding"):
        method.execute([torch.tensor([[1, 12, 3]])])
    (y,) = method.execute([ids])
    torch.testing.assert_close(y, model(ids))


class HalvedRelu(torch.nn.Module):
    def forward(self, x):
        return torch.ops.wgpu_difftest.halve(torch.relu(x))


def _halve_out(x: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    return out.resize_(x.shape).copy_(x * 0.5)


def test_an_operator_this_process_lacks_is_refused_at_load_method_naming_it(native_lib):
    """A custom op, registered with torch.library where the program was exported and gone where it is loaded
    (as when its library is not imported): the method is refused when it loads, not midway through a call, with
    the op's name -- ExecuTorch's runtime refuses it at load_method too. While registered, it runs."""
    x = randn(3, 4)()
    with torch.library._scoped_library("wgpu_difftest", "DEF") as lib:
        lib.define("halve(Tensor x) -> Tensor")
        lib.define("halve.out(Tensor x, *, Tensor(a!) out) -> Tensor(a!)")   # the emitter calls out variants
        lib.impl("halve", lambda x: x * 0.5, "CompositeExplicitAutograd")
        lib.impl("halve.out", _halve_out, "CompositeExplicitAutograd")
        pte = to_edge_transform_and_lower(torch.export.export(HalvedRelu(), x)).to_executorch().buffer
        (y,) = Runtime.get().load_program(pte).load_method("forward").execute(list(x))
        torch.testing.assert_close(y, torch.relu(x[0]) * 0.5)
    assert not hasattr(torch.ops.wgpu_difftest, "halve")
    program = Runtime.get().load_program(pte)   # operators are looked up per method, when it loads
    with pytest.raises(UnsupportedOperatorError, match=r"wgpu_difftest::halve\.out"):
        program.load_method("forward")
    with pytest.raises(RuntimeError):
        EtRuntime.get().load_program(pte).load_method("forward")
