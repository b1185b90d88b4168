"""Shared pieces of the distributed-engine workers that tests/test_engines.py launches.

A worker trains a tiny Llama (fixed init, fixed batches, fp32, AdamW, STEPS steps) once stock and
once per patch order, in one process group, and rank 0 writes every cell to a JSON file (rewritten
after each cell, so a crash or a hang still leaves the cells before it). Per cell:

  losses        per rank, per step, as float.hex strings (compare with ==)
  weights_equal whether the full (gathered) weights after training equal the engine's stock cell's
  max_abs_diff  the largest |patched - stock| over all those weights
  patched       len(patched_modules(model)) on the unwrapped model
  saved_bytes   bytes autograd saved for backward during the first forward of the first MLP
                (swiglu_hf.memory.track_saved, entered/exited by forward hooks), and `tokens`
  error         "Type: message" when the cell raised, with `swiglu_frames` (file:line in swiglu_hf)

Only the public API of swiglu_hf is used (plus swiglu_hf.memory.track_saved).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 64, 172, 2, 128
SEQ, MICRO, STEPS, LR = 16, 2, 3, 1e-3
TILE = 16  # tile_tokens of the *_tiled orders: 2 tiles per MLP call (MICRO * SEQ = 32 tokens per rank)
TIMEOUT = timedelta(seconds=int(os.environ.get("SWIGLU_DIST_TIMEOUT", "300")))  # collectives: fail, don't hang


# ---- process group ------------------------------------------------------------------------

def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def log(*args) -> None:
    print(f"[rank {rank()}]", *args, flush=True)


def finish(code: int = 0) -> None:
    """Exit without the interpreter's teardown (gloo/DeepSpeed atexit work costs ~8 s on 2 cores)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (deepspeed_shm_comm) at
    init_distributed: ~3 min on 2 cores the first time on a machine (then cached in
    ~/.cache/torch_extensions). Only inference_all_reduce uses it; training goes through torch.distributed
    (gloo). Skip the build. Call before deepspeed.init_distributed / Accelerator()."""
    try:
        import deepspeed.comm.torch  # noqa: F401
    except ImportError:
        return
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # `deepspeed.comm.torch` is torch itself


# ---- model and data -----------------------------------------------------------------------

def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False,
    )


def make_checkpoint(path: Path) -> Path:
    """Rank 0 writes the stock init weights (seed 0) with save_pretrained; everyone loads them."""
    from transformers import LlamaForCausalLM

    path = Path(path)
    if rank() == 0 and not (path / "config.json").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(llama_config()).save_pretrained(path)
    if dist.is_initialized():
        dist.barrier()
    return path


def load_model(path: Path):
    """from_pretrained: under an active HfDeepSpeedConfig (ZeRO-3) this builds under deepspeed.zero.Init."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")


