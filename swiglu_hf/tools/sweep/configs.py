"""Tiny configurations for `swiglu-hf sweep`, built the way a checkpoint's config is built.

Each config is constructed from its own class with small sizes passed as constructor arguments
(never patched onto a finished config), so `__post_init__` derives what real configurations derive
from them: layer patterns, per-layer overrides (`per_layer_config`), rope sections, Mamba head
sizes. Nested text / vision / audio configs get the same treatment through their own classes.
`OVERRIDES` holds, per model type, what its config class's constraints need at these sizes, each
with the constraint it satisfies (read from transformers' `configuration_<type>.py`).

`scaled_values` gives the values of the sweep's non-identity pass: every field that scales or clamps
(names with multiplier, limit, alpha, softcap, ...) a non-identity value small enough that clamps
clamp on a tiny random model's activations, and `mlp_bias` on, so that identity defaults cannot hide
unsupported math (the sweep also perturbs the parameters initialisation leaves constant).
"""

from __future__ import annotations

import copy
import dataclasses
import re

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB, EXPERTS = 64, 4, 2, 16, 2, 128, 4
INTERMEDIATE, MOE_INTERMEDIATE = 96, 48

TINY = {  # field -> tiny value, passed to the config class when it declares the field
    "hidden_size": HIDDEN, "d_model": HIDDEN, "n_embd": HIDDEN, "embed_dim": HIDDEN,
    "intermediate_size": INTERMEDIATE, "ffn_dim": INTERMEDIATE, "n_inner": INTERMEDIATE,
    "ffn_hidden_size": INTERMEDIATE,
    "moe_intermediate_size": MOE_INTERMEDIATE, "expert_intermediate_size": MOE_INTERMEDIATE,
    "shared_expert_intermediate_size": MOE_INTERMEDIATE, "shared_intermediate_size": MOE_INTERMEDIATE,
    "shared_experts_intermediate_size": MOE_INTERMEDIATE,
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "num_layers": LAYERS, "n_layers": LAYERS,
    "num_attention_heads": HEADS, "n_head": HEADS, "num_heads": HEADS, "n_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "attention_head_dim": HEAD_DIM,
    "vocab_size": VOCAB, "max_position_embeddings": 256, "n_positions": 256, "max_seq_len": 256,
    "num_local_experts": EXPERTS, "num_experts": EXPERTS, "n_routed_experts": EXPERTS, "moe_num_experts": EXPERTS,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "moe_top_k": 2, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "n_shared_experts": 1,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 24, "sliding_window": 64, "attention_chunk_size": 64, "global_attn_every_n_layers": 2,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "use_cache": False, "router_aux_loss_coef": 0.0, "output_router_logits": False,
    "hidden_dropout": 0.0, "attention_dropout": 0.0, "dropout": 0.0,
    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16,
    # linear-attention (Gated DeltaNet) heads
    "linear_key_head_dim": HEAD_DIM, "linear_value_head_dim": HEAD_DIM, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_head_dim": HEAD_DIM, "linear_num_heads": 2,
    # encoder-decoder families (no gated MLP; small so that they cost no time)
    "encoder_layers": LAYERS, "decoder_layers": LAYERS, "encoder_attention_heads": HEADS,
    "decoder_attention_heads": HEADS, "encoder_ffn_dim": INTERMEDIATE, "decoder_ffn_dim": INTERMEDIATE,
}
VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "depth": 1, "num_attention_heads": 2,
          "num_heads": 2, "embed_dim": 32, "out_hidden_size": HIDDEN, "projection_dim": HIDDEN,
          "mm_embed_dim": 32, "mm_posemb_size": 64, "output_proj_dims": 32}
TEXT_SUBCONFIGS = ("text_config", "language_config", "llm_config", "decoder_config", "thinker_config", "decoder",
                   "attn_config", "ffn_config", "patcher_config", "encoder_config", "global_config")
VISION_SUBCONFIGS = ("vision_config", "audio_config", "vision_tower_config")

