"""Which implementation runs: the Triton kernels or the PyTorch path.

The user names a backend ("auto", "triton", "torch"); `resolve` turns it into the one that runs
for given tensors ("triton" or "torch"), and that value is what the ops receive.

The environment variable SWIGLU_HF_BACKEND=torch|triton sets what "auto" means for the whole
process and the processes it starts (a launcher's ranks): "torch" to rule the kernels out when
debugging, "triton" to run them wherever they can run (on CPU only under TRITON_INTERPRET=1 and
for float32/float16, never for float64). The test suite runs every patched model both ways with it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .errors import BackendUnavailableError, InvalidDtypeError, UnknownBackendError

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "SWIGLU_HF_BACKEND"  # what "auto" resolves to, when set: "torch" or "triton"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the kernels compute in fp32


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UnknownBackendError(f"unknown backend {backend!r}; use one of {', '.join(map(repr, BACKENDS))}")
    return backend


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    """Cached: resolve() asks on every patched call on CUDA, and find_spec walks sys.path."""
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
        forced = os.environ.get(BACKEND_ENV, "")
        if forced == "torch":
            return "torch"
        # the interpreter's bfloat16 arithmetic is unreliable: on CPU only fp32/fp16 go to the kernels
        interpreted = forced == "triton" and device.type == "cpu" and interpreter_enabled()
        runs_here = device.type == "cuda" or (interpreted and dtype in (torch.float32, torch.float16))
        ok = runs_here and dtype in KERNEL_DTYPES and triton_installed()
        return "triton" if ok else "torch"
    ensure_triton(device)
    if dtype not in KERNEL_DTYPES:
        raise InvalidDtypeError(
            f"backend='triton' computes in fp32 and supports float32/float16/bfloat16, not {dtype}; "
            "use backend='auto' or 'torch' for it"
        )
    return "triton"
