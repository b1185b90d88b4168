"""Class-level mode: patch every Transformers model constructed while it is enabled.

    with swiglu_hf.patching(backend="torch"):
        model = AutoModelForCausalLM.from_config(config)     # patched at the end of construction
        other = AutoModelForCausalLM.from_pretrained(path)   # patched after its weights are loaded

    enable_class_patching(**kw) -> token ... disable_class_patching(token)   # the explicit pair

Mechanism: while enabled, three attributes of transformers' PreTrainedModel are wrapped:
`__init__` (every model calls it first, via super().__init__(config)) pushes the model on a
per-thread construction stack; `post_init` (every model calls it last) pops it and, for the
outermost model only (inner ones, e.g. a multimodal model's language tower, are part of it),
runs apply_swiglu_patch(model, **kw). A model built on the meta device (from_pretrained builds
that way before loading) has no data for the probe, so `from_pretrained` is wrapped too and
patches the loaded model; a meta-device model built directly is left unpatched with a warning.
Nothing else changes; the three class attributes are put back exactly (the same objects, or
absent again) when the last enable is disabled, in a `finally` for `patching()`. Enables nest:
the innermost active keyword arguments apply. Only models derived from PreTrainedModel are seen.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import warnings
import weakref

from .backend import check_backend
from .errors import InvalidInputError
from .mlp import check_tile_tokens

_KWARGS = ("backend", "filter_fn", "tile_tokens", "strict")
_WRAPPED = ("__init__", "post_init", "from_pretrained")
_MISSING = object()

_lock = threading.RLock()
_active: list[tuple[int, dict]] = []  # (token, apply kwargs), innermost last
_saved: dict[str, object] = {}  # PreTrainedModel.__dict__ entries replaced while enabled
_tokens = itertools.count(1)
_local = threading.local()  # .building: weakrefs of models under construction; .loading: from_pretrained depth


def _base():
    from transformers import PreTrainedModel

    return PreTrainedModel


def _building() -> list:
    if not hasattr(_local, "building"):
        _local.building = []
    return _local.building


def _current_kwargs() -> dict | None:
    with _lock:
        return dict(_active[-1][1]) if _active else None


def _patch(model) -> None:
    from .patch import apply_swiglu_patch

    kwargs = _current_kwargs()
    if kwargs is None:
        return
    if any(p.is_meta for p in model.parameters()):
        if getattr(_local, "loading", 0) == 0:
            warnings.warn(
                f"swiglu_hf class-level patching: {type(model).__name__} was built on the meta device and "
                "has no weights to probe; it was left unpatched. Call apply_swiglu_patch(model) after loading.",
                stacklevel=3,
            )
        return
    apply_swiglu_patch(model, **kwargs)


def _wrap_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        stack = _building()
        stack[:] = [r for r in stack if r() is not None]
        stack.append(weakref.ref(self))
        try:
            original(self, *args, **kwargs)
        except BaseException:
            _remove(self)
            raise

    return __init__


def _remove(model) -> bool:
    """Drop `model` from the construction stack; True if it was the outermost model being built."""
    stack = _building()
    for i in range(len(stack) - 1, -1, -1):
        if stack[i]() is model:
            del stack[i]
            return not any(r() is not None for r in stack[:i])
    return False


def _wrap_post_init(original):
    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        try:
            result = original(self, *args, **kwargs)
        except BaseException:
            _remove(self)
            raise
        if _remove(self):
            _patch(self)
        return result

    return post_init


def _wrap_from_pretrained(original):
    func = original.__func__

    @functools.wraps(func)
    def from_pretrained(cls, *args, **kwargs):
        _local.loading = getattr(_local, "loading", 0) + 1
        try:
            model = func(cls, *args, **kwargs)
        finally:
            _local.loading -= 1
        if _local.loading == 0 and isinstance(model, _base()):
            _patch(model)
        return model

    return classmethod(from_pretrained)


def _install() -> None:
    """Wrap the three attributes; all or none: a failure part-way puts back what was replaced."""
    base = _base()
    for name in _WRAPPED:
        _saved[name] = base.__dict__.get(name, _MISSING)
    try:
        base.__init__ = _wrap_init(base.__dict__["__init__"])
        base.post_init = _wrap_post_init(base.__dict__["post_init"])
        base.from_pretrained = _wrap_from_pretrained(base.__dict__["from_pretrained"])
    except BaseException:
        _uninstall()
        raise


def _uninstall() -> None:
    base = _base()
    for name, value in _saved.items():
        if value is _MISSING:
            if name in base.__dict__:
                delattr(base, name)
        else:
            setattr(base, name, value)
    _saved.clear()
    _building().clear()


def _check(kwargs: dict) -> dict:
    unknown = sorted(set(kwargs) - set(_KWARGS))
    if unknown:
        raise InvalidInputError(f"unknown apply_swiglu_patch argument(s) {', '.join(unknown)}; known: {', '.join(_KWARGS)}")
    if "backend" in kwargs:
        check_backend(kwargs["backend"])
    if "tile_tokens" in kwargs:
        kwargs["tile_tokens"] = check_tile_tokens(kwargs["tile_tokens"])
    return kwargs


def enable_class_patching(**apply_kwargs) -> int:
    """Patch every PreTrainedModel constructed from now on with apply_swiglu_patch(model, **apply_kwargs).

    Returns a token for disable_class_patching. Enables nest (the latest arguments apply).
    """
    kwargs = _check(dict(apply_kwargs))
    with _lock:
        if not _active:
            _install()
        token = next(_tokens)
        _active.append((token, kwargs))
        return token


def disable_class_patching(token: int | None = None) -> None:
    """Undo enable_class_patching(`token`), or every active enable when token is None.

    When none is left active, PreTrainedModel's attributes are exactly what they were before.
    """
    with _lock:
        if token is None:
            _active.clear()
        else:
            _active[:] = [entry for entry in _active if entry[0] != token]
        if not _active and _saved:
            _uninstall()


def class_patching_enabled() -> bool:
    with _lock:
        return bool(_active)


@contextlib.contextmanager
def patching(**apply_kwargs):
    """Within the block, every constructed Transformers model is patched (see the module doc)."""
    token = enable_class_patching(**apply_kwargs)
    try:
        yield
    finally:
        disable_class_patching(token)
