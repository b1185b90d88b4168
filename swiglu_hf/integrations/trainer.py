"""Hooks for training frameworks: one line to run a Hugging Face `Trainer` with the fused MLP.

    from swiglu_hf.integrations import SwigluCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[SwigluCallback()])

The callback patches the model the Trainer trains at `on_train_begin`, before the first step, with every
apply_swiglu_patch keyword argument (backend=, filter_fn=, tile_tokens=, strict=; validated when the
callback is built), and records the patched module names in `patched`. That equals calling
`apply_swiglu_patch(model)` before `Trainer(...)` only while the Trainer has not yet wrapped or
sharded the model at on_train_begin: with FSDP or DeepSpeed ZeRO-3 the model the callback sees may be
already wrapped (parameters flattened or partitioned, empty on this rank). ZeRO-3 is handled (the
probe gathers; tested: tests/test_engines.py trainer_zero3/callback) and FSDP1/FSDP2 shards defer the
probe to each MLP's first forward (tested through accelerator.prepare, not through the Trainer);
calling apply_swiglu_patch(model) before building the Trainer is still the plainest order. A model with nothing to patch raises NoGatedMLPError at on_train_begin,
before any step runs. The patch stays after training (save_pretrained writes the usual state_dict either way); pass revert_at_end=True to
put the stock forwards back at `on_train_end`.
"""

from __future__ import annotations

from ..options import PatchOptions
from ..patch import apply_swiglu_patch, patched_modules, revert_swiglu_patch

try:  # transformers is a dependency of the package, but keep this module importable without it
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object


class SwigluCallback(TrainerCallback):
    """`transformers.TrainerCallback` that applies apply_swiglu_patch(model, **kwargs) at train begin."""

    def __init__(self, *, revert_at_end: bool = False, **patch_kwargs):
        # fail at construction, not mid-run
        self.patch_kwargs = PatchOptions.from_kwargs(dict(patch_kwargs), "SwigluCallback").as_kwargs()
        self.revert_at_end = revert_at_end
        self.patched: list[str] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            from ..errors import InvalidInputError

            raise InvalidInputError("SwigluCallback.on_train_begin got no model; pass callbacks=[...] to a Trainer")
        apply_swiglu_patch(model, **self.patch_kwargs)
        self.patched = patched_modules(model)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.revert_at_end and model is not None:
            revert_swiglu_patch(model)
        return control
