"""swiglu_hf: fused gated-MLP kernels for Hugging Face Transformers, applied in one line.

    from swiglu_hf import apply_swiglu_patch
    apply_swiglu_patch(model)          # in place; revert_swiglu_patch(model) undoes it

Importing this package neither imports triton nor initializes CUDA.
"""

from .errors import (
    BackendUnavailableError,
    InvalidDtypeError,
    InvalidInputError,
    NoGatedMLPError,
    SelfCheckError,
    SwigluError,
    UnknownBackendError,
    UnsupportedActivationError,
)
from .functional import swiglu
from .patch import apply_swiglu_patch, patched_modules, revert_swiglu_patch
from .verification import VerifyReport, verify

__version__ = "0.1.0"


__all__ = [
    "apply_swiglu_patch",
    "revert_swiglu_patch",
    "patched_modules",
    "swiglu",
    "verify",
    "VerifyReport",
    "SwigluError",
    "InvalidInputError",
    "InvalidDtypeError",
    "UnsupportedActivationError",
    "UnknownBackendError",
    "BackendUnavailableError",
    "NoGatedMLPError",
    "SelfCheckError",
]
