"""Split projections proj_up_gate (gate), proj_up (up), proj_down:  xLSTM's feed-forward, weight_mode="single"."""

RECIPE = {
    "name": "split_xlstm",
    "form": "split",
    "projections": {"gate": "proj_up_gate", "up": "proj_up", "down": "proj_down"},
    "examples": ("xLSTMFeedForward",),
}
