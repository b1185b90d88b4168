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

_aten = torch.ops.aten

# The one table of activations. Each entry: the eager forward a stock module calls, and the aten
# backward stock autograd calls, (grad, gate, act) -> dgate, where `act` is the forward's output
# (already rounded to the input dtype), which is what eager autograd saves for sigmoid and relu.
EAGER = {
    "silu": (F.silu, lambda grad, gate, act: _aten.silu_backward.default(grad, gate)),
    "gelu": (F.gelu, lambda grad, gate, act: _aten.gelu_backward.default(grad, gate)),
    "gelu_tanh": (functools.partial(F.gelu, approximate="tanh"),
                  lambda grad, gate, act: _aten.gelu_backward.default(grad, gate, approximate="tanh")),
    "sigmoid": (torch.sigmoid, lambda grad, gate, act: _aten.sigmoid_backward.default(grad, act)),
    "relu": (torch.relu, lambda grad, gate, act: _aten.threshold_backward.default(grad, act, 0)),
}
ACTIVATIONS = tuple(EAGER)  # plain activations: what a module's act_fn can be
# Activations only a gate spec names (swiglu_hf.gate_spec writes their eager math: they take parameters).
SPEC_ONLY = ("relu2", "silu_alpha")
# The Triton kernels' ACT constexpr for each (swiglu_hf.kernels; tools/compile_check reads it without triton).
KERNEL_IDS = {name: i for i, name in enumerate((*ACTIVATIONS, *SPEC_ONLY))}
ALIASES = {"swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # transformers' ACT2FN names for the same functions


def check_activation(name: str) -> str:
    """The canonical name of a supported activation (aliases such as "swish" map to "silu")."""
    name = ALIASES.get(name, name)
    if name not in EAGER:
        raise UnsupportedActivationError(
            f"unknown activation {name!r}; supported: {', '.join(ACTIVATIONS)} (aliases: {', '.join(ALIASES)})"
        )
    return name


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
