"""Models and variants of `swiglu-hf finetune`: build the model (the shipped tiny Llama, a local
checkpoint with its tokenizer, or a random-init preset shape), the options every variant shares,
and what turns a private copy into each variant.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from swiglu_hf import apply_swiglu_patch
from swiglu_hf.errors import InvalidInputError, SwigluError

from ..peers import PeerUnavailable, apply_liger_swiglu_mlp
from . import data
from .config import FinetuneConfig

DEFAULT_CONFIG = data.DATA_DIR / "byte_llama.json"
DEFAULT_MODEL_NAME = "tiny Llama (byte_llama.json: 3 layers, hidden 128, MLP 384), random init"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Llama-3.2-1B's shape with random weights: the GPU benchmark needs the size, not the checkpoint.
PRESET_CONFIGS = {
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001, use_cache=False,
    ),
}


class VariantUnavailable(SwigluError):
    """A variant's peer is not installed or cannot run here; the run skips it and says why."""


# ---- model --------------------------------------------------------------------------------

def hf_config(spec: dict):
    """A transformers config from a plain dict holding "model_type" and the config fields."""
    from transformers import AutoConfig

    return AutoConfig.for_model(spec["model_type"], **{k: v for k, v in spec.items() if k != "model_type"})


def local_tokenizer(spec: str, trust_remote_code: bool = False):
    """The checkpoint's own tokenizer (local files only), or None when it ships none."""
    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    gguf = path.suffix == ".gguf"
    try:
        return AutoTokenizer.from_pretrained(path.parent if gguf else path, local_files_only=True,
                                             trust_remote_code=trust_remote_code,
                                             **({"gguf_file": path.name} if gguf else {}))
    except (OSError, ValueError, TypeError):
        return None


def check_model(spec: str) -> str:
    """check_model_spec for `finetune --model`: "builtin", "dir" or "gguf", or an InvalidInputError that
    offers only models finetune can train. A built-in has no tokenizer, so it trains on byte tokens and
    needs a vocabulary of data.BYTE_VOCAB ids; the verify built-ins (vocabulary 96) are refused up front."""
    from swiglu_hf.loading import TINY_MODELS, check_model_spec, tiny_config

    usable = [name for name in TINY_MODELS if tiny_config(name).vocab_size >= data.BYTE_VOCAB]
    instead = "leave out --model for the shipped tiny Llama (random init), or write it as a checkpoint with " \
              "`python -m swiglu_hf.tools.tiny_checkpoint DIR`"
    if spec in TINY_MODELS and spec not in usable:
        raise InvalidInputError(
            f"{spec!r} is a built-in of `swiglu-hf verify` with a vocabulary of {tiny_config(spec).vocab_size} ids "
            f"and no tokenizer; finetune trains such a model on byte tokens, which need {data.BYTE_VOCAB}: {instead}")
    try:
        return check_model_spec(spec)
    except InvalidInputError as err:
        if Path(spec).expanduser().exists() or "Hub id" in str(err):
            raise  # a wrong file or a Hub id: the loader's message says what to do
        builtins = f"a built-in model ({', '.join(usable)}), " if usable else ""
        raise InvalidInputError(f"{spec!r}: no such file or directory; give {builtins}a local Hugging Face model "
                                f"directory (config.json + *.safetensors and its tokenizer) or a local .gguf file; or "
                                f"{instead}") from None


def build_model(cfg: FinetuneConfig) -> tuple[nn.Module, str, bool]:
    """(model on CPU in fp32, description, pretrained?). The same seed gives the same weights.

    Under DeepSpeed ZeRO-3 (an Accelerator with its plugin must exist first) transformers builds
    the model under deepspeed.zero.Init, partitioned across the processes.
    """
    from transformers import AutoModelForCausalLM

    from swiglu_hf.loading import load_model

    torch.manual_seed(cfg.seed)
    if cfg.model:
        model = load_model(cfg.model, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code)
        if check_model(cfg.model) == "builtin":
            return model, f"{cfg.model} (built-in, random init)", False
        return model, f"{cfg.model} ({type(model).__name__}, pretrained weights)", True
    if cfg.preset:
        spec, name = PRESET_CONFIGS[cfg.preset], f"{cfg.preset} shape, random init"
    else:
        spec, name = json.loads(DEFAULT_CONFIG.read_text()), DEFAULT_MODEL_NAME
    return AutoModelForCausalLM.from_config(hf_config(spec)), name, False


