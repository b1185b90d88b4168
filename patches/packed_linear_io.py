"""Packed input_linear (gate first), output_linear:  output_linear(act(g) * u),  g, u = input_linear(x).chunk(2).

The shared MLP of GraniteMoE-Shared, GraniteMoE-Hybrid and GraniteMoE-SWA. JetMoE's MoE layer has the
same names over stacked expert weights: the dense form does not match 3D weights.
"""

RECIPE = {
    "name": "packed_linear_io",
    "form": "packed",
    "projections": {"gate_up": "input_linear", "down": "output_linear"},
    "activation_attrs": ("activation", "activation_fn", "act_fn"),
    "examples": ("GraniteMoeSharedMLP", "GraniteMoeHybridMLP", "GraniteMoeSWAMLP"),
}
