"""python -m executorch_wgpu llama-bench: a Llama-shaped int4 decoder end to end on the default adapter.

Builds ExecuTorch's Llama transformer with a named config ("small", the default:
the CI model, seconds on a CPU Vulkan; "1b": Llama-3.2-1B's shapes, dim 2048,
FFN 8192, 16 layers, 32 / 8 heads, vocab 128256 -- it needs a GPU: its export
takes minutes and a CPU Vulkan runs it far too slowly) and seeded random
weights, quantizes every linear to int4 (group size 32), exports ONE .pte with
a KV cache and a dynamic token count, and runs it with our runtime: prefill at
each --prompt length and greedy decode. Reports tokens/s and where the time goes:

  gpu_kernels_ms        sum of the route report's gpu_us (GPU timestamps of the kernels)
  delegate_wall_ms      sum of the route report's wall_us (host time of the delegate calls,
                        which includes waiting for those kernels)
  delegate_overhead_ms  delegate_wall_ms - gpu_kernels_ms (upload, encode, submit, map, copy)
  cpu_ops_ms            execute() wall time - delegate_wall_ms (embedding, RMSNorm, RoPE,
                        attention, KV cache update, ... through torch on the CPU)

--runtime native also runs the same .pte with the native C++ runner
(build/native/wgq4_llama_run: ExecuTorch's C++ runtime with the native delegate,
no Python) at the same prompt lengths and decode count, and reports its tokens/s
beside ours (skipped, saying why, where the native build is missing).

Writes llama_bench.json and llama_bench.md to --out and prints the table on
stdout; progress goes to stderr.

lm_head (2048 -> 128256 for "1b") packs to K/8 * N * 4 bytes = 131.3 MB (125.25
MiB), close to a max-storage-buffer-binding-size of 128 MiB. --lm-head auto (the
default) lowers it to int4; should the runtime refuse the layer at load (a layer
above the adapter's limits), the bench re-exports with the lm_head kept fp32 on
the CPU (not quantized, so not delegated) and goes on. --lm-head q4 / cpu force
either. The report says which was done and why.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from executorch_wgpu.shaders import registry
from executorch_wgpu.tools import cli
from executorch_wgpu.tools.configs import LLAMA_CONFIGS

# torch, ExecuTorch and the models are imported where used: `llama-bench --help` and a usage error stay fast.


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m executorch_wgpu llama-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(LLAMA_CONFIGS), default="small",
                   help="model shapes: small (default; seconds on a CPU Vulkan such as lavapipe) or 1b "
                        "(Llama-3.2-1B's: needs a GPU -- minutes to export, far too slow on a CPU Vulkan)")
    p.add_argument("--prompt", type=cli.int_list, default=[128, 512],
                   help="prefill lengths, comma-separated (the longest >= 2; default 128,512)")
    p.add_argument("--decode-tokens", type=cli.positive_int, default=64,
                   help="greedy decode steps timed after the first prompt")
    p.add_argument("--repeats", type=cli.positive_int, default=3, help="timed prefill calls per prompt length (median)")
    p.add_argument("--lm-head", choices=["auto", "q4", "cpu"], default="auto",
                   help="auto: int4 on the GPU when its packed weights fit the adapter's binding limit, "
                        "else fp32 on the CPU")
    p.add_argument("--mode", choices=["graph", "linears-only"], default="graph",
                   help="graph (default): the whole model is one delegate, KV cache on the GPU, one submit per "
                        "call (ExecuTorch's LLM transforms: custom_sdpa, update_cache); linears-only: one delegate "
                        "per q4 linear, every other op on the CPU")
    p.add_argument("--embedding", choices=["fp32", "int8", "int4"], default="fp32",
                   help="the token embedding's weights: fp32 (default) or torchao weight-only int8 / int4 "
                        "(graph mode gathers rows from the codes; 1b's fp32 table is 1 GB, int4 0.14 GB)")
    p.add_argument("--runtime", choices=["python", "native"], default="python",
                   help="python (default): time our Python runtime; native: also time the same .pte in the native "
                        "C++ runner (build/native/wgq4_llama_run, ExecuTorch's C++ runtime) and report both")
    p.add_argument("--profile", action="store_true",
                   help="graph mode: also time every dispatch of one prefill and one decode call (each in its own "
                        "compute pass: inflated, for where the time goes) and report the top ops")
    p.add_argument("--torch-peer", action="store_true",
                   help="also time the same model in torch eager on CUDA, bf16 weights (when CUDA is available)")
    p.add_argument("--layers", type=cli.positive_int, default=None,
                   help="override the config's layer count (smoke tests)")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    p.add_argument("--route-table", type=cli.route_table_file, default=None,
                   help="a route table from `python -m executorch_wgpu tune`")
    p.add_argument("--precision", choices=registry.PRECISIONS, default="fp32",
                   help="prefill math: fp32 (default), f16 or int8 (WebGPUPartitioner(precision=...): M > 1 calls "
                        "routed to shmem run shmem_f16 where the adapter has shader-f16, or shmem_int8)"),
    p.add_argument("--pte", type=cli.output_file, default=None,
                   help="where to write the .pte (default: OUT/llama-CONFIG.pte); "
                        "with --reuse-pte an existing file is loaded instead of exporting")
    p.add_argument("--reuse-pte", action="store_true", help="load --pte when it exists (same options only!)")
    p.add_argument("--out", type=cli.output_folder, default="llama_bench_out",
                   help="folder for llama_bench.json / .md and the default .pte")
    args = p.parse_args(argv)
    if max(args.prompt) < 2:
        p.error("argument --prompt: the longest prompt must have at least 2 tokens (the export's dynamic token dim)")
    return args


def packed_q4_bytes(in_features: int, out_features: int) -> int:
    """Bytes of a layer's packed int4 weights (backend/packing.py: K/8 words per padded column)."""
    from executorch_wgpu.backend.serialization.blob import N_ALIGN, round_up

    return in_features // 8 * round_up(out_features, N_ALIGN) * 4


