"""Built-in tiny models and local checkpoints for the tools: the core's loader (swiglu_hf.loading),
named here for the tools and scripts that import it from swiglu_hf.tools.models."""

from __future__ import annotations

from ..loading import _COMMON, TINY_MODELS, build_tiny, check_model_spec, load_model, tiny_config

__all__ = ["TINY_MODELS", "build_tiny", "check_model_spec", "load_model", "tiny_config", "_COMMON"]
