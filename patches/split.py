"""Split gate/up projections:  down_proj(act_fn(gate_proj(x)) * up_proj(x)).

Optional steps, applied when the module has them (swiglu_hf.forms.dense): a module between the gate
and down_proj (BitNet's, Dory's ffn_sub_norm), and per-channel scales on the projections' outputs
(Dory: gate_proj(x) * (suv_gate * suv_scale), up_proj(x) * (suv_up * suv_scale)).
"""

RECIPE = {
    "name": "split",
    "form": "split",
    "projections": {
        "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
        "post": "ffn_sub_norm", "gate_scale": "suv_gate", "up_scale": "suv_up", "scale": "suv_scale",
    },
    "examples": ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "BitNetMLP", "DoryMLP"),
}
