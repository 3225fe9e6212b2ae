"""python -m executorch_wgpu bench: every q4gsw kernel on Llama-3.2-1B shapes, timed on the GPU.

For each layer shape x M, every kernel that can run it is
  * checked against an fp64 golden (x @ dequant(W)^T) on a sample of rows,
  * timed with GPU timestamp queries: one pass per run, median of `reps`
    runs after `warmup` runs, all recorded into one submit,
and set next to ceilings measured in the same run on the same stack:
  * a streaming read through wgpu of as many bytes as the layer's packed
    weights and scales (what any GEMV of that layer could reach here),
  * torch's int4 CUDA kernel (tinygemm, `torch._weight_int4pack_mm`) and an
    fp32 CUDA-core matmul (TF32 off) on the same weights, when CUDA is present.
Writes bench.json, bench.md and bench.png (when matplotlib is installed).

Timing note: runs of one layer repeat back to back, so weights that fit the
GPU's L2 cache (tens of MB on a datacenter GPU) would be read from it after the
first run. A decode step reads each layer's weights once, from memory, so M = 1
rows are timed cold by default: every timed run (ours, the streaming probe and
the torch peers alike) is preceded by an untimed read of a buffer larger than
the L2 (--flush-mb), which evicts the layer. M > 1 rows are timed L2-warm (a
GEMM reuses each weight across rows; --cold-all times them cold too). Each row
says which ("weights": "cold" or "L2-warm"). `--model 1b` times all linears of
a model's decode step and prefill in one submit instead (tools/bench_model.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

from executorch_wgpu.errors import WebGPUDelegateError
from executorch_wgpu.shaders import registry
from executorch_wgpu.tools import cli
from executorch_wgpu.tools.configs import LLAMA_CONFIGS

# torch, wgpu and what needs them are imported where used: `bench --help` and a usage error stay fast.
if TYPE_CHECKING:
    import torch

    from executorch_wgpu.backend.route_table import RouteTable
    from executorch_wgpu.runtime_py.gpu import GPUContext
    from executorch_wgpu.runtime_py.q4_linear import Q4LinearGPU
    from executorch_wgpu.tools.reference import RandomQ4Layer

log = logging.getLogger(__name__)

# Llama-3.2-1B projections: name -> (K = in_features, N = out_features).
LLAMA_1B_SHAPES = {
    "q": (2048, 2048),        # also o
    "kv": (2048, 512),        # k and v
    "gate": (2048, 8192),     # also up
    "down": (8192, 2048),
    "lm_head": (2048, 128256),
}
LLAMA_1B_M = (1, 16, 64, 128, 512, 2048)
# Generation computes lm_head for the last position only, so its prefill M stays small.
LM_HEAD_MAX_M = 128
# Small enough for lavapipe (Vulkan on the CPU) in CI; same kernels, same checks.
QUICK_SHAPES = {"q": (256, 256), "kv": (256, 64), "gate": (256, 1024), "down": (1024, 256)}
QUICK_M = (1, 16, 64)
KERNELS_FOR_M = {True: registry.DECODE_KERNELS, False: registry.PREFILL_KERNELS}   # keyed by M == 1
GOLDEN_ROWS = 4


@dataclass
class BenchLayer:
    """A random q4gsw layer (its codes and scales, for goldens and peers) and its packed GPU copy."""

    weights: RandomQ4Layer
    name: str
    gpu: Q4LinearGPU

    @property
    def N(self) -> int:
        return self.weights.N

    @property
    def weight_bytes(self) -> int:
        """Bytes a kernel must read: packed int4 weights plus scales."""
        return self.gpu.rec.qweight.nbytes + self.gpu.rec.scales.nbytes


def make_layer(ctx: GPUContext, name: str, k: int, n: int, group_size: int, seed: int = 0) -> BenchLayer:
    """reference.random_q4_layer (no bias) on the GPU, routed by the default rule."""
    from executorch_wgpu.runtime_py.q4_linear import Q4LinearGPU
    from executorch_wgpu.tools.reference import random_q4_layer

    weights = random_q4_layer(k, n, group_size, seed=seed)
    gpu = Q4LinearGPU(ctx, weights.record(name, m_max=1 << 20))
    return BenchLayer(weights, name, gpu)


def time_gpu_passes(ctx: GPUContext, encode: Callable, reps: int, warmup: int,
                    flush: Optional[Callable] = None) -> List[float]:
    """GPU µs of `reps` compute passes, each timestamped, after `warmup` untimed ones.

    flush(encoder), when given, records an untimed pass before every run that
    evicts the L2 (StreamProbe.flush): the timed pass then reads cold memory.
    """
    import numpy as np
    import wgpu

    dev = ctx.device
    enc = dev.create_command_encoder()
    for _ in range(warmup):
        if flush is not None:
            flush(enc)
        encode(enc, None)
    dev.queue.submit([enc.finish()])
    queries = dev.create_query_set(type=wgpu.QueryType.timestamp, count=2 * reps)
    resolve = dev.create_buffer(size=16 * reps, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC)
    readback = dev.create_buffer(size=16 * reps, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
    enc = dev.create_command_encoder()
    for i in range(reps):
        if flush is not None:
            flush(enc)
        encode(enc, {"query_set": queries, "beginning_of_pass_write_index": 2 * i, "end_of_pass_write_index": 2 * i + 1})
    enc.resolve_query_set(queries, 0, 2 * reps, resolve, 0)
    enc.copy_buffer_to_buffer(resolve, 0, readback, 0, 16 * reps)
    dev.queue.submit([enc.finish()])
    readback.map_sync(wgpu.MapMode.READ)
    ticks = np.frombuffer(readback.read_mapped(), dtype=np.uint64).reshape(reps, 2).astype(np.float64)
    readback.unmap()
    queries.destroy()
    return list((ticks[:, 1] - ticks[:, 0]) * ctx.timestamp_period_ns / 1000.0)


def precision_list(text: str) -> tuple:
    """--precision: precisions other than fp32, comma-separated."""
    values = tuple(v.strip() for v in text.split(","))
    bad = [v for v in values if v not in registry.PRECISIONS or v == "fp32"]
    if bad:
        raise argparse.ArgumentTypeError(f"{', '.join(bad)}: expected {', '.join(registry.PRECISIONS[1:])} "
                                         "(comma-separated)")
    return values


def is_variant(kernel: str) -> bool:
    """A precision variant (shmem_f16, shmem_int8): a precision opted into, not a route."""
    return registry.kernel(kernel).variant_of is not None


def tolerance(kernel: str) -> float:
    """The error bar a kernel's rows are judged by."""
    from executorch_wgpu.tools.reference import TOLERANCES

    return TOLERANCES[registry.kernel(kernel).precision]


