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
    NotPicklableError,
    PatchRefusedWarning,
    SelfCheckError,
    SwigluError,
    UnknownBackendError,
    UnsupportedActivationError,
    UnsupportedModuleError,
)
from .classpatch import disable_class_patching, enable_class_patching, patching
from .functional import swiglu
from .patch import PatchReport, apply_swiglu_patch, patch_report, patched_modules, revert_swiglu_patch
from .verification import VerifyReport, verify

__version__ = "0.1.0"


__all__ = [
    "apply_swiglu_patch",
    "revert_swiglu_patch",
    "patched_modules",
    "patch_report",
    "PatchReport",
    "patching",
    "enable_class_patching",
    "disable_class_patching",
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
    "NotPicklableError",
    "SelfCheckError",
    "UnsupportedModuleError",
    "PatchRefusedWarning",
]
