"""Class-level mode: patch every Transformers model constructed while it is enabled.

    with swiglu_hf.patching(backend="torch"):
        model = AutoModelForCausalLM.from_config(config)     # patched at the end of construction
        other = AutoModelForCausalLM.from_pretrained(path)   # patched after its weights are loaded

    enable_class_patching(**kw) -> token ... disable_class_patching(token)   # the explicit pair

Mechanism: while enabled, three attributes of transformers' PreTrainedModel are wrapped:
`__init__` (every model calls it first, via super().__init__(config)) pushes the model on a
per-thread construction stack; `post_init` (every model calls it last) pops it and, for the
outermost model only (inner ones, e.g. a multimodal model's language tower, are part of it),
runs apply_swiglu_patch(model, **kw). "Outermost" means no other model on the stack is still
inside its own `__init__` (checked on the live call stack), so a model whose class never calls
post_init leaves no stale entry that would hide later models. A model built on the meta device
(from_pretrained builds that way before loading) has no data for the probe, so `from_pretrained`
is wrapped too and patches the loaded model (the first element when output_loading_info=True
returns a tuple); a meta-device model built directly is left unpatched with a warning.

Every model built inside is patched, including ones that have no gated MLP at all (GPT-2, a
reward model's head, a vision tower built on its own): those are skipped with a warning instead
of raising NoGatedMLPError, so building them inside the block never fails. Other errors of
apply_swiglu_patch (strict=True refusals) still raise.
Nothing else changes; the three class attributes are put back exactly (the same objects, or
absent again) when the last enable is disabled, in a `finally` for `patching()`. Enables nest:
the innermost active keyword arguments apply. Only models derived from PreTrainedModel are seen.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import sys
import threading
import warnings
import weakref

from .backend import check_backend
from .errors import InvalidInputError, NoGatedMLPError
from .mlp import check_tile_tokens

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


def apply_options() -> tuple[str, ...]:
    """The keyword arguments apply_swiglu_patch takes (read from its signature: the one definition)."""
    from .patch import apply_swiglu_patch

    sig = inspect.signature(apply_swiglu_patch)
    return tuple(n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY)


def check_apply_kwargs(kwargs: dict, caller: str = "apply_swiglu_patch") -> dict:
    """Validate apply_swiglu_patch keyword arguments up front, as apply_swiglu_patch does; returns them
    normalised (tile_tokens). Used by the class-level mode and SwigluCallback."""
    known = apply_options()
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise InvalidInputError(
            f"{caller}: unknown apply_swiglu_patch argument(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )
    if "backend" in kwargs:
        check_backend(kwargs["backend"])
    if "tile_tokens" in kwargs:
        kwargs["tile_tokens"] = check_tile_tokens(kwargs["tile_tokens"])
    if kwargs.get("filter_fn") is not None and not callable(kwargs["filter_fn"]):
        raise InvalidInputError(f"{caller}: filter_fn must be a callable (name, module) -> bool, got {kwargs['filter_fn']!r}")
    if "strict" in kwargs and not isinstance(kwargs["strict"], bool):
        raise InvalidInputError(f"{caller}: strict must be True or False, not {kwargs['strict']!r}")
    return kwargs


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
    try:
        apply_swiglu_patch(model, **kwargs)
    except NoGatedMLPError as err:  # class mode patches every model built: one without a gated MLP is skipped
        warnings.warn(
            f"swiglu_hf class-level patching: {type(model).__name__} left unpatched: {err}", UserWarning, stacklevel=3
        )


def _wrap_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        stack = _building()
        stack[:] = [r for r in stack if _under_construction(r())]  # drops models that never called post_init
        stack.append(weakref.ref(self))
        try:
            original(self, *args, **kwargs)
        except BaseException:
            _remove(self)
            raise

    return __init__


def _under_construction(model) -> bool:
    """Whether an `__init__` of `model` is running on this thread's call stack."""
    if model is None:
        return False
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__init__" and code.co_argcount and frame.f_locals.get(code.co_varnames[0]) is model:
            return True
        frame = frame.f_back
    return False


def _remove(model) -> bool:
    """Drop `model` from the construction stack; True if it was the outermost model being built
    (no model below it is still inside its __init__: entries of models that skipped post_init don't count)."""
    stack = _building()
    for i in range(len(stack) - 1, -1, -1):
        if stack[i]() is model:
            del stack[i]
            return not any(_under_construction(r()) for r in stack[:i])
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
        if _local.loading == 0:
            # output_loading_info=True returns (model, loading_info)
            target = model[0] if isinstance(model, tuple) and model else model
            if isinstance(target, _base()):
                _patch(target)
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


def enable_class_patching(**apply_kwargs) -> int:
    """Patch every PreTrainedModel constructed from now on with apply_swiglu_patch(model, **apply_kwargs).

    Returns a token for disable_class_patching. Enables nest (the latest arguments apply).
    """
    kwargs = check_apply_kwargs(dict(apply_kwargs), "enable_class_patching")
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
    """Within the block, every constructed Transformers model is patched (see the module doc).

    Models without a gated MLP (GPT-2, a reward model, a vision tower) are skipped with a warning,
    not an error; strict=True refusals of gated modules still raise.
    """
    token = enable_class_patching(**apply_kwargs)
    try:
        yield
    finally:
        disable_class_patching(token)
