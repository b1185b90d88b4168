"""MoE experts (transformers 5):  3D gate_up_proj [E, 2I, H] (gate first) and down_proj [E, H, I], act_fn.

Called as forward(hidden_states, top_k_index, top_k_weights) (positionally or by keyword), or, for
Llama-4's Llama4TextExperts, as forward(hidden_states) over tokens already grouped per expert
(torch.bmm with [E, H, 2I] / [E, I, H] weights, no bias); the transposed [E, H, 2I] layout
and gate_up_proj_bias / down_proj_bias are detected from shapes (swiglu_hf.forms.experts). Structure
alone makes a candidate: a module with these weights but no plain activation (GPT-OSS's clamped,
interleaved gate) is refused with a reason, never skipped silently.
"""

RECIPE = {
    "name": "experts",
    "form": "experts",
    "projections": {"gate_up": "gate_up_proj", "down": "down_proj"},
    "require_activation": False,
    "examples": (
        "MixtralExperts", "Qwen2MoeExperts", "Qwen3MoeExperts", "OlmoeExperts", "DeepseekV3Experts",
        "Glm4MoeExperts", "PhimoeExperts", "GraniteMoeExperts", "MiniMaxExperts", "Llama4TextExperts",
    ),
}
