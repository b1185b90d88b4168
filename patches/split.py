"""Split gate/up projections:  down_proj(act_fn(gate_proj(x)) * up_proj(x))."""

RECIPE = {
    "name": "split",
    "form": "split",
    "projections": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "activation_attrs": ("act_fn", "activation_fn", "act"),
    "examples": ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP"),
}
