"""Wall time per execute of one .pte in our Python runtime and in ExecuTorch's runtime with the native delegate.

    python -m executorch_wgpu native-bench [--k 2048 --n 2048 --m 1] [--calls 300] [--warmup 30]
                                           [--rounds 3] [--runtimes python,et-python,et-cpp] [--out DIR]

The same torchao-quantized 1-linear program (bench.one_linear_pte, lowered linears-only: one WGQ4 delegate)
runs three ways:

  python      our runtime (executorch_wgpu.runtime): Python interpreter, delegate through wgpu-native's C API
  et-python   ExecuTorch's runtime driven from Python (executorch.runtime) with the native delegate loaded
  et-cpp      ExecuTorch's C++ Module API in its own process, no Python (build/native/wgq4_run_pte)

Each runs `calls` timed executes after `warmup`, in `rounds` interleaved rounds;
the best round's medians are reported: execute wall, the delegate's own wall
and GPU time (timestamp queries), and the host time above the GPU; and the
floor of any delegate call: the round trip of a 4-byte write and a 256-byte
copy submitted, mapped and waited for on the native library's device. Outputs
are checked equal to the Python runtime's (max relative difference <= 1e-5)
before anything is reported. The table goes to stdout, progress to stderr; on an
adapter without timestamp queries the GPU columns say "—" (no GPU time), not 0.

--runtimes picks a subset: executorch's Python extension needs the torch it was
built against (2.13.0); in an image with another torch, `et-python` fails
inside the extension ("tensor does not have a device") while `et-cpp`, which
involves no torch, still runs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
from datetime import date
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from executorch_wgpu.tools import cli

# numpy, torch and the native library are imported where used: `native-bench --help` and a usage error stay fast.
if TYPE_CHECKING:
    import torch

    from executorch_wgpu import native

AGREEMENT = 1e-5
RUNTIMES = ("python", "et-python", "et-cpp")


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def time_python_runtime(pte: bytes, x: torch.Tensor, calls: int, warmup: int) -> tuple:
    from executorch_wgpu.runtime import Runtime

    method = Runtime.get().load_program(pte).load_method("forward")
    walls, timed = [], []
    for i in range(warmup + calls):
        start = time.perf_counter()
        y, = method.execute([x])
        wall = (time.perf_counter() - start) * 1e6
        if i >= warmup:
            walls.append(wall)
            timed.append(method.route_report()[0])
    return summary(walls, timed), y


def time_executorch_python(lib: native.NativeLibrary, pte_path: pathlib.Path, x: torch.Tensor, calls: int,
                           warmup: int) -> tuple:
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(pte_path).load_method("forward")
    assert method is not None   # annotated Optional, but load_method returns the method or raises
    lib.take_calls()
    walls = []
    for i in range(warmup + calls):
        if i == warmup:
            lib.take_calls()
        start = time.perf_counter()
        y, = method.execute([x])
        walls.append((time.perf_counter() - start) * 1e6)
    timed = lib.take_calls()
    return summary(walls[warmup:], timed), y.clone()


def time_executorch_cpp(pte_path: pathlib.Path, x: torch.Tensor, calls: int, warmup: int) -> tuple:
    from executorch_wgpu import native

    result, y = native.run_pte_in_cpp(pte_path, x, warmup=warmup, iters=calls)
    out = {key: result[key] for key in ("execute_us", "delegate_us", "gpu_us") + SPLIT}
    out["kernel"] = "+".join(result["kernels"])
    # the runner's median of no timed calls (an adapter without timestamp queries) is 0: no GPU time, not 0 µs
    if not out["gpu_us"]:
        out["gpu_us"] = None
    out["above_gpu_us"] = None if out["gpu_us"] is None else out["execute_us"] - out["gpu_us"]
    out["outside_delegate_us"] = out["execute_us"] - out["delegate_us"]
    return out, y


SPLIT = ("upload_us", "submit_us", "wait_us", "readback_us")   # the delegate call's host phases


def summary(walls: list, calls: list) -> dict:
    """Medians of execute walls and of the route-report entries of the same calls (None: a call has no value,
    e.g. no gpu_us on an adapter without timestamp queries)."""
    import numpy as np

    def median(key):
        values = [c[key] for c in calls]
        return None if any(v is None for v in values) else float(np.median(values))

    out = {"execute_us": float(np.median(walls)), "delegate_us": median("wall_us"), "gpu_us": median("gpu_us")}
    out.update({key: median(key) for key in SPLIT})
    out["kernel"] = calls[-1]["kernel"]
    out["above_gpu_us"] = None if out["gpu_us"] is None else out["execute_us"] - out["gpu_us"]
    out["outside_delegate_us"] = out["execute_us"] - out["delegate_us"]
    return out


def compare_runtimes(k: int = 2048, n: int = 2048, m: int = 1, calls: int = 300, warmup: int = 30,
                     rounds: int = 3, runtimes: Sequence[str] = RUNTIMES,
                     on_step: Callable[[str], None] = lambda what: None) -> dict:
    """The runtimes' medians (best round each) and the output agreement; raises if outputs differ.

    on_step(what) is called before each slow step: the export, then each runtime of each round."""
    from executorch_wgpu import native
    from executorch_wgpu.tools.bench import one_linear_pte

    lib = native.load()
    on_step(f"exporting a q4 Linear({k}, {n})")
    pte, x = one_linear_pte(k, n, m)
    best: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        pte_path = pathlib.Path(tmp, "linear.pte")
        pte_path.write_bytes(pte)
        for r in range(rounds):
            timers = {
                "python": lambda: time_python_runtime(pte, x, calls, warmup),
                "et-python": lambda: time_executorch_python(lib, pte_path, x, calls, warmup),
                "et-cpp": lambda: time_executorch_cpp(pte_path, x, calls, warmup),
            }
            results = {}
            for name in dict.fromkeys(("python", *runtimes)):   # python: the reference
                on_step(f"round {r + 1} of {rounds}: {name}")
                results[name] = timers[name]()
            reference = results["python"][1]
            for name, (stats, y) in results.items():
                diff = rel_diff(y, reference)
                if diff > AGREEMENT:
                    raise RuntimeError(f"{name} output differs from the Python runtime's by {diff:.2e} (> {AGREEMENT})")
                stats["rel_diff_vs_python"] = diff
                if name not in best or stats["execute_us"] < best[name]["execute_us"]:
                    best[name] = stats
    return {"K": k, "N": n, "M": m, "calls": calls, "warmup": warmup, "rounds": rounds,
            "adapter": lib.adapter().get("adapter", "?"), "date": date.today().isoformat(), "runtimes": best,
            "submit_roundtrip": lib.submit_roundtrip(calls)}


def markdown(result: dict) -> str:
    lines = [f"1 linear {result['K']}->{result['N']}, M = {result['M']}, {result['adapter']}, {result['date']}: "
             f"medians of {result['calls']} executes, best of {result['rounds']} rounds",
             "", "| runtime | execute µs | above GPU µs | outside delegate µs | delegate µs | upload | submit | wait "
                 "| readback | GPU µs | kernel |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    def us(v: Optional[float]) -> str:
        return "—" if v is None else f"{v:.1f}"

    for name, s in result["runtimes"].items():
        lines.append(f"| {name} | {s['execute_us']:.1f} | {us(s['above_gpu_us'])} | {s['outside_delegate_us']:.1f} | "
                     f"{us(s['delegate_us'])} | " + " | ".join(us(s[k]) for k in SPLIT) +
                     f" | {us(s['gpu_us'])} | {s['kernel']} |")
    floor = result.get("submit_roundtrip", {})
    if "median_us" in floor:
        lines += ["", f"Round-trip floor (native device: write 4 bytes, submit a 256-byte copy, map, wait): "
                      f"{floor['median_us']:.1f} µs median (p10 {floor['p10_us']:.1f}, p90 {floor['p90_us']:.1f})"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m executorch_wgpu native-bench", description=__doc__.split("\n")[0])
    p.add_argument("--k", type=cli.multiple_of_32, default=2048, help="in-features: a multiple of the group size 32")
    p.add_argument("--n", type=cli.positive_int, default=2048, help="out-features")
    p.add_argument("--m", type=cli.positive_int, default=1, help="rows of x")
    p.add_argument("--calls", type=cli.positive_int, default=300, help="timed executes per runtime and round")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=30)
    p.add_argument("--rounds", type=cli.positive_int, default=3)
    p.add_argument("--runtimes", type=cli.comma_choices(RUNTIMES), default=list(RUNTIMES),
                   help="comma-separated subset of " + ",".join(RUNTIMES))
    p.add_argument("--out", type=cli.output_folder, help="folder for native_bench.json / .md")
    args = p.parse_args(argv)
    from executorch_wgpu.errors import WebGPUDelegateError

    steps = 1 + args.rounds * len(dict.fromkeys(("python", *args.runtimes)))
    try:
        with cli.Progress(steps, "native-bench") as progress:
            result = compare_runtimes(args.k, args.n, args.m, args.calls, args.warmup, args.rounds, args.runtimes,
                                      on_step=progress.step)
    except WebGPUDelegateError as e:   # no native library, no adapter: said in a line, not a traceback
        cli.fail(str(e))
    result["command"] = "python -m executorch_wgpu native-bench " + " ".join(argv)
    table = markdown(result)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "native_bench.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "native_bench.md").write_text(table)
