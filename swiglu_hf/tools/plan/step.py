"""One training step of the real transformers model on the meta device: the peak of live tensor bytes
and what is live at that peak.

    model = build(config, StepSpec(...), "patched")       # no storage anywhere: shapes, dtypes, strides
    result = measure(model, StepSpec(...), seq_len=8192)  # {"peak_bytes": ..., "breakdown": {...}, ...}

The step is the main job's (swiglu-hf finetune): its loss (`model(input_ids=ids, labels=ids).loss`, or with
loss "chunked" the decoder and swiglu_hf.loss, finetune.model.training_loss), backward,
AdamW step, zero_grad, with the main job's LoRA and gradient-checkpointing settings (its own
prepare_base and apply_variant). Every op runs its meta kernel, which allocates exactly what the real
kernel returns, so the main job's tracker (swiglu_hf.peak.PeakBreakdown, which the main job runs on CPU)
counts the same bytes it counts on a CPU, here for storages that hold nothing, with the same breakdown.

What differs from running the same code on a device, and how this file handles it:
- Attention. On the meta device torch's scaled_dot_product_attention falls back to the math path (a
  T x T score matrix). A TorchFunctionMode (`Attention`) sends it to the kernel the device would pick:
  the CPU flash kernel (target "cpu", what a CPU run of the main job calls) or CUDA flash attention
  (target "cuda": fp16/bf16, no mask, head dim <= 256; else memory-efficient attention). Both keep
  the output and a float32 logsumexp per query for backward, never a T x T matrix.
- The optimizer. target "cuda" runs AdamW with foreach=True (torch's default for CUDA tensors, whose
  `_foreach_sqrt` temporaries are part of the real peak); target "cpu" runs torch's CPU default.
- The allocator. target "cuda" rounds every storage up to 512 bytes (the caching allocator's block
  size, which max_memory_allocated counts); "cpu" counts exact bytes as the main job does on CPU.
- The steady state. With steps >= 2 the optimizer state exists before the measured step (as in any
  step after the first); steps=1 measures the first step, where AdamW creates its state.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ...peak import PeakBreakdown
from ..finetune.model import training_loss

CUDA_BLOCK = 512  # CUDA caching allocator: every allocation is rounded up to a multiple of 512 bytes
TARGETS = ("cuda", "cpu")


@dataclass(frozen=True)
class StepSpec:
    dtype: torch.dtype = torch.float32  # the model's weights and activations (from_config(dtype=...))
    batch_size: int = 1
    lora: bool = False
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"  # "adamw" (torch.optim.AdamW) or "sgd" (no state)
    steps: int = 2  # the last one is measured; >= 2: the optimizer state exists before it
    target: str = "cuda"  # "cuda": a GPU runs it; "cpu": a CPU runs it, counted as the main job counts on CPU
    loss: str = "model"  # the main job's --loss: "model" (transformers' own) or "chunked" (swiglu_hf.loss)


# ---- attention as the device runs it ----------------------------------------------------------

def _sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


class Attention(TorchFunctionMode):
    """Routes F.scaled_dot_product_attention to the fused kernel the target device would run."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.used: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v, mask, dropout_p, is_causal, scale, gqa = _sdpa_args(*args, **kwargs)
        aten = torch.ops.aten
        if self.target == "cpu":
            self.used.add("CPU flash attention (_scaled_dot_product_flash_attention_for_cpu)")
            return aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, dropout_p, is_causal, attn_mask=mask, scale=scale)[0]
        if mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0:
            self.used.add("CUDA flash attention (_scaled_dot_product_flash_attention)")
            return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
        if gqa and k.shape[-3] != q.shape[-3]:
            repeat = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(repeat, -3), v.repeat_interleave(repeat, -3)
        self.used.add("CUDA memory-efficient attention (_scaled_dot_product_efficient_attention)")
        need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, need_lse, dropout_p, is_causal, scale=scale)[0]


# ---- the model --------------------------------------------------------------------------------

def build(config, spec: StepSpec, variant: str) -> nn.Module:
    """The model of `config` on the meta device as the main job prepares it, turned into `variant`."""
    from transformers import AutoModelForCausalLM

    from ..finetune.config import FinetuneConfig
    from ..finetune.model import apply_variant, prepare_base

    config.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=spec.dtype, attn_implementation="sdpa")
    base = FinetuneConfig(lora=spec.lora, gradient_checkpointing=spec.gradient_checkpointing)
    model = prepare_base(model, base)
    if spec.lora:  # PEFT builds the adapters on the CPU, then moves them next to their base layer
        model.to("meta")
    return apply_variant(variant, model, torch.device("meta"))


@contextlib.contextmanager
def _one_sequence_per_row():
    """transformers checks position_ids for packed sequences, a data-dependent `.all()` that has no answer on
    the meta device; the step's input is one sequence per row, for which the check returns None."""
    from transformers import masking_utils

    found = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = found


def _optimizer(model: nn.Module, spec: StepSpec):
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    foreach = True if spec.target == "cuda" else None  # CUDA tensors default to foreach; CPU to the loop
    return torch.optim.AdamW(params, lr=1e-3, foreach=foreach)


def measure(model: nn.Module, spec: StepSpec, seq_len: int) -> dict:
    """One measured training step (after steps - 1 state-making ones) of `model` at `seq_len` tokens."""
    block, device_only = (CUDA_BLOCK, True) if spec.target == "cuda" else (1, False)
    ids = torch.zeros(spec.batch_size, seq_len, dtype=torch.long, device="meta")
    optimizer = _optimizer(model, spec)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if spec.steps > 1:  # the state every step after the first starts with; no need to run a whole step
        for p in trainable:
            p.grad = torch.empty_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.train()
    gc.collect()
    loss_of, loss_head = training_loss(model, spec.loss)
    tracker = PeakBreakdown(block, device_only=device_only)
    attention = Attention(spec.target)
    with _one_sequence_per_row(), tracker.watching(model, optimizer, loss_head, around=attention):
        loss = loss_of(ids)
        tracker.enter_phase("backward")
        loss.backward()
        tracker.enter_phase("optimizer")
        optimizer.step()
        tracker.mark_optimizer_state(optimizer)
        optimizer.zero_grad(set_to_none=True)
        del loss
    result = tracker.result()
    return {"peak_bytes": result["peak_bytes"], "breakdown": result["breakdown"], "peak_phase": result["peak_phase"],
            "attention": sorted(attention.used), "trainable_params": sum(p.numel() for p in trainable),
            "params": sum(p.numel() for p in model.parameters())}
