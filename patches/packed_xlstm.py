"""Packed proj_up_gate_z (gate first), proj_down:  xLSTM's feed-forward, weight_mode="fused"
(torch.tensor_split at the intermediate size: the two halves)."""

RECIPE = {
    "name": "packed_xlstm",
    "form": "packed",
    "projections": {"gate_up": "proj_up_gate_z", "down": "proj_down"},
    "examples": ("xLSTMFeedForward",),
}
