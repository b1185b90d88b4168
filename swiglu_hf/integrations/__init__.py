"""Glue for the frameworks around a training run: one module per framework.

    from swiglu_hf.integrations import SwigluCallback      # Hugging Face Trainer (trainer.py)

SwigluCallback is loaded on first use: importing this package imports no framework.
"""

__all__ = ["SwigluCallback"]


def __getattr__(name):
    if name == "SwigluCallback":
        from .trainer import SwigluCallback

        return SwigluCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
