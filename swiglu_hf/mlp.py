"""The fused forwards bound onto matched MLP modules, one per recipe form.

Each keeps the module's own projection submodules (so LoRA wrappers, quantized linears and
hooks still run) and replaces only the elementwise act(gate) * up with the fused op.
"""

from __future__ import annotations

from . import ops
from .backend import use_triton


def split_forward(module, state, x):
    p = state.recipe.projections
    gate = getattr(module, p["gate"])(x)  # (.., I)
    up = getattr(module, p["up"])(x)  # (.., I)
    h = ops.glu_fwd(gate, up, state.activation, use_triton(state.backend, gate.device))
    return getattr(module, p["down"])(h)


def packed_forward(module, state, x):
    p = state.recipe.projections
    gate_up = getattr(module, p["gate_up"])(x)  # (.., 2I), gate first
    h = ops.glu_packed_fwd(gate_up, state.activation, use_triton(state.backend, gate_up.device))
    return getattr(module, p["down"])(h)


FORWARDS = {"split": split_forward, "packed": packed_forward}
