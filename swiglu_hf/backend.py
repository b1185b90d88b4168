"""Which implementation runs: Triton kernels or the PyTorch path."""

from __future__ import annotations

import importlib.util
import os

import torch

from .errors import BackendUnavailableError, InvalidDtypeError, UnknownBackendError

BACKENDS = ("auto", "triton", "torch")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UnknownBackendError(f"unknown backend {backend!r}; use one of {', '.join(map(repr, BACKENDS))}")
    return backend


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def ensure_triton(device: torch.device) -> None:
    """Raise BackendUnavailableError unless the Triton kernels can run on `device`."""
    if not triton_installed():
        raise BackendUnavailableError("backend='triton' needs the `triton` package: pip install triton")
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreter_enabled():
        return
    if device.type == "cpu":
        raise BackendUnavailableError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing triton, move the model to a CUDA device, or use backend='torch'/'auto'"
        )
    raise BackendUnavailableError(f"backend='triton' does not run on {device.type} tensors; use backend='torch'")


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the kernels compute in fp32


def use_triton(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Resolve a backend name for tensors on `device` of `dtype`: True means the Triton kernels run.

    "auto" keeps float64 on the PyTorch path (the kernels would silently compute it in fp32);
    "triton" refuses it.
    """
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" and dtype in KERNEL_DTYPES and triton_installed()
    ensure_triton(device)
    if dtype not in KERNEL_DTYPES:
        raise InvalidDtypeError(
            f"backend='triton' computes in fp32 and supports float32/float16/bfloat16, not {dtype}; "
            "use backend='auto' or 'torch' for it"
        )
    return True
