"""One expert's GLU over weights passed in by the caller:  forward(x, w1, v1, w2) =
(act(x @ w1.T) * (x @ v1.T)) @ w2, the module holding every expert's stacked [E * I, H] w1, v1, w2.

DBRX's DbrxExpertGLU (DbrxExperts slices one expert's weights and calls it per expert).
"""

RECIPE = {
    "name": "expert_glu",
    "form": "expert_glu",
    "projections": {"gate": "w1", "up": "v1", "down": "w2"},
    "activation_attrs": ("activation_fn", "act_fn", "act"),
    "examples": ("DbrxExpertGLU",),
}
