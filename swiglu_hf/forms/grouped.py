"""Gated MLPs over expert weights that are not transformers 5's 3D gate_up_proj / down_proj experts.

    expert_glu        forward(x, w_gate, w_up, w_down): one expert's weights passed in by the caller
                      (the module holds all experts' stacked [E * I, H] weights):
                          y = (act(x @ w_gate.T) * (x @ w_up.T)) @ w_down               DBRX
    parallel_experts  a whole MoE layer over ParallelExperts projections (weight [E, out, in], called
                      with the per-expert token counts), routed by its own router:
                          index, batch_index, gates, sizes, _ = router(x)
                          g, u = input_linear(x[batch_index], sizes).chunk(2)
                          y = index_add(gates * output_linear(act(g) * u, sizes)) + bias    JetMoE
    stacked           S shared experts with [S, I, H] / [S, H, I] weights run together by bmm, each
                      output scaled by a per-token weight (gammas) and summed in fp32:
                          y = sum_s bmm(act(x W_g[s]^T) * (x W_u[s]^T) * gammas[s], W_d[s]^T)   Inkling

Each fused forward runs the module's own steps with stock's ops in stock's order and replaces only
act(gate) * up; in default mode h is dropped from what the down projection saves and recomputed
from gate and up (swiglu_hf.gated.down_of_glu). tile_tokens does not apply (as for experts). The
probe (swiglu_hf.probe) proves each against the module's own forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..gated import down_of_glu, glu, resolve_gate
from .base import PROBE_SCALES, Form, bind_inputs, is_tensor_of_dim, positional_params, probe_randn, unwrapped_forward


def _positional(cls) -> list[str] | None:
    params = positional_params(unwrapped_forward(cls))
    return None if params is None else [name for name, _ in params]


def _down(parts, activation, backend, down):
    """down(act(gate) * up): h dropped from what `down` saves in grad mode (recomputed from the parts)."""
    if torch.is_grad_enabled():
        return down_of_glu(down, parts, activation, backend)
    return down(glu(parts, activation, backend))


class _GroupedForm(Form):
    tiles = False
    inputs = 0  # positional inputs of the stock forward

    def refusal(self, module, projections, act):
        names = _positional(type(module))
        if names is None or len(names) != self.inputs:
            return f"its forward takes {names} positional inputs, not the {self.inputs} of the {self.name} form"
        return None


class ExpertGLUForm(_GroupedForm):
    """DBRX's DbrxExpertGLU: forward(x, expert_w1, expert_v1, expert_w2) over weights passed in."""

    name, roles, inputs = "expert_glu", ("gate", "up", "down"), 4

    def has_structure(self, module, projections):
        return all(is_tensor_of_dim(getattr(module, projections[r], None), 2) for r in self.roles)

    def probe_inputs(self, module, projections, generator):
        w_gate, w_up, w_down = (getattr(module, projections[r]) for r in self.roles)
        x = probe_randn(generator, 5, w_gate.shape[1], like=w_gate)
        inputs = [(s * x, w_gate, w_up, w_down) for s in PROBE_SCALES]  # all experts as one wide expert
        width = getattr(module, "ffn_hidden_size", None)
        if isinstance(width, int) and 0 < width < w_gate.shape[0]:  # one expert's slices, as the caller passes
            inputs.append((x, *(w.view(-1, width, w.shape[1])[-1] for w in (w_gate, w_up, w_down))))
        return inputs

    def forward(self, module, state, *args, **kwargs):
        x, w_gate, w_up, w_down = bind_inputs(module, args, kwargs, 4)
        backend = resolve_gate(state.backend, state.activation, x.device, x.dtype)
        parts = (x.matmul(w_gate.T), x.matmul(w_up.T))
        return _down(parts, state.activation, backend, lambda h: h.matmul(w_down))


