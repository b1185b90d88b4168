"""`swiglu-hf finetune`: stock vs patched (vs peers) in one accelerate fine-tuning loop.

Every variant trains a deep copy of the same initial weights on the same batches, in the same
order, so losses compare step by step and speed and memory differ only by the MLP:

    stock    the unpatched model
    patched  apply_swiglu_patch(model)
    tiled    apply_swiglu_patch(model, tile_tokens="auto")
    liger    Liger-Kernel's SwiGLU MLP (its apply_liger_kernel_to_<model type>, swiglu only)
    compile  torch.compile(model) of the stock model

A variant whose peer is missing or cannot run on this device is skipped with a one-line reason.
Per variant: the loss at every optimizer step (averaged over processes); tokens/s and step time
as medians over the steps after --warmup-steps, each clock read after synchronizing the device;
peak memory over the same steps (CUDA: max allocated / reserved; CPU: peak RSS growth, see
finetune_memory); and the bytes autograd saves for backward in one micro-batch forward.
results.json and results.md are rewritten after each variant, so a run stopped part-way (a
timeout, Ctrl-C) keeps the variants it finished; the plots are drawn at the end.

Run `python examples/finetune.py` or `swiglu-hf finetune`; under DDP on CPU (gloo):
`accelerate launch --multi_gpu --num_processes 2 examples/finetune.py --device cpu --steps 3`
(accelerate 1.x's `launch --cpu` starts a single process whatever --num_processes says).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import SwigluError
from .finetune_memory import memory_kind, read_memory, start_memory
from ..memory import track_saved
from ..patch import apply_swiglu_patch
from .peers import PeerUnavailable, apply_liger_swiglu_mlp

VARIANTS = ("stock", "patched", "tiled", "liger", "compile")
MIXED_PRECISION = ("no", "bf16", "fp16")
DATA_DIR = Path(__file__).with_name("data")
DEFAULT_CONFIG = DATA_DIR / "byte_llama.json"
CORPUS = DATA_DIR / "corpus.txt"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Llama-3.2-1B's shape with random weights: the GPU benchmark needs the size, not the checkpoint.
PRESETS = {
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001, use_cache=False,
    ),
}


class VariantUnavailable(SwigluError):
    """A variant's peer is not installed or cannot run here; the run skips it and says why."""


def parse_variants(spec: str | tuple | list) -> tuple[str, ...]:
    """"stock,patched" (or a sequence of names) -> validated tuple of variant names."""
    names = tuple(n.strip() for n in spec.split(",")) if isinstance(spec, str) else tuple(spec)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ValueError(
            f"unknown variant(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose a comma-separated subset of: {', '.join(VARIANTS)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"variant listed twice in {','.join(names)}; list each once")
    return names


@dataclass(frozen=True)
class FinetuneConfig:
    variants: tuple[str, ...] = ("stock", "patched")
    model: str | None = None  # local HF directory or .gguf; None = the shipped byte-level Llama
    preset: str | None = None  # random-init model of a known shape, e.g. "llama-3.2-1b"
    steps: int = 30
    warmup_steps: int = 5  # excluded from the timing medians (allocator, autotuning, compile)
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 1e-3
    seed: int = 0
    device: str | None = None  # "cpu" or "cuda"; None = CUDA when available
    mixed_precision: str | None = None  # None = bf16 on a CUDA device that supports it, else "no"
    gradient_checkpointing: bool = False
    lora: bool = False

    def __post_init__(self):
        object.__setattr__(self, "variants", parse_variants(self.variants))
        if self.model and self.preset:
            raise ValueError("give either model= (a checkpoint) or preset= (a random-init shape), not both")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps}): "
                "the timing medians need at least one step after warm-up"
            )
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.mixed_precision not in (None, *MIXED_PRECISION):
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}")


# ---- data ---------------------------------------------------------------------------------

def corpus_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    """The shipped corpus as token ids: the tokenizer's, or its raw UTF-8 bytes (ids 0-255)."""
    text = CORPUS.read_text(encoding="utf-8")
    if tokenizer is not None:
        return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    if vocab_size < 256:
        raise ValueError(f"byte-level tokens need a vocabulary of >= 256 ids; the model has {vocab_size}")
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def make_batches(tokens: torch.Tensor, cfg: FinetuneConfig, num_processes: int, rank: int) -> list[torch.Tensor]:
    """This process's steps * grad_accum micro-batches, each (B, T) windows of the corpus.

    Window starts are drawn from one seeded generator for the global batch and then sliced per
    process, so every variant sees the same data order and the ranks see disjoint rows.
    """
    starts_max = tokens.numel() - cfg.seq_len
    if starts_max < 0:
        raise ValueError(f"the corpus has {tokens.numel()} tokens, fewer than seq_len={cfg.seq_len}")
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, starts_max + 1, (cfg.steps * cfg.grad_accum, cfg.batch_size * num_processes), generator=gen)
    mine = starts[:, rank * cfg.batch_size:(rank + 1) * cfg.batch_size]  # (micro-batches, B)
    return list(tokens[mine[..., None] + torch.arange(cfg.seq_len)])  # each (B, T)


