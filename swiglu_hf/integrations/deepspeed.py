"""DeepSpeed ZeRO-3: parameters are partitioned across ranks (size 0 here) outside module hooks.

Anything that reads a ZeRO-3 module's weights outside its own forward must gather them first; the
patch-time probe does, on the probed module only, and nothing else in swiglu_hf reads weights
outside a forward. Inside a forward, ZeRO-3's hooks have gathered them already; a down_proj with
such hooks is not a plain nn.Linear, so the fused forward calls it as stock does (swiglu_hf.gated).
The tiled mode's backward re-runs the projections' forwards (ZeRO gathers again) and sets
`ds_grad_is_ready` so ZeRO reduces each weight gradient once, after the last tile
(swiglu_hf.gated.TiledZero3).
"""

from __future__ import annotations

import contextlib

from torch import nn


def is_partitioned(module: nn.Module) -> bool:
    """Whether any parameter of `module` is managed by ZeRO-3 (carries a ds_id)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def gathered(module: nn.Module):
    """Context in which `module`'s ZeRO-3 parameters hold their full data, read-only, on every rank."""
    if not is_partitioned(module):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
