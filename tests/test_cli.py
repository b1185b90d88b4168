"""The `swiglu-hf` command line: lazy parser, defaults in --help, one-line user errors (exit 2)."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swiglu_hf import cli
from swiglu_hf.errors import InvalidInputError
from swiglu_hf.tools.finetune import data as finetune_data

HEAVY = ("torch", "transformers", "accelerate", "triton")
SWIGLU_HF = Path(cli.__file__).resolve().parent


def _modules_after(code: str, bypass_init: bool = True) -> list[str]:
    """Heavy top-level modules imported by `code`, with swiglu_hf's own __init__ bypassed or not.

    Bypassed, swiglu_hf is registered as a bare namespace (its __path__ only), so only cli.py and
    what it imports run: this isolates the command line from the core package's imports.
    """
    prelude = "import sys, types\n" + (
        f"pkg = types.ModuleType('swiglu_hf'); pkg.__path__ = [{str(SWIGLU_HF)!r}]; sys.modules['swiglu_hf'] = pkg\n"
        if bypass_init else ""
    )
    check = f"\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    out = subprocess.run([sys.executable, "-c", prelude + code + check], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return eval(out.stdout.strip().splitlines()[-1])


def test_building_the_parser_imports_neither_torch_nor_transformers():
    code = "import swiglu_hf.cli as c\nc.build_parser()\nc.build_parser('finetune').format_help()"
    assert _modules_after(code) == []


def test_importing_the_package_and_the_cli_imports_nothing_heavy():
    """`import swiglu_hf` loads the public names lazily: `swiglu-hf --help` never pays for torch."""
    assert _modules_after("import swiglu_hf, swiglu_hf.cli as c\nc.build_parser().format_help()", bypass_init=False) == []
    assert "torch" in _modules_after("from swiglu_hf import apply_swiglu_patch", bypass_init=False)


def test_commands_table_matches_the_modules():
    assert set(cli.COMMANDS) >= {"tools.verify_cli", "tools.bench", "tools.finetune", "tools.sweep", "tools.compile_check"}
    assert {module for module, _ in cli.SUBCOMMANDS.values()} == set(cli.COMMANDS)
    for name, (module, _) in cli.SUBCOMMANDS.items():  # each module registers the name the table lists
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"swiglu_hf.{module}").add_parser(sub)
        assert name in sub.choices, f"swiglu_hf.{module}.add_parser registers {list(sub.choices)}, not {name!r}"


def test_help_lists_every_command_and_every_option_shows_its_default(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    top = capsys.readouterr().out
    assert all(name in top for name in cli.SUBCOMMANDS) and "--debug" in top
    for command in ("finetune", "verify"):
        parser = cli.build_parser(command)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            default = action.default
            if action.option_strings and action.nargs != 0 and not any(default is x for x in (None, False, argparse.SUPPRESS)):
                assert f"default: {action.default}" in text, f"{command} {action.option_strings[0]} hides its default"


def test_sweep_never_writes_into_the_repository_by_default():
    parser = cli.build_parser("sweep")
    out = Path(parser.parse_args(["sweep"]).out)
    assert not out.is_absolute() and out.parts[0] == "swiglu-hf-sweep" and out != Path("docs/SUPPORTED_MODELS.md")


@pytest.fixture
def data_files(tmp_path):
    (tmp_path / "wrong_field.jsonl").write_text('{"body": "some text"}\n')
    (tmp_path / "table.csv").write_text("a,b\n")
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    (tmp_path / "pickle_only").mkdir()
    (tmp_path / "pickle_only" / "config.json").write_text("{}")
    (tmp_path / "pickle_only" / "pytorch_model.bin").write_bytes(b"")
    return tmp_path


USER_ERRORS = [
    (["finetune", "--model", "./no/such/model"], "no such file or directory"),
    (["verify", "meta-llama/Llama-3.2-1B"], "hf download meta-llama/Llama-3.2-1B"),
    (["finetune", "--model", "meta-llama/Llama-3.2-1B"], "never downloads"),
    (["finetune", "--model", "{tmp}/pickle_only"], "safetensors only"),
    (["finetune", "--device", "cuda"], "run on the CPU with --device cpu"),
    (["verify", "--device", "cuda"], "run on the CPU with --device cpu"),
    (["finetune", "--variants", "stock,fused"], "unknown variant(s) 'fused'"),
    (["finetune", "--steps", "0"], "--steps: must be >= 1"),
    (["finetune", "--seq-len", "abc"], "expected a whole number"),
    (["finetune", "--eval-fraction", "1"], "must be in [0, 1)"),
    (["finetune", "--lr", "-1"], "must be > 0"),
    (["finetune", "--model", "x", "--preset", "llama-3.2-1b"], "not allowed with argument"),
    (["finetune", "--data", "{tmp}/missing.jsonl"], "no such file or directory"),
    (["finetune", "--data", "{tmp}/table.csv"], "unsupported file type '.csv'"),
    (["finetune", "--data", "{tmp}/wrong_field.jsonl", "--steps", "1"], "no 'text' field"),
    (["finetune", "--data", "{tmp}/x.parquet"], "pip install pyarrow"),
    (["finetune", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: COMMAND"),
]


@pytest.mark.parametrize("argv, says", USER_ERRORS, ids=[" ".join(a) or "(none)" for a, _ in USER_ERRORS])
def test_user_errors_print_one_line_and_exit_2(argv, says, data_files, capsys, monkeypatch):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    real = finetune_data.importlib.util.find_spec
    monkeypatch.setattr(finetune_data.importlib.util, "find_spec",  # as if pyarrow were not installed
                        lambda name, *a: None if name == "pyarrow" else real(name, *a))
    code = cli.main([a.replace("{tmp}", str(data_files)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("swiglu-hf") and says in err


def test_debug_shows_the_traceback():
    with pytest.raises(InvalidInputError, match="no such file"):
        cli.main(["--debug", "finetune", "--model", "./no/such/model"])


def test_the_installed_command_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "swiglu_hf.cli", "verify", "meta-llama/Llama-3.2-1B"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_commands_run_offline_unless_the_user_says_otherwise(preset, expected):
    """A library imported under a command must not reach the network (bitsandbytes asks the Hub for a CPU
    kernel on import on AVX512-BF16 machines): the command sets HF_HUB_OFFLINE=1, keeping a user's value."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    if preset is not None:
        env["HF_HUB_OFFLINE"] = preset
    code = ("import os, sys; from swiglu_hf import cli; code = cli.main(['frobnicate']); "
            "print(code, os.environ.get('HF_HUB_OFFLINE'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.split() == ["2", expected], proc.stderr
