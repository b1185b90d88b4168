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
import weakref
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


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


# ---- live tensor bytes: the peak memory of a block of ops on any device -------------------
# CPU has no allocator counter and RSS is glibc's heap high-water mark, not live tensors, so a
# TorchDispatchMode sees every tensor an op returns and counts each storage from creation until a
# weakref finalizer says it was freed. Exact and repeatable: the same ops give the same bytes.

def _storages(t: torch.Tensor):
    """The untyped storages behind `t` (a DTensor or other wrapper subclass: its inner tensors)."""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return [t.untyped_storage()]
    todo, out = [t], []
    while todo:
        x = todo.pop()
        if is_traceable_wrapper_subclass(x):
            todo.extend(v for v in (getattr(x, a) for a in x.__tensor_flatten__()[0]) if isinstance(v, torch.Tensor))
        else:
            try:
                out.append(x.untyped_storage())
            except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
                pass
    return out


def resident_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and shared storages counted once)."""
    seen = {}
    for t in tensors:
        for st in _storages(t):
            if st.device.type != "meta":
                seen[(st.device, st.data_ptr()) if st.data_ptr() else id(st)] = st.nbytes()
    return sum(seen.values())


def optimizer_state(optimizer) -> list[torch.Tensor]:
    """The optimizer's state tensors (accelerate's AcceleratedOptimizer forwards .state; None: none)."""
    state = getattr(optimizer, "state", {})
    return [v for per_param in state.values() for v in per_param.values() if isinstance(v, torch.Tensor)]


def training_state(model: torch.nn.Module, optimizer) -> list[torch.Tensor]:
    """Parameters, buffers, gradients and optimizer state tensors."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    return tensors + optimizer_state(optimizer)


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of storages created by ops inside the block that are still alive; keeps the peak."""

    def __init__(self):
        from torch.distributed.tensor import DTensor

        super().__init__()
        self._dtensor = DTensor
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int, _ref) -> None:
        self.live -= nbytes
        self._refs.pop(key, None)

    # What a subclass may change (swiglu_hf.peak: meta storages, allocator rounding, a record per storage)
    def counts(self, st: torch.UntypedStorage) -> bool:
        return st.device.type != "meta"  # a CPU or device run: meta storages hold nothing

    def rounded(self, nbytes: int) -> int:
        return nbytes

    def _made(self, key: int, nbytes: int) -> None:
        """A storage was counted (before `live` includes it)."""

    def _new_peak(self) -> None:
        """`live` just rose above the previous peak."""

    def _track(self, st: torch.UntypedStorage) -> None:
        key = id(st)
        ref = self._refs.get(key)
        if ref is not None and ref() is st:
            return  # already counted (a view, or an op returning its input)
        nbytes = st.nbytes()
        if nbytes == 0 or not self.counts(st):
            return
        nbytes = self.rounded(nbytes)
        self._refs[key] = weakref.ref(st, lambda r, k=key, n=nbytes: self._freed(k, n, r))
        self._made(key, nbytes)
        self.live += nbytes
        if self.live > self.peak:
            self.peak = self.live
            self._new_peak()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._dtensor in types:
            return NotImplemented  # let DTensor unwrap to local ops, which come back here
        out = func(*args, **(kwargs or {}))
        # An output sharing an input's storage (a view: W.t(), reshape, slicing; an in-place op) allocated
        # nothing: the storage is either tracked already or was resident before the block.
        inputs = {st._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
                  for st in _storages(t)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                for st in _storages(t):
                    if st._cdata not in inputs:
                        self._track(st)
        return out
