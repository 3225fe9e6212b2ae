"""python -m executorch_wgpu <command>:
  demo         MiniLM sentence embeddings, int4 on the default adapter (demo --ffn: the small FFN demo)
  llama-bench  a Llama-shaped int4 decoder: prefill and decode tokens/s, time split
  bench  time every kernel on Llama-3.2-1B shapes against its ceilings
  tune   measure the kernels on this adapter and write a route table
  native-bench  wall time per execute: our Python runtime vs ExecuTorch's runtime with the native delegate
"""

import sys


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": "executorch_wgpu.tools.demo",
        "bench": "executorch_wgpu.tools.bench",
        "tune": "executorch_wgpu.tools.tune",
        "llama-bench": "executorch_wgpu.tools.llama_bench",
        "native-bench": "executorch_wgpu.tools.native_bench",
    }
    if not argv or argv[0] not in commands:
        print(f"usage: python -m executorch_wgpu {{{','.join(commands)}}} [options]  (--help after a command)")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    import importlib

    importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
