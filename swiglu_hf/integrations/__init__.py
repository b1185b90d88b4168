"""Glue for the frameworks around a training run: one module per framework.

    from swiglu_hf.integrations import SwigluCallback      # Hugging Face Trainer (trainer.py)

deepspeed.py gathers ZeRO-3 parameters for the patch-time probe. SwigluCallback is loaded on first
use, so the core can import deepspeed.py without importing the Trainer.
"""

__all__ = ["SwigluCallback"]


def __getattr__(name):
    if name == "SwigluCallback":
        from .trainer import SwigluCallback

        return SwigluCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
