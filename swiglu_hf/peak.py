"""What is live at the peak of one training step, by category: the tracker `swiglu-hf plan` runs on the
meta device and `swiglu-hf finetune` runs on CPU, one implementation for both.

    tracker = PeakBreakdown()
    with tracker.watching(model, optimizer):  # module and gradient hooks, the dispatch mode
        ...                                   # the step: forward, then enter_phase("backward"), backward,
                                              # enter_phase("optimizer"), step, mark_optimizer_state(optimizer)
    tracker.result()   # {"peak_bytes", "resident_bytes", "breakdown": {category: bytes}, "peak_phase"}

(swiglu_hf.tools.plan.step.measure runs one such step on the meta device; swiglu_hf.tools.finetune's
memory step, with gradient accumulation, on the CPU.)

The peak is swiglu_hf.memory.LiveTensorBytes' (the storages alive at the start, each once, plus the highest
total of storages created inside), and the breakdown sums to it exactly. A storage's category:
- weights, gradients, optimizer_state: alive at the start (parameters and buffers; .grad; optimizer.state),
  or marked when made: a gradient when autograd accumulates it into a parameter, optimizer state after the
  optimizer's step;
- activations_mlp / activations_rest: made inside a gated MLP's forward / any other module's forward of the
  causal LM (a checkpointed layer's recompute in backward included);
- logits_loss: made inside the causal LM's own forward outside its decoder (lm_head and the loss), inside
  the loss module given as `loss_head`, or in backward before the gradient reaches the loss's input;
- transient: everything else (the rest of backward: gradients of activations, temporaries; the optimizer's
  temporaries).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .memory import LiveTensorBytes, optimizer_state

CATEGORIES = ("weights", "gradients", "optimizer_state", "activations_mlp", "activations_rest", "logits_loss",
              "transient")
LABELS = {"weights": "weights", "gradients": "grads", "optimizer_state": "optim", "activations_mlp": "act MLP",
          "activations_rest": "act rest", "logits_loss": "logits+loss", "transient": "transient"}
WORDS = {"gradients": "gradients", "optimizer_state": "optimizer state", "activations_mlp": "MLP activations",
         "activations_rest": "activations outside the MLP", "logits_loss": "logits and loss",
         "transient": "backward temporaries"}


def peak_is(breakdown: dict) -> str:
    """The largest part of the peak besides the weights, in words."""
    parts = {k: v for k, v in breakdown.items() if k in WORDS}
    return WORDS[max(parts, key=parts.get)] if parts else "weights"


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside `model` (itself, or under PEFT / accelerate wrappers): the first
    PreTrainedModel among its modules that has output embeddings (lm_head)."""
    from transformers import PreTrainedModel

    for m in model.modules():
        if isinstance(m, PreTrainedModel) and isinstance(m.get_output_embeddings(), nn.Module):
            return m
    raise TypeError(f"{type(model).__name__} holds no transformers model with output embeddings (lm_head)")


def _is_gated_mlp(module: nn.Module) -> bool:
    from .recipes import match_recipe

    return match_recipe(module) is not None


