"""Class-level mode: patch every Transformers model built while it is enabled.

    with swiglu_hf.patching(backend="torch"):
        model = AutoModelForCausalLM.from_config(config)     # patched when construction ends
        other = AutoModelForCausalLM.from_pretrained(path)   # patched after its weights are loaded

    enable_class_patching(**kw) -> token ... disable_class_patching(token)   # the explicit pair

It is for code that builds the model where you cannot reach it (a launcher, a library's train()):
where you hold the model, `apply_swiglu_patch(model)` or, with a Trainer, SwigluCallback is simpler.

Mechanism, through transformers' own entry points only: while enabled, PreTrainedModel's
`post_init` (every model calls it at the end of its __init__) and the loading classmethods
`from_pretrained` and `_from_config` (what from_config and the Auto classes call) are wrapped.
Inside a loading call, nothing is patched until the outermost one returns; then the loaded model is
patched once (with its weights, and after transformers' DeepSpeed ZeRO-3 integration has built it
under zero.Init: the probe gathers the weights it needs). Outside one (a model class called
directly), each model is patched at its post_init; a model built inside another (a vision-language
model's language tower) is patched at its own post_init and the outer one finds it already patched.
A model built on the meta device has no data for the probe: it is left unpatched with a warning.

Every model built inside is patched, including ones with no gated MLP at all (GPT-2, a reward head,
a vision tower): those are skipped with a warning instead of raising NoGatedMLPError. Other errors
of apply_swiglu_patch (strict=True refusals) still raise. The wrapped attributes are put back exactly
(the same objects, or absent again) when the last enable is disabled, in a `finally` for
`patching()`. Enables nest: the innermost active arguments apply.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import warnings

from .errors import NoGatedMLPError
from .options import PatchOptions

_WRAPPED = ("post_init", "from_pretrained", "_from_config")
_MISSING = object()

_lock = threading.RLock()
_active: list[tuple[int, PatchOptions]] = []  # innermost last
_saved: dict[str, object] = {}  # PreTrainedModel.__dict__ entries replaced while enabled
_tokens = itertools.count(1)
_local = threading.local()  # .loading: depth of loading classmethods on this thread


def _base():
    from transformers import PreTrainedModel

    return PreTrainedModel


def _loading() -> int:
    return getattr(_local, "loading", 0)


def _current() -> PatchOptions | None:
    with _lock:
        return _active[-1][1] if _active else None


def _patch(model) -> None:
    from .patch import apply_swiglu_patch

    options = _current()
    if options is None:
        return
    if any(p.is_meta for p in model.parameters()):
        warnings.warn(
            f"swiglu_hf class-level patching: {type(model).__name__} was built on the meta device and "
            "has no weights to probe; it was left unpatched. Call apply_swiglu_patch(model) after loading.",
            stacklevel=3,
        )
        return
    try:
        apply_swiglu_patch(model, **options.as_kwargs())
    except NoGatedMLPError as err:  # class mode patches every model built: one without a gated MLP is skipped
        warnings.warn(
            f"swiglu_hf class-level patching: {type(model).__name__} left unpatched: {err}", UserWarning, stacklevel=3
        )


def _wrap_post_init(original):
    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if _loading() == 0:
            _patch(self)
        return result

    return post_init


def _wrap_loader(original):
    func = original.__func__

    @functools.wraps(func)
    def load(cls, *args, **kwargs):
        _local.loading = _loading() + 1
        try:
            model = func(cls, *args, **kwargs)
        finally:
            _local.loading -= 1
        if _loading() == 0:
            # from_pretrained(output_loading_info=True) returns (model, loading_info)
            target = model[0] if isinstance(model, tuple) and model else model
            if isinstance(target, _base()):
                _patch(target)
        return model

    return classmethod(load)


def _install() -> None:
    """Wrap the attributes; all or none: a failure part-way puts back what was replaced."""
    base = _base()
    for name in _WRAPPED:
        _saved[name] = base.__dict__.get(name, _MISSING)
    try:
        base.post_init = _wrap_post_init(base.__dict__["post_init"])
        base.from_pretrained = _wrap_loader(base.__dict__["from_pretrained"])
        base._from_config = _wrap_loader(base.__dict__["_from_config"])
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


def enable_class_patching(**apply_kwargs) -> int:
    """Patch every PreTrainedModel built from now on with apply_swiglu_patch(model, **apply_kwargs).

    Returns a token for disable_class_patching. Enables nest (the latest arguments apply).
    """
    options = PatchOptions.from_kwargs(dict(apply_kwargs), "enable_class_patching")
    with _lock:
        if not _active:
            _install()
        token = next(_tokens)
        _active.append((token, options))
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
