"""Packed projection fc1 (gate first), fc2:  fc2(act(g) * u)  with  g, u = the halves of fc1(x).

Moshi's gating MLP (fc1's output viewed as (.., 2, I): index 0 is the gate). fc1/fc2 also name plain
MLPs (CLIP, OPT): the packed form matches only when fc1 is twice as wide as fc2's input.
"""

RECIPE = {
    "name": "packed_fc",
    "form": "packed",
    "projections": {"gate_up": "fc1", "down": "fc2"},
    "activation_attrs": ("activation_fn", "act_fn", "act"),
    "examples": ("MoshiGatingMLP",),
}
