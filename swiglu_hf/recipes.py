"""Load the data-only recipes shipped in `swiglu_hf.patches` and match modules against them."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass

import torch
from torch import nn

FORMS = {"split": ("gate", "up", "down"), "packed": ("gate_up", "down"), "experts": ("gate_up", "down")}
# Forms whose projections are 3D expert weight tensors [E, ., .] rather than child modules.
TENSOR_FORMS = ("experts",)


@dataclass(frozen=True)
class Recipe:
    name: str
    form: str
    projections: dict  # role -> child attribute name
    activation_attrs: tuple
    examples: tuple = ()
    # False: the structure alone makes a candidate and a missing activation is a refusal (with a
    # reason) rather than "not a gated MLP"; True: no activation attribute, no match.
    require_activation: bool = True

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"recipe {self.name!r}: unknown form {self.form!r}; known: {', '.join(FORMS)}")
        if set(self.projections) != set(FORMS[self.form]):
            raise ValueError(f"recipe {self.name!r}: form {self.form!r} needs projections {FORMS[self.form]}")

    def has_structure(self, module: nn.Module) -> bool:
        for attr in self.projections.values():
            part = getattr(module, attr, None)
            if self.form in TENSOR_FORMS:
                if not (isinstance(part, torch.Tensor) and part.dim() == 3):
                    return False
            elif not isinstance(part, nn.Module):
                return False
        return True

    def activation(self, module: nn.Module):
        for attr in self.activation_attrs:
            act = getattr(module, attr, None)
            if act is not None:
                return act
        return None


@functools.cache
def load_recipes() -> tuple[Recipe, ...]:
    package = importlib.import_module("swiglu_hf.patches")
    recipes = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        spec = getattr(importlib.import_module(f"{package.__name__}.{info.name}"), "RECIPE", None)
        if spec is not None:
            recipes.append(Recipe(**spec))
    return tuple(recipes)


def match_recipe(module: nn.Module):
    """(recipe, activation object) for the first recipe whose structure the module has.

    The activation is None only for recipes with require_activation=False (a refusal to report).
    """
    for recipe in load_recipes():
        if not recipe.has_structure(module):
            continue
        act = recipe.activation(module)
        if act is not None or not recipe.require_activation:
            return recipe, act
    return None