def prepare_base(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """Training options every variant shares, applied before the copies so all start identical."""
    model.config.use_cache = False  # no KV cache while training (and none with checkpointing)
    if cfg.gradient_checkpointing:
        # transformers >= 5.x renamed it (the old name warns); non-reentrant works with frozen inputs (LoRA)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        # dropout 0: the variants must consume no randomness, so their losses stay comparable
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
        model = get_peft_model(model, lora)
    return model.train()


def is_zero3(accelerator) -> bool:
    """Whether the accelerator runs DeepSpeed ZeRO-3 (weights partitioned: variants are rebuilt, not copied)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def training_loss(model: nn.Module, kind: str, autocast=contextlib.nullcontext):
    """(loss(ids) -> the causal-LM loss of ids as their own labels, the module that computes it from the
    decoder's output for swiglu_hf.peak's breakdown: None for the model's own forward). kind "model":
    model(input_ids=ids, labels=ids).loss; "chunked": swiglu_hf.loss.ChunkedCausalLMLoss, which calls the
    decoder directly, so it runs under `autocast()` (the accelerator's, which wraps model.forward only)."""
    if kind == "model":
        return (lambda ids: model(input_ids=ids, labels=ids).loss), None
    from swiglu_hf.loss import ChunkedCausalLMLoss

    chunked = ChunkedCausalLMLoss(model)

    def loss(ids):
        with autocast():
            return chunked(ids, ids)

    return loss, chunked.head


# ---- variants -----------------------------------------------------------------------------

def backend_used(variant: str, backend: str, device: torch.device, mixed_precision: str = "no") -> str:
    """Which implementation the variant's MLP runs: stock eager, torch, triton (interpreter), liger, inductor.

    Mirrors swiglu_hf's resolution of backend="auto": Triton on CUDA; on CPU the PyTorch path, unless
    SWIGLU_HF_BACKEND=triton with TRITON_INTERPRET=1 for float32/float16 activations.
    """
    if variant in ("stock", "compile", "liger"):
        return {"stock": "stock eager", "compile": "torch.compile (inductor)", "liger": "liger-kernel (triton)"}[variant]
    if backend == "torch":
        return "torch"
    if backend == "triton":
        return "triton" if device.type == "cuda" else "triton (interpreter)"
    forced = os.environ.get("SWIGLU_HF_BACKEND", "")
    if forced == "torch" or importlib.util.find_spec("triton") is None:
        return "torch"
    if device.type == "cuda":
        return "triton"
    interpreted = forced == "triton" and os.environ.get("TRITON_INTERPRET") == "1" and mixed_precision != "bf16"
    return "triton (interpreter)" if interpreted else "torch"


def apply_variant(name: str, model: nn.Module, device: torch.device, backend: str = "auto") -> nn.Module:
    """Turn `model` (a private copy) into variant `name`; VariantUnavailable says why it cannot."""
    if name == "stock":
        return model
    if name in ("patched", "tiled"):
        tile = {"tile_tokens": "auto"} if name == "tiled" else {}
        return apply_swiglu_patch(model, backend=backend, **tile)
    if name == "liger":
        if device.type != "cuda":
            raise VariantUnavailable(f"Liger-Kernel's Triton kernels need a CUDA device, this run is on {device.type}")
        try:  # only the MLP, so the comparison isolates it
            return apply_liger_swiglu_mlp(model)
        except PeerUnavailable as why:
            raise VariantUnavailable(str(why)) from None
    # compile (parse_variants admits no other name)
    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise VariantUnavailable("torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH")
    return torch.compile(model)


def variant_model(name: str, base: nn.Module | None, cfg: FinetuneConfig, accelerator) -> nn.Module:
    """Variant `name` on the accelerator's device: a copy of `base`, or under ZeRO-3 (base None) a rebuild."""
    if not is_zero3(accelerator):
        return apply_variant(name, copy.deepcopy(base).to(accelerator.device), accelerator.device, cfg.backend)
    # ZeRO-3: partitioned weights cannot be copied; rebuild under zero.Init with the same seed. The
    # patch gathers each probed module's weights itself (swiglu_hf's DeepSpeed integration).
    return apply_variant(name, prepare_base(build_model(cfg)[0], cfg), accelerator.device, cfg.backend)
