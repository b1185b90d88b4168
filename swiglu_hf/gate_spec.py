"""The parametric gated unit: every gate h = f(gate, up) the library fuses, as one small spec.

    gate = gate * gate_mul                       Falcon-H1's mlp_multipliers[0]
    gate = gate.clamp(max=gate_max)              GPT-OSS, DeepSeek-V4, MiniMax-M3 (swiglu_limit)
    up   = up.clamp(-up_limit, up_limit)         the same models
    a    = act(gate)                             silu, gelu, gelu_tanh, sigmoid, relu, relu2 (BitNet),
                                                 silu_alpha: gate * sigmoid(alpha * gate) (GPT-OSS)
    h    = (up + 1) * a  if up_plus_one  else  up * a
    layout: gate and up are the two halves of a packed (.., 2I) tensor, or interleaved (even, odd
    columns: GPT-OSS), or two separate tensors (split form)

Each field is read from the module or its config by the form, never assumed from the family, and
the patch-time probe confirms the whole spec at input scales beyond any clamp. A spec travels to
the custom ops as its `key()` string; the plain activations' keys are their names. The Triton
kernels implement every spec, forward, backward and backward-with-h (swiglu_hf/kernels.py: each
field a step of the kernels, absent ones compiled out, each intermediate rounded to the input
dtype where eager rounds it; interleaved gate/up read in place from the packed tensor). The
PyTorch path of any spec runs the ops above in the order the models write them, and its backward
is autograd's over those same ops, so it is bitwise equal to stock.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS, EAGER, SPEC_ONLY, describe

SPEC_ACTIVATIONS = (*ACTIVATIONS, *SPEC_ONLY)


@dataclasses.dataclass(frozen=True)
class GateSpec:
    activation: str
    alpha: float | None = None  # silu_alpha only
    gate_max: float | None = None
    up_limit: float | None = None
    up_plus_one: bool = False
    gate_mul: float | None = None
    interleaved: bool = False

    # Cached: a patched module reads these on every call (the spec is resolved once, at patch time).
    @functools.cached_property
    def plain(self) -> bool:
        """Only a plain activation over halves, keyed by its name: the PyTorch path runs it as
        act(gate) * up (the Triton kernels run every spec, plain or not)."""
        return self == GateSpec(self.activation) and self.activation in ACTIVATIONS

    @functools.cached_property
    def _key(self) -> str:
        if self.plain:
            return self.activation
        fields = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                  if getattr(self, f.name) != f.default and f.name != "activation"]
        return "|".join([self.activation, *fields])

    def key(self) -> str:
        """The spec as a string: what the torch.library ops take (their schemas have no GateSpec)."""
        return self._key

    def describe(self) -> str:
        return self.key().replace("|", ", ")


@functools.lru_cache(maxsize=None)
def parse(key: str) -> GateSpec:
    name, *rest = key.split("|")
    values = {}
    for item in rest:
        field, value = item.split("=", 1)
        values[field] = {"True": True, "False": False, "None": None}.get(value) if value in ("True", "False", "None") else float(value)
    return GateSpec(name, **values)


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def activation_name(act) -> str | None:
    """A spec activation name for a module's activation object, or None (see activations.activation_of)."""
    from transformers import activations as hf

    from .activations import activation_of

    name = activation_of(act)
    if name is None and type(act) is getattr(hf, "ReLUSquaredActivation", None):
        return "relu2"
    return name


def read_spec(module, act, *, interleaved: bool = False) -> GateSpec | str:
    """The gate spec a module's attributes describe, or the reason there is none.

    Read, never assumed: `limit`/`swiglu_limit` -> clamps of gate (max) and up (symmetric);
    `alpha`/`swiglu_alpha` -> gate * sigmoid(alpha * gate) with up + 1 (the clamped SwiGLU of GPT-OSS
    and MiniMax-M3); `gate_multiplier` -> gate scaled before the activation (Falcon-H1). The probe then
    proves the spec against the module's own forward; attributes the forward does not use fail it.
    """
    limit = next((_number(getattr(module, a, None)) for a in ("limit", "swiglu_limit") if _number(getattr(module, a, None)) is not None), None)
    alpha = next((_number(getattr(module, a, None)) for a in ("alpha", "swiglu_alpha") if _number(getattr(module, a, None)) is not None), None)
    gate_mul = _number(getattr(module, "gate_multiplier", None))
    if alpha is not None:
        name = "silu_alpha"
    else:
        name = activation_name(act) if act is not None else None
        if name is None:
            return "no act_fn attribute" if act is None else f"its activation {describe(act)} is not one the fused gate implements (supported: {', '.join(SPEC_ACTIVATIONS)})"
    return GateSpec(
        name, alpha=alpha, gate_max=limit, up_limit=limit, up_plus_one=alpha is not None,
        gate_mul=None if gate_mul in (None, 1.0) else gate_mul, interleaved=interleaved,
    )