def run_kernel(layer: BenchLayer, kernel: str, x: torch.Tensor) -> torch.Tensor:
    """One untimed call of a kernel (whatever the route says), for the correctness check."""
    import numpy as np
    import torch
    import wgpu

    gpu = layer.gpu
    m = x.shape[0]
    plan = gpu.prepare(kernel, m)
    dev = gpu.ctx.device
    dev.queue.write_buffer(gpu.x, 0, x.contiguous().numpy())
    enc = dev.create_command_encoder()
    gpu.encode(enc, plan)
    enc.copy_buffer_to_buffer(gpu.y, 0, gpu.staging, 0, m * layer.N * 4)
    dev.queue.submit([enc.finish()])
    gpu.staging.map_sync(wgpu.MapMode.READ)
    y = np.frombuffer(gpu.staging.read_mapped(0, m * layer.N * 4), dtype=np.float32).copy()
    gpu.staging.unmap()
    return torch.from_numpy(y).reshape(m, layer.N)


def check_kernel(layer: BenchLayer, kernel: str, x: torch.Tensor, golden: torch.Tensor, rows: torch.Tensor) -> dict:
    """Correctness of one kernel at this M: max rel err of the sampled rows against the fp64 golden."""
    from executorch_wgpu.tools.reference import rel_err

    y = run_kernel(layer, kernel, x)
    plan = layer.gpu.prepare(kernel, x.shape[0])
    return {"rel_err": rel_err(y[rows], golden), "k_splits": plan.k_splits}


def time_kernel(layer: BenchLayer, kernel: str, m: int, reps: int, warmup: int,
                flush: Optional[Callable] = None) -> float:
    """Median GPU µs of a kernel at M = m (x as left by the last run_kernel); cold with a flush."""
    plan = layer.gpu.prepare(kernel, m)
    return statistics.median(time_gpu_passes(layer.gpu.ctx, lambda enc, ts: layer.gpu.encode(enc, plan, ts),
                                             reps, warmup, flush))


