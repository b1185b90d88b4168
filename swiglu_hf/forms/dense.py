"""Dense gated MLPs: child projection modules, one token dimension.

    split    y = down_proj(act(gate_proj(x)) * up_proj(x))                 Llama, Mistral, Qwen, Gemma
    packed   y = down_proj(act(g) * u),  g, u = gate_up_proj(x).chunk(2)    Phi-3, GLM-4

The gate is any swiglu_hf.gate spec the module's attributes describe (DeepSeek-V4's clamps,
Falcon-H1's gate multiplier, BitNet's relu²), plus two steps read off the module: a sub-norm
between the gate and down_proj (BitNet) and an output multiplier (Falcon-H1).

Both keep the module's own projection submodules, so LoRA wrappers, quantized linears and hooks
still run; only act(gate) * up is fused (swiglu_hf.gated for the memory modes).
"""

from __future__ import annotations

import torch
from torch import nn

from ..gated import dense_mlp
from .base import PROBE_SCALES, Form


def _in_features(m: nn.Module) -> int | None:
    hidden = getattr(m, "in_features", None)
    weight = getattr(m, "weight", None)
    if hidden is None and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        hidden = weight.shape[-1]
    return hidden


# Extra steps read off the module (and proven by the probe): a module between the gate and down_proj
# (BitNet's RMSNorm over h), and a scalar on the output (Falcon-H1's mlp_multipliers[1]).
POST_GATE = "ffn_sub_norm"


def _out_multiplier(module: nn.Module) -> float | None:
    value = getattr(module, "down_multiplier", None)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1.0
    return float(value) if ok else None


class DenseForm(Form):
    input_roles: tuple[str, ...] = ()

    def probe_inputs(self, module, projections, generator):
        hidden = _in_features(getattr(module, projections[self.input_roles[0]]))
        param = next((p for p in module.parameters() if p.is_floating_point()), None)
        if hidden is None or param is None:
            return []
        x = torch.randn(2, 3, hidden, generator=generator, dtype=torch.float64).to(param.device, param.dtype)
        return [(s * x,) for s in PROBE_SCALES]

    def forward(self, module, state, x=None, **kwargs):
        if x is None and len(kwargs) == 1:  # mlp(x=...) / mlp(hidden_states=...): one input either way
            (x,) = kwargs.values()
        elif kwargs or x is None:
            raise TypeError(f"{type(module).__name__}.forward takes one input tensor, got keyword arguments {sorted(kwargs)}")
        p = state.recipe.projections
        projections = tuple(getattr(module, p[role]) for role in self.input_roles)
        post = getattr(module, POST_GATE, None)
        return dense_mlp(module, x, projections, getattr(module, p["down"]), state.activation, state.backend,
                         state.tile_tokens, post=post if isinstance(post, nn.Module) else None,
                         out_mul=_out_multiplier(module))


class SplitForm(DenseForm):
    name, roles, input_roles = "split", ("gate", "up", "down"), ("gate", "up")


class PackedForm(DenseForm):
    name, roles, input_roles = "packed", ("gate_up", "down"), ("gate_up",)
