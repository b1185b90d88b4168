"""`swiglu-hf bench <what>`: benchmark subcommands, one module each (add_parser(subparsers)).

A benchmark module that cannot be imported here does not take the others down: its name stays
listed, and running it says why it is unavailable (one line, exit status 2).
"""

from __future__ import annotations

import importlib

from ..errors import SwigluError

# bench name -> (module under swiglu_hf.tools with add_parser(bench_sub), one-line help)
BENCHES = {
    "kernel": ("bench_kernel", "GB/s of the fused kernel vs eager, Liger-Kernel and torch.compile (needs a GPU)"),
    "memory": ("bench_memory", "activation bytes saved for backward per token per MLP layer"),
    "mlp": ("bench_mlp", "GPU: one MLP layer fwd+bwd time and peak memory, stock vs patched vs peers"),
    "overhead": ("bench_overhead", "CPU: host overhead per patched MLP call, stock vs patched"),
}


class BenchUnavailableError(SwigluError, ImportError):
    """A benchmark module failed to import in this installation."""


def _unavailable(name: str, module: str, err: Exception):
    def run(args) -> int:
        raise BenchUnavailableError(f"bench {name} is unavailable: swiglu_hf.tools.{module} failed to import "
                                    f"({type(err).__name__}: {err})")

    return run


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (kernel bandwidth, activation memory, MLP layer time/peak memory)")
    bench_sub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, (module, help) in BENCHES.items():
        try:
            loaded = importlib.import_module(f"swiglu_hf.tools.{module}")
        except ImportError as err:
            bench_sub.add_parser(name, help=f"{help} [unavailable: {type(err).__name__}]",
                                 add_help=False).set_defaults(func=_unavailable(name, module, err))
        else:
            loaded.add_parser(bench_sub)