# ---- model --------------------------------------------------------------------------------

def _local_tokenizer(spec: str):
    """The checkpoint's own tokenizer, or None (byte-level) when it ships none."""
    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    gguf = path.suffix == ".gguf"
    try:
        return AutoTokenizer.from_pretrained(
            path.parent if gguf else path, local_files_only=True, **({"gguf_file": path.name} if gguf else {})
        )
    except (OSError, ValueError):
        return None


def hf_config(spec: dict):
    """A transformers config from a plain dict holding "model_type" and the config fields."""
    from transformers import AutoConfig

    fields = {k: v for k, v in spec.items() if k != "model_type"}
    return AutoConfig.for_model(spec["model_type"], **fields)


def build_model(cfg: FinetuneConfig) -> tuple[nn.Module, object, str]:
    """(model on CPU, tokenizer or None for byte-level, display name). Same seed, same weights."""
    from transformers import AutoModelForCausalLM

    from .models import load_model

    torch.manual_seed(cfg.seed)
    if cfg.model:
        return load_model(cfg.model, seed=cfg.seed), _local_tokenizer(cfg.model), cfg.model
    if cfg.preset:
        spec, name = PRESETS[cfg.preset], f"{cfg.preset} shape, random init"
    else:
        spec, name = json.loads(DEFAULT_CONFIG.read_text()), f"byte-level Llama ({DEFAULT_CONFIG.name}), random init"
    return AutoModelForCausalLM.from_config(hf_config(spec)), None, name


