"""Built-in tiny models (built from a config, no download) and loading of local checkpoints.

Loading never touches the network: local directories only (`local_files_only=True`), weights
from safetensors only, and remote code only when the caller passes trust_remote_code=True.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InvalidInputError

_COMMON = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)

# name -> (transformers model_type, config overrides). One per MLP form and activation we claim.
TINY_MODELS = {
    "tiny-llama": ("llama", {}),
    "tiny-mistral": ("mistral", {"sliding_window": None}),
    "tiny-qwen2": ("qwen2", {}),
    "tiny-qwen3": ("qwen3", {"head_dim": 16}),
    "tiny-gemma": ("gemma", {"head_dim": 16, "hidden_activation": "gelu_pytorch_tanh"}),
    "tiny-phi3": ("phi3", {}),  # packed gate_up_proj
}


def tiny_config(name: str):
    from transformers import AutoConfig

    if name not in TINY_MODELS:
        raise InvalidInputError(f"unknown built-in model {name!r}; built-ins: {', '.join(TINY_MODELS)}")
    model_type, overrides = TINY_MODELS[name]
    return AutoConfig.for_model(model_type, **{**_COMMON, **overrides})


def build_tiny(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised tiny causal LM; the same seed gives the same weights."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, seed: int = 0, trust_remote_code: bool = False):
    """A built-in tiny model name, a local Hugging Face directory (safetensors) or a local .gguf file."""
    from transformers import AutoModelForCausalLM

    if spec in TINY_MODELS:
        return build_tiny(spec, seed=seed, dtype=dtype)
    path = Path(spec).expanduser()
    common = dict(dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code)
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            raise InvalidInputError(
                f"{path} holds no *.safetensors weights; swiglu_hf loads safetensors only "
                "(convert with model.save_pretrained(dir, safe_serialization=True))"
            )
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **common).eval()
    if path.suffix == ".gguf" and path.is_file():
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **common).eval()
    raise InvalidInputError(
        f"{spec!r} is neither a built-in model ({', '.join(TINY_MODELS)}), a local model directory, "
        "nor a local .gguf file"
    )
