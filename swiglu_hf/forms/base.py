"""The interface every MLP form implements; the patch engine and the probe know forms only by it.

A form is a structural shape of gated MLP (two projections and a down projection, one packed
projection, 3D expert weights, ...). A recipe (patches/*.py) names a form and the attribute names
of its projections; the form does the rest:

    has_structure(module, projections)    does the module have this shape?
    refusal(module, projections, act)     why it cannot take the fused forward, or None
    gate(module, projections, act)        the GateSpec its attributes describe (swiglu_hf.gate_spec), or the
                                          reason there is none
    probe_inputs(module, projections, generator)
                                          argument tuples for the patch-time probe (several input
                                          scales, reaching far from 0 where clamps and saturating
                                          look-alikes show)
    probe_pairs(module, stock_forward)    (label, stock callable, fused keyword overrides): the
                                          implementations the probe compares
    forward(module, state, *args, **kwargs)
                                          the fused forward, in state.tile_tokens' memory mode
    make_plan(module, state)              the same for a call with one input, from what the form
                                          resolved once per instance (host time), or None: forward runs
    tiles                                 whether tile_tokens applies (else the default mode runs)
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

# Inputs to the probe: unit scale, then scaled so gates sit far from 0.
PROBE_SCALES = (1.0, 32.0)


_PARAMS: dict = {}  # unwrapped forward function -> its positional parameters after self, or None


def positional_params(fn) -> tuple | None:
    """(name, default) of the forward's positional parameters after self (None: no signature).

    Cached per function object (a plain dict, so torch.compile traces a lookup, not inspect): a class
    whose forward is replaced later gets the new function's parameters."""
    if fn in _PARAMS:
        return _PARAMS[fn]
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        params = None
    else:
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        params = tuple((p.name, p.default) for p in sig.parameters.values() if p.kind in kinds)[1:]
    _PARAMS[fn] = params
    return params


def unwrapped_forward(cls):
    return inspect.unwrap(cls.forward)


def bind_inputs(module: nn.Module, args, kwargs, count: int | None = None) -> list:
    """The forward's positional parameters (after self) as the class's own forward binds them: positional,
    keyword or mixed calls alike (inspect.Signature.bind semantics, kept simple enough for torch.compile).
    With `count`: exactly that many inputs and no other keyword (defaults do not fill in)."""
    params = positional_params(unwrapped_forward(type(module))) or ()
    limit = len(params) if count is None else count
    cls = type(module).__name__
    if len(args) > limit:
        raise TypeError(f"{cls}.forward takes {limit} positional arguments, got {len(args)}")
    values, rest = list(args), dict(kwargs)
    for name, default in params[len(args):limit]:
        if name in rest:
            values.append(rest.pop(name))
        elif count is None and default is not inspect.Parameter.empty:
            values.append(default)
        else:
            raise TypeError(f"{cls}.forward missing required argument {name!r}")
    if count is not None and (len(values) != count or rest):
        names = ", ".join(name for name, _ in params[:count])
        raise TypeError(f"{cls}.forward takes {count} inputs ({names}), got {len(args)} positional and keyword "
                        f"arguments {sorted(kwargs)}")
    return values


def is_tensor_of_dim(t, dim: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == dim


def probe_randn(generator: torch.Generator, *shape, like: torch.Tensor) -> torch.Tensor:
    """Probe input drawn in float64 from the probe's private generator, in `like`'s device and dtype."""
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(like.device, like.dtype)


class Form:
    name: str = ""
    roles: tuple[str, ...] = ()
    optional_roles: tuple[str, ...] = ()  # roles a recipe may name and a module may lack
    tiles: bool = True

    def has_structure(self, module: nn.Module, projections: dict) -> bool:
        return all(isinstance(getattr(module, attr, None), nn.Module) for attr in projections.values())

    def refusal(self, module: nn.Module, projections: dict, act) -> str | None:
        return None

    def gate(self, module: nn.Module, projections: dict, act):
        from ..gate_spec import read_spec

        return read_spec(module, act)

    def probe_inputs(self, module: nn.Module, projections: dict, generator: torch.Generator) -> list[tuple]:
        raise NotImplementedError

    def probe_pairs(self, module: nn.Module, stock_forward: Callable) -> list[tuple[str, Callable, dict]]:
        return [("forward", stock_forward, {})]

    def forward(self, module: nn.Module, state, *args, **kwargs):
        raise NotImplementedError

    def make_plan(self, module: nn.Module, state):
        """The per-call plan for a call with one input (an object with run(module, x) -> y or None, and
        stale(module)), or None: every call runs forward()."""
        return None
