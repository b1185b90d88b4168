"""The causal-LM loss a chunk of tokens at a time: no more than one chunk's logits alive.

    loss = chunked_causal_lm_loss(hidden_states, lm_head, labels, chunk_tokens=1024)
    loss = ChunkedCausalLMLoss(model)(input_ids, labels)    # the decoder, then the loss above

transformers' causal LMs compute the logits of every token (B x T x vocabulary in the model dtype), a
float32 copy and a float32 log-softmax for the loss (ForCausalLMLoss), and keep them for backward: with
Llama-3's vocabulary of 128,256 about 1.5 MiB per token, which is the peak of a LoRA run with gradient
checkpointing. Here each chunk's loss is a non-reentrant torch.utils.checkpoint region: forward keeps only
the chunk's hidden states (views of the decoder's output) and labels, backward recomputes the chunk's
logits and frees them before the next chunk.

Same loss as ForCausalLMLoss: labels shifted left by one (the last position ignored), ignore_index -100,
float32 log-softmax, the mean over tokens whose label is not ignored (or the sum over num_items_in_batch,
as the Trainer passes under gradient accumulation). Not bitwise: the sum runs in another order. The logit
steps some families take after lm_head (Gemma-2/3's final_logit_softcapping, Cohere's logit_scale,
Granite's logits_scaling) are read off the model's own forward and applied per chunk in the same order; a
forward that does anything else is refused (UnsupportedLossError).
"""

from __future__ import annotations

import inspect
import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import UnsupportedLossError

CHUNK_TOKENS = 1024
IGNORE_INDEX = -100
INSTEAD = "use the model's own loss (--loss model)"


def _apply(logits: torch.Tensor, steps) -> torch.Tensor:
    for op, value in steps:
        if op == "mul":
            logits = logits * value
        elif op == "div":
            logits = logits / value
        else:  # softcap, written as the families write it
            logits = torch.tanh(logits / value) * value
    return logits


