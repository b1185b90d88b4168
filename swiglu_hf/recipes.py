"""Load the data-only recipes shipped in `swiglu_hf.patches` and match modules against them.

A recipe is a plain dict in patches/<shape>.py: its form (swiglu_hf.forms), the attribute names of
the projections, and where the module keeps its activation. The patch engine matches modules by
structure (any class with these children or weights), then proves the match with the probe.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from .forms import FORMS, Form


# Activations a recipe may name as its default (the functions stock forwards call by name).
DEFAULT_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


@dataclass(frozen=True)
class Recipe:
    name: str
    form_name: str
    projections: dict  # role -> attribute name
    examples: tuple = ()
    # Where the module keeps its activation, tried in order (a recipe names its own order only where
    # its models differ).
    activation_attrs: tuple = ("act_fn", "activation_fn", "act")
    # False: the structure alone makes a candidate and a missing activation is a refusal (with a
    # reason) rather than "not a gated MLP"; True: no activation attribute, no match.
    require_activation: bool = True
    # The activation of a shape whose forward calls it by name (Lfm2's F.silu(self.w1(x))), when no
    # activation attribute is found; the probe proves it like any other.
    default_activation: str | None = None
    # Recipes are tried in (order, name) order: a shape whose names overlap another's comes first.
    order: int = 100

    def __post_init__(self):
        if self.form_name not in FORMS:
            raise ValueError(f"recipe {self.name!r}: unknown form {self.form_name!r}; known: {', '.join(FORMS)}")
        roles, optional = set(self.form.roles), set(self.form.optional_roles)
        if not roles <= set(self.projections) <= roles | optional:
            raise ValueError(
                f"recipe {self.name!r}: form {self.form_name!r} needs projections {self.form.roles}"
                + (f" (optional: {tuple(sorted(optional))})" if optional else "")
            )
        if self.default_activation is not None and self.default_activation not in DEFAULT_ACTIVATIONS:
            raise ValueError(f"recipe {self.name!r}: default_activation must be one of {tuple(DEFAULT_ACTIVATIONS)}")

    @property
    def form(self) -> Form:
        return FORMS[self.form_name]

    def activation(self, module: nn.Module):
        for attr in self.activation_attrs:
            act = getattr(module, attr, None)
            if act is not None:
                return act
        return DEFAULT_ACTIVATIONS.get(self.default_activation)


@functools.cache
def load_recipes() -> tuple[Recipe, ...]:
    package = importlib.import_module("swiglu_hf.patches")
    recipes = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        spec = getattr(importlib.import_module(f"{package.__name__}.{info.name}"), "RECIPE", None)
        if spec is not None:
            spec = dict(spec)
            recipes.append(Recipe(form_name=spec.pop("form"), **spec))
    return tuple(sorted(recipes, key=lambda r: (r.order, r.name)))


def match_recipe(module: nn.Module):
    """(recipe, activation object) for the first recipe whose structure the module has.

    The activation is None only for recipes with require_activation=False (a refusal to report).
    """
    for recipe in load_recipes():
        if not recipe.form.has_structure(module, recipe.projections):
            continue
        act = recipe.activation(module)
        if act is not None or not recipe.require_activation:
            return recipe, act
    return None