def split_packed(x: torch.Tensor, spec: GateSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) views of a packed (.., 2I) tensor in the spec's layout."""
    if spec.interleaved:
        return x[..., ::2], x[..., 1::2]
    n = x.shape[-1] // 2
    return x[..., :n], x[..., n:]


def _activation(spec: GateSpec, gate: torch.Tensor) -> torch.Tensor:
    if spec.activation == "silu_alpha":
        return gate * torch.sigmoid(gate * spec.alpha)
    if spec.activation == "relu2":
        return torch.square(F.relu(gate))
    return EAGER[spec.activation][0](gate)


def apply(spec: GateSpec, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h for the spec, with eager's own ops in the models' order (differentiable)."""
    if spec.plain:  # act_fn(gate) * up, as the stock modules write it
        return EAGER[spec.activation][0](gate) * up
    if spec.gate_mul is not None:
        gate = gate * spec.gate_mul
    if spec.gate_max is not None:
        gate = gate.clamp(max=spec.gate_max)
    if spec.up_limit is not None:
        up = up.clamp(min=-spec.up_limit, max=spec.up_limit)
    a = _activation(spec, gate)
    if spec.up_plus_one:
        up = up + 1
    return up * a


def _activation_backward(spec: GateSpec, d_a, gate, a):
    """Gradient through `_activation`, as eager autograd forms it for those ops."""
    if spec.activation == "silu_alpha":  # gate * sigmoid(gate * alpha): two paths into gate, summed
        s = torch.sigmoid(gate * spec.alpha)
        return d_a * s + torch.ops.aten.sigmoid_backward(d_a * gate, s) * spec.alpha
    if spec.activation == "relu2":  # square(relu(gate)): pow_backward, then threshold_backward
        r = F.relu(gate)
        return torch.ops.aten.threshold_backward(d_a * (2 * r), r, 0)
    return EAGER[spec.activation][1](d_a, gate, a)


def backward(spec: GateSpec, dh, gate, up, with_h: bool = False):
    """(dgate, dup), optionally with h first, as eager autograd forms them for `apply`'s ops.

    Written out rather than differentiated: the custom ops' implementations run below autograd."""
    if spec.plain:
        forward, backward_of = EAGER[spec.activation]
        act = forward(gate)
        d_act = dh * up
        d_gate = backward_of(d_act, gate, act)
        if torch.is_grad_enabled():  # a differentiable backward (create_graph): no out= or in-place writes
            return (act * up, d_gate, dh * act) if with_h else (d_gate, dh * act)
        # The same ops on the same operands, written into buffers this function made and no longer
        # needs (one allocation each fewer: host time on a small call)
        d_up = torch.mul(dh, act, out=d_act)
        return (act.mul_(up), d_gate, d_up) if with_h else (d_gate, d_up)
    g = gate if spec.gate_mul is None else gate * spec.gate_mul
    gc = g if spec.gate_max is None else g.clamp(max=spec.gate_max)
    u = up if spec.up_limit is None else up.clamp(min=-spec.up_limit, max=spec.up_limit)
    a = _activation(spec, gc)
    u1 = u + 1 if spec.up_plus_one else u
    d_u = dh * a
    d_gc = _activation_backward(spec, dh * u1, gc, a)
    zero = torch.zeros((), dtype=dh.dtype, device=dh.device)
    if spec.up_limit is not None:
        d_u = torch.where((up >= -spec.up_limit) & (up <= spec.up_limit), d_u, zero)
    d_g = d_gc if spec.gate_max is None else torch.where(g <= spec.gate_max, d_gc, zero)
    d_gate = d_g if spec.gate_mul is None else d_g * spec.gate_mul
    return (u1 * a, d_gate, d_u) if with_h else (d_gate, d_u)


def interleave(d_gate: torch.Tensor, d_up: torch.Tensor, spec: GateSpec) -> torch.Tensor:
    """The gradient of a packed tensor from the gradients of its gate and up views."""
    if not spec.interleaved:
        return torch.cat((d_gate, d_up), dim=-1)
    return torch.stack((d_gate, d_up), dim=-1).flatten(-2)
