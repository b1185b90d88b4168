"""Split projections named w1 (gate), w3 (up), w2 (down):  w2(F.silu(w1(x)) * w3(x)).

LFM2, LFM2-MoE (dense layers) and LFM3 call F.silu by name in the forward (no activation attribute):
silu is the default, proven by the probe like any other activation.
"""

RECIPE = {
    "name": "split_w1_w3",
    "form": "split",
    "projections": {"gate": "w1", "up": "w3", "down": "w2"},
    "default_activation": "silu",
    "examples": ("Lfm2MLP", "Lfm2MoeMLP", "Lfm3MLP"),
}
