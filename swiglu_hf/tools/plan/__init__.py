"""`swiglu-hf plan`: how long a sequence fits on my GPU, stock vs patched vs tiled, from a config alone.

Per variant it runs one full training step (forward, backward, optimizer step) of the real transformers
model class on the meta device, where tensors have shapes but no storage, and records the peak of live
tensor bytes with the main job's tracker, with what is live at the peak (step.py). Then it searches
the longest sequence whose peak fits --memory-gb (search.py) and prints a table, writes JSON and a
plot (report.py). The model is a built-in name, a directory holding a config.json (no weights
needed), or a config .json file.

This module imports neither torch nor transformers: `swiglu-hf plan --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

VARIANTS = ("stock", "patched", "tiled")


def _variants(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a comma-separated subset of {','.join(VARIANTS)}, each once; got {text!r}")
    return names


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
        return value

    parse.__name__ = f"{kind.__name__} > 0"
    return parse


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="from a config alone: peak memory of a training step and the longest sequence "
                       "that fits, stock vs patched vs tiled", description=__doc__.split("\n\n")[0])
    arg = p.add_argument
    arg("--model", metavar="NAME|DIR|FILE.json", help="a built-in (tiny-llama, ..., llama-3.2-1b, llama-3.1-8b, "
        "qwen2.5-7b), a directory with a config.json (weights not needed) or a config .json; default: the main "
        "job's tiny Llama")
    arg("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16", help="dtype of the weights and activations")
    arg("--batch-size", type=_positive(int), default=1, metavar="N")
    arg("--seq-len", type=_positive(int), default=4096, metavar="T", help="the sequence length of the reported peak "
        "and where the search starts")
    arg("--lora", action="store_true", help="LoRA adapters as the main job adds them (r=8, attention and MLP)")
    arg("--gradient-checkpointing", action="store_true", help="non-reentrant, as the main job enables it")
    arg("--loss", choices=("model", "chunked"), default="model", help="model: transformers' own loss (the logits "
        "of every token, a float32 copy and log-softmax at once); chunked: swiglu_hf.loss, a chunk of tokens at a time "
        "(the main job's --loss)")
    arg("--optimizer", choices=("adamw", "sgd"), default="adamw", help="torch.optim.AdamW (2 state tensors per "
        "trainable weight) or SGD without momentum (none)")
    arg("--memory-gb", type=_positive(float), default=80.0, metavar="GIB", help="device memory in GiB (2^30 bytes)")
    arg("--reserve-gb", type=float, default=1.0, metavar="GIB", help="kept out of the budget for the CUDA context "
        "and allocator fragmentation")
    arg("--variants", type=_variants, default=",".join(VARIANTS), metavar="LIST",
        help=f"comma-separated subset of {','.join(VARIANTS)}")
    arg("--steps", type=_positive(int), default=2, metavar="N", help="the measured step is the N-th: 1 = the first "
        "(AdamW makes its state inside it), >= 2 = the steady state")
    arg("--target", choices=("cuda", "cpu"), default="cuda", help="cuda: as a GPU runs and counts it (flash "
        "attention, foreach AdamW, 512-byte blocks, cuBLAS workspaces); cpu: as `swiglu-hf finetune` counts on a CPU")
    arg("--granularity", type=_positive(int), default=256, metavar="T", help="the search's step in tokens")
    arg("--max-seq-len", type=_positive(int), metavar="T", help="the search's cap; default: the config's "
        "max_position_embeddings")
    arg("--no-search", action="store_true", help="only the peak at --seq-len")
    arg("--trust-remote-code", action="store_true", help="allow a config's own Python code (custom model classes)")
    arg("--json", type=Path, metavar="PATH", help="write the result as JSON (variants.<name>.peak_bytes, .max_seq_len, ...)")
    arg("--plot", type=Path, metavar="PATH", help="write a PNG of the breakdowns (needs matplotlib); default: next "
        "to --json")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from .report import format_table, plot, write_json
    from .search import PlanConfig, run_plan

    cfg = PlanConfig(model=args.model, dtype=args.dtype, batch_size=args.batch_size, seq_len=args.seq_len,
                     lora=args.lora, gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
                     memory_gb=args.memory_gb, reserve_gb=args.reserve_gb, variants=tuple(args.variants),
                     target=args.target, loss=args.loss, steps=args.steps, granularity=args.granularity,
                     max_seq_len=args.max_seq_len, search=not args.no_search,
                     trust_remote_code=args.trust_remote_code)
    print(f"swiglu-hf plan: {', '.join(cfg.variants)} on the meta device ...", flush=True)
    result = run_plan(cfg, say=lambda text: print(text, flush=True))
    result["command"] = getattr(args, "command_line", None)
    print(format_table(result), flush=True)
    written = []
    if args.json:
        written.append(write_json(result, args.json))
    picture = args.plot or (args.json.with_suffix(".png") if args.json else None)
    if picture is not None:
        drawn = plot(result, picture)
        written.append(drawn if drawn else "(no plot: matplotlib is not installed)")
    if written:
        print("wrote " + ", ".join(map(str, written)), flush=True)
    return 0

