"""python -m executorch_wgpu tune: measure the kernels on this adapter and write a route table.

Runs the bench's measurements (same shapes, same M values, same fp64 checks,
GPU timestamps; no torch peers) and keeps, per layer shape (K, N, group size):
  * decode: the fastest correct kernel at M == 1,
  * prefill: the fastest correct kernel at each measured M > 1, as buckets
    "this kernel up to m_max", the bound between two measured M being their
    geometric mean (kernel times scale roughly with log M, so the midpoint in
    log M splits the unmeasured range fairly); the last bucket serves every
    larger M; neighbouring buckets with the same kernel are merged.
What it measures: the bench's Llama-3.2-1B shapes (--quick: its small ones), the
names and KxN items of --shapes (`--shapes 512x1024,gate`), and with --pte every
(K, N, group size) that a lowered .pte delegates to executorch_wgpu (read from its
delegate blobs: each linear's own, or a graph delegate's linears), each at its own
group size (--group-size is --shapes').
`WebGPUPartitioner(route_table="routes.json")` then lowers with these routes;
`python -m executorch_wgpu bench --route-table routes.json` checks them.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from executorch_wgpu.backend.route_table import LAST_BUCKET_M_MAX, RouteTable, RouteTableEntry, describe_buckets
from executorch_wgpu.backend.serialization.blob import adapter_class_of
from executorch_wgpu.tools import cli
from executorch_wgpu.shaders.registry import DECODE_KERNELS, PREFILL_KERNELS, ROUTABLE_NAMES

log = logging.getLogger(__name__)

ShapeKey = Tuple[int, int, int]              # (K, N, group_size)
Timings = Dict[int, Dict[str, float]]        # M -> {kernel: µs}, correct kernels only


class TuneError(ValueError):
    """Measurements a route table cannot be built from; the message says what is missing."""


def correct_timings(results: dict) -> Dict[ShapeKey, Timings]:
    """µs of every kernel that ran correctly (bench's "ok"), by layer shape and M.

    A kernel outside the fp64 tolerance is left out, so it is never chosen. When two
    rows measure the same shape and M, each kernel keeps its faster time.
    """
    timings: Dict[ShapeKey, Timings] = {}
    for row in results["rows"]:
        per_m = timings.setdefault((row["K"], row["N"], row["group_size"]), {}).setdefault(row["M"], {})
        for kernel, r in row["kernels"].items():
            if "us" in r and r.get("ok"):
                per_m[kernel] = min(r["us"], per_m.get(kernel, math.inf))
            else:
                log.warning("tune: %s at K=%d N=%d M=%d is not a candidate: %s", kernel, row["K"], row["N"],
                            row["M"], r.get("error") or f"rel_err {r.get('rel_err')} above tolerance")
    return timings


def fastest(us_by_kernel: Dict[str, float], candidates: Sequence[str]) -> Optional[str]:
    timed = {k: us for k, us in us_by_kernel.items() if k in candidates}
    return min(timed, key=lambda k: timed[k]) if timed else None


def prefill_buckets(winners: List[Tuple[int, str]]) -> Tuple[Tuple[int, str], ...]:
    """((m_max, kernel), ...) from the fastest kernel at each measured M > 1 (sorted by M).

    The bound between measured M_i and M_{i+1} is floor(sqrt(M_i * M_{i+1})); the last
    bucket reaches LAST_BUCKET_M_MAX. A bucket with the kernel of the next one is merged into it.
    """
    buckets: List[Tuple[int, str]] = []
    for i, (m, kernel) in enumerate(winners):
        m_max = math.isqrt(m * winners[i + 1][0]) if i + 1 < len(winners) else LAST_BUCKET_M_MAX
        if buckets and buckets[-1][1] == kernel:
            buckets[-1] = (m_max, kernel)
        else:
            buckets.append((m_max, kernel))
    return tuple(buckets)


def entry_from_timings(key: ShapeKey, timings: Timings) -> RouteTableEntry:
    k, n, gs = key
    decode = fastest(timings.get(1, {}), DECODE_KERNELS)
    if decode is None:
        raise TuneError(f"K={k} N={n} group_size={gs}: no kernel ran correctly at M=1, so there is no decode route")
    winners = []
    for m in sorted(m for m in timings if m > 1):
        kernel = fastest(timings[m], PREFILL_KERNELS)
        if kernel is None:
            # Its neighbours' buckets cover this M; a failing kernel is reported by correct_timings.
            log.warning("tune: K=%d N=%d M=%d: no prefill kernel ran correctly; neighbouring M decide", k, n, m)
            continue
        winners.append((m, kernel))
    if not winners:
        raise TuneError(f"K={k} N={n} group_size={gs}: no kernel ran correctly at any M > 1, so there is "
                        f"no prefill route (measure at least one M > 1)")
    measured_us = {str(m): {kern: round(us, 3) for kern, us in sorted(t.items())} for m, t in sorted(timings.items())}
    return RouteTableEntry(k, n, gs, decode, prefill_buckets(winners), measured_us)


def adapter_name(adapter: dict) -> str:
    """'llvmpipe (LLVM 15.0.6, 256 bits), Vulkan, Mesa 22.3.6 (LLVM 15.0.6)': device, backend and driver."""
    return ", ".join(str(adapter.get(key)) for key in ("device", "backend_type", "description") if adapter.get(key))


def table_from_bench(results: dict, name: str, command: str = "") -> RouteTable:
    """The route table the measurements of bench.bench() call for (no GPU needed: a pure function)."""
    entries = [entry_from_timings(key, t) for key, t in correct_timings(results).items()]
    return RouteTable(name=name, adapter=adapter_name(results["adapter"]), date=results["date"], command=command,
                      entries=entries, adapter_class=adapter_class_of(results["adapter"].get("adapter_type")))


def summary(entry: RouteTableEntry) -> str:
    return (f"K={entry.K} N={entry.N} gs={entry.group_size}: decode {entry.decode}; "
            f"prefill {describe_buckets(entry.prefill)}")


SHAPE_ITEM = re.compile(r"(\d+)x(\d+)")


@dataclass
class PteLayers:
    """The q4 layers a lowered .pte delegates to executorch_wgpu: layer names by (K, N, group size)."""

    path: Path
    names: Dict[ShapeKey, List[str]] = field(default_factory=dict)

    @property
    def group_sizes(self) -> List[int]:
        return sorted({gs for _, _, gs in self.names})


def pte_layers(path: Path) -> PteLayers:
    """Reads every executorch_wgpu delegate blob of every method of a .pte (ValueError says what is wrong): a
    linear's own blob (linears-only mode), or a graph blob (graph mode, the default) and the blobs of the q4
    linears it runs, which the program's named data holds."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.exir.schema import DataLocation

    from executorch_wgpu.backend.serialization.blob import BACKEND_ID, deserialize_q4linear
    from executorch_wgpu.backend.serialization.graph_blob import deserialize_graph, is_graph_blob
    from executorch_wgpu.errors import WebGPUDelegateError

    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    try:
        pte = deserialize_pte_binary(data)
        program = pte.program
    except Exception as e:   # the flatbuffer reader raises whatever a bad offset leads it to
        raise ValueError(f"{path} is not an ExecuTorch program (.pte): {type(e).__name__}: {e}") from e
    named = pte.named_data

    def named_bytes(plan_name: str, key: str) -> bytes:
        data = None if named is None or key not in named.pte_data else named.buffers[named.pte_data[key].buffer_index]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"{path}: method {plan_name!r}: the graph delegate's linear {key!r} is not in the "
                             f"program's named data")
        return bytes(data)

    def linear_blobs(plan_name: str, blob: bytes) -> List[bytes]:
        """A linear's own blob, or the blobs of a graph blob's linears."""
        if not is_graph_blob(blob):
            return [blob]
        return [named_bytes(plan_name, lin.blob_key) for lin in deserialize_graph(blob).linears]

    layers = PteLayers(path)
    for plan in program.execution_plan:
        for d in plan.delegates:
            if d.id != BACKEND_ID:
                continue
            if d.processed.location != DataLocation.INLINE or not 0 <= d.processed.index < len(
                    program.backend_delegate_data):
                raise ValueError(f"{path}: method {plan.name!r}: delegate data of {d.id} not found in the file")
            try:
                recs = [deserialize_q4linear(blob) for blob in
                        linear_blobs(plan.name, program.backend_delegate_data[d.processed.index].data)]
            except WebGPUDelegateError as e:
                raise ValueError(f"{path}: method {plan.name!r}: {e}") from e
            for rec in recs:
                names = layers.names.setdefault((rec.in_features, rec.out_features, rec.group_size), [])
                if rec.name not in names:
                    names.append(rec.name)
    if not layers.names:
        raise ValueError(f"{path} delegates no layer to executorch_wgpu ({BACKEND_ID}): lower it with "
                         f"WebGPUPartitioner after quantizing with torchao (README, Use)")
    return layers


