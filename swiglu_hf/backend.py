"""Which implementation runs: the Triton kernels or the PyTorch path.

The user names a backend ("auto", "triton", "torch"); `resolve` turns it into the one that runs
for given tensors ("triton" or "torch"), and that value is what the ops receive.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .errors import BackendUnavailableError, InvalidDtypeError, UnknownBackendError

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the kernels compute in fp32


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


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs for tensors on `device` of `dtype`: "triton" or "torch".

    "auto" picks Triton on CUDA for the kernel dtypes and keeps float64 on the PyTorch path (the
    kernels would silently compute it in fp32); "triton" refuses what it cannot run.
    """
    if backend == "torch":
        return "torch"
    if backend == "auto":
        ok = device.type == "cuda" and dtype in KERNEL_DTYPES and triton_installed()
        return "triton" if ok else "torch"
    ensure_triton(device)
    if dtype not in KERNEL_DTYPES:
        raise InvalidDtypeError(
            f"backend='triton' computes in fp32 and supports float32/float16/bfloat16, not {dtype}; "
            "use backend='auto' or 'torch' for it"
        )
    return "triton"
