"""`swiglu(gate, up=None, activation=...)`: the fused gated-linear-unit step as a function."""

from __future__ import annotations

import torch

from . import ops
from .activations import check_activation
from .backend import check_backend, resolve
from .errors import InvalidDtypeError, InvalidInputError

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_tensor(name: str, t, kernels_only: bool) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidDtypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    allowed = _FLOAT_DTYPES if kernels_only else (*_FLOAT_DTYPES, torch.float64)
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise InvalidDtypeError(f"{name} has dtype {t.dtype}; supported: {names} (cast with .to(...))")
    if t.dim() == 0:
        raise InvalidInputError(f"{name} is a 0-d tensor; the gated unit needs a last (feature) dimension")


def swiglu(
    gate: torch.Tensor,
    up: torch.Tensor | None = None,
    *,
    activation: str = "silu",
    backend: str = "auto",
) -> torch.Tensor:
    """Return act(gate) * up, differentiable, in the dtype of the inputs.

    With `up=None`, `gate` is the packed tensor (.., 2I) whose FIRST half is the gate and
    second half the up projection; it is read in place, never copied.

    `activation` is "silu" (alias "swish") (Llama's SwiGLU: up * gate * sigmoid(gate)), "sigmoid" (the original
    GLU: up * sigmoid(gate)), "gelu", "gelu_tanh" (GeGLU) or "relu" (ReGLU).

    >>> import torch
    >>> swiglu(torch.tensor([4.0, -1.0, 5.0, 2.0]), activation="sigmoid")  # gate [4, -1], up [5, 2]
    tensor([4.9101, 0.5379])
    """
    activation = check_activation(activation)
    check_backend(backend)
    kernels_only = backend == "triton"
    _check_tensor("gate", gate, kernels_only)
    if up is None:
        if gate.shape[-1] % 2:
            raise InvalidInputError(
                f"packed input has odd last dimension {gate.shape[-1]}; it must be 2*I (gate half, then up half)"
            )
        return ops.glu((gate,), activation, resolve(backend, gate.device, gate.dtype))

    _check_tensor("up", up, kernels_only)
    if gate.dtype != up.dtype:
        raise InvalidDtypeError(f"gate is {gate.dtype} but up is {up.dtype}; cast both to one dtype")
    if gate.device != up.device:
        raise InvalidInputError(f"gate is on {gate.device} but up is on {up.device}; move both to one device")
    if gate.shape != up.shape:
        raise InvalidInputError(
            f"gate shape {tuple(gate.shape)} != up shape {tuple(up.shape)}; they must match "
            "(pass up=None if gate is the packed (.., 2I) tensor)"
        )
    return ops.glu((gate, up), activation, resolve(backend, gate.device, gate.dtype))