def choose_lm_head(mode: str, dim: int, vocab: int, limit: int) -> Dict[str, Any]:
    """How the lm_head is lowered: "q4" (int4, delegated) or "cpu-fp32" (not quantized, runs on the CPU).

    auto starts with q4; run() falls back to cpu-fp32 (and says why) when the runtime
    refuses the layer at load, e.g. packed weights above the adapter's binding limit.
    """
    packed = packed_q4_bytes(dim, vocab)
    info = {"packed_bytes": packed, "max_storage_buffer_binding_size": limit, "exceeds_binding_limit": packed > limit}
    if mode == "q4":
        return {**info, "mode": "q4", "why": "forced by --lm-head q4"}
    if mode == "cpu":
        return {**info, "mode": "cpu-fp32", "why": "forced by --lm-head cpu"}
    relation = "above" if packed > limit else "within"
    return {**info, "mode": "q4", "why": f"auto: int4 on the GPU (packed {packed} B, {relation} the adapter's "
                                         f"max-storage-buffer-binding-size {limit} B)"}


def phase_split(wall_s: float, report: List[dict], graph: Optional[List[dict]] = None) -> Dict[str, Any]:
    """Time of one execute() split into GPU kernels, the rest of the delegate calls, and CPU ops (ms).

    In graph mode the delegate calls are the graph delegates' (Method.graph_report()): GPU time is their
    compute passes' timestamps; the host part is split into prepare (symbols, expressions, Params),
    encode (upload, encode, submit), wait (submit to mapped outputs) and readback.
    """
    wall_ms = wall_s * 1e3
    if graph:
        gpu = [g["gpu_us"] for g in graph]
        gpu_ms = None if any(g is None for g in gpu) else sum(gpu) / 1e3
        host = {k: sum(g[f"{k}_us"] for g in graph) / 1e3 for k in ("prepare", "encode", "wait", "readback")}
        delegate_ms = sum(host.values())
        return {
            "wall_ms": wall_ms,
            "gpu_kernels_ms": gpu_ms,
            "delegate_wall_ms": delegate_ms,
            "delegate_overhead_ms": None if gpu_ms is None else delegate_ms - gpu_ms,
            "cpu_ops_ms": wall_ms - delegate_ms,
            "delegate_calls": len(graph),
            "dispatches": sum(g["dispatches"] for g in graph),
            "host_prepare_ms": host["prepare"], "host_encode_ms": host["encode"], "wait_ms": host["wait"],
            "readback_ms": host["readback"],
            "kernels": dict(Counter(e["kernel"] for e in report)),
        }
    delegate_ms = sum(e["wall_us"] for e in report) / 1e3
    gpu = [e["gpu_us"] for e in report]
    gpu_ms = None if any(g is None for g in gpu) else sum(gpu) / 1e3
    return {
        "wall_ms": wall_ms,
        "gpu_kernels_ms": gpu_ms,
        "delegate_wall_ms": delegate_ms,
        "delegate_overhead_ms": None if gpu_ms is None else delegate_ms - gpu_ms,
        "cpu_ops_ms": wall_ms - delegate_ms,
        "delegate_calls": len(report),
        "kernels": dict(Counter(e["kernel"] for e in report)),
    }


