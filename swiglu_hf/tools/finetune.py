"""`swiglu-hf finetune`: stock vs patched (vs peers) in one accelerate fine-tuning loop.

Every variant starts from the same weights and trains on the same batches in the same order, so
losses compare step by step and speed and memory differ only by the MLP:

    stock    the unpatched model
    patched  apply_swiglu_patch(model)
    tiled    apply_swiglu_patch(model, tile_tokens="auto")
    liger    Liger-Kernel's SwiGLU MLP (its apply_liger_kernel_to_<model type>, swiglu only)
    compile  torch.compile(model) of the stock model

Model: the shipped tiny byte-level Llama from random init (default), a local checkpoint with its
own tokenizer (--model DIR or FILE.gguf; safetensors only, no remote code unless
--trust-remote-code) or a random-init shape (--preset). Data: the shipped corpus (default) or
--data (.txt, .jsonl, .parquet, a saved datasets directory), packed into --seq-len windows; the
last --eval-fraction of the windows is held out; the first --eval-batches batches of it give an
eval loss per variant.

Per variant: the loss of every step, every step's time (tokens/s as median and IQR over the steps
after warm-up, pooled over --repeats runs in alternating order), the eval loss, peak memory and the
bytes autograd saves for backward (measured on the last step, which is not timed; see
finetune_memory). A speed ratio to stock is shown only when the IQRs do not overlap
(finetune_report.speed_vs_stock). results.json/.md are rewritten after each variant run; plots are
drawn at the end. Under `accelerate launch` the engine of the config (DDP,
FSDP, DeepSpeed ZeRO; ZeRO-3 builds the model under zero.Init) is used and recorded.

This module imports neither torch nor transformers: `swiglu-hf finetune --help` stays fast; the
training code is in finetune_run and finetune_model (run, apply_variant, ... are forwarded from there).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidInputError

VARIANTS = ("stock", "patched", "tiled", "liger", "compile")
DEFAULT_VARIANTS = ("stock", "patched", "tiled")
MIXED_PRECISION = ("no", "bf16", "fp16")
BACKENDS = ("auto", "triton", "torch")
PRESETS = ("llama-3.2-1b",)  # shapes in finetune_run.PRESET_CONFIGS
_LAZY = {  # name -> module of the torch side, imported on first use
    **dict.fromkeys(("run", "train_variant", "evaluate", "save_variant"), "finetune_run"),
    **dict.fromkeys(("apply_variant", "build_model", "prepare_base", "hf_config", "VariantUnavailable",
                     "PRESET_CONFIGS", "DEFAULT_CONFIG"), "finetune_model"),
}


class SaveFailedError(InvalidInputError):
    """--save could not write a trained variant; everything measured was written first."""


def parse_variants(spec: str | tuple | list) -> tuple[str, ...]:
    """"stock,patched" (or a sequence of names) -> validated tuple of variant names."""
    names = tuple(n.strip() for n in spec.split(",") if n.strip()) if isinstance(spec, str) else tuple(spec)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise InvalidInputError(
            f"unknown variant(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose a comma-separated subset of: {', '.join(VARIANTS)}"
        )
    if len(set(names)) != len(names):
        raise InvalidInputError(f"variant listed twice in {','.join(names)}; list each once")
    return names


@dataclass(frozen=True)
class FinetuneConfig:
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    model: str | None = None  # local HF directory or .gguf; None = the shipped byte-level Llama (random init)
    preset: str | None = None  # random-init model of a known shape, e.g. "llama-3.2-1b"
    data: str | None = None  # .txt/.jsonl/.parquet/saved datasets dir; None = the shipped corpus
    text_field: str = "text"
    eval_fraction: float = 0.1  # held-out share of the packed windows (0: no eval)
    eval_batches: int = 4  # held-out batches evaluated per variant (0: all of them)
    steps: int = 12
    warmup_steps: int = 2  # left out of the timing medians (allocator, autotuning, compile)
    repeats: int = 2  # runs of every variant, in alternating order (run_order); timed steps pooled over them
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 1e-3
    seed: int = 0
    device: str | None = None  # "cpu" or "cuda"; None = CUDA when available
    mixed_precision: str | None = None  # None = the accelerate config's, else bf16 on a capable GPU, else "no"
    backend: str = "auto"  # swiglu_hf backend of the patched/tiled variants
    gradient_checkpointing: bool = False
    lora: bool = False
    trust_remote_code: bool = False
    save: str | None = None  # directory: <save>/<variant>/ gets the trained weights (or LoRA adapter)
    log_every: int = 5  # off a terminal: a progress line every this many steps
    notices: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        object.__setattr__(self, "variants", parse_variants(self.variants))
        if self.model and self.preset:
            raise InvalidInputError("give either --model (a checkpoint) or --preset (a random-init shape), not both")
        if self.preset is not None and self.preset not in PRESETS:
            raise InvalidInputError(f"unknown preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        for name in ("steps", "repeats", "batch_size", "seq_len", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.eval_batches < 0:
            raise InvalidInputError(f"--eval-batches must be >= 0, got {self.eval_batches}")
        if self.warmup_steps < 0:
            raise InvalidInputError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.eval_fraction < 1:
            raise InvalidInputError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if not self.lr > 0:
            raise InvalidInputError(f"--lr must be > 0, got {self.lr}")
        if self.device not in (None, "cpu", "cuda"):
            raise InvalidInputError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.mixed_precision not in (None, *MIXED_PRECISION):
            raise InvalidInputError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
        if self.backend not in BACKENDS:
            raise InvalidInputError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        # The last step measures memory and is not timed; at least one timed step must remain after warm-up.
        most = max(0, self.steps - 2)
        if self.warmup_steps > most:
            timed = "no step is timed (--steps 1 only measures memory)" if self.steps == 1 else "one step is timed"
            note = (f"warm-up clamped from {self.warmup_steps} to {most} step(s) for --steps {self.steps}: "
                    f"the last step measures memory and {timed}")
            object.__setattr__(self, "notices", (*self.notices, note))
            object.__setattr__(self, "warmup_steps", most)

    def run_order(self) -> list[tuple[int, str]]:
        """(repeat, variant) in the order they run: forward, then backward, then forward, ... (ABBA).

        Step-level interleaving would need every variant's model, optimizer and engine alive at once
        (N x the memory, one DeepSpeed engine per Accelerator, and a peak that counts the others'
        tensors), so variants run whole and alternate instead: in two repeats each variant sits at the
        same mean position, so the first run's process warm-up and a linear drift of a shared host
        weigh on every variant alike."""
        return [(r, name) for r in range(self.repeats) for name in (self.variants if r % 2 == 0 else self.variants[::-1])]

    @property
    def timed_steps(self) -> range:
        """Indices of the steps whose times make the medians: after warm-up, before the memory step."""
        return range(self.warmup_steps, self.steps - 1)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- command line -------------------------------------------------------------------------

def _variants_arg(text: str) -> tuple[str, ...]:
    try:
        return parse_variants(text)
    except InvalidInputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _number(convert, ok, rule: str, kind: str):
    """An argparse type: `convert` the text, then require `ok(value)` (stated as `rule`)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value

    parse.__name__ = f"{convert.__name__} {rule}"
    return parse


