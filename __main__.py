"""python -m executorch_wgpu <command> [options]: the project's tools (tools/); `<command> --help` for each."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, Optional, Sequence, Tuple

from executorch_wgpu import __version__

# command -> (module with main(argv), what it does). Imported only when run: --help stays fast.
COMMANDS: Dict[str, Tuple[str, str]] = {
    "demo": ("executorch_wgpu.tools.demo",
             "MiniLM sentence embeddings, int4 on the default adapter, one graph delegate (demo --ffn: small FFN)"),
    "llama-bench": ("executorch_wgpu.tools.llama_bench",
                    "a Llama-shaped int4 decoder: prefill and decode tokens/s, time split"),
    "bench": ("executorch_wgpu.tools.bench",
              "time every kernel on Llama-3.2-1B shapes against its ceilings (--model: a model's step, one submit)"),
    "tune": ("executorch_wgpu.tools.tune", "measure the kernels on this adapter and write a route table"),
    "native-bench": ("executorch_wgpu.tools.native_bench",
                     "wall time per execute: our Python runtime vs ExecuTorch's runtime with the native delegate"),
}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m executorch_wgpu", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("--version", action="version", version=f"executorch_wgpu {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, summary) in COMMANDS.items():
        # The command's own parser (in its module) reads the rest, --help included.
        commands.add_parser(name, help=summary, add_help=False)
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    importlib.import_module(COMMANDS[args.command][0]).main(rest)


if __name__ == "__main__":
    main()
