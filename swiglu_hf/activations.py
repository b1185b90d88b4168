"""The activations the fused kernels implement, and how to recognise them on a module.

Each name maps to the eager PyTorch function whose rounding the kernels reproduce:

    silu       x * sigmoid(x)                     Llama, Mistral, Qwen, Phi-3, Mixtral ("SwiGLU")
    gelu       x * Phi(x), erf form               GeGLU
    gelu_tanh  tanh approximation of GELU         Gemma ("gelu_pytorch_tanh")
    sigmoid    sigmoid(x)                         the seed's GLU: up * sigmoid(gate)
    relu       max(x, 0)                          ReGLU

The activation is always read from the module, never assumed from the model family.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedActivationError

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "sigmoid", "relu")
ALIASES = {"swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # transformers' ACT2FN names for the same functions


def check_activation(name: str) -> str:
    """The canonical name of a supported activation (aliases such as "swish" map to "silu")."""
    name = ALIASES.get(name, name)
    if name not in ACTIVATIONS:
        raise UnsupportedActivationError(
            f"unknown activation {name!r}; supported: {', '.join(ACTIVATIONS)} (aliases: {', '.join(ALIASES)})"
        )
    return name


def act_forward(name: str, gate: torch.Tensor) -> torch.Tensor:
    """Eager activation, exactly the call a stock module makes."""
    if name == "silu":
        return F.silu(gate)
    if name == "gelu":
        return F.gelu(gate)
    if name == "gelu_tanh":
        return F.gelu(gate, approximate="tanh")
    if name == "sigmoid":
        return torch.sigmoid(gate)
    if name == "relu":
        return torch.relu(gate)
    raise UnsupportedActivationError(f"unknown activation {name!r}; supported: {', '.join(ACTIVATIONS)}")


def act_backward(name: str, grad: torch.Tensor, gate: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Eager autograd's backward of the activation: the same aten op stock backward calls.

    `act` is the activation output (already rounded to the input dtype), which is what
    eager autograd saves for sigmoid and relu.
    """
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, gate)
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, gate)
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, gate, approximate="tanh")
    if name == "sigmoid":
        return torch.ops.aten.sigmoid_backward(grad, act)
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, act, 0)
    raise UnsupportedActivationError(f"unknown activation {name!r}; supported: {', '.join(ACTIVATIONS)}")


def _partial_gelu_name(fn: functools.partial) -> str | None:
    if fn.func is F.gelu and not fn.args:
        approximate = fn.keywords.get("approximate", "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    return None


def activation_of(act) -> str | None:
    """Name of a module's activation (module instance or function), or None if not fusable.

    Matching is by behaviour-defining type and attributes, never by model family. Look-alikes
    that compute a different formula (e.g. NewGELU, QuickGELU, clipped GELU) return None.
    """
    from transformers import activations as hf

    if isinstance(act, (nn.SiLU, hf.SiLUActivation)) or act is F.silu:
        return "silu"
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if type(act) is hf.GELUActivation:
        return "gelu" if act.act is F.gelu else None
    if type(act) is hf.GELUTanh:
        return _partial_gelu_name(act.act) if isinstance(act.act, functools.partial) else None
    if isinstance(act, functools.partial):
        return _partial_gelu_name(act)
    if act is F.gelu:
        return "gelu"
    if type(act) is nn.Sigmoid or act is torch.sigmoid or act is F.sigmoid:
        return "sigmoid"
    if (type(act) is nn.ReLU) or act is F.relu or act is torch.relu:
        return "relu"
    return None


def describe(act) -> str:
    return type(act).__name__ if isinstance(act, nn.Module) else getattr(act, "__name__", repr(act))