def _count(minimum: int):
    return _number(int, lambda v: v >= minimum, f">= {minimum}", "a whole number")


_fraction = _number(float, lambda v: 0 <= v < 1, "in [0, 1)", "a number in [0, 1)")
_positive = _number(float, lambda v: v > 0, "> 0", "a number")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d, arg = FinetuneConfig, p.add_argument
    arg("--variants", type=_variants_arg, metavar="LIST", default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)}")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="DIR|FILE.gguf", help="local HF checkpoint (safetensors) with its "
                       "tokenizer; default: the shipped tiny Llama, random init")
    which.add_argument("--preset", choices=PRESETS, help="random-init model of a real model's shape (no weights needed)")
    arg("--data", metavar="PATH", help=".txt, .jsonl, .parquet or a saved datasets directory; default: the shipped corpus")
    arg("--text-field", default=d.text_field, metavar="NAME", help="field/column holding the text (.jsonl, .parquet, datasets)")
    arg("--eval-fraction", type=_fraction, metavar="F", default=d.eval_fraction,
        help="share of the packed windows held out for the eval loss")
    arg("--eval-batches", type=_count(0), metavar="N", default=d.eval_batches,
        help="held-out batches of --batch-size windows evaluated per variant (0: all)")
    arg("--steps", type=_count(1), metavar="N", default=d.steps, help="optimizer steps per variant (the last one measures memory)")
    arg("--warmup-steps", type=_count(0), metavar="N", default=d.warmup_steps,
        help="first steps left out of the timing (clamped to leave one timed step)")
    arg("--repeats", type=_count(1), metavar="N", default=d.repeats,
        help="runs of every variant in alternating order (stock,patched then patched,stock); timed steps pooled")
    arg("--batch-size", type=_count(1), metavar="N", default=d.batch_size, help="sequences per micro-batch per process")
    arg("--seq-len", type=_count(1), metavar="N", default=d.seq_len, help="tokens per sequence (packed windows)")
    arg("--grad-accum", type=_count(1), metavar="N", default=d.grad_accum, help="micro-batches per optimizer step")
    arg("--lr", type=_positive, default=d.lr, help="AdamW learning rate")
    arg("--seed", type=int, metavar="N", default=d.seed, help="seed of the initial weights and the batch order")
    arg("--device", choices=["cpu", "cuda"], help="where to train; default: cuda when available, else cpu")
    arg("--mixed-precision", choices=MIXED_PRECISION, help="default: the accelerate config's under accelerate launch, "
        "else bf16 on a GPU that has it, else no")
    arg("--backend", choices=BACKENDS, default=d.backend,
        help="swiglu_hf backend of patched/tiled: auto = triton on CUDA, torch on CPU")
    arg("--gradient-checkpointing", action="store_true", help="HF gradient checkpointing (non-reentrant)")
    arg("--lora", action="store_true", help="train LoRA adapters (r=8 on attention and MLP projections)")
    arg("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code to run")
    arg("--save", metavar="DIR", help="write each variant's trained weights (or LoRA adapter) to DIR/<variant>/ "
        "as safetensors")
    arg("--log-every", type=_count(1), metavar="N", default=d.log_every, help="off a terminal: one progress line every N steps")
    arg("--out", type=Path, metavar="DIR", default=Path("runs/finetune"), help="folder for results.json/.md and plots")


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="accelerate fine-tuning: stock vs patched (vs peers) speed, memory, loss",
                       description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=_main)


