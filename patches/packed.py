"""Packed gate/up projection, gate first:  down_proj(act(g) * u)  with  g, u = gate_up_proj(x).chunk(2, -1).

Optional steps, applied when the module has them (swiglu_hf.forms.dense): a module between the gate
and down_proj (ffn_sub_norm), and Zamba2's per-layer adapters: forward(x, layer_idx) adds
gate_up_proj_adapter_list[layer_dic[layer_idx]](x) to gate_up_proj(x).
"""

RECIPE = {
    "name": "packed",
    "form": "packed",
    "projections": {
        "gate_up": "gate_up_proj", "down": "down_proj", "post": "ffn_sub_norm",
        "adapters": "gate_up_proj_adapter_list", "adapter_index": "layer_dic",
    },
    "activation_attrs": ("activation_fn", "act_fn", "act"),
    "examples": ("Phi3MLP", "Glm4MLP", "Zamba2MLP"),
}
