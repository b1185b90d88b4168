"""Peer implementations the benchmarks and the fine-tuning comparison measure against.

Liger-Kernel is loaded here and only here (bench kernel, bench memory, bench mlp, finetune):

    liger_silu_mul()                  LigerSiLUMulFunction.apply: h = silu(gate) * up with autograd
    liger_swiglu_mlp(config)          a LigerSwiGLUMLP built from a transformers config (on CPU)
    apply_liger_swiglu_mlp(model)     Liger's apply_liger_kernel_to_<model type>, SwiGLU MLP only
    liger_version()                   the installed version, or None

Each raises PeerUnavailable (an ImportError) with a one-line reason when the peer is missing,
fails to import, or has nothing for the model; callers turn that into a skipped row or variant.
Liger's kernels are Triton kernels for CUDA devices: checking the device is the caller's job.
"""

from __future__ import annotations

import importlib.util
import inspect

from ..errors import SwigluError

LIGER_INSTALL = "pip install liger-kernel"


class PeerUnavailable(SwigluError, ImportError):
    """A peer implementation is not installed, cannot be imported here, or does not cover the model."""


def _import_liger(module: str, name: str):
    if importlib.util.find_spec("liger_kernel") is None:
        raise PeerUnavailable(f"liger-kernel is not installed ({LIGER_INSTALL})")
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as e:  # installed but incompatible with this torch / triton / transformers
        first = str(e).splitlines()[0] if str(e) else ""
        raise PeerUnavailable(f"liger-kernel is installed but {module}.{name} failed to import "
                              f"({type(e).__name__}: {first})") from e


def liger_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("liger-kernel")
    except PackageNotFoundError:
        return None


def liger_silu_mul():
    """LigerSiLUMulFunction.apply(gate, up) -> silu(gate) * up."""
    return _import_liger("liger_kernel.ops.swiglu", "LigerSiLUMulFunction").apply


def liger_swiglu_mlp(config):
    """LigerSwiGLUMLP(config), freshly initialised on CPU; load the stock MLP's state_dict into it."""
    return _import_liger("liger_kernel.transformers.swiglu", "LigerSwiGLUMLP")(config)


def apply_liger_swiglu_mlp(model):
    """Replace the MLPs of `model` (or of a PEFT wrapper's base model) by Liger's SwiGLU MLP only.

    Rope, RMSNorm and the (fused linear) cross-entropy stay stock, so a comparison isolates the
    MLP. Liger also rebinds the family's MLP class in transformers for the whole process;
    instances built earlier keep theirs. Returns `model`.
    """
    table = _import_liger("liger_kernel.transformers.monkey_patch", "MODEL_TYPE_TO_APPLY_LIGER_FN")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    apply_fn = table.get(base.config.model_type)
    params = inspect.signature(apply_fn).parameters if apply_fn else {}
    if "swiglu" not in params:  # liger's own instance API would silently do nothing here
        raise PeerUnavailable(f"Liger-Kernel has no SwiGLU MLP for model type {base.config.model_type!r}")
    off = dict(rope=False, rms_norm=False, cross_entropy=False, fused_linear_cross_entropy=False)
    apply_fn(model=base, swiglu=True, **{k: v for k, v in off.items() if k in params})
    return model
