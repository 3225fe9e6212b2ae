"""Write a bench run (bench.bench()'s dict) as bench.json, bench.md and bench.png."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List

from executorch_wgpu.shaders.registry import VARIANTS
from executorch_wgpu.shaders.registry import ROUTABLE_NAMES as KERNELS   # every routable kernel, in route-id order
from executorch_wgpu.tools.cli import figure   # 3 significant digits: no "0.00" TFLOP/s on a slow adapter

log = logging.getLogger(__name__)


def _fmt(v, spec: str = ".1f") -> str:
    return "—" if v is None else format(v, spec)


def columns(results: dict) -> List[str]:
    """Every routable kernel, then the precision variants (bench --precision) that some row timed."""
    timed = {k for r in results["rows"] for k in r["kernels"]}
    return list(KERNELS) + [k for k in VARIANTS.values() if k in timed]


def markdown(results: dict) -> str:
    from executorch_wgpu.tools.reference import TOLERANCES

    a = results["adapter"]
    kernels = columns(results)
    lines = [
        f"Adapter: {a.get('device')} ({a.get('backend_type')}, driver {a.get('description')}); "
        f"CUDA peers: {results.get('cuda_device') or 'none'}; date {results['date']}; "
        f"wgpu {results['versions']['wgpu']}, torch {results['versions']['torch']}.",
        f"Command: `{results.get('command', 'python -m executorch_wgpu bench')}`; "
        f"GPU-timestamp median of {results['config']['reps']} runs after {results['config']['warmup']} warm-up; "
        f"routes: {results['config']['route_table'] or 'default rule'}.",
        "",
        "| shape | K→N | M | weights | " + "".join(f"{k} µs | " for k in kernels) + "routed | TFLOP/s | weight GB/s | "
        "routed/fastest | default rule (÷fastest) | stream-read GB/s | tinygemm µs | ours/tinygemm time | "
        "fp32 CUDA µs | max rel err |",
        "|---" * (4 + len(kernels) + 10) + "|",
    ]
    for r in results["rows"]:
        ks = r["kernels"]
        cells = []
        for k in kernels:
            v = ks.get(k)
            if v is None:
                cells.append("")
            elif "us" not in v:
                cells.append("n/a")
            else:
                mark = "**" if k == r.get("fastest") else ""
                cells.append(f"{mark}{v['us']:.1f}{mark}" + ("" if v["ok"] else " ✗"))
        routed = ks.get(r["routed"], {})
        errs = [v["rel_err"] for v in ks.values() if "rel_err" in v]
        lines.append(
            f"| {r['shape']} | {r['K']}→{r['N']} | {r['M']} | {r.get('weights', 'L2-warm')} | " + " | ".join(cells) + f" | {r['routed']} | "
            f"{figure(r.get('routed_tflops'))} | {figure(routed.get('weight_gbps'))} | "
            f"{_fmt(r.get('routed_vs_fastest'), '.2f')} | "
            f"{r.get('default_rule', '')} ({_fmt(r.get('default_rule_vs_fastest'), '.2f')}) | "
            f"{figure(r.get('stream_read_gbps'))} | "
            f"{_fmt(r.get('tinygemm_us'))} | {_fmt(r.get('routed_time_vs_tinygemm'), '.2f')} | "
            f"{_fmt(r.get('fp32_cuda_us'))} | {_fmt(max(errs) if errs else None, '.1e')} |"
        )
    lines += ["", "Bold: fastest fp32 kernel of the row. "
              f"✗: above the 1e-4 tolerance (f16 kernels: {TOLERANCES['f16']:.0e}, int8: {TOLERANCES['int8']:.0e}). "
              "weight GB/s = (packed int4 + scale bytes) / routed time; stream-read = a plain read of as many bytes. "
              "weights: cold = every timed run follows an L2 flush (kernels, stream read and torch peers alike); "
              "L2-warm = runs back to back."]
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> bool:
    """TFLOP/s per shape x M per kernel, torch peers as markers; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no chart (pip install matplotlib)")
        return False
    rows = results["rows"]
    labels = [f"{r['shape']}\nM={r['M']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(rows)), 5))
    kernels = columns(results)
    width = 0.8 / len(kernels)
    for i, k in enumerate(kernels):
        xs = [j + (i - (len(kernels) - 1) / 2) * width for j in range(len(rows))]
        ys = [r["kernels"].get(k, {}).get("tflops", 0.0) for r in rows]
        ax.bar(xs, ys, width, label=k)
    for peer, marker in (("tinygemm", "k_"), ("fp32_cuda", "r_")):
        ys = [r.get(f"{peer}_tflops") for r in rows]
        if any(y is not None for y in ys):
            ax.plot(range(len(rows)), [y if y is not None else float("nan") for y in ys], marker,
                    markersize=14, label=f"torch {peer} (CUDA)")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("TFLOP/s (2·M·N·K / GPU time)")
    ax.set_yscale("log")
    a = results["adapter"]
    ax.set_title(f"q4gsw kernels on {a.get('device')} ({a.get('backend_type')}), {results['date'][:10]}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_reports(results: dict, out_dir: Path) -> List[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "bench.json", out_dir / "bench.md"]
    written[0].write_text(json.dumps(results, indent=1) + "\n")
    written[1].write_text(markdown(results))
    if chart(results, out_dir / "bench.png"):
        written.append(out_dir / "bench.png")
    return written