class ParallelExpertsForm(_GroupedForm):
    """JetMoE's JetMoeMoE: a MoE layer whose experts are ParallelExperts modules (weight [E, out, in])."""

    name, roles, inputs = "parallel_experts", ("gate_up", "down", "router"), 1
    optional_roles = ("bias",)

    def has_structure(self, module, projections):
        gate_up, down = getattr(module, projections["gate_up"], None), getattr(module, projections["down"], None)
        router = getattr(module, projections["router"], None)
        if not all(isinstance(m, nn.Module) for m in (gate_up, down, router)):
            return False
        w1, w2 = getattr(gate_up, "weight", None), getattr(down, "weight", None)
        return is_tensor_of_dim(w1, 3) and is_tensor_of_dim(w2, 3)

    def refusal(self, module, projections, act):
        reason = super().refusal(module, projections, act)
        if reason is not None:
            return reason
        w1, w2 = getattr(module, projections["gate_up"]).weight, getattr(module, projections["down"]).weight
        if not (w1.shape[0] == w2.shape[0] and w1.shape[1] == 2 * w2.shape[2] and w1.shape[2] == w2.shape[1]):
            return (f"expert weights {tuple(w1.shape)} / {tuple(w2.shape)} are not [E, 2I, H] / [E, H, I] "
                    "(a packed gate/up projection per expert)")
        return None

    def probe_inputs(self, module, projections, generator):
        w1 = getattr(module, projections["gate_up"]).weight
        x = probe_randn(generator, 2, 5, w1.shape[2], like=w1)
        return [(s * x,) for s in PROBE_SCALES]

    def forward(self, module, state, *args, **kwargs):
        (layer_input,) = bind_inputs(module, args, kwargs, 1)
        p = state.recipe.projections
        gate_up, down, router = getattr(module, p["gate_up"]), getattr(module, p["down"]), getattr(module, p["router"])
        bias = getattr(module, p["bias"], None) if "bias" in p else None
        backend = resolve_gate(state.backend, state.activation, layer_input.device, layer_input.dtype)
        bsz, length, emb_size = layer_input.size()
        layer_input = layer_input.reshape(-1, emb_size)
        _, batch_index, batch_gates, expert_size, _ = router(layer_input)
        expert_inputs = layer_input[batch_index]
        hidden_states = gate_up(expert_inputs, expert_size)
        expert_outputs = _down((hidden_states,), state.activation, backend, lambda h: down(h, expert_size))
        expert_outputs = expert_outputs * batch_gates[:, None]
        zeros = torch.zeros((bsz * length, emb_size), dtype=expert_outputs.dtype, device=expert_outputs.device)
        layer_output = zeros.index_add(0, batch_index, expert_outputs)
        layer_output = layer_output.view(bsz, length, emb_size)
        return layer_output if bias is None else layer_output + bias


class StackedForm(_GroupedForm):
    """Inkling's shared experts: [S, I, H] gate/up and [S, H, I] down weights, forward(hidden_states, gammas)."""

    name, roles, inputs = "stacked", ("gate", "up", "down"), 2

    def has_structure(self, module, projections):
        return all(is_tensor_of_dim(getattr(module, projections[r], None), 3) for r in self.roles)

    def refusal(self, module, projections, act):
        reason = super().refusal(module, projections, act)
        if reason is not None:
            return reason
        g, u, d = (getattr(module, projections[r]) for r in self.roles)
        if not (g.shape == u.shape and d.shape == (g.shape[0], g.shape[2], g.shape[1])):
            return f"stacked weights {tuple(g.shape)} / {tuple(u.shape)} / {tuple(d.shape)} are not [S, I, H] x2 / [S, H, I]"
        return None

    def probe_inputs(self, module, projections, generator):
        g = getattr(module, projections["gate"])
        x = probe_randn(generator, 2, 3, g.shape[2], like=g)
        gammas = torch.rand(2, 3, g.shape[0], generator=generator, dtype=torch.float64).to(g.device, g.dtype) + 0.5
        return [(s * x, gammas) for s in PROBE_SCALES]

    def forward(self, module, state, *args, **kwargs):
        hidden_states, gammas = bind_inputs(module, args, kwargs, 2)
        p = state.recipe.projections
        w_gate, w_up, w_down = (getattr(module, p[r]) for r in self.roles)
        shared = w_gate.shape[0]
        backend = resolve_gate(state.backend, state.activation, hidden_states.device, hidden_states.dtype)
        input_shape = hidden_states.shape
        hidden_states = hidden_states.reshape(1, -1, input_shape[-1]).expand(shared, -1, -1)
        gammas = gammas.reshape(-1, shared, 1).transpose(0, 1)
        parts = (torch.bmm(hidden_states, w_gate.transpose(1, 2)), torch.bmm(hidden_states, w_up.transpose(1, 2)))
        down = _down(parts, state.activation, backend, lambda h: torch.bmm(h * gammas, w_down.transpose(1, 2)))
        out = down.float().sum(dim=0).to(hidden_states.dtype)
        return out.view(input_shape)