def _chunk_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, steps, ignore_index: int):
    logits = _apply(lm_head(hidden), steps).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def chunked_causal_lm_loss(hidden_states: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor,
                           chunk_tokens: int = CHUNK_TOKENS, *, ignore_index: int = IGNORE_INDEX,
                           num_items_in_batch=None, logit_steps=()) -> torch.Tensor:
    """ForCausalLMLoss(lm_head(hidden_states) with `logit_steps` applied, labels), a chunk of tokens at a time.

    hidden_states: (B, T, H), the decoder's output; labels: (B, T), not yet shifted; lm_head: any module
    (a LoRA-wrapped or frozen linear); logit_steps: ("mul" | "div" | "softcap", value) pairs applied to
    the logits in order, in their dtype, before the float32 cast (ChunkedLMHead reads them off a model).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = shifted.reshape(-1).to(tokens.device)
    grad = torch.is_grad_enabled()
    total = None
    for hidden, target in zip(tokens.split(chunk_tokens), targets.split(chunk_tokens)):
        if grad:
            part = checkpoint(_chunk_loss_sum, hidden, target, lm_head, logit_steps, ignore_index, use_reentrant=False)
        else:
            part = _chunk_loss_sum(hidden, target, lm_head, logit_steps, ignore_index)
        total = part if total is None else total + part
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# ---- a model's decoder, lm_head and logit steps ------------------------------------------------

_HEAD_CALL = re.compile(r"^\s*logits = self\.lm_head\(hidden_states(\[:, slice_indices, :\])?\)\s*$", re.M)
_KNOWN_STEPS = (  # (the lines of a family's forward after the lm_head call, the step they make)
    (re.compile(r"if self\.config\.final_logit_softcapping is not None:\s*logits = logits / self\.config\."
                r"final_logit_softcapping\s*logits = torch\.tanh\(logits\)\s*logits = logits \* self\.config\."
                r"final_logit_softcapping"), lambda lm: ("softcap", lm.config.final_logit_softcapping)),
    (re.compile(r"logits = logits \* self\.logit_scale(\s*#.*)?"), lambda lm: ("mul", lm.logit_scale)),
    (re.compile(r"logits = logits / self\.config\.logits_scaling(\s*#.*)?"), lambda lm: ("div", lm.config.logits_scaling)),
)


def logit_steps(lm: nn.Module) -> tuple:
    """What `lm`'s forward does to lm_head's output before its loss, as ("mul" | "div" | "softcap", value)
    steps; UnsupportedLossError when it does anything else or its loss is not the plain causal-LM loss."""
    name = type(lm).__name__
    try:
        source = inspect.getsource(type(lm).forward)
    except (OSError, TypeError) as err:
        raise UnsupportedLossError(f"{name}: cannot read its forward to see how it makes logits ({err}); {INSTEAD}")
    calls = list(_HEAD_CALL.finditer(source))
    end = source.find("loss = None", calls[0].end()) if len(calls) == 1 else -1
    decoder_out = re.search(r"hidden_states = outputs(\.last_hidden_state|\[0\])\s", source[:calls[0].start()]) if calls else None
    if end < 0 or decoder_out is None or "self.loss_function(" not in source[end:]:
        raise UnsupportedLossError(f"{name}'s forward does not compute `logits = self.lm_head(hidden_states)` once, on "
                                   f"its decoder's output, then `self.loss_function(...)`; the chunked loss would not "
                                   f"be its loss: {INSTEAD}")
    between, steps = source[calls[0].end():end], []
    for pattern, step in _KNOWN_STEPS:
        found = pattern.search(between)
        if found:
            steps.append((found.start(), step))
            between = between[:found.start()] + " " * (found.end() - found.start()) + between[found.end():]
    if between.strip():
        raise UnsupportedLossError(f"{name} changes its logits after lm_head with steps swiglu_hf.loss does not know "
                                   f"({' '.join(between.split())[:200]!r}); {INSTEAD}")
    if getattr(lm.config, "output_router_logits", False):
        raise UnsupportedLossError(f"{name} adds the router's auxiliary loss (config.output_router_logits=True), which "
                                   f"the chunked loss leaves out; set it False or {INSTEAD}")
    made = [make(lm) for _, make in sorted(steps, key=lambda s: s[0])]
    return tuple((op, value) for op, value in made if value is not None)


class ChunkedLMHead(nn.Module):
    """lm_head and the loss as one module: forward(hidden_states, labels) -> the chunked causal-LM loss.
    (A module so that memory trackers see the loss as one region: swiglu_hf.peak's loss_head.)"""

    def __init__(self, lm_head: nn.Module, steps=(), chunk_tokens: int = CHUNK_TOKENS):
        super().__init__()
        self.lm_head, self.steps, self.chunk_tokens = lm_head, tuple(steps), chunk_tokens

    def forward(self, hidden_states, labels, num_items_in_batch=None):
        return chunked_causal_lm_loss(hidden_states, self.lm_head, labels, self.chunk_tokens,
                                      num_items_in_batch=num_items_in_batch, logit_steps=self.steps)


class ChunkedCausalLMLoss:
    """loss(input_ids, labels) of a transformers causal LM (plain, or under PEFT / accelerate wrappers),
    through its decoder (lm.get_decoder()) and ChunkedLMHead over its output embeddings
    (lm.get_output_embeddings()), as transformers finds them. Single process: the decoder is called
    directly, outside a DDP/FSDP/DeepSpeed wrapper's forward."""

    def __init__(self, model: nn.Module, chunk_tokens: int | None = None):  # None: CHUNK_TOKENS
        from .peak import causal_lm

        try:
            self.lm = causal_lm(model)
        except TypeError as err:
            raise UnsupportedLossError(f"{err}; {INSTEAD}") from None
        self.decoder = self.lm.get_decoder()
        if not isinstance(self.decoder, nn.Module) or self.decoder is self.lm:
            raise UnsupportedLossError(f"{type(self.lm).__name__}.get_decoder() gives no decoder module; {INSTEAD}")
        self.head = ChunkedLMHead(self.lm.get_output_embeddings(), logit_steps(self.lm), chunk_tokens or CHUNK_TOKENS)

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.decoder(input_ids=input_ids, use_cache=False, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.head(hidden, labels)
