"""The interface every MLP form implements; the patch engine and the probe know forms only by it.

A form is a structural shape of gated MLP (two projections and a down projection, one packed
projection, 3D expert weights, ...). A recipe (patches/*.py) names a form and the attribute names
of its projections; the form does the rest:

    has_structure(module, projections)    does the module have this shape?
    refusal(module, projections, act)     why it cannot take the fused forward, or None
    gate(module, projections, act)        the GateSpec its attributes describe (swiglu_hf.gate), or the
                                          reason there is none
    probe_inputs(module, projections, generator)
                                          argument tuples for the patch-time probe (several input
                                          scales, reaching far from 0 where clamps and saturating
                                          look-alikes show)
    probe_pairs(module, stock_forward)    (label, stock callable, fused keyword overrides): the
                                          implementations the probe compares
    forward(module, state, *args, **kwargs)
                                          the fused forward, in state.tile_tokens' memory mode
    tiles                                 whether tile_tokens applies (else the default mode runs)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# Inputs to the probe: unit scale, then scaled so gates sit far from 0.
PROBE_SCALES = (1.0, 32.0)


class Form:
    name: str = ""
    roles: tuple[str, ...] = ()
    tiles: bool = True

    def has_structure(self, module: nn.Module, projections: dict) -> bool:
        return all(isinstance(getattr(module, attr, None), nn.Module) for attr in projections.values())

    def refusal(self, module: nn.Module, projections: dict, act) -> str | None:
        return None

    def gate(self, module: nn.Module, projections: dict, act):
        from ..gate import read_spec

        return read_spec(module, act)

    def probe_inputs(self, module: nn.Module, projections: dict, generator: torch.Generator) -> list[tuple]:
        raise NotImplementedError

    def probe_pairs(self, module: nn.Module, stock_forward: Callable) -> list[tuple[str, Callable, dict]]:
        return [("forward", stock_forward, {})]

    def forward(self, module: nn.Module, state, *args, **kwargs):
        raise NotImplementedError
