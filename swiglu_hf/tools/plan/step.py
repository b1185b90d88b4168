"""One training step of the real transformers model on the meta device: the peak of live tensor bytes
and what is live at that peak.

    model = build(config, StepSpec(...), "patched")       # no storage anywhere: shapes, dtypes, strides
    result = measure(model, StepSpec(...), seq_len=8192)  # {"peak_bytes": ..., "breakdown": {...}, ...}

The step is the main job's (swiglu-hf finetune): `model(input_ids=ids, labels=ids).loss`, backward,
AdamW step, zero_grad, with the main job's LoRA and gradient-checkpointing settings (its own
prepare_base and apply_variant). Every op runs its meta kernel, which allocates exactly what the real
kernel returns, so the live-tensor tracker of the main job (swiglu_hf.memory.LiveTensorBytes) counts the
same bytes it counts on a CPU, here for storages that hold nothing.

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
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ...memory import LiveTensorBytes

CATEGORIES = ("weights", "gradients", "optimizer_state", "activations_mlp", "activations_rest", "logits_loss",
              "transient")
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


# ---- the tracker: the main job's, counting storages that hold nothing, with a breakdown at the peak ----

class PeakBreakdown(LiveTensorBytes):
    """swiglu_hf.memory.LiveTensorBytes that also counts meta storages (rounded up to `block` bytes) and
    remembers which storages were live at the peak, each with the phase and module it was made in.
    (Views of resident tensors and in-place updates share an input's storage: the base class never
    counts them, as a device's allocator does not.)"""

    def __init__(self, block: int = 1, device_only: bool = False):
        super().__init__()
        self.block = block
        self.device_only = device_only  # count meta storages only: the CPU ones (AdamW's step counts) stay in host memory
        self.phase = "forward"
        self.where: list[str] = []  # module context stack: "mlp", "rest", "head"
        self.head_backward = False  # backward before the grad reaches the decoder's output: logits and loss
        self.made: list[tuple[int, str, str | None]] = []  # serial -> (bytes, phase, context)
        self.marks: dict[int, str] = {}  # serial -> category decided after creation (gradients, optimizer state)
        self._serial: dict[int, int] = {}  # id(storage) -> serial, for live storages
        self.at_peak: list[int] = []
        self.peak_phase = None

    def rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.block) * self.block

    def _freed(self, key: int, nbytes: int, _ref) -> None:
        super()._freed(key, nbytes, _ref)
        self._serial.pop(key, None)

    def _track(self, st: torch.UntypedStorage) -> None:  # the base class's, without its "not meta" filter
        key = id(st)
        ref = self._refs.get(key)
        if ref is not None and ref() is st:
            return
        nbytes = st.nbytes()
        if nbytes == 0 or (self.device_only and st.device.type != "meta"):
            return
        nbytes = self.rounded(nbytes)
        self._refs[key] = weakref.ref(st, lambda r, k=key, n=nbytes: self._freed(k, n, r))
        context = self.where[-1] if self.where else ("head" if self.head_backward else None)
        self._serial[key] = len(self.made)
        self.made.append((nbytes, self.phase, context))
        self.live += nbytes
        if self.live > self.peak:
            self.peak = self.live
            self.at_peak = list(self._serial.values())
            self.peak_phase = self.phase

    def mark(self, tensors, category: str) -> None:
        for t in tensors:
            serial = self._serial.get(id(t.untyped_storage()))
            if serial is not None:
                self.marks[serial] = category

    def breakdown(self) -> dict:
        """Bytes per category of the storages created in the block that were live at the peak."""
        out = dict.fromkeys(CATEGORIES, 0)
        for serial in self.at_peak:
            nbytes, phase, context = self.made[serial]
            category = self.marks.get(serial)
            if category is None:
                if context == "head":
                    category = "logits_loss"
                elif context in ("mlp", "rest"):  # made by a module's forward (or its recompute in backward)
                    category = f"activations_{context}"
                else:
                    category = "transient"
            out[category] += nbytes
        return out


