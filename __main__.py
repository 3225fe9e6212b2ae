"""python -m executorch_wgpu <command>: demo (export a small int4 model and run it)."""

import sys


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "executorch_wgpu.demo"}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m executorch_wgpu {{{','.join(commands)}}} [options]  (--help after a command)")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    import importlib

    importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
