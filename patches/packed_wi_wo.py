"""Packed projection Wi (gate first), dropout, Wo:  Wo(drop(act(g) * u)),  g, u = Wi(x).chunk(2, -1).

ModernBERT-decoder. The dropout runs between the gate and Wo, as stock runs it (same shape, same RNG
draws); in eval mode it is the identity.
"""

RECIPE = {
    "name": "packed_wi_wo",
    "form": "packed",
    "projections": {"gate_up": "Wi", "down": "Wo", "post": "drop"},
    "activation_attrs": ("act", "act_fn", "activation_fn"),
    "examples": ("ModernBertDecoderMLP",),
}