def prepare_base(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """Training options every variant shares, applied once so all variants start identical."""
    model.config.use_cache = False  # no KV cache while training (and none with checkpointing)
    if cfg.gradient_checkpointing:
        # transformers >= 5.x renamed it (the old name warns); non-reentrant works with frozen inputs (LoRA)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        # dropout 0: the variants must consume no randomness, so their losses stay comparable
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
        model = get_peft_model(model, lora)
    return model.train()


# ---- variants -----------------------------------------------------------------------------

def _apply_liger(model: nn.Module, device: torch.device) -> nn.Module:
    if device.type != "cuda":
        raise VariantUnavailable(f"Liger-Kernel's Triton kernels need a CUDA device, this run is on {device.type}")
    try:
        # Only the MLP, so the comparison isolates it. Liger also rebinds the family's MLP class
        # in transformers for the whole process; instances built earlier (our base copy) keep theirs.
        return apply_liger_swiglu_mlp(model)
    except PeerUnavailable as why:
        raise VariantUnavailable(str(why)) from None


def apply_variant(name: str, model: nn.Module, device: torch.device) -> nn.Module:
    """Turn `model` (a private copy) into variant `name`; VariantUnavailable says why it cannot."""
    if name == "stock":
        return model
    if name == "patched":
        return apply_swiglu_patch(model)
    if name == "tiled":
        return apply_swiglu_patch(model, tile_tokens="auto")
    if name == "liger":
        return _apply_liger(model, device)
    # compile (parse_variants admits no other name)
    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise VariantUnavailable("torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH")
    return torch.compile(model)


# ---- training -----------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_variant(accelerator, model: nn.Module, batches: list[torch.Tensor], cfg: FinetuneConfig, progress) -> dict:
    """Train `model` on `batches`; returns losses, timing medians and memory for the variant."""
    device = accelerator.device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    micro_batches = iter(batches)
    losses, times, saved = [], [], None
    for step in range(cfg.steps):
        if step == cfg.warmup_steps:
            baseline = start_memory(device)
        _sync(device)
        start = time.perf_counter()
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            ids = next(micro_batches)
            first = step == 0 and micro == 0
            with accelerator.accumulate(model):
                with track_saved() if first else contextlib.nullcontext({}) as hooked:
                    loss = model(input_ids=ids, labels=ids).loss
                if first:
                    saved = sum(hooked.values())
                accelerator.backward(loss)  # divides by grad_accum; steps only on the last micro-batch
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss = step_loss + loss.detach() / cfg.grad_accum
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(step_loss)
        progress.update()
        progress.set_postfix(loss=f"{step_loss.item():.4f}")  # after the clock: the sync is free
    memory = read_memory(device, baseline)
    accelerator.free_memory()  # drop accelerate's references so the next variant starts clean

    step_time = statistics.median(times[cfg.warmup_steps:])
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * accelerator.num_processes
    return {
        "tokens_per_s": tokens_per_step / step_time,
        "step_time_s": step_time,
        "first_step_s": times[0],  # includes torch.compile / autotuning, excluded from the median
        **memory,
        "saved_activation_bytes": saved,
        "losses": accelerator.reduce(torch.stack(losses), reduction="mean").tolist(),
    }


def add_loss_agreement(variants: dict) -> None:
    """max over steps of |loss - stock loss| / |stock loss|, per variant (None without stock)."""
    stock = variants.get("stock")
    for result in variants.values():
        result["max_rel_loss_diff_vs_stock"] = None if stock is None else max(
            abs(a - b) / abs(b) for a, b in zip(result["losses"], stock["losses"])
        )


def _default_mixed_precision(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"


def _device_name(accelerator) -> str:
    device = accelerator.device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    return f"{device} ({where}) x {accelerator.num_processes} process(es)"


def run(cfg: FinetuneConfig, on_variant: Callable[[dict], None] | None = None) -> dict:
    """Train every variant of cfg.variants; returns the results (on every process).

    on_variant(results), when given, is called after each variant is trained or skipped, with the
    results so far (results["pending"] lists the variants still to come); the CLI writes
    results.json/.md there, so a run stopped part-way keeps what it finished.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    device_type = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but torch sees no CUDA device; use device='cpu'")
    mixed_precision = cfg.mixed_precision or _default_mixed_precision(torch.device(device_type))
    accelerator = Accelerator(
        cpu=device_type == "cpu", mixed_precision=mixed_precision, gradient_accumulation_steps=cfg.grad_accum
    )
    device = accelerator.device

    base, tokenizer, name = build_model(cfg)
    base = prepare_base(base, cfg)
    tokens = corpus_tokens(tokenizer, base.config.vocab_size)
    batches = [b.to(device) for b in make_batches(tokens, cfg, accelerator.num_processes, accelerator.process_index)]
    results = {
        "device": _device_name(accelerator), "model": name,
        "dtype": str(next(base.parameters()).dtype).removeprefix("torch."), "mixed_precision": mixed_precision,
        "steps": cfg.steps, "warmup_steps": cfg.warmup_steps, "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len, "grad_accum": cfg.grad_accum, "num_processes": accelerator.num_processes,
        "lora": cfg.lora, "gradient_checkpointing": cfg.gradient_checkpointing,
        "tokenizer": "byte-level" if tokenizer is None else type(tokenizer).__name__,
        "peak_memory_kind": memory_kind(device), "variants": {}, "skipped": {}, "pending": list(cfg.variants),
    }
    for variant in cfg.variants:
        try:
            model = apply_variant(variant, copy.deepcopy(base).to(device), device)
        except VariantUnavailable as why:
            accelerator.print(f"skipping variant {variant!r}: {why}")
            results["skipped"][variant] = str(why)
        else:
            torch.manual_seed(cfg.seed)  # any randomness inside training starts from the same state
            hide = None if accelerator.is_main_process else True
            with tqdm(total=cfg.steps, desc=f"{variant:>8}", disable=hide) as progress:
                results["variants"][variant] = train_variant(accelerator, model, batches, cfg, progress)
            del model
        results["pending"].remove(variant)
        add_loss_agreement(results["variants"])
        if on_variant is not None:
            on_variant(results)
    return results


# ---- command line -------------------------------------------------------------------------

def _variants_arg(text: str) -> tuple[str, ...]:
    try:
        return parse_variants(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants", type=_variants_arg, default=("stock", "patched"),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: stock,patched)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="local HF directory (safetensors) or .gguf file instead of the shipped model")
    which.add_argument("--preset", choices=sorted(PRESETS), help="random-init model of a real model's shape")
    p.add_argument("--steps", type=int, default=FinetuneConfig.steps, help="optimizer steps per variant")
    p.add_argument("--warmup-steps", type=int, default=FinetuneConfig.warmup_steps,
                   help="first steps left out of the timing medians")
    p.add_argument("--batch-size", type=int, default=FinetuneConfig.batch_size, help="sequences per micro-batch per process")
    p.add_argument("--seq-len", type=int, default=FinetuneConfig.seq_len)
    p.add_argument("--grad-accum", type=int, default=FinetuneConfig.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=FinetuneConfig.lr)
    p.add_argument("--seed", type=int, default=FinetuneConfig.seed)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION, help="default: bf16 on a CUDA device that supports it, else no")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (r=8 on attention and MLP projections)")
    p.add_argument("--out", type=Path, default=Path("runs/finetune"), help="folder for results.json/.md and plots")


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="accelerate fine-tuning: stock vs patched (vs peers) speed, memory, loss",
                       description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=_main)


def _main(args) -> int:
    from accelerate import PartialState

    from .finetune_report import format_table, write_plots, write_results

    fields = ("variants", "model", "preset", "steps", "warmup_steps", "batch_size", "seq_len", "grad_accum",
              "lr", "seed", "device", "mixed_precision", "gradient_checkpointing", "lora")
    try:
        cfg = FinetuneConfig(**{f: getattr(args, f) for f in fields})
    except ValueError as err:
        raise SystemExit(f"swiglu-hf finetune: error: {err}") from None

    def write_so_far(partial: dict) -> None:
        # PartialState only once run()'s Accelerator has set it up: a PartialState() made before
        # Accelerator(cpu=True) would fix the process group without it (no DDP on CPU).
        if PartialState().is_main_process:  # under DDP only rank 0 reports
            write_results(partial, args.out)

    results = run(cfg, on_variant=write_so_far)
    if PartialState().is_main_process:
        written = [*write_results(results, args.out), *write_plots(results, args.out)]
        print(format_table(results))
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of examples/finetune.py (also works under `accelerate launch`)."""
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return _main(parser.parse_args(argv))
