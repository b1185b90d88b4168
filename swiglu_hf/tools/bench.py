"""`swiglu-hf bench <what>`: benchmark subcommands, one module each (add_parser(subparsers))."""

from __future__ import annotations

import importlib

BENCHES = ("bench_kernel", "bench_memory", "bench_mlp")  # module names under swiglu_hf, each with add_parser(bench_sub)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (kernel bandwidth, activation memory, MLP layer time/peak memory)")
    bench_sub = p.add_subparsers(dest="bench", required=True)
    for name in BENCHES:
        importlib.import_module(f"swiglu_hf.tools.{name}").add_parser(bench_sub)
