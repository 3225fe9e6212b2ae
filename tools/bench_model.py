"""python -m executorch_wgpu bench --model 1b: a model's q4 linears in one submit, weights cold.

`bench` times each layer alone, run after run, so a layer's weights sit in the
GPU's L2 cache from the second run on. A real decode step reads every layer's
weights once, from memory. Here every linear of a Llama-shaped model gets its
own weight buffers (0.77 GB for Llama-3.2-1B, beyond any GPU's L2) and the
step's linears run in order in one command buffer -- one compute pass per
layer, timestamped at both ends, one submit per step -- as they will once the
whole model runs on the GPU:

  * decode (M = 1): every linear as a GEMV (the routed kernel at M = 1);
  * prefill (M = T): every linear at M = T with its routed kernel, except
    lm_head, which generation computes for the last position only (M = 1).

Reported per M: the step's GPU time (first pass begin to last pass end,
median over steps), its weight bytes over that time, a cold streaming read of
the same number of bytes (the ceiling any kernel could reach here), and the
time per projection kind. The first layer of each projection kind is checked
against the fp64 golden after the timed steps. Weights are random (one draw per shape, copied
into each layer's own buffers: distinct addresses, so no cache sees a repeat).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import defaultdict
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
import wgpu

from executorch_wgpu.backend.routing import RouteOptions, adapter_routes
from executorch_wgpu.backend.serialization.blob import Q4LinearRecord
from executorch_wgpu.runtime_py.gpu import GPUContext
from executorch_wgpu.runtime_py.q4_linear import Plan, Q4LinearGPU
from executorch_wgpu.tools.models import LLAMA_CONFIGS
from executorch_wgpu.tools.reference import TOLERANCES, RandomQ4Layer, random_q4_layer, rel_err



def model_linears(config: str) -> List[Tuple[str, int, int]]:
    """(projection kind, K, N) of every q4 linear of a Llama config, in the order a step runs them."""
    c = LLAMA_CONFIGS[config]
    dim, hidden = c["dim"], c["hidden_dim"]
    kv = c["n_kv_heads"] * (dim // c["n_heads"])
    block = [("q", dim, dim), ("k", dim, kv), ("v", dim, kv), ("o", dim, dim),
             ("gate", dim, hidden), ("up", dim, hidden), ("down", hidden, dim)]
    return block * c["n_layers"] + [("lm_head", dim, c["vocab_size"])]


@dataclasses.dataclass
class ModelLayer:
    kind: str
    weights: RandomQ4Layer   # shared by every layer of this shape
    gpu: Q4LinearGPU         # this layer's own buffers

    @property
    def weight_bytes(self) -> int:
        return self.gpu.rec.qweight.nbytes + self.gpu.rec.scales.nbytes


def load_model_layers(ctx: GPUContext, config: str, group_size: int, seed: int = 0,
                      precision: str = "fp32") -> List[ModelLayer]:
    by_shape: Dict[Tuple[int, int], Tuple[RandomQ4Layer, Q4LinearRecord]] = {}
    layers = []
    for i, (kind, k, n) in enumerate(model_linears(config)):
        if (k, n) not in by_shape:   # draw and pack once per shape; each layer uploads its own copy
            weights = random_q4_layer(k, n, group_size, seed=seed + len(by_shape))
            # Routed as a default lowering routes it, per kind of adapter too: the step runs
            # what a lowered model runs on this adapter.
            record = weights.record(kind, RouteOptions(prefill_precision=precision), m_max=1 << 20)
            by_shape[(k, n)] = weights, dataclasses.replace(
                record, adapter_routes=adapter_routes(k, n, group_size, RouteOptions()))
        weights, record = by_shape[(k, n)]
        layers.append(ModelLayer(kind, weights, Q4LinearGPU(ctx, dataclasses.replace(record, name=f"{kind}.{i}"))))
    return layers


def step_rows(layer: ModelLayer, m: int) -> int:
    """Rows a layer computes in a step of M = m: lm_head only for the last position."""
    return 1 if layer.kind == "lm_head" else m


def time_steps(ctx: GPUContext, layers: Sequence[ModelLayer], plans: Sequence[Plan], reps: int,
               warmup: int, per_pass: bool = True, one_pass: bool = False) -> Tuple[List[float], np.ndarray]:
    """GPU µs of `reps` steps (first begin to last end) and each layer's µs per step [reps, layers].

    per_pass=False writes only the step's first and last timestamps (the per-layer
    times are then zero): it shows what the other timestamp writes cost. Every
    query of the set is written before it is resolved: resolving one never
    written waits forever on some drivers (NVIDIA's Vulkan).
    """
    dev = ctx.device
    last = len(layers) - 1
    per_pass = per_pass and not one_pass
    per_step = 2 * len(layers) if per_pass else 2

    def encode_step(enc, first_query=None):
        if one_pass:   # every layer's dispatches in one compute pass: no pass boundaries between layers
            ts = {"query_set": queries, "beginning_of_pass_write_index": first_query,
                  "end_of_pass_write_index": first_query + 1} if first_query is not None else None
            cpass = enc.begin_compute_pass(**({"timestamp_writes": ts} if ts else {}))
            for layer, plan in zip(layers, plans):
                layer.gpu.record(cpass, plan)
            cpass.end()
            return
        for i, (layer, plan) in enumerate(zip(layers, plans)):
            ts = None
            if first_query is not None and per_pass:
                ts = {"query_set": queries, "beginning_of_pass_write_index": first_query + 2 * i,
                      "end_of_pass_write_index": first_query + 2 * i + 1}
            elif first_query is not None and i in (0, last):
                ts = {"query_set": queries}
                if i == 0:
                    ts["beginning_of_pass_write_index"] = first_query
                if i == last:
                    ts["end_of_pass_write_index"] = first_query + 1
            layer.gpu.encode(enc, plan, ts)

    count = per_step * reps
    queries = dev.create_query_set(type=wgpu.QueryType.timestamp, count=count)
    for _ in range(warmup):
        enc = dev.create_command_encoder()
        encode_step(enc)
        dev.queue.submit([enc.finish()])
    for rep in range(reps):   # one submit per step, as a forward pass on the GPU would be
        enc = dev.create_command_encoder()
        encode_step(enc, per_step * rep)
        dev.queue.submit([enc.finish()])
    resolve = dev.create_buffer(size=8 * count, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC)
    readback = dev.create_buffer(size=8 * count, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
    enc = dev.create_command_encoder()
    enc.resolve_query_set(queries, 0, count, resolve, 0)
    enc.copy_buffer_to_buffer(resolve, 0, readback, 0, 8 * count)
    dev.queue.submit([enc.finish()])
    readback.map_sync(wgpu.MapMode.READ)
    ticks = np.frombuffer(readback.read_mapped(), dtype=np.uint64).reshape(reps, per_step // 2, 2).astype(np.float64)
    readback.unmap()
    for b in (resolve, readback):
        b.destroy()
    queries.destroy()
    scale = ctx.timestamp_period_ns / 1000.0
    totals = [(ticks[r, -1, 1] - ticks[r, 0, 0]) * scale for r in range(reps)]
    if not per_pass:
        return totals, np.zeros((reps, len(layers)))
    return totals, (ticks[:, :, 1] - ticks[:, :, 0]) * scale


def read_y(layer: ModelLayer, rows: int) -> torch.Tensor:
    gpu, n = layer.gpu, layer.gpu.rec.out_features
    enc = gpu.ctx.device.create_command_encoder()
    enc.copy_buffer_to_buffer(gpu.y, 0, gpu.staging, 0, rows * n * 4)
    gpu.ctx.device.queue.submit([enc.finish()])
    gpu.staging.map_sync(wgpu.MapMode.READ)
    y = np.frombuffer(gpu.staging.read_mapped(0, rows * n * 4), dtype=np.float32).copy()
    gpu.staging.unmap()
    return torch.from_numpy(y).reshape(rows, n)


def bench_model(ctx: GPUContext, config: str, m_values: Sequence[int], group_size: int, reps: int,
                warmup: int, stream_us: Callable[[int], float], seed: int = 0,
                progress: Callable[[str], None] = lambda s: None, precision: str = "fp32") -> dict:
    """Time the model's linears per M; stream_us(nbytes) is the cold streaming-read ceiling.
    precision: the layers' prefill precision, as WebGPUPartitioner(precision=...) lowers them."""
    layers = load_model_layers(ctx, config, group_size, seed, precision)
    tolerance = TOLERANCES[precision]
    result: dict = {"config": config, "group_size": group_size, "layers": len(layers), "reps": reps,
                    "warmup": warmup, "precision": precision,
                    "tolerance": tolerance, "rows": []}
    for m in m_values:
        g = torch.Generator().manual_seed(seed + m)
        inputs: Dict[Tuple[int, int], torch.Tensor] = {}
        plans = []
        for layer in layers:
            rows, k = step_rows(layer, m), layer.gpu.rec.in_features
            if (rows, k) not in inputs:
                inputs[(rows, k)] = torch.randn(rows, k, generator=g)
            plans.append(layer.gpu.prepare(layer.gpu.route.kernel_for(rows), rows))
            ctx.device.queue.write_buffer(layer.gpu.x, 0, inputs[(rows, k)].numpy())
        totals, per_layer = time_steps(ctx, layers, plans, reps, warmup)
        step_only, _ = time_steps(ctx, layers, plans, reps, warmup, per_pass=False)
        one_pass, _ = time_steps(ctx, layers, plans, reps, warmup, one_pass=True)
        # The same step on the first layer's buffers of each projection kind: weights
        # that stay in L2 and TLB from layer to layer, to tell memory from fixed costs.
        first: Dict[Tuple[str, int, int], Tuple[ModelLayer, Plan]] = {}
        for layer, plan in zip(layers, plans):
            first.setdefault((layer.kind, layer.gpu.rec.in_features, layer.gpu.rec.out_features), (layer, plan))
        shared = [first[(l.kind, l.gpu.rec.in_features, l.gpu.rec.out_features)] for l in layers]
        shared_weights, _ = time_steps(ctx, [l for l, _ in shared], [p for _, p in shared], reps, warmup,
                                       per_pass=False)
        # ... and in one pass: consecutive layers of a kind write the same y, so wgpu puts a
        # barrier between them -- dependent dispatches in one pass, as a graph on the GPU runs.
        shared_one_pass, _ = time_steps(ctx, [l for l, _ in shared], [p for _, p in shared], reps, warmup,
                                        one_pass=True)
        errors: Dict[str, float] = {}
        for layer in layers:   # the first layer of each kind, after the timed steps
            if layer.kind not in errors:
                rows = step_rows(layer, m)
                x = inputs[(rows, layer.gpu.rec.in_features)]
                errors[layer.kind] = rel_err(read_y(layer, rows), layer.weights.golden(x))
        weight_bytes = sum(layer.weight_bytes for layer in layers)
        step_us = statistics.median(totals)
        layer_us = np.median(per_layer, axis=0)
        by_kind: Dict[str, dict] = defaultdict(lambda: {"us": 0.0, "bytes": 0, "layers": 0, "kernels": set()})
        for layer, plan, us in zip(layers, plans, layer_us):
            entry = by_kind[layer.kind]
            entry["us"] += float(us)
            entry["bytes"] += layer.weight_bytes
            entry["layers"] += 1
            entry["kernels"].add(plan.kernel)
        stream = stream_us(weight_bytes)
        row = {
            "M": m, "weight_bytes": weight_bytes, "step_us": step_us, "step_us_all": totals,
            "step_us_two_timestamps": statistics.median(step_only),
            "step_us_one_pass": statistics.median(one_pass),
            "step_us_shared_weights": statistics.median(shared_weights),
            "step_us_shared_weights_one_pass": statistics.median(shared_one_pass),
            "passes_us": float(layer_us.sum()),
            "weight_gbps": weight_bytes / step_us / 1e3,
            "stream_read_us": stream, "stream_read_gbps": weight_bytes / stream / 1e3,
            "vs_stream": stream / step_us,
            "tokens_per_s_if_alone": m / step_us * 1e6,
            "by_kind": {kind: {**v, "kernels": sorted(v["kernels"]),
                               "gbps": v["bytes"] / v["us"] / 1e3 if v["us"] > 0 else None}
                        for kind, v in by_kind.items()},
            "max_rel_err": max(errors.values()), "ok": max(errors.values()) <= tolerance,
        }
        result["rows"].append(row)
        progress(format_row(row))
    return result


def format_row(row: dict) -> str:
    return (f"M={row['M']:<5} {row['step_us'] / 1e3:8.3f} ms GPU for {row['weight_bytes'] / 1e9:.3f} GB "
            f"= {row['weight_gbps']:7.1f} GB/s (stream read {row['stream_read_gbps']:7.1f} GB/s, "
            f"{100 * row['vs_stream']:5.1f} %); {row['tokens_per_s_if_alone']:,.0f} tok/s if nothing else ran; "
            f"max rel err {row['max_rel_err']:.1e}")


def markdown(result: dict, adapter: str, command: str, date: str) -> str:
    lines = [f"Model linears in one submit per step, weights cold: Llama `{result['config']}` "
             f"({result['layers']} q4 linears, gs {result['group_size']}, prefill precision "
             f"{result.get('precision', 'fp32')}); {adapter}; {date}.",
             f"Command: `{command}`; median of {result['reps']} steps after {result['warmup']} warm-up; "
             "GPU ms from timestamps around every pass; then around the step only: with a pass per layer, "
             "with every layer in one pass, and on the first layer's buffers of each kind (weights L2/TLB-warm).", "",
             "| M | weight GB | GPU ms | GB/s | stream-read GB/s | of stream | tok/s if alone | max rel err | "
             "GPU ms, 2 timestamps | one pass | one layer's buffers per kind | the same, one pass |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['M']} | {r['weight_bytes'] / 1e9:.3f} | {r['step_us'] / 1e3:.3f} | "
                     f"{r['weight_gbps']:.1f} | {r['stream_read_gbps']:.1f} | {100 * r['vs_stream']:.0f} % | "
                     f"{r['tokens_per_s_if_alone']:,.0f} | {r['max_rel_err']:.1e} | "
                     f"{r['step_us_two_timestamps'] / 1e3:.3f} | {r['step_us_one_pass'] / 1e3:.3f} | "
                     f"{r['step_us_shared_weights'] / 1e3:.3f} | {r['step_us_shared_weights_one_pass'] / 1e3:.3f} |")
    lines += ["", "| M | kind | layers | kernels | µs (sum) | GB/s |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for kind, v in r["by_kind"].items():
            gbps = "—" if v["gbps"] is None else f"{v['gbps']:.1f}"
            lines.append(f"| {r['M']} | {kind} | {v['layers']} | {', '.join(v['kernels'])} | {v['us']:.1f} | {gbps} |")
    return "\n".join(lines) + "\n"
