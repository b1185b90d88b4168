"""The options of apply_swiglu_patch, validated in one place for every entry point.

apply_swiglu_patch, the class-level mode and SwigluCallback all build a PatchOptions, so a bad value
fails the same way wherever it is given, before any module is touched.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from typing import Callable

from torch import nn

from .backend import check_backend
from .errors import InvalidInputError


def check_tile_tokens(value):
    """None (default mode), a positive int, or "auto"; anything else raises InvalidInputError."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == "auto":
            return value
        raise InvalidInputError(f'tile_tokens={value!r} is not understood; use a positive int, "auto" or None')
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInputError(
            f'tile_tokens must be a positive int, "auto" or None, not {type(value).__name__} {value!r}'
        )
    if value <= 0:
        raise InvalidInputError(f"tile_tokens must be a positive number of tokens, got {value}")
    return int(value)


def patch_everything(name: str, module: nn.Module) -> bool:
    """The default filter: patch every module that matches a recipe."""
    return True


@dataclass(frozen=True)
class PatchOptions:
    """backend: "auto" | "triton" | "torch". filter_fn(name, module) -> bool: which matched modules to
    patch (name first, as `model.named_modules()` yields them). tile_tokens: None, N or "auto".
    strict: raise on any gated module that cannot be patched (True), or patch the rest (False)."""

    backend: str = "auto"
    filter_fn: Callable[[str, nn.Module], bool] | None = None
    tile_tokens: int | str | None = None
    strict: bool = True

    def __post_init__(self):
        check_backend(self.backend)
        object.__setattr__(self, "tile_tokens", check_tile_tokens(self.tile_tokens))
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise InvalidInputError(
                f"filter_fn must be a callable (name, module) -> bool, got {type(self.filter_fn).__name__} "
                f"{self.filter_fn!r}"
            )
        if not isinstance(self.strict, bool):
            raise InvalidInputError(f"strict must be True or False, not {self.strict!r}")

    @classmethod
    def from_kwargs(cls, kwargs: dict, caller: str = "apply_swiglu_patch") -> "PatchOptions":
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise InvalidInputError(
                f"{caller}: unknown apply_swiglu_patch argument(s) {', '.join(unknown)}; known: {', '.join(known)}"
            )
        return cls(**kwargs)

    def as_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
