"""Shared experts with stacked [S, I, H] gate_proj / up_proj and [S, H, I] down_proj weights, run by bmm,
each scaled by per-token weights:  forward(hidden_states, gammas) =
sum_s bmm(act(x W_g[s]^T) * (x W_u[s]^T) * gammas[s], W_d[s]^T) (summed in fp32).

Inkling's InklingSharedExperts. The split recipe needs child modules, the experts recipe a packed
gate_up_proj: neither matches these 3D parameters.
"""

RECIPE = {
    "name": "stacked_experts",
    "form": "stacked",
    "projections": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "examples": ("InklingSharedExperts",),
}
