"""Parameters that a distributed engine keeps elsewhere outside a forward: DeepSpeed ZeRO-3 and FSDP.

ZeRO-3 partitions each parameter (size 0 on this rank) outside its module's forward hooks; FSDP1/FSDP2
keep shards (flat parameters, DTensors) outside the forward of their unit. Anything that reads a
module's weights outside its own forward must gather them first: the patch-time probe does
(`gathered`, on the probed module only) or waits for the first forward under FSDP (swiglu_hf.patch),
and nothing else in swiglu_hf reads weights outside a forward. Inside a forward the engines' hooks
have gathered them; a projection with such hooks is not a plain nn.Linear, so the fused forward
calls it as stock does (swiglu_hf.gated), and the tiled mode re-runs the modules' own forwards under
ZeRO-3 (swiglu_hf.tiled.TiledZero3). Every check here is by attribute or class name: nothing imports
deepspeed or torch.distributed unless a model already uses them.
"""

from __future__ import annotations

import contextlib

from torch import nn

_FSDP_CLASSES = ("FullyShardedDataParallel", "FSDPModule")  # FSDP1 wrapper; FSDP2 fully_shard's mixin

SHARDED_HINT = (
    " Its parameters are distributed shards (DTensor / FSDP flat parameters) outside an FSDP-managed forward: "
    "call apply_swiglu_patch(model) (or build the model inside swiglu_hf.patching()) before accelerator.prepare, "
    "fully_shard or parallelize_module."
)


def is_partitioned(module: nn.Module) -> bool:
    """Whether any parameter of `module` is managed by ZeRO-3 (carries a ds_id). Read at every forward:
    a model patched before deepspeed.initialize is partitioned only afterwards."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def gathered(module: nn.Module):
    """Context in which `module`'s ZeRO-3 parameters hold their full data, read-only, on every rank."""
    if not is_partitioned(module):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def fsdp_units(model: nn.Module) -> list[str]:
    """Qualified names of the FSDP1/FSDP2 units in `model` ("" for the model itself), by class name (no import)."""
    return [name for name, m in model.named_modules() if any(c.__name__ in _FSDP_CLASSES for c in type(m).__mro__)]


def under_fsdp(name: str, units: list[str]) -> bool:
    """Whether the module `name` lies inside (or is) one of the FSDP units: its weights are shards outside forward."""
    return any(u == "" or name == u or name.startswith(u + ".") for u in units)


def sharded_params(module: nn.Module) -> bool:
    """DTensor parameters (FSDP2, tensor parallel): the probe cannot run the module's forward on them."""
    return any(any(c.__name__ == "DTensor" for c in type(p).__mro__) for p in module.parameters())