def shape_name(k: int, n: int) -> str:
    return f"{k}x{n}"


def parse_shapes(p: argparse.ArgumentParser, items: str, named: Dict[str, Tuple[int, int]],
                 group_size: int) -> Dict[str, Tuple[int, int]]:
    """--shapes: names of `named` and KxN items, each checked against the group size (a parser error if not)."""
    from executorch_wgpu.backend.packing import q4gsw_shape_problem

    shapes: Dict[str, Tuple[int, int]] = {}
    for item in (i.strip() for i in items.split(",")):
        match = SHAPE_ITEM.fullmatch(item)
        if item in named:
            name, (k, n) = item, named[item]
        elif match:
            name, k, n = item, int(match.group(1)), int(match.group(2))
        else:
            p.error(f"--shapes: {item!r} is neither a shape name ({', '.join(named)}) nor KxN "
                    f"(K inputs x N outputs of a layer, e.g. 512x1024)")
        problem = "K and N must be at least 1" if k < 1 or n < 1 else q4gsw_shape_problem(k, n, group_size)
        if problem:
            p.error(f"--shapes: {item!r} (K={k}, N={n}) cannot be a q4gsw layer at --group-size {group_size}: "
                    f"{problem}")
        if (k, n) not in shapes.values():
            shapes[name] = (k, n)
    return shapes


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    from executorch_wgpu.tools.bench import LLAMA_1B_M, LLAMA_1B_SHAPES, QUICK_M, QUICK_SHAPES

    p = argparse.ArgumentParser(prog="python -m executorch_wgpu tune", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes and M for a CPU Vulkan (lavapipe)")
    p.add_argument("--shapes", help="comma-separated layer shapes: names of " + ",".join(LLAMA_1B_SHAPES) +
                                    " (--quick: its small shapes of the same names) and/or KxN (K inputs, "
                                    "N outputs), e.g. 512x1024,2048x8192")
    p.add_argument("--pte", type=cli.existing_file,
                   help="a lowered .pte: measure the (K, N, group size) of every layer it delegates to "
                        "executorch_wgpu, at its own group size")
    p.add_argument("--m", help="comma-separated M values, 1 and at least one M > 1 "
                               "(default 1,16,64,128,512,2048; --quick: 1,16,64)")
    p.add_argument("--group-size", type=cli.multiple_of_32,
                   help="group size of --shapes, a positive multiple of 32 (default 32; a .pte's layers keep theirs)")
    p.add_argument("--reps", type=cli.positive_int, default=25, help="timed runs per measurement (median kept)")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=5)
    p.add_argument("--rounds", type=cli.positive_int, default=3,
                   help="interleaved rounds; the best round's median is kept")
    p.add_argument("--out", type=cli.output_file, required=True, help="route table file to write (JSON)")
    p.add_argument("--name", help="the table's name (default: the --out file's stem)")
    args = p.parse_args(argv)

    try:
        m_values = [int(v) for v in args.m.split(",")] if args.m else list(QUICK_M if args.quick else LLAMA_1B_M)
    except ValueError:
        p.error(f"--m takes comma-separated integers, got {args.m!r}")
    # A table needs a decode kernel (M == 1) and at least one prefill bucket (M > 1).
    if 1 not in m_values or not any(m > 1 for m in m_values) or any(m < 1 for m in m_values):
        p.error(f"--m must hold 1 and at least one M > 1 (and nothing below 1), got {m_values}")
    args.m = sorted(set(m_values))
    group_size = 32 if args.group_size is None else args.group_size
    # What to measure, by group size: one bench run each (bench measures one group size at a time).
    jobs: Dict[int, Dict[str, Tuple[int, int]]] = {}
    args.jobs = jobs
    args.pte_layers = None
    if args.pte is not None:
        try:
            args.pte_layers = pte_layers(args.pte)
        except ValueError as e:
            p.error(f"--pte: {e}")
        for k, n, gs in sorted(args.pte_layers.names):
            args.jobs.setdefault(gs, {})[shape_name(k, n)] = (k, n)
    if args.shapes or args.pte is None:
        named = dict(QUICK_SHAPES if args.quick else LLAMA_1B_SHAPES)
        shapes = parse_shapes(p, args.shapes, named, group_size) if args.shapes else named
        if not args.shapes:
            from executorch_wgpu.backend.packing import q4gsw_shape_problem   # torch: only once the options parse

            for name, (k, n) in shapes.items():
                problem = q4gsw_shape_problem(k, n, group_size)
                if problem:
                    p.error(f"shape {name} (K={k}, N={n}) cannot be a q4gsw layer at --group-size {group_size}: "
                            f"{problem}; name the shapes to measure with --shapes")
        job = args.jobs.setdefault(group_size, {})
        for name, kn in shapes.items():
            if kn not in job.values():
                job[name] = kn
    args.group_size_option, args.group_size = args.group_size, group_size
    return args