class StreamProbe:
    """The streaming-read ceiling: time to read n bytes once through wgpu (shaders/stream_read.wgsl)."""

    def __init__(self, ctx: GPUContext, flush_bytes: int = 256 << 20):
        import wgpu

        self.ctx = ctx
        dev = ctx.device
        self.pipeline = ctx.pipeline("stream_read")
        self.layout = ctx.bind_group_layout("stream_read")
        self.threads = registry.kernel("stream_read").workgroup_size[0]
        # The L2 flush: a read of flush_bytes (larger than any GPU's L2) between timed runs,
        # within what one binding may hold (lavapipe: 128 MiB).
        self.flush_groups = 1024
        flush_bytes = min(flush_bytes, ctx.plan_limits().max_binding_bytes // 16 * 16)
        self._flush_data = dev.create_buffer(size=flush_bytes, usage=wgpu.BufferUsage.STORAGE)
        self._flush_sink = dev.create_buffer(size=self.flush_groups * self.threads * 4, usage=wgpu.BufferUsage.STORAGE)
        self._flush_bind = self._bind(self._flush_data, self._flush_sink)

    def _bind(self, data, sink):
        return self.ctx.device.create_bind_group(layout=self.layout, entries=[
            {"binding": 0, "resource": {"buffer": data, "offset": 0, "size": data.size}},
            {"binding": 1, "resource": {"buffer": sink, "offset": 0, "size": sink.size}},
        ])

    def flush(self, enc) -> None:
        """Record an untimed pass that reads the flush buffer, evicting whatever the L2 held."""
        cpass = enc.begin_compute_pass()
        cpass.set_pipeline(self.pipeline)
        cpass.set_bind_group(0, self._flush_bind)
        cpass.dispatch_workgroups(self.flush_groups, 1, 1)
        cpass.end()

    def us(self, nbytes: int, reps: int, warmup: int, cold: bool = False) -> float:
        """Fastest median over a few thread shapes (vec4 per thread): the best plain read we can measure.

        cold: every timed read follows a flush (as a cold kernel run does); otherwise
        a buffer that fits the L2 is read from it after the first run."""
        import wgpu

        dev = self.ctx.device
        count = math.ceil(nbytes / 16)
        data = dev.create_buffer(size=count * 16, usage=wgpu.BufferUsage.STORAGE)
        best = float("inf")
        for per_thread in (2, 4, 8):
            groups = min(65535, max(1, math.ceil(count / (self.threads * per_thread))))
            sink = dev.create_buffer(size=groups * self.threads * 4, usage=wgpu.BufferUsage.STORAGE)
            bind = self._bind(data, sink)

            def encode(enc, ts, groups=groups, bind=bind):
                cpass = enc.begin_compute_pass(**({"timestamp_writes": ts} if ts else {}))
                cpass.set_pipeline(self.pipeline)
                cpass.set_bind_group(0, bind)
                cpass.dispatch_workgroups(groups, 1, 1)
                cpass.end()

            best = min(best, statistics.median(time_gpu_passes(self.ctx, encode, reps, warmup,
                                                               self.flush if cold else None)))
            sink.destroy()
        data.destroy()
        return best

    def spin_up(self, ms: float = 30.0) -> None:
        """Keep the GPU busy for ~ms so its clocks ramp up before a measurement (idle GPUs clock down)."""
        import wgpu

        dev = self.ctx.device
        data = dev.create_buffer(size=16 << 20, usage=wgpu.BufferUsage.STORAGE)
        sink = dev.create_buffer(size=1024 * self.threads * 4, usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC)
        done = dev.create_buffer(size=4, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
        bind = self._bind(data, sink)
        end = time.perf_counter() + ms / 1000.0
        while time.perf_counter() < end:
            enc = dev.create_command_encoder()
            for _ in range(4):
                cpass = enc.begin_compute_pass()
                cpass.set_pipeline(self.pipeline)
                cpass.set_bind_group(0, bind)
                cpass.dispatch_workgroups(1024, 1, 1)
                cpass.end()
            enc.copy_buffer_to_buffer(sink, 0, done, 0, 4)
            dev.queue.submit([enc.finish()])
            done.map_sync(wgpu.MapMode.READ)   # wait for the GPU (a readback is the portable fence)
            done.unmap()
        for b in (data, sink, done):
            b.destroy()


def cuda_median_us(fn: Callable, reps: int, warmup: int, flush_bytes: int = 0) -> float:
    """Median µs of fn on CUDA; with flush_bytes, a buffer that large is zeroed (untimed) before each run."""
    import torch

    flush = torch.empty(flush_bytes, dtype=torch.uint8, device="cuda") if flush_bytes else None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


class TorchPeers:
    """torch int4 tinygemm and fp32 CUDA-core matmul on the same weights (CUDA only)."""

    def __init__(self, layer: BenchLayer):
        import torch

        dev = torch.device("cuda")
        w = layer.weights
        q = (w.codes.to(torch.int32) + 8).to(torch.uint8)                # tinygemm: w = (q - 8) * scale + zero
        packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(dev)                  # [N, K/2], even k in the high nibble
        self.w_int4 = torch._convert_weight_to_int4pack(packed, 8)
        scales = w.scales.t().contiguous()                                # [K/gs, N]
        self.scales_zeros = torch.stack([scales, torch.zeros_like(scales)], dim=-1).to(dev, torch.bfloat16).contiguous()
        self.group_size = w.group_size
        self.w_fp32_t = w.dequantized(slice(None), torch.float32).t().contiguous().to(dev)   # [K, N]

    def _calls(self, x: torch.Tensor) -> dict:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False   # fp32 on CUDA cores, as our kernels compute
        xb = x.to("cuda", torch.bfloat16)
        xf = x.to("cuda")
        return {
            "tinygemm": lambda: torch._weight_int4pack_mm(xb, self.w_int4, self.group_size, self.scales_zeros),
            "fp32_cuda": lambda: xf @ self.w_fp32_t,
        }

    def check(self, x: torch.Tensor, golden: torch.Tensor, rows: torch.Tensor) -> dict:
        """Rel errors of the peers (tinygemm takes bf16 activations: ~1e-2 expected)."""
        from executorch_wgpu.tools.reference import rel_err

        return {f"{name}_rel_err": rel_err(fn().float().cpu()[rows], golden) for name, fn in self._calls(x).items()}

    def time(self, x: torch.Tensor, reps: int, warmup: int, flush_bytes: int = 0) -> dict:
        return {name: cuda_median_us(fn, reps, warmup, flush_bytes) for name, fn in self._calls(x).items()}


def adapter_info(ctx: GPUContext) -> dict:
    info = dict(ctx.adapter.info)
    return {k: info.get(k, "") for k in ("vendor", "device", "description", "backend_type", "adapter_type")}


@dataclass
class BenchConfig:
    shapes: Dict[str, tuple]
    m_values: Sequence[int]
    group_size: int = 32
    reps: int = 25
    warmup: int = 5
    rounds: int = 3
    peers: bool = True
    route_table: Optional[RouteTable] = None
    seed: int = 0
    kernels: Sequence[str] = registry.ROUTABLE_NAMES
    flush_bytes: int = 256 << 20   # the L2 flush between cold runs: larger than any GPU's L2
    cold_all: bool = False         # time M > 1 rows cold too (M = 1 rows always are)
    # M > 1 rows also time the variants in these precisions (shmem_f16, shmem_int8) where the adapter has their
    # features
    precisions: Sequence[str] = ()


def bench(cfg: BenchConfig, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Measure every kernel on every shape x M; returns the JSON-able results."""
    import torch
    import wgpu

    from executorch_wgpu.runtime_py.gpu import gpu_context

    ctx = gpu_context()
    if not ctx.has_timestamps:
        raise WebGPUDelegateError(f"adapter {ctx.adapter_name} has no timestamp queries; the bench needs them")
    use_cuda = cfg.peers and torch.cuda.is_available()
    probe = StreamProbe(ctx, cfg.flush_bytes)
    variants = [v for (precision, _), v in registry.VARIANTS.items() if precision in cfg.precisions]
    for v in variants:
        if ctx.missing_features(v):
            log.warning("bench: adapter %s lacks %s: %s is not timed", ctx.adapter_name,
                        ", ".join(ctx.missing_features(v)), v)
    variants = [v for v in variants if not ctx.missing_features(v)]
    rows_out = []
    for name, (k, n) in cfg.shapes.items():
        layer = make_layer(ctx, name, k, n, cfg.group_size, cfg.seed)
        peers = TorchPeers(layer) if use_cuda else None
        for m in cfg.m_values:
            if name == "lm_head" and m > LM_HEAD_MAX_M:
                continue
            g = torch.Generator().manual_seed(cfg.seed + m)
            x = torch.randn(m, k, generator=g)
            rows = torch.unique(torch.linspace(0, m - 1, min(GOLDEN_ROWS, m)).long())
            golden = layer.weights.golden(x[rows])
            cold = m == 1 or cfg.cold_all
            flush = probe.flush if cold else None
            row = {"shape": name, "K": k, "N": n, "M": m, "group_size": cfg.group_size,
                   "weight_bytes": layer.weight_bytes, "weights": "cold" if cold else "L2-warm", "kernels": {}}
            row["routed"] = routed_kernel(cfg.route_table, k, n, m, cfg.group_size, ctx.adapter_class)
            row["default_rule"] = routed_kernel(None, k, n, m, cfg.group_size, ctx.adapter_class)
            kernels = [kern for kern in KERNELS_FOR_M[m == 1] if kern in cfg.kernels]
            if m > 1:
                kernels += [v for v in variants if registry.kernel(v).variant_of in kernels]
            for kernel in kernels:
                try:
                    row["kernels"][kernel] = check_kernel(layer, kernel, x, golden, rows)
                except WebGPUDelegateError as e:
                    row["kernels"][kernel] = {"error": str(e)}
            kernels = [kern for kern in kernels if "error" not in row["kernels"][kern]]
            if peers is not None:
                row.update(peers.check(x, golden, rows))
            # Rounds: every competitor is timed once per round, interleaved, and
            # the best round's median is kept -- the GPU's clocks and any other
            # tenant vary over seconds, and this compares all in the same windows.
            timings: Dict[str, List[float]] = {kern: [] for kern in kernels + ["stream_read", "tinygemm", "fp32_cuda"]}
            for _ in range(cfg.rounds):
                probe.spin_up()
                for kernel in kernels:   # times the x that check_kernel left in the layer's buffer
                    timings[kernel].append(time_kernel(layer, kernel, m, cfg.reps, cfg.warmup, flush))
                timings["stream_read"].append(probe.us(layer.weight_bytes, cfg.reps, cfg.warmup, cold))
                if peers is not None:
                    for peer, us in peers.time(x, cfg.reps, cfg.warmup, cfg.flush_bytes if cold else 0).items():
                        timings[peer].append(us)
            for kernel in kernels:
                row["kernels"][kernel].update(us=min(timings[kernel]), round_medians_us=timings[kernel])
            row["stream_read_us"] = min(timings["stream_read"])
            for peer in ("tinygemm", "fp32_cuda"):
                if timings[peer]:
                    row[f"{peer}_us"] = min(timings[peer])
            finish_row(row)
            progress(format_progress(row))
            rows_out.append(row)
        del peers, layer
        if use_cuda:
            torch.cuda.empty_cache()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "adapter": adapter_info(ctx),
        "cuda_device": torch.cuda.get_device_name() if use_cuda else None,
        "versions": {"wgpu": wgpu.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "config": {"group_size": cfg.group_size, "reps": cfg.reps, "warmup": cfg.warmup, "rounds": cfg.rounds,
                   "flush_bytes": cfg.flush_bytes, "cold_all": cfg.cold_all,
                   "precisions": list(cfg.precisions),
                   "route_table": cfg.route_table.describe() if cfg.route_table else None},
        "rows": rows_out,
    }


def routed_kernel(table: Optional[RouteTable], k: int, n: int, m: int, group_size: int,
                  adapter_class: Optional[str] = None) -> str:
    """The kernel a lowering with this table (None: the rules) would run at M on an adapter of this class."""
    from executorch_wgpu.backend.routing import RouteOptions, adapter_routes, decide_route

    options = RouteOptions(route_table=table)
    for cls, route in adapter_routes(k, n, group_size, options):
        if cls == adapter_class:
            return route.kernel_for(m)
    return decide_route(k, n, group_size, options).kernel_for(m)


def finish_row(row: dict) -> None:
    """Derived figures: TFLOP/s, GB/s, fastest kernel, routed-vs-fastest, ratios to the peers."""
    flops = 2.0 * row["M"] * row["K"] * row["N"]
    for kernel, r in row["kernels"].items():
        if "us" in r:
            r["tflops"] = flops / r["us"] / 1e6
            r["weight_gbps"] = row["weight_bytes"] / r["us"] / 1e3
            r["ok"] = r["rel_err"] <= tolerance(kernel)
    row["stream_read_gbps"] = row["weight_bytes"] / row["stream_read_us"] / 1e3
    # The fastest of the kernels routes choose from (fp32): a variant is a precision opted into, not a route.
    timed = {k: r["us"] for k, r in row["kernels"].items() if "us" in r and r["ok"] and not is_variant(k)}
    row["fastest"] = min(timed, key=lambda k: timed[k]) if timed else None
    routed = row["kernels"].get(row["routed"], {})
    row["routed_us"] = routed.get("us")
    if row["fastest"] and row["routed_us"]:
        row["routed_vs_fastest"] = row["routed_us"] / timed[row["fastest"]]
    default = row["kernels"].get(row["default_rule"], {})
    if row["fastest"] and default.get("us"):
        row["default_rule_vs_fastest"] = default["us"] / timed[row["fastest"]]
    if row["routed_us"]:
        row["routed_tflops"] = flops / row["routed_us"] / 1e6
        row["routed_vs_stream"] = row["stream_read_us"] / row["routed_us"]
        for peer in ("tinygemm", "fp32_cuda"):
            if f"{peer}_us" in row:
                row[f"routed_time_vs_{peer}"] = row["routed_us"] / row[f"{peer}_us"]
                row[f"{peer}_tflops"] = flops / row[f"{peer}_us"] / 1e6


def format_progress(row: dict) -> str:
    parts = [f"{row['shape']:>8} K={row['K']:<5} N={row['N']:<6} M={row['M']:<5}"]
    for kernel, r in row["kernels"].items():
        parts.append(f"{kernel} {r['us']:9.1f} us {cli.figure(r['tflops']):>7} TF" if "us" in r else f"{kernel} n/a")
    if "tinygemm_us" in row:
        parts.append(f"tinygemm {row['tinygemm_us']:8.1f} us  fp32 {row['fp32_cuda_us']:8.1f} us")
    parts.append(f"stream {row['stream_read_us']:.1f} us")
    return " | ".join(parts)


def one_linear_pte(k: int = 2048, n: int = 2048, m: int = 1) -> tuple:
    """(.pte bytes, example x) of a torchao-quantized Linear(k, n, bias=False), gs 32, lowered with
    WebGPUPartitioner(linears_only=True): one WGQ4 delegate, whose route report times the call and splits its host
    phases (call_overhead, native-bench)."""
    import torch

    from executorch_wgpu.tools.models import lower_to_pte, quantize_q4

    torch.manual_seed(0)
    model = quantize_q4(torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)).eval(), group_size=32)
    x = torch.randn(m, k)
    return lower_to_pte(model, (x,), None, linears_only=True), x


def call_overhead(k: int = 2048, n: int = 2048, m: int = 1, calls: int = 300, warmup: int = 30) -> dict:
    """Host cost of one `execute` of a 1-linear program, split by phase (medians over `calls`).

    Exports a q4 Linear(k, n) with torchao + WebGPUPartitioner and runs it
    with our runtime, as a user would. Python interpretation = execute wall
    minus the delegate call's wall; the delegate call splits into upload,
    encode + submit, wait (GPU work + completion signal) and readback.
    """
    import numpy as np

    from executorch_wgpu.runtime import Runtime

    pte, x = one_linear_pte(k, n, m)
    method = Runtime.get().load_program(pte).load_method("forward")
    samples = []
    for i in range(warmup + calls):
        start = time.perf_counter()
        method.execute([x])
        wall = (time.perf_counter() - start) * 1e6
        c = method.route_report()[0]
        if i >= warmup:
            samples.append((wall, c["wall_us"], c["gpu_us"], c["upload_us"], c["submit_us"], c["wait_us"],
                            c["readback_us"]))
    names = ("execute_us", "delegate_us", "gpu_us", "upload_us", "submit_us", "wait_us", "readback_us")
    # gpu_us is None on an adapter without timestamp queries: then so are it and above_gpu_us, not 0
    out: dict = {name: None if any(v is None for v in column) else float(np.median(column))
                 for name, column in zip(names, zip(*samples))}
    out["interpreter_us"] = out["execute_us"] - out["delegate_us"]
    out["above_gpu_us"] = None if out["gpu_us"] is None else out["execute_us"] - out["gpu_us"]
    out.update({"K": k, "N": n, "M": m, "calls": calls, "kernel": method.route_report()[0]["kernel"]})
    return out


def select_shapes(parser: argparse.ArgumentParser, quick: bool, names: Optional[str]) -> Dict[str, tuple]:
    """The shape set (--quick or Llama-1B), narrowed to the comma-separated names; a parser error names unknown ones."""
    shapes = dict(QUICK_SHAPES if quick else LLAMA_1B_SHAPES)
    if not names:
        return shapes
    wanted = [name for name in names.split(",") if name]
    unknown = set(wanted) - set(shapes)
    if unknown or not wanted:
        parser.error(f"argument --shapes: unknown shapes {sorted(unknown)}; choose from {list(shapes)}")
    return {k: shapes[k] for k in wanted}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line, every value checked (a usage error, exit 2) before anything is imported or measured."""
    p = argparse.ArgumentParser(prog="python -m executorch_wgpu bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes and M for a CPU Vulkan (lavapipe)")
    p.add_argument("--shapes", help="comma-separated subset of " + ",".join(LLAMA_1B_SHAPES)
                   + " (--quick: " + ",".join(QUICK_SHAPES) + ")")
    p.add_argument("--m", type=cli.int_list,
                   help="comma-separated positive M values (default 1,16,64,128,512,2048; --quick: 1,16,64)")
    p.add_argument("--group-size", type=cli.multiple_of_32, default=32,
                   help="q4 group size: a positive multiple of 32 that divides every K (default 32)")
    p.add_argument("--reps", type=cli.positive_int, default=25, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=5)
    p.add_argument("--rounds", type=cli.positive_int, default=3,
                   help="interleaved rounds; the best round's median is reported")
    p.add_argument("--no-peers", action="store_true", help="skip the torch CUDA peers")
    p.add_argument("--route-table", type=cli.route_table_file,
                   help="route table (from `tune`) the routed column follows")
    p.add_argument("--out", type=cli.output_folder, default=Path("bench-out"),
                   help="folder for bench.json/.md/.png")
    p.add_argument("--overhead", action="store_true",
                   help="only measure the host cost of execute() for a 1-linear 2048->2048 program at M=1 "
                        "(lowered linears-only: one delegate, the linear's)")
    p.add_argument("--flush-mb", type=cli.positive_int,
                   help="MiB read between cold runs to evict the L2 (default 256; --quick 16)")
    p.add_argument("--cold-all", action="store_true", help="time M > 1 rows cold too (M = 1 rows always are)")
    p.add_argument("--precision", type=precision_list, default=(),
                   help="f16, int8 or f16,int8: M > 1 rows also time the shared-memory GEMM's variants in these "
                        "precisions (shmem_f16, shmem_int8: what WebGPUPartitioner(precision=...) runs) where the "
                        "adapter has their features, judged by reference.TOLERANCES; the fastest and routed columns "
                        "stay fp32. With --model (one precision): the step's layers lowered with it")
    p.add_argument("--f16", dest="precision", action="store_const", const=("f16",),
                   help="the same as --precision f16"),
    p.add_argument("--model", choices=sorted(LLAMA_CONFIGS),
                   help="time all q4 linears of this Llama config's decode step and prefill in one submit each, "
                        "weights cold (--m: the step's M values, default 1,128,512; --quick: 1,16)")
    args = p.parse_args(argv)
    args.shape_set = select_shapes(p, args.quick, args.shapes)
    if args.model:
        c = LLAMA_CONFIGS[args.model]
        ks = {"dim": c["dim"], "hidden_dim": c["hidden_dim"]}
    elif not args.overhead:
        ks = {name: k for name, (k, _) in args.shape_set.items()}
    else:
        ks = {}
    undivided = [f"{name} (K = {k})" for name, k in ks.items() if k % args.group_size]
    if undivided:
        p.error(f"argument --group-size: {args.group_size} does not divide the in-features of {', '.join(undivided)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    flush_bytes = (args.flush_mb or (16 if args.quick else 256)) << 20
    command = "python -m executorch_wgpu bench " + " ".join(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")   # diagnostics on stderr, results on stdout
    try:
        if args.overhead:
            overhead_main(args)
        elif args.model:
            model_main(args, flush_bytes, command)
        else:
            kernels_main(args, flush_bytes, command)
    except WebGPUDelegateError as e:   # no adapter, no timestamp queries, ...: said in a line, not a traceback
        cli.fail(str(e))


def overhead_main(args: argparse.Namespace) -> None:
    """bench --overhead: the host cost of one execute, as JSON on stdout (and overhead.json)."""
    from executorch_wgpu.runtime_py.gpu import gpu_context

    with cli.Progress(1, "bench --overhead") as progress:
        progress.step("export, load and time a 1-linear program")
        result = call_overhead()
    result["adapter"] = adapter_info(gpu_context())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


def require_timestamps(ctx: GPUContext) -> None:
    if not ctx.has_timestamps:
        raise WebGPUDelegateError(f"adapter {ctx.adapter_name} has no timestamp queries; the bench needs them")


def kernels_main(args: argparse.Namespace, flush_bytes: int, command: str) -> None:
    """bench: every kernel on every shape x M; the report table on stdout, progress on stderr."""
    from executorch_wgpu.backend.route_table import RouteTable
    from executorch_wgpu.runtime_py.gpu import gpu_context
    from executorch_wgpu.tools.bench_report import markdown, write_reports

    m_values = args.m or list(QUICK_M if args.quick else LLAMA_1B_M)
    cfg = BenchConfig(args.shape_set, m_values, group_size=args.group_size, reps=args.reps, warmup=args.warmup,
                      rounds=args.rounds, peers=not args.no_peers,
                      route_table=RouteTable.load(args.route_table) if args.route_table else None,
                      flush_bytes=flush_bytes, cold_all=args.cold_all, precisions=args.precision)
    require_timestamps(gpu_context())
    rows = sum(1 for name in cfg.shapes for m in cfg.m_values if not (name == "lm_head" and m > LM_HEAD_MAX_M))
    start = time.perf_counter()
    with cli.Progress(rows, "bench", unit="row") as progress:
        def on_row(line: str) -> None:
            progress.note(line)
            progress.advance()

        results = bench(cfg, progress=on_row)
    results["command"] = command
    results["wall_s"] = round(time.perf_counter() - start, 1)
    for path in write_reports(results, args.out):
        log.info("wrote %s", path)
    print(markdown(results), end="")
    bad = [(r["shape"], r["M"], k) for r in results["rows"] for k, v in r["kernels"].items() if v.get("ok") is False]
    if bad:
        log.error("kernels above their tolerance (reference.TOLERANCES): %s", bad)
        sys.exit(1)


def model_main(args: argparse.Namespace, flush_bytes: int, command: str) -> None:
    """bench --model: a model's linears per step in one submit (tools/bench_model.py)."""
    from executorch_wgpu.runtime_py.gpu import gpu_context
    from executorch_wgpu.tools import bench_model

    ctx = gpu_context()
    require_timestamps(ctx)
    if len(args.precision) > 1:
        raise SystemExit("bench --model: give one --precision (the step's layers are lowered with it)")
    model_precision = args.precision[0] if args.precision else "fp32"
    m_values = args.m or ([1, 16] if args.quick else [1, 128, 512])
    probe = StreamProbe(ctx, flush_bytes)
    probe.spin_up()
    one_binding = ctx.plan_limits().max_binding_bytes // 16 * 16

    def stream_us(nbytes: int) -> float:
        """A cold read of the bytes; beyond one binding, of one binding's worth, scaled to the bytes."""
        read = min(nbytes, one_binding)
        return probe.us(read, args.reps, args.warmup, cold=True) * nbytes / read

    with cli.Progress(len(m_values), f"bench --model {args.model}", unit="M") as progress:
        progress.step("loading the layers, then M = " + ", ".join(map(str, m_values)))

        def on_row(line: str) -> None:
            progress.note(line)
            progress.advance()

        result = bench_model.bench_model(ctx, args.model, m_values, args.group_size, args.reps, args.warmup,
                                         stream_us=stream_us, progress=on_row,
                                         precision=model_precision)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result.update(date=date, command=command, adapter=adapter_info(ctx))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model.json").write_text(json.dumps(result, indent=1) + "\n")
    report = bench_model.markdown(result, ctx.adapter_name, command, date)
    (args.out / "model.md").write_text(report)
    print(report)
    if not all(r["ok"] for r in result["rows"]):
        log.error("a model layer is above the %.0e tolerance", result["tolerance"])
        sys.exit(1)
