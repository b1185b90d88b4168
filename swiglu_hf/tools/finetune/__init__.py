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
finetune.memory). A speed ratio to stock is shown only when the IQRs do not overlap
(finetune.report.speed_vs_stock). results.json/.md are rewritten after each variant run; plots are
drawn at the end. Under `accelerate launch` the engine of the config (DDP,
FSDP, DeepSpeed ZeRO; ZeRO-3 builds the model under zero.Init) is used and recorded.

This module (the command line) and `config` (FinetuneConfig) import neither torch nor
transformers: `swiglu-hf finetune --help` stays fast. Below them, each importing only what is
below it: `run` (the training loop: run, train_variant, evaluate, save_variant), `model` (models and
variants: build_model, prepare_base, apply_variant), `data`, `env`, `memory`, `report` (text) and
`plots` (over report).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...errors import InvalidInputError
from .config import BACKENDS, DEFAULT_VARIANTS, LOSSES, MIXED_PRECISION, PRESETS, VARIANTS, FinetuneConfig, parse_variants


class SaveFailedError(InvalidInputError):
    """--save could not write a trained variant; everything measured was written first."""


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
    arg("--loss", choices=LOSSES, default=d.loss, help="model: the model's own loss (transformers: the logits of every "
        "token at once); chunked: the decoder, then swiglu_hf.loss a chunk of tokens at a time (one process)")
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
           "mixed_precision", "backend", "gradient_checkpointing", "lora", "loss", "trust_remote_code", "save", "log_every")


def _main(args) -> int:
    variants = args.variants if isinstance(args.variants, tuple) else parse_variants(args.variants)
    cfg = FinetuneConfig(**{f: getattr(args, f) for f in _FIELDS if f != "variants"}, variants=variants)
    from .plots import write_plots
    from .report import format_table, write_results
    from .run import is_main_process, run

    def write_so_far(partial: dict) -> None:
        if is_main_process():  # under a distributed launch only rank 0 writes
            write_results(partial, args.out)

    results = run(cfg, on_variant=write_so_far, command=getattr(args, "command_line", None))
    failed = {name: v["save_error"] for name, v in results["variants"].items() if v.get("save_error")}
    if is_main_process():
        written = [*write_results(results, args.out), *write_plots(results, args.out)]  # results.json first
        print(format_table(results), flush=True)
        print("wrote " + ", ".join(str(p) for p in written), flush=True)
    if failed:
        raise SaveFailedError("; ".join(f"--save of {name} failed ({why})" for name, why in failed.items())
                              + f"; the measurements are in {args.out / 'results.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (`python -m swiglu_hf.tools.finetune`; works under `accelerate launch`)."""
    from ...cli import main as cli_main

    return cli_main(["finetune", *(argv if argv is not None else sys.argv[1:])])
