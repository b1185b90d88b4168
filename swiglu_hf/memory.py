"""Measure the activation memory autograd keeps for backward.

    nbytes = saved_activation_bytes(lambda: mlp(x))

Every tensor autograd saves while `fn` runs passes through a torch.autograd.graph.saved_tensors_hooks
pack hook. We count each underlying storage once (a view keeps its whole storage alive, and x saved
by gate_proj and again by up_proj is one buffer) and skip parameters and views of parameters (they
live for the whole run whatever the MLP does). What the hooks cannot see is not counted: tensors a
torch.utils.checkpoint region keeps in its closure, and anything saved inside another
saved_tensors_hooks context (the innermost hooks win). The patched forwards save through
ctx.save_for_backward for exactly this reason: their memory is visible to this measurement.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from torch import nn


def _storage_key(t: torch.Tensor):
    storage = t.untyped_storage()
    ptr = storage.data_ptr()
    # meta and empty storages all report data_ptr 0: fall back to the StorageImpl's identity.
    return (t.device, ptr) if ptr else (t.device, "impl", storage._cdata)


def _is_parameter(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter)


@contextlib.contextmanager
def track_saved(exclude: Iterable[torch.Tensor] = ()):
    """Yields a dict {storage: nbytes}, filled with what autograd saves for backward in the block.

    Parameters (and views of them, e.g. the W.t() that a linear saves) are left out, as is every
    tensor sharing a storage with one in `exclude` (pass e.g. model buffers, or the inputs if they
    should not count).
    """
    skip = {_storage_key(t) for t in exclude}
    seen: dict = {}

    def pack(t: torch.Tensor):
        if not _is_parameter(t):
            key = _storage_key(t)
            if key not in skip:
                seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def saved_activation_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of distinct storages autograd saves for backward while `fn()` runs (see track_saved).

    The output of `fn` is discarded once measured; grad mode is left as it is, so under
    torch.no_grad() the answer is 0.
    """
    with track_saved(exclude) as seen:
        out = fn()
    del out
    return sum(seen.values())
