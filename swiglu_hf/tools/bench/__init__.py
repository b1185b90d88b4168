"""`swiglu-hf bench <what>`: benchmark subcommands, one module each (add_parser(subparsers)).

A benchmark whose third-party package is missing (ModuleNotFoundError naming a module outside
swiglu_hf) does not take the others down: its name stays listed, and running it says which package
is missing (one line, exit status 2). Any other import error, above all one inside swiglu_hf (a
renamed module, a removed name), is a bug and raises.
"""

from __future__ import annotations

import importlib

from ...errors import SwigluError

# bench name -> (module of this package with add_parser(bench_sub), one-line help)
BENCHES = {
    "kernel": ("kernel", "GB/s of the fused kernel vs eager, Liger-Kernel and torch.compile (needs a GPU)"),
    "memory": ("memory", "activation bytes saved for backward per token per MLP layer"),
    "mlp": ("mlp", "GPU: one MLP layer fwd+bwd time and peak memory, stock vs patched vs peers"),
    "overhead": ("overhead", "CPU: host overhead per patched MLP call, stock vs patched"),
}


class BenchUnavailableError(SwigluError, ImportError):
    """A benchmark needs a third-party package this installation lacks."""


def missing_package(err: ImportError) -> str | None:
    """The third-party module whose absence caused `err`, or None when `err` is anything else."""
    if type(err) is not ModuleNotFoundError or not err.name:
        return None
    return None if err.name.partition(".")[0] == "swiglu_hf" else err.name


def _unavailable(name: str, module: str, missing: str):
    def run(args) -> int:
        raise BenchUnavailableError(f"bench {name} is unavailable: {__name__}.{module} needs the "
                                    f"{missing.partition('.')[0]!r} package, which is not installed")

    return run


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (kernel bandwidth, activation memory, MLP layer time/peak memory)")
    bench_sub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, (module, help) in BENCHES.items():
        try:
            loaded = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as err:
            missing = missing_package(err)
            if missing is None:
                raise
            note = f"{help} [unavailable: needs {missing.partition('.')[0]}]"
            bench_sub.add_parser(name, help=note, description=note).set_defaults(func=_unavailable(name, module, missing))
        else:
            loaded.add_parser(bench_sub)