class PeakBreakdown(LiveTensorBytes):
    """LiveTensorBytes that remembers which storages were live at the peak, with the phase and module each
    was made in. block: every storage rounded up to it (512: the CUDA caching allocator's block, as
    max_memory_allocated counts). device_only: count meta storages only (a planned CUDA step, whose
    CPU tensors, e.g. AdamW's step counts, stay in host memory); else every storage, meta ones included.
    (Views of resident tensors and in-place updates share an input's storage: never counted, as a
    device's allocator does not.)"""

    def __init__(self, block: int = 1, device_only: bool = False):
        super().__init__()
        self.block = block
        self.device_only = device_only
        self.phase = "forward"
        self.where: list[str] = []  # module context stack: "mlp", "rest", "head"
        self.head_backward = False  # backward before the grad reaches the loss's input: logits and loss
        self.made: list[tuple[int, str, str | None]] = []  # serial -> (bytes, phase, context)
        self.marks: dict[int, str] = {}  # serial -> category decided after creation (gradients, optimizer state)
        self._serial: dict[int, int] = {}  # id(storage) -> serial, for live storages
        self.at_peak: list[int] = []
        self.peak_phase = None
        self.resident: dict[str, int] = {}

    def counts(self, st: torch.UntypedStorage) -> bool:
        return st.device.type == "meta" if self.device_only else True

    def rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.block) * self.block

    def _freed(self, key: int, nbytes: int, _ref) -> None:
        super()._freed(key, nbytes, _ref)
        self._serial.pop(key, None)

    def _made(self, key: int, nbytes: int) -> None:
        context = self.where[-1] if self.where else ("head" if self.head_backward else None)
        self._serial[key] = len(self.made)
        self.made.append((nbytes, self.phase, context))

    def _new_peak(self) -> None:
        self.at_peak = list(self._serial.values())
        self.peak_phase = self.phase

    # ---- what the step tells the tracker ----------------------------------------------------------

    def enter_phase(self, phase: str) -> None:
        """"forward", "backward" (the loss's backward comes first: logits_loss until the grad reaches the
        loss's input) or "optimizer"."""
        self.phase, self.head_backward = phase, phase == "backward"

    def mark(self, tensors, category: str) -> None:
        for t in tensors:
            serial = self._serial.get(id(t.untyped_storage()))
            if serial is not None:
                self.marks[serial] = category

    def mark_optimizer_state(self, optimizer) -> None:
        self.mark(optimizer_state(optimizer), "optimizer_state")

    def resident_split(self, model: nn.Module, optimizer=None) -> dict[str, int]:
        """Bytes alive before the step, by category, each storage once (rounded, counted as _track counts)."""
        groups = {"weights": [*model.parameters(), *model.buffers()],
                  "gradients": [p.grad for p in model.parameters() if p.grad is not None],
                  "optimizer_state": optimizer_state(optimizer) if optimizer is not None else []}
        seen, out = set(), {}
        for category, tensors in groups.items():
            out[category] = 0
            for t in tensors:
                st = t.untyped_storage()
                if st._cdata not in seen and self.counts(st):
                    seen.add(st._cdata)
                    out[category] += self.rounded(st.nbytes())
        return out

    @contextlib.contextmanager
    def watching(self, model: nn.Module, optimizer=None, loss_head: nn.Module | None = None, around=None):
        """The block is one training step of `model`: counts what is resident, hooks the modules and the
        trainable parameters' gradients, and runs the block under this dispatch mode.

        loss_head: the module that turns the decoder's output into the loss when it is not the causal
        LM's own forward (swiglu_hf.loss.ChunkedLMHead); default: lm_head inside the LM's forward.
        around: a context manager entered while any hooked module runs (the planner's attention mode),
        so that it is on in a checkpointed layer's recompute during backward too."""
        self.resident = self.resident_split(model, optimizer)
        trainable = [p for p in model.parameters() if p.requires_grad]
        handles = [p.register_post_accumulate_grad_hook(lambda p: self.mark([p.grad], "gradients"))
                   for p in trainable]
        try:
            with self._contexts(model, loss_head, around), self:
                yield self
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def _contexts(self, model: nn.Module, loss_head: nn.Module | None, around):
        """Module hooks that say which part of the model makes each tensor: the gated MLPs ("mlp"), the
        causal LM's own forward and the loss ("head"), everything else ("rest"). Nothing inside a gated MLP
        gets a hook (a hook on a projection would change the path swiglu_hf takes, see gated.plain_linear).
        The outermost hooked module's forward enters `around`: inside module forwards only (a mode entered
        around the whole step would be off for all of backward: a mode is off while it handles a call,
        here backward())."""
        lm = causal_lm(model)
        head = loss_head if loss_head is not None else lm.get_output_embeddings()
        tags, inside_mlp = {}, set()
        for m in lm.modules():
            if id(m) in inside_mlp:
                continue
            if _is_gated_mlp(m):
                tags[id(m)] = "mlp"
                inside_mlp.update(id(sub) for sub in m.modules())
            else:
                tags[id(m)] = "rest"
        for m in (lm, *head.modules()):
            tags[id(m)] = "head"
        hooked = [m for m in (*lm.modules(), *head.modules()) if id(m) in tags]

        def push(m, *_):
            if not self.where and around is not None:
                around.__enter__()
            self.where.append(tags[id(m)])

        def pop(*_):
            self.where.pop()
            if not self.where and around is not None:
                around.__exit__(None, None, None)

        def leave_head(grad):  # the loss's backward is done once the grad reaches its input
            self.head_backward = False
            return grad

        def watch_head_input(m, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
                args[0].register_hook(leave_head)

        handles = []
        for m in dict.fromkeys(hooked):
            handles.append(m.register_forward_pre_hook(push))
            handles.append(m.register_forward_hook(pop, always_call=True))
        handles.append(head.register_forward_pre_hook(watch_head_input))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # ---- the answer ---------------------------------------------------------------------------------

    def breakdown(self) -> dict:
        """Bytes per category at the peak: what was resident at the start plus what was made and live."""
        out = dict.fromkeys(CATEGORIES, 0)
        out.update(self.resident)
        for serial in self.at_peak:
            nbytes, _phase, context = self.made[serial]
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

    def result(self) -> dict:
        resident = sum(self.resident.values())
        breakdown = self.breakdown()
        peak = resident + self.peak
        assert sum(breakdown.values()) == peak, (breakdown, peak)
        return {"peak_bytes": peak, "resident_bytes": resident, "breakdown": breakdown,
                "peak_phase": self.peak_phase}
