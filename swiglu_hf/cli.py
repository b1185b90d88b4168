"""`swiglu-hf` command line: one subcommand per module, each registering itself via add_parser."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define add_parser(subparsers); each sets `func(args) -> exit code`.
COMMANDS = ("verification", "tools.bench", "tools.finetune", "tools.sweep")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swiglu-hf", description="Fused gated-MLP kernels for HF Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"swiglu_hf.{name}").add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
