"""swiglu_hf: fused gated-MLP kernels for Hugging Face Transformers, applied in one line.

    from swiglu_hf import apply_swiglu_patch
    apply_swiglu_patch(model)          # in place; revert_swiglu_patch(model) undoes it

Importing this package imports neither torch nor triton and initializes no CUDA: each public name
is loaded on first use (so `swiglu-hf --help` stays fast). The typed errors are plain Python.
"""

from __future__ import annotations

import importlib

from .errors import (
    BackendUnavailableError,
    HigherOrderGradError,
    InvalidDtypeError,
    InvalidInputError,
    NoGatedMLPError,
    NotPicklableError,
    PatchRefusedWarning,
    SelfCheckError,
    SwigluError,
    UnknownBackendError,
    UnsupportedActivationError,
    UnsupportedLossError,
    UnsupportedModuleError,
)

__version__ = "0.1.0"

_LAZY = {
    "apply_swiglu_patch": "patch", "revert_swiglu_patch": "patch", "patched_modules": "patch",
    "patch_report": "patch", "PatchReport": "patch",
    "patching": "classpatch", "enable_class_patching": "classpatch", "disable_class_patching": "classpatch",
    "swiglu": "functional",
    "verify": "verification", "VerifyReport": "verification",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'swiglu_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    *_LAZY,
    "SwigluError",
    "InvalidInputError",
    "InvalidDtypeError",
    "UnsupportedActivationError",
    "UnknownBackendError",
    "BackendUnavailableError",
    "NoGatedMLPError",
    "HigherOrderGradError",
    "UnsupportedLossError",
    "NotPicklableError",
    "SelfCheckError",
    "UnsupportedModuleError",
    "PatchRefusedWarning",
]
