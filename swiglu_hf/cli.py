"""`swiglu-hf` command line: one subcommand per module, each registering itself via add_parser(sub).

Only the chosen subcommand's module is imported (torch and transformers load with it, not to
print `swiglu-hf --help`). User errors, i.e. swiglu_hf's typed errors (SwigluError subclasses),
bad arguments and a --device cuda without a GPU, print one line and exit with status 2; the
traceback only with --debug. Every option's help shows its default.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import shlex
import sys

from .errors import BackendUnavailableError, SwigluError

# Modules that define add_parser(subparsers); each sets `func(args) -> exit code`.
COMMANDS = ("tools.verify_cli", "tools.bench", "tools.finetune", "tools.sweep", "tools.compile_check", "tools.plan")

# subcommand -> (module in COMMANDS, one-line help): lets `--help` list them without importing any.
SUBCOMMANDS = {
    "verify": ("tools.verify_cli", "compare a patched model with the stock one against a float64 reference"),
    "bench": ("tools.bench", "benchmarks (kernel bandwidth, activation memory, MLP layer time/peak memory)"),
    "finetune": ("tools.finetune", "accelerate fine-tuning: stock vs patched (vs peers) speed, memory, loss"),
    "sweep": ("tools.sweep", "patch and verify a tiny model of every causal-LM type, write a support table"),
    "compile": ("tools.compile_check",
                "compile the kernels ahead of time for GPU archs and check registers/spills/vectorization"),
    "plan": ("tools.plan", "from a config alone: peak memory of a training step and the longest sequence that fits"),
}
USAGE_ERROR = 2


class UsageError(Exception):
    """A bad command line: argparse's message, printed on one line."""

    def __init__(self, prog: str, message: str):
        super().__init__(f"{prog}: error: {message} (see {prog} --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, also for options registered without a help string."""

    @staticmethod
    def _has_default(action) -> bool:
        default = action.default  # identity checks: a default of 0 is a default to show
        return (bool(action.option_strings) and default is not None and default is not False
                and default is not argparse.SUPPRESS and action.nargs != 0)

    def _format_action(self, action):
        if not (action.help and action.help.strip()) and self._has_default(action):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action):
        help = action.help or ""
        if "%(default)" in help or not self._has_default(action):
            return help
        return help + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """ArgumentParser that raises UsageError (one line) instead of printing usage and exiting."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(self.prog, message)


def _command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `swiglu-hf` parser; only `command`'s module is imported (none for None)."""
    parser = Parser(prog="swiglu-hf", description="Fused gated-MLP kernels for HF Transformers.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, (module, help) in SUBCOMMANDS.items():
        if name == command:
            try:
                loaded = importlib.import_module(f"swiglu_hf.{module}")
            except ModuleNotFoundError as err:
                if err.name != f"swiglu_hf.{module}":
                    raise
                missing = f"swiglu_hf/{module.replace('.', '/')}.py"
                raise UsageError(f"swiglu-hf {name}", f"this installation has no {missing}") from None
            loaded.add_parser(sub)
        else:  # listed for --help; never parsed (the parser is rebuilt with the real one)
            sub.add_parser(name, help=help, add_help=False)
    return parser


def _check_device(args) -> None:
    device = getattr(args, "device", None)
    if isinstance(device, str) and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"--device {device}: no CUDA device is visible to torch {torch.__version__}; "
                "run on the CPU with --device cpu"
            )


def _one_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


# swiglu-hf never downloads (swiglu_hf.loading reads local files only). Libraries it imports might: on a
# CPU with AVX512-BF16, importing bitsandbytes (peft does, for LoRA) asks the Hub for a CPU kernel. In
# offline mode that fails at once, with no network access; a value the user set is kept.
OFFLINE = ("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault(*OFFLINE)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = _command(argv)
    prog = f"swiglu-hf {command}" if command in SUBCOMMANDS else "swiglu-hf"
    try:
        args = build_parser(command if command in SUBCOMMANDS else None).parse_args(argv)
        args.command_line = shlex.join(["swiglu-hf", *argv])  # what ran, for results files
        _check_device(args)
        return args.func(args)
    except UsageError as err:
        if debug:
            raise
        print(err, file=sys.stderr)
        return USAGE_ERROR
    except SwigluError as err:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