def seeded_prompt(vocab: int, length: int, seed: int):
    """A prompt of `length` random token ids, [1, length] int64, from a torch generator seeded `seed`."""
    import torch

    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


WARMUP_S = 1.0   # seconds of untimed calls before each prompt length's timed ones


def timed_execute(method, inputs):
    start = time.perf_counter()
    (logits,) = method.execute(inputs)
    return logits, time.perf_counter() - start, method.route_report(), method.graph_report()


def bench_prefill(method, prompt_len: int, vocab: int, repeats: int, seed: int) -> Dict[str, Any]:
    import torch

    tokens = seeded_prompt(vocab, prompt_len, seed + prompt_len)
    pos = torch.tensor([0])
    # Warm-up: the first call makes this M's pipelines and buffers; further untimed calls, for
    # WARMUP_S at least, bring an idle GPU up to its clocks (an H200 idles at 345 MHz and timed
    # the first prompt length 2-4x slow after three warm-up-less repeats).
    warm_start = time.perf_counter()
    while True:
        method.reset_state()
        timed_execute(method, [tokens, pos])
        if time.perf_counter() - warm_start >= WARMUP_S:
            break
    runs = []
    for _ in range(max(1, repeats)):
        method.reset_state()
        _, wall, report, graph = timed_execute(method, [tokens, pos])
        runs.append((wall, report, graph))
    runs.sort(key=lambda r: r[0])
    wall, report, graph = runs[len(runs) // 2]
    split = phase_split(wall, report, graph)
    layer_m = sorted({e["M"] for e in report})
    return {"prompt": prompt_len, "tokens_per_s": prompt_len / wall, "repeats": len(runs),
            "walls_ms": [r[0] * 1e3 for r in runs], "linear_M": layer_m, **split}


def bench_decode(method, prompt_len: int, n_tokens: int, vocab: int, seed: int) -> Dict[str, Any]:
    import torch

    prompt = seeded_prompt(vocab, prompt_len, seed + 7919)
    method.reset_state()
    logits, _, _, _ = timed_execute(method, [prompt, torch.tensor([0])])
    token = int(logits[0].argmax())
    pos = prompt_len
    generated = [token]
    # one untimed step: the M = 1 pipelines and buffers of every layer
    logits, _, _, _ = timed_execute(method, [torch.tensor([[token]]), torch.tensor([pos])])
    token, pos = int(logits[0].argmax()), pos + 1
    generated.append(token)
    steps = []
    for _ in range(n_tokens):
        logits, wall, report, graph = timed_execute(method, [torch.tensor([[token]]), torch.tensor([pos])])
        steps.append(phase_split(wall, report, graph))
        token, pos = int(logits[0].argmax()), pos + 1
        generated.append(token)
    total_s = sum(s["wall_ms"] for s in steps) / 1e3

    def per_token(key):
        values = [s[key] for s in steps]
        return None if any(v is None for v in values) else sum(values) / len(values)

    kernels: Counter[str] = Counter()
    for s in steps:
        kernels.update(s["kernels"])
    return {
        "after_prompt": prompt_len, "tokens": n_tokens, "tokens_per_s": n_tokens / total_s,
        "ms_per_token_median": statistics.median(s["wall_ms"] for s in steps),
        "ms_per_token_mean": per_token("wall_ms"),
        "gpu_kernels_ms_per_token": per_token("gpu_kernels_ms"),
        "delegate_wall_ms_per_token": per_token("delegate_wall_ms"),
        "delegate_overhead_ms_per_token": per_token("delegate_overhead_ms"),
        "cpu_ops_ms_per_token": per_token("cpu_ops_ms"),
        "delegate_calls_per_token": per_token("delegate_calls"),
        **({f"{k}_per_token": per_token(k) for k in ("dispatches", "host_prepare_ms", "host_encode_ms", "wait_ms",
                                                     "readback_ms")} if "dispatches" in steps[0] else {}),
        "kernels": dict(kernels),
        "generated_tokens": generated,
    }


def bench_native(pte_path: Path, prompts: Sequence[int], n_tokens: int, vocab: int, repeats: int,
                 seed: int) -> Dict[str, Any]:
    """The same .pte in the native C++ runner (wgq4_llama_run), with bench_prefill's and bench_decode's prompts.

    One runner process per prompt length (prefill only: a warm-up, then `repeats` timed calls) and one
    for the decode (prefill, one untimed decode step, n_tokens timed ones, as bench_decode does).
    """
    from executorch_wgpu import native

    prefill = []
    for p in prompts:
        r = native.run_llama_in_cpp(pte_path, seeded_prompt(vocab, p, seed + p)[0].tolist(), new_tokens=1,
                                    warmup=1, repeats=repeats)
        prefill.append({"prompt": p, "tokens_per_s": r["prefill_tokens_per_s"], "wall_ms": r["prefill_ms"]})
    r = native.run_llama_in_cpp(pte_path, seeded_prompt(vocab, prompts[0], seed + 7919)[0].tolist(),
                                new_tokens=n_tokens + 2, warmup=1)
    return {"runner": str(native.llama_runner_path()), "load_ms": r["load_ms"], "prefill": prefill,
            "decode": {"tokens": r["decode_steps_timed"], "tokens_per_s": r["decode_tokens_per_s"],
                       "ms_per_token_mean": r["decode_ms_per_token"], "generated_tokens": r["tokens"]}}


def run_native(pte_path: Path, prompts: Sequence[int], n_tokens: int, vocab: int, repeats: int,
               seed: int) -> Dict[str, Any]:
    """bench_native's figures, or {"skipped": why} where the runner is not built or fails (its message)."""
    from executorch_wgpu import native

    reason = native.llama_runner_unavailable_reason()
    if reason:
        return {"skipped": reason}
    try:
        return bench_native(pte_path, prompts, n_tokens, vocab, repeats, seed)
    except RuntimeError as e:
        return {"skipped": f"the runner failed: {e}"}


def op_kind(node: str, kernel: str) -> str:
    """A profile row's group: the kernel, and for generic kernels the op (fx node name without its number)."""
    import re

    if kernel in registry.ROUTABLE_NAMES or kernel in registry.VARIANTS.values() or kernel == "splitk_reduce":
        return f"q4 linear ({kernel})"
    if "@" in node:   # a fused pattern's step: "pattern@anchor node"
        return f"{kernel}: {node.split('@')[0]}"
    op = re.sub(r"^aten_|_default$|_tensor$|(_\d+)+$", "", node)
    op = re.sub(r"(_default|_tensor|_dims|_int)$", "", op)
    return f"{kernel}: {op}"


def profile_calls(method, prompt_len: int, vocab: int, seed: int) -> Dict[str, Any]:
    """GPU time per op kind of one prefill and one decode call, every dispatch in its own timed pass."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, vocab, (1, prompt_len), generator=g)
    out: Dict[str, Any] = {}
    method.set_profile(True)
    try:
        method.reset_state()
        for phase, inputs in (("prefill", [tokens, torch.tensor([0])]),
                              ("decode", [tokens[:, :1], torch.tensor([prompt_len])])):
            method.execute(inputs)
            rows = [r for g in method.graph_report() for r in (g["profile"] or [])]
            by_kind: Counter = Counter()
            count: Counter = Counter()
            for node, kernel, us in rows:
                by_kind[op_kind(node, kernel)] += us
                count[op_kind(node, kernel)] += 1
            total = sum(by_kind.values())
            out[phase] = {"tokens": inputs[0].shape[1], "dispatches": len(rows), "sum_us": total,
                          "by_op": [{"op": k, "us": v, "dispatches": count[k], "share": v / total if total else 0.0}
                                    for k, v in by_kind.most_common()]}
    finally:
        method.set_profile(False)
    return out


def torch_peer(config: str, overrides: Dict[str, Any], prompts: Sequence[int], n_tokens: int, repeats: int,
               seed: int) -> Optional[Dict[str, Any]]:
    """The same Llama in torch eager on CUDA with bf16 weights (ExecuTorch's module, its KV cache): tok/s."""
    import torch

    if not torch.cuda.is_available():
        return None
    from executorch.examples.models.llama.llama_transformer import construct_transformer

    from executorch_wgpu.tools import models

    torch.manual_seed(seed)
    model = models.LlamaDecoder(construct_transformer(models.llama_args(config, **overrides))).eval()
    model = model.to("cuda", torch.bfloat16)
    vocab = model.args.vocab_size

    def timed(tokens, pos) -> tuple:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = model(tokens, torch.tensor([pos], device="cuda"))
        torch.cuda.synchronize()
        return logits, time.perf_counter() - t0

    prefill = []
    for p in prompts:
        tokens = torch.randint(0, vocab, (1, p), device="cuda")
        timed(tokens, 0)
        walls = []
        for _ in range(max(1, repeats)):
            models.reset_kv_cache(model)
            walls.append(timed(tokens, 0)[1])
        prefill.append({"prompt": p, "tokens_per_s": p / statistics.median(walls)})
    models.reset_kv_cache(model)
    logits, _ = timed(torch.randint(0, vocab, (1, prompts[0]), device="cuda"), 0)
    pos, total = prompts[0], 0.0
    token = logits[0].argmax().reshape(1, 1)
    timed(token, pos)   # warm-up at T = 1
    pos += 1
    for _ in range(n_tokens):
        logits, wall = timed(token, pos)
        total += wall
        token, pos = logits[0].argmax().reshape(1, 1), pos + 1
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
            "prefill": prefill, "decode_tokens_per_s": n_tokens / total}


def _ms(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.2f}"


def markdown(result: Dict[str, Any]) -> str:
    """The report; without GPU timestamps (an adapter without timestamp queries) the GPU columns are left out."""
    m = result["model"]
    d = result["decode"]
    gpu = [p["gpu_kernels_ms"] for p in result["prefill"]] + [d["gpu_kernels_ms_per_token"]]
    timed = any(v is not None for v in gpu)
    native: Dict[str, Any] = result.get("native") or {}   # --runtime native: its figures, or why it was skipped
    ncol = "prefill" in native

    def nat(entry: Dict[str, Any]) -> str:   # the native column's cell, with its separator
        return f"{entry['native_tokens_per_s']:.1f} | " if ncol else ""

    lines = [
        f"# llama-bench: {result['config']} ({result['date']})",
        "",
        f"- adapter: {result['adapter']}",
        f"- model: dim {m['dim']}, {m['n_layers']} layers, FFN {m['hidden_dim']}, {m['n_heads']}/{m['n_kv_heads']} heads, "
        f"vocab {m['vocab_size']}, KV cache {m['max_context_len']} positions; random weights (seed {result['seed']}), "
        f"int4 group size {result['group_size']}",
        f"- lm_head: {result['lm_head']['mode']} ({result['lm_head']['why']}); prefill precision "
        f"{result.get('precision', 'fp32')}",
        f"- delegated linears: {result['delegated_linears']}; export {result['export_s']:.1f} s "
        f"({result['pte_bytes'] / 1e6:.1f} MB .pte); load {result['load_s']:.1f} s",
        f"- command: `{result['command']}`",
        "",
        "| phase | tokens | tokens/s | " + ("native C++ tokens/s | " if ncol else "") + "wall ms | "
        + ("GPU kernels ms | delegate overhead ms | " if timed else "delegate calls ms | ") + "CPU ops ms | kernels |",
        "|---" * ((8 if timed else 7) + ncol) + "|",
    ]
    for p in result["prefill"]:
        kernels = ", ".join(f"{k}×{v}" for k, v in sorted(p["kernels"].items()))
        split = (f"{_ms(p['gpu_kernels_ms'])} | {_ms(p['delegate_overhead_ms'])}" if timed else
                 f"{p['delegate_wall_ms']:.2f}")
        lines.append(f"| prefill | {p['prompt']} | {p['tokens_per_s']:.1f} | {nat(p)}{p['wall_ms']:.2f} | "
                     f"{split} | {p['cpu_ops_ms']:.2f} | {kernels} |")
    kernels = ", ".join(f"{k}×{v / d['tokens']:g}" for k, v in sorted(d["kernels"].items()))
    split = (f"{_ms(d['gpu_kernels_ms_per_token'])} | {_ms(d['delegate_overhead_ms_per_token'])}" if timed else
             f"{d['delegate_wall_ms_per_token']:.2f}")
    lines.append(f"| decode (per token, after {d['after_prompt']}) | {d['tokens']} | {d['tokens_per_s']:.1f} | "
                 f"{nat(d)}{d['ms_per_token_mean']:.2f} | {split} | {d['cpu_ops_ms_per_token']:.2f} | {kernels} |")
    if ncol:
        same = "the same" if native["decode"]["generated_tokens"] == d["generated_tokens"] else "NOT the same"
        lines += ["", f"native C++ tokens/s: `{native['runner']}` on the same .pte (ExecuTorch's C++ runtime, no "
                      f"Python; its own process per prompt length and for the decode; load {native['load_ms']:.0f} "
                      f"ms): {same} greedy tokens as ours."]
    elif native:
        lines += ["", f"native C++ runner: {native['skipped']}"]
    if result.get("mode") == "graph":
        lines += ["", "Graph mode: GPU kernels = the graph call's compute pass (GPU timestamps); delegate overhead = "
                      "host prepare + encode + wait + readback - GPU kernels; CPU ops = execute wall - that host time.",
                  "", "| phase | dispatches | host prepare ms | host encode+submit ms | wait ms | readback ms |",
                  "|---|---|---|---|---|---|"]
        for p in result["prefill"]:
            lines.append(f"| prefill {p['prompt']} | {p.get('dispatches')} | {_ms(p.get('host_prepare_ms'))} | "
                         f"{_ms(p.get('host_encode_ms'))} | {_ms(p.get('wait_ms'))} | {_ms(p.get('readback_ms'))} |")
        lines.append(f"| decode (per token) | {d.get('dispatches_per_token')} | "
                     f"{_ms(d.get('host_prepare_ms_per_token'))} | {_ms(d.get('host_encode_ms_per_token'))} | "
                     f"{_ms(d.get('wait_ms_per_token'))} | {_ms(d.get('readback_ms_per_token'))} |")
    elif timed:
        lines += ["", "GPU kernels = sum of gpu_us; delegate overhead = sum of wall_us - GPU kernels; "
                      "CPU ops = execute wall - sum of wall_us.", ""]
    else:
        lines += ["", "This adapter has no timestamp queries: no GPU time, so the delegate calls are not split into "
                      "GPU kernels and overhead. delegate calls = sum of wall_us; "
                      "CPU ops = execute wall - sum of wall_us.", ""]
    peer = result.get("torch_peer")
    if peer:
        lines += ["", f"Torch peer ({peer['device']}, torch {peer['torch']}, {peer['dtype']} weights, eager, same "
                      "model and shapes): "
                  + ", ".join(f"prefill {p['prompt']}: {p['tokens_per_s']:.0f} tok/s" for p in peer["prefill"])
                  + f", decode: {peer['decode_tokens_per_s']:.1f} tok/s", ""]
    for phase, prof in (result.get("profile") or {}).items():
        lines += ["", f"Per-op GPU profile, {phase} of {prof['tokens']} token(s): {prof['dispatches']} dispatches, "
                      f"{prof['sum_us'] / 1e3:.2f} ms summed (each dispatch in its own pass: inflated)", "",
                  "| op | dispatches | ms | share |", "|---|---|---|---|"]
        for row in prof["by_op"][:15]:
            lines.append(f"| {row['op']} | {row['dispatches']} | {row['us'] / 1e3:.3f} | {row['share']:.1%} |")
    lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Build, export, load and time; progress on stderr, the report table on stdout."""
    # steps: import, build, export, load, each prefill length, decode[, the native runner]
    steps = 4 + len(args.prompt) + 1 + (args.runtime == "native")
    with cli.Progress(steps, f"llama-bench {args.config}") as progress:
        progress.step("importing torch and ExecuTorch")
        result = _run(args, progress)
    print(markdown(result), end="")
    return result


def _run(args: argparse.Namespace, progress: cli.Progress) -> Dict[str, Any]:
    from executorch_wgpu.errors import WebGPUDelegateError
    from executorch_wgpu.runtime import Runtime
    from executorch_wgpu.runtime_py.gpu import gpu_context
    from executorch_wgpu.tools import models

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = args.prompt
    needed = max(prompts) + args.decode_tokens + 2
    base = LLAMA_CONFIGS[args.config]
    overrides = {"max_context_len": max(base["max_context_len"], -(-needed // 128) * 128)}
    if args.layers is not None:
        overrides["n_layers"] = args.layers
    model_args = models.llama_args(args.config, **overrides)
    ctx = gpu_context()
    limit = ctx.device.limits["max-storage-buffer-binding-size"]
    lm_head = choose_lm_head(args.lm_head, model_args.dim, model_args.vocab_size, limit)
    precision = "" if args.precision == "fp32" else f"-{args.precision}"   # fp32 keeps the name it had
    pte_path = Path(args.pte) if args.pte else out / f"llama-{args.config}-{args.mode}{precision}.pte"
    partitioner_options: Dict[str, Any] = {"route_table": args.route_table} if args.route_table else {}
    partitioner_options["precision"] = args.precision
    graph = args.mode == "graph"
    embedding = None if args.embedding == "fp32" else args.embedding

    def export(lm_head_mode: str):
        t0 = time.perf_counter()
        progress.step(f"building {args.config} (random weights, seed {args.seed}; lm_head {lm_head_mode})")
        model = models.build_llama(args.config, seed=args.seed, quantize_output=lm_head_mode == "q4",
                                   llm_ops=graph, quantize_embedding=embedding, **overrides)
        n_linears = len(models.llama_linear_names(model))
        progress.step("exporting and lowering")
        with models.recording_declines() as declines:
            data = models.export_llama_pte(model, pte_path, max_tokens=max(prompts), linears_only=not graph,
                                           **partitioner_options)
        del model
        return data, n_linears, list(declines), time.perf_counter() - t0

    if args.reuse_pte and pte_path.exists():
        progress.note(f"reusing {pte_path}")
        progress.advance(2)
        data, n_linears, declines, export_s = pte_path.read_bytes(), None, [], 0.0
    else:
        data, n_linears, declines, export_s = export(lm_head["mode"])
        progress.note(f"built and exported in {export_s:.1f} s -> {pte_path} ({len(data) / 1e6:.1f} MB)")
    progress.step("loading the program")
    t0 = time.perf_counter()
    try:
        method = Runtime.get().load_program(data).load_method("forward")
    except WebGPUDelegateError as e:
        if args.lm_head != "auto" or lm_head["mode"] != "q4":
            raise
        lm_head = {**lm_head, "mode": "cpu-fp32",
                   "why": f"auto: the runtime refused the int4 lm_head ({e}); re-exported with it fp32 on the CPU"}
        progress.note(lm_head["why"])
        progress.add(3)   # build, export and load again
        data, n_linears, declines, export_s = export("cpu-fp32")
        progress.note(f"built and exported in {export_s:.1f} s -> {pte_path} ({len(data) / 1e6:.1f} MB)")
        progress.step("loading the program")
        t0 = time.perf_counter()
        method = Runtime.get().load_program(data).load_method("forward")
    load_s = time.perf_counter() - t0
    progress.note(f"loaded in {load_s:.1f} s on {ctx.adapter_name}; lm_head: {lm_head['mode']} ({lm_head['why']})")

    prefill = []
    for p in prompts:
        progress.step(f"prefill of {p} tokens, {args.repeats} timed")
        prefill.append(bench_prefill(method, p, model_args.vocab_size, args.repeats, args.seed))
        r = prefill[-1]
        progress.note(f"prefill {p:>5} tokens: {r['tokens_per_s']:9.1f} tok/s  wall {r['wall_ms']:.1f} ms  "
                      f"GPU {_ms(r['gpu_kernels_ms'])} ms  CPU ops {r['cpu_ops_ms']:.1f} ms  {r['kernels']}")
    progress.step(f"decode of {args.decode_tokens} tokens")
    decode = bench_decode(method, prompts[0], args.decode_tokens, model_args.vocab_size, args.seed)
    progress.note(f"decode {args.decode_tokens} tokens after {prompts[0]}: {decode['tokens_per_s']:.1f} tok/s  "
                  f"{decode['ms_per_token_mean']:.1f} ms/token (GPU {_ms(decode['gpu_kernels_ms_per_token'])}, "
                  f"CPU ops {decode['cpu_ops_ms_per_token']:.1f})  {decode['kernels']}")

    profile = None
    if args.profile and graph and ctx.has_timestamps:
        progress.note("profiling one prefill and one decode call, dispatch by dispatch")
        profile = profile_calls(method, prompts[0], model_args.vocab_size, args.seed)
    peer = None
    if args.torch_peer:
        progress.note("timing the torch CUDA peer")
        peer = torch_peer(args.config, overrides, prompts, args.decode_tokens, args.repeats, args.seed)
        if peer is None:
            progress.note("no CUDA device: no torch peer")
    native = None
    if args.runtime == "native":
        progress.step("the native C++ runner on the same .pte")
        native = run_native(pte_path, prompts, args.decode_tokens, model_args.vocab_size, args.repeats, args.seed)
        if "skipped" in native:
            progress.note(f"native C++ runner skipped: {native['skipped']}")
        else:
            for entry, theirs in [*zip(prefill, native["prefill"]), (decode, native["decode"])]:
                entry["native_tokens_per_s"] = theirs["tokens_per_s"]   # beside ours, in the JSON and the table
            progress.note(f"native C++ runner: decode {decode['native_tokens_per_s']:.1f} tok/s")
    delegated = len(method.route_report()) if graph else prefill[0]["delegate_calls"]
    result = {
        "mode": args.mode,
        "precision": args.precision,
        "embedding": args.embedding,
        "runtime": args.runtime,
        "command": "python -m executorch_wgpu llama-bench " + " ".join(args.argv),
        "date": datetime.date.today().isoformat(),
        "adapter": ctx.adapter_name,
        "config": args.config,
        "model": {k: getattr(model_args, k) for k in
                  ("dim", "n_layers", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size", "max_context_len")},
        "seed": args.seed,
        "group_size": models.GROUP_SIZE,
        "lm_head": lm_head,
        "quantized_linears": n_linears,
        "delegated_linears": delegated,
        "declined": declines,
        "export_s": export_s,
        "pte_bytes": len(data),
        "pte": str(pte_path),
        "load_s": load_s,
        "prefill": prefill,
        "decode": decode,
        "profile": profile,
        "torch_peer": peer,
        "native": native,
    }
    (out / "llama_bench.json").write_text(json.dumps(result, indent=2))
    (out / "llama_bench.md").write_text(markdown(result))
    progress.note(f"wrote {out / 'llama_bench.json'} and {out / 'llama_bench.md'}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    from executorch_wgpu.errors import WebGPUDelegateError   # no torch: a plain class module

    try:
        return run(args)
    except WebGPUDelegateError as e:   # no adapter, a --reuse-pte of an old blob version, ...: a line, not a traceback
        cli.fail(str(e))


if __name__ == "__main__":
    main()