def all_rows() -> torch.Tensor:
    """(STEPS * world * MICRO, SEQ) token ids; step s, rank r trains on rows [(s*W + r)*MICRO, +MICRO)."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (STEPS * world() * MICRO, SEQ), generator=gen)


def rank_batch(step: int) -> torch.Tensor:
    start = (step * world() + rank()) * MICRO
    return all_rows()[start:start + MICRO]


# ---- measurements -------------------------------------------------------------------------

def first_mlp(model):
    return next(m for _, m in model.named_modules() if type(m).__name__.endswith("MLP"))


class SavedProbe:
    """Bytes autograd saves during the first grad-mode forward of `module` (hooks around it)."""

    def __init__(self, module):
        from swiglu_hf.memory import track_saved

        self.track_saved, self.ctx, self.bytes, self.tokens = track_saved, None, None, None
        self.handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module, args, kwargs):
        if self.bytes is None and self.ctx is None and torch.is_grad_enabled():
            x = args[0] if args else next(iter(kwargs.values()))
            self.tokens = x.numel() // x.shape[-1]
            self.ctx = self.track_saved()
            self.seen = self.ctx.__enter__()

    def _post(self, module, args, kwargs, output):
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
            self.bytes, self.ctx = sum(self.seen.values()), None
            for h in self.handles:
                h.remove()


def clean_name(name: str) -> str:
    for prefix in ("module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


def digest(weights: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def compare(weights: dict, stock: dict | None):
    """(keys_equal, bitwise_equal, max_abs_diff) of full weight dicts."""
    if stock is None or weights is None:
        return None, None, None
    keys = set(weights) == set(stock)
    common = set(weights) & set(stock)
    equal = keys and all(torch.equal(weights[k], stock[k]) for k in common)
    diff = max(((weights[k].double() - stock[k].double()).abs().max().item() for k in common), default=0.0)
    return keys, equal, diff


# ---- the matrix ---------------------------------------------------------------------------

def describe_error(err: BaseException) -> dict:
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f"swiglu_hf/{f.filename.split('/swiglu_hf/', 1)[1]}:{f.lineno} in {f.name}"
            for f in frames if "/swiglu_hf/" in f.filename]
    last = frames[-1] if frames else None
    return {
        "error": f"{type(err).__name__}: {err}"[:1500],
        "swiglu_frames": ours,
        "raised_at": f"{last.filename.split('site-packages/')[-1]}:{last.lineno} in {last.name}" if last else None,
        "traceback": "".join(traceback.format_exception(err))[-6000:],
    }


class Matrix:
    """Runs cells (engine, order) in order; the stock cell of an engine must come first."""

    def __init__(self, out: Path, meta: dict | None = None):
        self.out = Path(out)
        self.cells: dict = {}
        self.stock: dict = {}
        self.meta = {"world_size": world(), "torch": torch.__version__, **(meta or {})}
        import transformers

        import swiglu_hf

        self.meta["transformers"] = transformers.__version__
        self.meta["swiglu_hf"] = str(Path(swiglu_hf.__file__).parent)
        for mod in ("accelerate", "deepspeed"):
            if mod in sys.modules:
                self.meta[mod] = getattr(sys.modules[mod], "__version__", "?")

    def run(self, engine: str, order: str, fn) -> dict:
        """fn() -> dict(losses=[...], weights={name: tensor} (full, any rank), patched=int, ...)."""
        key = f"{engine}/{order}"
        log("cell", key)
        t0 = time.time()
        local = {"engine": engine, "order": order, "error": None}
        weights = None
        try:
            got = fn()
            weights = got.pop("weights", None)
            local.update(got)
            local["losses_hex"] = [float(x).hex() for x in local.pop("losses")]
        except BaseException as err:  # noqa: BLE001 - a cell's failure is a result
            if isinstance(err, KeyboardInterrupt):
                raise
            local.update(describe_error(err))
            log("cell", key, "FAILED:", local["error"].splitlines()[0][:300])
        if order == "stock" and weights is not None:
            self.stock[engine] = weights
        keys, equal, diff = compare(weights, self.stock.get(engine)) if order != "stock" else (None, None, None)
        local.update(keys_equal=keys, weights_equal=equal, max_abs_diff=diff,
                     weights_digest=digest(weights) if weights is not None else None)
        local["seconds"] = round(time.time() - t0, 2)
        local["F_linear_after"] = torch.nn.functional.linear.__name__  # DeepSpeed ZeRO-3 swaps it globally
        gathered = [None] * world()
        if dist.is_initialized():
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        cell = dict(gathered[0])
        cell["losses_hex"] = [g.get("losses_hex") for g in gathered]
        cell["error"] = next((g["error"] for g in gathered if g["error"]), None)
        if cell["error"] and not gathered[0]["error"]:
            cell.update({k: v for g in gathered if g["error"] for k, v in describe_keys(g).items()})
        cell["errors_per_rank"] = [bool(g["error"]) for g in gathered]
        for k in ("weights_equal", "keys_equal"):
            vals = [g.get(k) for g in gathered]
            cell[k] = None if any(v is None for v in vals) else all(vals)
        diffs = [g.get("max_abs_diff") for g in gathered if g.get("max_abs_diff") is not None]
        cell["max_abs_diff"] = max(diffs) if diffs else None
        self.cells[key] = cell
        if rank() == 0:
            self.out.write_text(json.dumps({"meta": self.meta, "cells": self.cells}, indent=1))
        gc.collect()
        if dist.is_initialized():
            dist.barrier()
        return cell


def describe_keys(g: dict) -> dict:
    return {k: g[k] for k in ("swiglu_frames", "raised_at", "traceback") if k in g}


def patch_kwargs(order: str) -> dict:
    """apply_swiglu_patch keywords of an order: "*_tiled" orders run the tiled mode (tile_tokens=TILE)."""
    return {"tile_tokens": TILE} if order.endswith("_tiled") else {}


def load_for_order(ckpt, order: str, patch_before: tuple[str, ...]):
    """The model for one cell: built inside swiglu_hf.patching() for order "class", patched right after
    loading for the orders in patch_before (an order "X_tiled" as X, in the tiled mode). Returns (model,
    whether ZeRO-3 partitioned it at load)."""
    import swiglu_hf
    from swiglu_hf.distributed import is_partitioned

    base = order.removesuffix("_tiled")
    if base == "class":
        with swiglu_hf.patching(**patch_kwargs(order)):
            model = load_model(ckpt)
    else:
        model = load_model(ckpt)
    zero_init = is_partitioned(model)
    if base in patch_before:
        swiglu_hf.apply_swiglu_patch(model, **patch_kwargs(order))
    return model, zero_init
