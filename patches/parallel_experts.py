"""A MoE layer over ParallelExperts projections (weight [E, out, in], called with per-expert token counts),
routed by its own router:  y = index_add(gates * output_linear(act(g) * u, sizes)) + bias,
g, u = input_linear(x[batch_index], sizes).chunk(2).

JetMoE's JetMoeMoE. Its attention counterpart (JetMoeMoA) has no activation: no match.
"""

RECIPE = {
    "name": "parallel_experts",
    "form": "parallel_experts",
    "projections": {"gate_up": "input_linear", "down": "output_linear", "router": "router", "bias": "bias"},
    "activation_attrs": ("activation", "activation_fn", "act_fn"),
    "examples": ("JetMoeMoE",),
}