def describe_pte(layers: PteLayers, group_size_option: Optional[int]) -> List[str]:
    """What tune measures of a .pte: its layer shapes and the layers of each."""
    lines = [f"{layers.path}: {sum(len(v) for v in layers.names.values())} q4 layers, "
             f"{len(layers.names)} distinct (K, N, group size):"]
    for (k, n, gs), names in sorted(layers.names.items()):
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} layers)" if len(names) > 4 else "")
        lines.append(f"  K={k} N={n} gs={gs}: {shown}")
    if group_size_option is not None and layers.group_sizes != [group_size_option]:
        lines.append(f"  (measured at the .pte's group size {', '.join(map(str, layers.group_sizes))}: "
                     f"--group-size {group_size_option} applies to --shapes only)")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from executorch_wgpu.errors import WebGPUDelegateError

    try:
        tune(args, argv)
    except WebGPUDelegateError as e:   # no adapter, no timestamp queries, ...: said in a line, as bench does
        cli.fail(str(e))


def tune(args: argparse.Namespace, argv: List[str]) -> None:
    """Measure args.jobs, write the route table to args.out and print it (main, once the options parse)."""
    from executorch_wgpu.tools.bench import LM_HEAD_MAX_M, BenchConfig, bench

    if args.pte_layers is not None:
        for line in describe_pte(args.pte_layers, args.group_size_option):
            log.info("%s", line)
    results: Optional[dict] = None
    rows = sum(1 for shapes in args.jobs.values() for name in shapes for m in args.m
               if not (name == "lm_head" and m > LM_HEAD_MAX_M))   # as bench() skips them
    with cli.Progress(rows, "tune", unit="row") as progress:   # a bar on stderr at a terminal
        def on_row(line: str) -> None:
            progress.note(line)
            progress.advance()

        for group_size, shapes in sorted(args.jobs.items()):
            # Only kernels a route can name are worth the time; no torch peers (they cannot be routed to).
            cfg = BenchConfig(shapes, args.m, group_size=group_size, reps=args.reps, warmup=args.warmup,
                              rounds=args.rounds, peers=False, kernels=ROUTABLE_NAMES)
            measured = bench(cfg, progress=on_row)
            if results is None:
                results = measured
            else:
                results["rows"].extend(measured["rows"])
    assert results is not None   # parse_args gives at least one job
    command = "python -m executorch_wgpu tune " + " ".join(argv)
    try:
        table = table_from_bench(results, args.name or args.out.stem, command)
    except TuneError as e:
        sys.exit(f"tune: no route table written: {e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.save(args.out)
    print(f"route table {table.describe()} written to {args.out}")
    for entry in table.entries:
        print("  " + summary(entry))
    # As bench does: a kernel outside the tolerance is a bug to see, even though the table skips it.
    bad = [(r["shape"], r["M"], k) for r in results["rows"] for k, v in r["kernels"].items() if not v.get("ok")]
    if bad:
        log.error("kernels that failed the fp64 check or did not run (left out of the table): %s", bad)
        sys.exit(1)
