"""The main job: quantize a small transformer FFN block to int4, lower it to a .pte
with WebGPUPartitioner, run it with our Python runtime on the default adapter,
and print outputs next to eager torch, the route report and timings."""

from __future__ import annotations

import argparse
import statistics
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


def main(argv=None) -> None:
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    from executorch_wgpu import WebGPUPartitioner
    from executorch_wgpu.runtime import Runtime
    from executorch_wgpu.runtime.gpu import gpu_context

    parser = argparse.ArgumentParser(prog="python -m executorch_wgpu demo", description=__doc__)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32, help="tokens of the prefill call")
    parser.add_argument("--max-tokens", type=int, default=256, help="upper bound of the dynamic token dim")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per phase after one warm-up")
    parser.add_argument("--pte", default="demo_ffn.pte")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = FeedForward(args.dim, args.hidden).eval()
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(args.group_size)))
    example = torch.randn(1, args.prompt, args.dim)
    tokens = torch.export.Dim("tokens", min=1, max=args.max_tokens)
    t0 = time.perf_counter()
    ep = torch.export.export(model, (example,), dynamic_shapes=({1: tokens},))
    program_bytes = to_edge_transform_and_lower(ep, partitioner=[WebGPUPartitioner()]).to_executorch().buffer
    with open(args.pte, "wb") as f:
        f.write(program_bytes)
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


if __name__ == "__main__":
    main()