def distinct_bytes(tensors, block: int = 1, device_only: bool = False) -> int:
    """Bytes of the distinct storages behind `tensors`, each rounded up to `block` (meta storages too;
    with device_only, meta storages only)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()  # plain tensors only: the planned model is built here, on meta
        if not device_only or st.device.type == "meta":
            seen[st._cdata] = -(-st.nbytes() // block) * block
    return sum(seen.values())


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

def is_gated_mlp(module: nn.Module) -> bool:
    from swiglu_hf.recipes import match_recipe

    return match_recipe(module) is not None


def build(config, spec: StepSpec, variant: str) -> nn.Module:
    """The model of `config` on the meta device as the main job prepares it, turned into `variant`."""
    from transformers import AutoModelForCausalLM

    from ..finetune.config import FinetuneConfig
    from ..finetune.model import apply_variant, prepare_base

    config.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=spec.dtype, attn_implementation="sdpa")
    model.__dict__["_plan_lm"] = model  # the causal LM itself, before PEFT wraps it
    base = FinetuneConfig(lora=spec.lora, gradient_checkpointing=spec.gradient_checkpointing)
    model = prepare_base(model, base)
    if spec.lora:  # PEFT builds the adapters on the CPU, then moves them next to their base layer
        model.to("meta")
    return apply_variant(variant, model, torch.device("meta"))


def _causal_lm(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if "_plan_lm" in m.__dict__:
            return m
    raise ValueError("not a model built by swiglu_hf.tools.plan.step.build")


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


@contextlib.contextmanager
def _contexts(model: nn.Module, tracker: PeakBreakdown, attention: Attention):
    """Module hooks that tell the tracker which part of the model makes each tensor: the gated MLPs
    ("mlp"), lm_head and the loss ("head"), everything else ("rest"). Nothing inside a gated MLP gets
    a hook (a hook on a projection would change the path swiglu_hf takes, see gated.plain_linear).

    The outermost hooked module's forward also turns `attention` on: inside module forwards only, so
    that it is on in checkpoint's recompute during backward too (a TorchFunctionMode entered around the
    whole step would be off for all of backward: a mode is off while it handles a call, here backward())."""
    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    tags, inside_mlp = {}, set()
    for m in lm.modules():
        if id(m) in inside_mlp:
            continue
        if is_gated_mlp(m):
            tags[id(m)] = "mlp"
            inside_mlp.update(id(sub) for sub in m.modules())
        else:
            tags[id(m)] = "rest"
    for m in (lm, *head.modules()):
        tags[id(m)] = "head"
    handles = []

    def push(m, *_):
        if not tracker.where:
            attention.__enter__()
        tracker.where.append(tags[id(m)])

    def pop(*_):
        tracker.where.pop()
        if not tracker.where:
            attention.__exit__(None, None, None)

    def leave_head(grad):  # the loss and logits' backward is done once the grad reaches lm_head's input
        tracker.head_backward = False
        return grad

    def watch_head_input(m, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            args[0].register_hook(leave_head)

    for m in lm.modules():
        if id(m) in tags:
            handles.append(m.register_forward_pre_hook(push))
            handles.append(m.register_forward_hook(pop, always_call=True))
    handles.append(head.register_forward_pre_hook(watch_head_input))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _optimizer(model: nn.Module, spec: StepSpec):
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    foreach = True if spec.target == "cuda" else None  # CUDA tensors default to foreach; CPU to the loop
    return torch.optim.AdamW(params, lr=1e-3, foreach=foreach)


def _optimizer_state(optimizer) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


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
    weights = distinct_bytes([*model.parameters(), *model.buffers()], block, device_only)
    state_before = distinct_bytes(_optimizer_state(optimizer), block, device_only)
    tracker = PeakBreakdown(block, device_only=device_only)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.mark([p.grad], "gradients")) for p in trainable]
    attention = Attention(spec.target)
    try:
        with _one_sequence_per_row(), _contexts(model, tracker, attention), tracker:
            loss = model(input_ids=ids, labels=ids).loss
            tracker.phase, tracker.head_backward = "backward", True
            loss.backward()
            tracker.phase, tracker.head_backward = "optimizer", False
            optimizer.step()
            tracker.mark(_optimizer_state(optimizer), "optimizer_state")
            optimizer.zero_grad(set_to_none=True)
            del loss
    finally:
        for h in hooks:
            h.remove()
    breakdown = tracker.breakdown()
    breakdown["weights"] += weights
    breakdown["optimizer_state"] += state_before
    peak = weights + state_before + tracker.peak
    assert sum(breakdown.values()) == peak, (breakdown, peak)
    return {"peak_bytes": peak, "breakdown": breakdown, "peak_phase": tracker.peak_phase,
            "attention": sorted(attention.used), "trainable_params": sum(p.numel() for p in trainable),
            "params": sum(p.numel() for p in model.parameters())}
