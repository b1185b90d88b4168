"""Packed gate/up projection, gate first:  down_proj(act(g) * u)  with  g, u = gate_up_proj(x).chunk(2, -1)."""

RECIPE = {
    "name": "packed",
    "form": "packed",
    "projections": {"gate_up": "gate_up_proj", "down": "down_proj"},
    "activation_attrs": ("activation_fn", "act_fn", "act"),
    "examples": ("Phi3MLP", "Glm4MLP"),
}