# Per model type: constructor arguments its config class's constraints need at the tiny sizes.
# A nested dict under a sub-config key ("text_config") goes to that sub-config.
_GEMMA4_TEXT = {
    # head_dim and num_key_value_heads are per-layer: __post_init__ turns `global_head_dim` into a
    # `per_layer_config` override for every full-attention layer (real checkpoints: 256 / 512).
    "global_head_dim": 2 * HEAD_DIM,
    "layer_types": ["sliding_attention", "full_attention"],  # the last layer must be full attention
}
_DOTS3_TEXT = {
    # sliding layers get their own attention sizes through `swa_*` (-> per_layer_config); validate_architecture
    # wants num_key_value_heads == num_attention_heads, and SWA head_dim == qk_nope + qk_rope head dims
    "num_key_value_heads": HEADS, "head_dim": 24, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
    "index_head_dim": 16, "index_n_heads": 2, "index_topk": 4,
    "swa_num_attention_heads": 2, "swa_num_key_value_heads": 2, "swa_q_lora_rank": 16, "swa_kv_lora_rank": 16,
    "swa_head_dim": 32, "swa_qk_nope_head_dim": 24, "swa_v_head_dim": 16,
    "layer_types": ["indexed_attention", "sliding_attention"],
    "mlp_layer_types": ["dense", "sparse"],
}
_DOTS3_VISION = {  # validate_architecture: adapter_in_dim == hidden_size; the text side: adapter_out_dim == its hidden
    "num_hidden_layers": 2, "pyramid_num_routed": [-1, EXPERTS],  # a dense block, then one with 4 experts
    "moe_intermediate_size": 24, "adapter_in_dim": VISION["hidden_size"], "adapter_out_dim": HIDDEN,
}
_GEMMA3N_TEXT = {
    # 4 layers, the last 2 reusing the KV cache of the first 2 (kv_sharing_modes: every shared layer type
    # must have a producing layer before them), as real checkpoints share their last layers' caches
    "num_hidden_layers": 4, "num_kv_shared_layers": 2,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    "laurel_rank": 8, "altup_num_inputs": 2,
}
_MAMBA = {"mamba_n_heads": 8, "mamba_d_state": 16, "mamba_chunk_size": 16}  # n_heads * d_head == expand * hidden
# Types whose causal-LM class is built from one sub-config of the composite config (MusicgenForCausalLM:
# MusicgenDecoderConfig); sweep.build instantiates that class directly.
DECODER_ONLY = {"musicgen": "decoder", "musicgen_melody": "decoder"}
_QSA = {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": HEAD_DIM, "indexer_budget": 4,
        "indexer_compress_ratio": 2}
_MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0}
OVERRIDES: dict[str, dict] = {
    "gemma4_text": _GEMMA4_TEXT,
    "gemma4": {"text_config": _GEMMA4_TEXT},
    # validate_architecture: an assistant has no per-layer input embeddings (size 0) and shares every layer's KV
    "gemma4_assistant": {"text_config": {**_GEMMA4_TEXT, "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0},
                         "backbone_hidden_size": HIDDEN},
    "gemma4_unified_text": _GEMMA4_TEXT,
    "gemma4_unified": {"text_config": _GEMMA4_TEXT},
    "gemma4_unified_assistant": {"text_config": _GEMMA4_TEXT, "backbone_hidden_size": HIDDEN},
    "dots3_note_text": _DOTS3_TEXT,
    "dots3_note": {"text_config": _DOTS3_TEXT, "vision_config": _DOTS3_VISION,
                   "audio_config": {"adapter_input_size": VISION["hidden_size"], "adapter_out_dim": HIDDEN}},
    "gemma3n_text": _GEMMA3N_TEXT,
    "gemma3n": {"text_config": _GEMMA3N_TEXT},
    # DBRX's attention reads attn_config.rope_theta, which real checkpoints carry (dbrx-instruct: 500000), and
    # clamps qkv with clip_qkv, whose default None makes its clamp(min=None, max=None) raise (dbrx-instruct: 8)
    "dbrx": {"attn_config": {"kv_n_heads": KV_HEADS, "rope_theta": 500000.0, "clip_qkv": 8.0}},
    # one layer of each kind, as layer_types of real checkpoints (LFM2-8B-A1B) list them; first layer dense
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    # rope parameters per layer type (the rotary embedding indexes rope_parameters by layer type)
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # byte-level: hash-n-gram embeddings of 500002 rows x 6 sizes by default; global hidden == encoder's x cross_attn_k
    "blt": {"encoder_hash_byte_group_vocab": 64, "encoder_hash_byte_group_size": [3, 4],
            "encoder_config": {"hidden_size": HIDDEN // 2, "hidden_size_global": HIDDEN},
            "decoder_config": {"hidden_size": HIDDEN // 2, "hidden_size_global": HIDDEN}},
    # M-RoPE: mrope_section splits head_dim / 2 rotary frequencies among (time, height, width); real checkpoints
    # [16, 24, 24] for head_dim 128, the same 2:3:3 proportions for head_dim 16
    "qwen2_vl": {"text_config": {"rope_parameters": _MROPE}},
    "qwen2_5_vl": {"text_config": {"rope_parameters": _MROPE}},
    # indexed (QSA) attention layers need their indexer sizes, which the defaults leave unset (None):
    # validate_architecture: kv heads 1, budget divisible by the compress ratio, rotary dim <= index head dim
    "qwen4_exp_text": _QSA,
    "qwen4_exp": {"text_config": _QSA},
    "zaya": {"num_experts_per_tok": 1},  # validate_architecture: ZAYA supports top-1 routing only
    # ReformerModelWithLMHead asserts it is a decoder; axial position dims sum to hidden, shape multiplies to max positions
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [32, 32], "axial_pos_shape": [16, 16]},
    # attention_types ([[kinds, repeats]]) must expand to num_layers
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    # validate_architecture: num_heads * head_dim == expand * hidden_size
    "mamba2": {"num_heads": 8, "head_dim": 16, "state_size": 16, "chunk_size": 16},
    "bamba": _MAMBA,
    "granitemoehybrid": _MAMBA,
    "falcon_h1": {**_MAMBA, "mamba_d_ssm": 2 * HIDDEN},  # d_head = d_ssm / n_heads
}


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def subconfig_classes(cls) -> dict:
    """key -> (config class, init kwargs) for each nested config a config class builds."""
    from transformers import CONFIG_MAPPING, PreTrainedConfig

    out = {}
    specs = getattr(cls, "sub_configs_defaults", None) or {}
    if not specs:
        specs = {k: v for k, v in (cls.__dict__.get("sub_configs") or {}).items()}  # e.g. DBRX's attn/ffn configs
    for key, spec in specs.items():
        sub = getattr(spec, "config_class", spec)
        if not (isinstance(sub, type) and issubclass(sub, PreTrainedConfig)):  # AutoConfig with a default type
            model_type = getattr(spec, "model_type", None)
            if model_type not in CONFIG_MAPPING:
                continue
            sub = CONFIG_MAPPING[model_type]
        out[key] = (sub, dict(getattr(spec, "init_kwargs", None) or {}))
    return out


def _kwargs(cls, values: dict) -> dict:
    """The entries of `values` that `cls` declares (directly or through its attribute_map)."""
    names = field_names(cls)
    amap = getattr(cls, "attribute_map", {}) or {}
    out = {}
    for key, value in values.items():
        if key in names:
            out[key] = value
        elif key in amap and amap[key] in names and amap[key] not in values:
            out[amap[key]] = value
    return out


def config_kwargs(cls, values: dict, overrides: dict | None = None, scaled: dict | None = None) -> dict:
    """Constructor arguments for `cls`: tiny `values` it declares, nested configs as dicts, then `overrides`."""
    overrides = dict(overrides or {})
    kwargs = _kwargs(cls, values)
    if {"kv_lora_rank", "qk_rope_head_dim"} <= kwargs.keys():  # multi-head latent attention (DeepSeek-V2 and kin)
        if "head_dim" in kwargs:
            kwargs["head_dim"] = kwargs["qk_rope_head_dim"]  # the rotary embedding is sized by head_dim
        if "num_key_value_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", HEADS)  # one latent kv per query head
    for key, (sub, init) in subconfig_classes(cls).items():
        if key in VISION_SUBCONFIGS:
            sub_values = VISION
        elif key in TEXT_SUBCONFIGS:
            sub_values = values
        else:
            continue
        kwargs[key] = {**init, **config_kwargs(sub, sub_values, overrides.pop(key, None), (scaled or {}).get(key))}
    kwargs.update(overrides)
    for key, value in (scaled or {}).items():
        if not isinstance(value, dict):
            kwargs[key] = value
    return kwargs


def tiny_config(model_type: str, *, scaled: dict | None = None):
    """The config class built with tiny sizes (nested text / vision configs too); `scaled`: extra values.

    Every kind of layer the full-size default config has (attention kinds, dense / sparse / hash MLPs,
    hybrid blocks) is kept: a 2-layer prefix of a 40-layer pattern would drop most of them.
    """
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    overrides = copy.deepcopy(OVERRIDES.get(model_type) or {})
    kwargs = config_kwargs(cls, TINY, copy.deepcopy(overrides), scaled)
    _cover_layer_kinds(cls, kwargs, overrides)
    cfg = cls(**kwargs)
    if model_type in DECODER_ONLY:  # the causal-LM class takes this sub-config, not the composite
        cfg = getattr(cfg, DECODER_ONLY[model_type])
    return cfg


# ---- layer patterns ----------------------------------------------------------------------------


def _patterns(cfg) -> dict:
    """Per-layer pattern fields of a built config: lists (or strings) with one entry per layer."""
    n = getattr(cfg, "num_hidden_layers", None)
    names = field_names(type(cfg))
    out = {}
    for key in names:
        try:
            value = getattr(cfg, key, None)
        except Exception:  # noqa: BLE001 - a per-layer attribute of a heterogeneous config
            continue
        if isinstance(value, (list, tuple)) and n and len(value) == n and value and all(
                isinstance(v, (str, bool, int)) and not isinstance(v, float) for v in value):
            if all(isinstance(v, int) and not isinstance(v, bool) for v in value) and set(value) - {0, 1}:
                continue  # layer indices or per-layer sizes, not kinds
            out[key] = list(value)
        elif isinstance(value, str) and n and n > 1 and len(value) == n and key.endswith("pattern"):
            out[key] = value
    return out


def _covering(default) -> list:
    """The shortest pattern holding every kind of layer of `default`: its first layer's kind first (a dense
    first layer, a layer that computes what later ones share), the others in first-seen order, its last
    layer's kind last (Gemma: the last layer must be full attention)."""
    pattern = list(dict.fromkeys(default))
    if pattern[-1] != default[-1]:
        pattern.append(default[-1])
    return pattern


def _fit(pattern, n: int, default):
    """`pattern` grown to n layers by repeating its first kind at the front; a string again for a string."""
    pattern = [pattern[0]] * (n - len(pattern)) + list(pattern)
    return "".join(pattern) if isinstance(default, str) else pattern


def _cover_layer_kinds(cls, kwargs: dict, overrides: dict, depth: int = 0) -> None:
    """Where the tiny config's layer pattern lacks a kind of layer the default config has, pass a pattern
    with every kind (more layers if there are more kinds than LAYERS). An override's pattern stands."""
    for key, (sub, _) in subconfig_classes(cls).items():
        if key in TEXT_SUBCONFIGS and isinstance(kwargs.get(key), dict) and depth < 2:
            _cover_layer_kinds(sub, kwargs[key], overrides.get(key) or {}, depth + 1)
    if "num_hidden_layers" in overrides or any(k.endswith(("layer_types", "block_type", "pattern")) for k in overrides):
        return
    try:
        default = _patterns(cls())
    except Exception:  # noqa: BLE001 - a config class whose own defaults do not validate: OVERRIDES states it
        return
    try:
        tiny = _patterns(cls(**kwargs))
    except Exception:  # noqa: BLE001 - e.g. Zamba2: a fixed 54-layer default pattern against 2 layers
        tiny = None
    if tiny is None:
        missing = {k: _covering(v) for k, v in default.items()}
    else:
        missing = {k: _covering(v) for k, v in default.items() if k in tiny and set(v) - set(tiny[k])}
    if not missing:
        return
    n = max([LAYERS] + [len(v) for v in missing.values()])
    for key, pattern in missing.items():
        kwargs[key] = _fit(pattern, n, default[key])
    for key, value in (tiny or {}).items():  # the other patterns follow the new layer count
        if key not in missing and len(value) != n:
            kwargs[key] = _fit(value, n, value)
    if n != LAYERS:
        kwargs.update(_kwargs(cls, {"num_hidden_layers": n}))


# ---- the non-identity pass ---------------------------------------------------------------------

# Names of fields that scale or clamp (the MLP's own, and any other: changing a non-MLP one is harmless,
# stock and patched both apply it). Identity defaults (1.0, None) would hide a patched forward that drops them.
SCALED_FIELD = re.compile(r"multiplier|limit|alpha|beta_factor|^mlp_.*softcap|routed_scaling_factor|route_scale")
_SKIP = re.compile(r"_init$|initializer|time_step_limit")  # initialisation constants; the SSM's dt clamp is a tuple
# Per-layer values with no scaling name that change the MLP's math at real sizes (identity at tiny defaults).
EXTRA_SCALED = {
    # Gemma 3n: a Gaussian top-k on the gate in the first 10 layers of real checkpoints (0.0 = off)
    "gemma3n_text": {"activation_sparsity_pattern": [0.95, 0.95, 0.0, 0.0]},
    "gemma3n": {"text_config": {"activation_sparsity_pattern": [0.95, 0.95, 0.0, 0.0]}},
}
BIAS_FIELDS = ("mlp_bias",)
LIMIT = 0.1  # a tiny random model's gate/up values are ~0.1-0.3: a clamp at 0.1 clamps many of them


def _scaled_value(name: str, default, annotation: str):
    """A non-identity value for one field, or None to leave it."""
    if isinstance(default, bool):
        return None
    floats = "float" in annotation
    if isinstance(default, (list, tuple)) or (default is None and "list" in annotation):
        if not floats:
            return None
        n = len(default) if isinstance(default, (list, tuple)) and default else 2
        if "multiplier" not in name or any(v != 1 for v in default or ()):
            return None
        return [0.88, 0.59, 0.73, 1.21, 0.66][:n] if n <= 5 else [0.88 if i % 2 else 0.59 for i in range(n)]
    if not (isinstance(default, (int, float)) or default is None):
        return None
    if "float" not in annotation and "int" not in annotation:
        return None
    if "limit" in name or "softcap" in name:  # real limits (7, 10) never bind on tiny activations: always set
        return LIMIT if floats else None
    if default not in (None, 1, 1.0):  # already not the identity: the defaults pass runs it
        return None
    if "multiplier" in name or "beta_factor" in name:
        return 0.88 if floats else 2
    return 0.7 if floats else 2  # alpha, routing scale


def _class_scaled(cls, depth: int = 0) -> dict:
    out = {}
    fields = [f for f in (dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ())
              if SCALED_FIELD.search(f.name) and not _SKIP.search(f.name)]
    try:  # the values __post_init__ derives (Falcon-H1: mlp_multipliers None -> [1.0, 1.0])
        instance = cls() if fields else None
    except Exception:  # noqa: BLE001 - a class with required arguments: its field defaults then
        instance = None
    names = field_names(cls)
    for f in dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ():
        if f.name in BIAS_FIELDS and f.default is False:  # projections without bias by default: with one
            out[f.name] = True
            if "attention_bias" in names:  # InternLM3 validates one bias setting for attention and MLP
                out["attention_bias"] = True
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if instance is not None:
            default = getattr(instance, f.name, default)
        value = _scaled_value(f.name, default, str(f.type))
        if value is not None:
            out[f.name] = value
    if depth < 2:
        for key, (sub, _) in subconfig_classes(cls).items():
            if key in TEXT_SUBCONFIGS and (nested := _class_scaled(sub, depth + 1)):
                out[key] = nested
    return out


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for key, value in b.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def scaled_values(model_type: str) -> dict:
    """The non-identity values of the second pass for one type ({} when it has no such field)."""
    from transformers import CONFIG_MAPPING

    return _merge(_class_scaled(CONFIG_MAPPING[model_type]), EXTRA_SCALED.get(model_type, {}))


def flat(values: dict, prefix: str = "") -> dict:
    """{"text_config": {"a": 1}} -> {"text_config.a": 1}."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