_FIELDS = ("variants", "model", "preset", "data", "text_field", "eval_fraction", "eval_batches", "steps",
           "warmup_steps", "repeats", "batch_size", "seq_len", "grad_accum", "lr", "seed", "device",
           "mixed_precision", "backend", "gradient_checkpointing", "lora", "trust_remote_code", "save", "log_every")


def _main(args) -> int:
    variants = args.variants if isinstance(args.variants, tuple) else parse_variants(args.variants)
    cfg = FinetuneConfig(**{f: getattr(args, f) for f in _FIELDS if f != "variants"}, variants=variants)
    from .finetune_report import format_table, write_outputs, write_results
    from .finetune_run import is_main_process, run

    def write_so_far(partial: dict) -> None:
        if is_main_process():  # under a distributed launch only rank 0 writes
            write_results(partial, args.out)

    results = run(cfg, on_variant=write_so_far, command=getattr(args, "command_line", None))
    failed = {name: v["save_error"] for name, v in results["variants"].items() if v.get("save_error")}
    if is_main_process():
        written = write_outputs(results, args.out)  # results.json first, then the plots
        print(format_table(results), flush=True)
        print("wrote " + ", ".join(str(p) for p in written), flush=True)
    if failed:
        raise SaveFailedError("; ".join(f"--save of {name} failed ({why})" for name, why in failed.items())
                              + f"; the measurements are in {args.out / 'results.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (`python -m swiglu_hf.tools.finetune`; works under `accelerate launch`)."""
    from ..cli import main as cli_main

    return cli_main(["finetune", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
