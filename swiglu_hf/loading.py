"""Loading the models `verify` and the tools run: built-in tiny models (built from a config, no
download) and local checkpoints (a Hugging Face directory or a .gguf file).

Loading never touches the network: local directories only (`local_files_only=True`), weights
from safetensors only, and remote code only when the caller passes trust_remote_code=True.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import InvalidInputError

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


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _not_found(spec: str) -> InvalidInputError:
    if _HUB_ID.match(spec):
        return InvalidInputError(
            f"{spec!r} is not a local path; it looks like a Hugging Face Hub id, and swiglu-hf never downloads. "
            f"Fetch it first (hf download {spec} --local-dir ./{spec.split('/')[-1]}) and pass that directory"
        )
    return InvalidInputError(
        f"{spec!r}: no such file or directory; give a built-in model ({', '.join(TINY_MODELS)}), a local "
        "Hugging Face model directory (config.json + *.safetensors) or a local .gguf file"
    )


def _load(loader, what: str, **kwargs):
    """Call a transformers loader; its errors about the files become one-line InvalidInputErrors."""
    try:
        return loader(**kwargs)
    except ImportError as err:  # e.g. the gguf package for .gguf files
        raise InvalidInputError(f"loading {what} needs a package that is not installed: {err}") from err
    except (OSError, ValueError, KeyError) as err:
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        raise InvalidInputError(f"cannot load {what}: {text}") from err


def check_model_spec(spec: str) -> str:
    """What `spec` names: "builtin", "dir" or "gguf"; InvalidInputError (saying what to do) otherwise.

    Checks the files only (nothing is loaded), so a command can refuse a bad path before it starts.
    """
    if spec in TINY_MODELS:
        return "builtin"
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InvalidInputError(f"{path} has no config.json; it is not a Hugging Face model directory")
        if not any(path.glob("*.safetensors")):
            raise InvalidInputError(
                f"{path} holds no *.safetensors weights; swiglu_hf loads safetensors only "
                "(convert with model.save_pretrained(dir, safe_serialization=True))"
            )
        return "dir"
    if path.suffix == ".gguf" and path.is_file():
        return "gguf"
    if path.exists():
        raise InvalidInputError(f"{path} is a file but not a .gguf; pass the model's directory (config.json + *.safetensors)")
    raise _not_found(spec)


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, seed: int = 0, trust_remote_code: bool = False):
    """A built-in tiny model name, a local Hugging Face directory (safetensors) or a local .gguf file.

    Local files only (no download), weights from safetensors only (or GGUF), and the checkpoint's
    own Python code only with trust_remote_code=True. Typed errors (InvalidInputError) say what to do.
    """
    from transformers import AutoModelForCausalLM

    kind = check_model_spec(spec)
    if kind == "builtin":
        return build_tiny(spec, seed=seed, dtype=dtype)
    path = Path(spec).expanduser()
    common = dict(dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code)
    if kind == "dir":
        return _load(AutoModelForCausalLM.from_pretrained, str(path), pretrained_model_name_or_path=path,
                     use_safetensors=True, **common).eval()
    return _load(AutoModelForCausalLM.from_pretrained, str(path), pretrained_model_name_or_path=path.parent,
                 gguf_file=path.name, **common).eval()
