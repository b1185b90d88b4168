"""Hooks for training frameworks: one line to run a Hugging Face `Trainer` with the fused MLP.

    from swiglu_hf.integrations import SwigluCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[SwigluCallback()])

is the same as calling `apply_swiglu_patch(model)` before `Trainer(...)`: the callback patches
the model the Trainer trains at `on_train_begin`, before the first step (the same apply_swiglu_patch
keyword arguments are accepted), and records the patched module names in `patched`. A model
with nothing to patch raises NoGatedMLPError there, before any step runs. The patch stays after
training (save_pretrained writes the usual state_dict either way); pass revert_at_end=True to
put the stock forwards back at `on_train_end`.
"""

from __future__ import annotations

from .patch import apply_swiglu_patch, patched_modules, revert_swiglu_patch

try:  # transformers is a dependency of the package, but keep this module importable without it
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object


class SwigluCallback(TrainerCallback):
    """`transformers.TrainerCallback` that applies apply_swiglu_patch(model, **kwargs) at train begin."""

    def __init__(self, *, revert_at_end: bool = False, **patch_kwargs):
        from .backend import check_backend
        from .errors import InvalidInputError
        from .mlp import check_tile_tokens

        unknown = set(patch_kwargs) - {"backend", "filter_fn", "tile_tokens"}
        if unknown:
            raise InvalidInputError(
                f"SwigluCallback got unknown argument(s) {', '.join(sorted(unknown))}; "
                "it takes apply_swiglu_patch's backend=, filter_fn=, tile_tokens= and revert_at_end="
            )
        check_backend(patch_kwargs.get("backend", "auto"))  # fail at construction, not mid-run
        check_tile_tokens(patch_kwargs.get("tile_tokens"))
        self.patch_kwargs = patch_kwargs
        self.revert_at_end = revert_at_end
        self.patched: list[str] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            from .errors import InvalidInputError

            raise InvalidInputError("SwigluCallback.on_train_begin got no model; pass callbacks=[...] to a Trainer")
        apply_swiglu_patch(model, **self.patch_kwargs)
        self.patched = patched_modules(model)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.revert_at_end and model is not None:
            revert_swiglu_patch(model)
        return control
