"""Load the data-only recipes shipped in `swiglu_hf.patches` and match modules against them."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass

from torch import nn

FORMS = {"split": ("gate", "up", "down"), "packed": ("gate_up", "down")}


@dataclass(frozen=True)
class Recipe:
    name: str
    form: str
    projections: dict  # role -> child attribute name
    activation_attrs: tuple
    examples: tuple = ()

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"recipe {self.name!r}: unknown form {self.form!r}; known: {', '.join(FORMS)}")
        if set(self.projections) != set(FORMS[self.form]):
            raise ValueError(f"recipe {self.name!r}: form {self.form!r} needs projections {FORMS[self.form]}")

    def match(self, module: nn.Module):
        """The module's activation object if it has this recipe's structure, else None."""
        for attr in self.projections.values():
            if not isinstance(getattr(module, attr, None), nn.Module):
                return None
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
    """(recipe, activation object) for the first recipe whose structure the module has."""
    for recipe in load_recipes():
        act = recipe.match(module)
        if act is not None:
            return recipe, act
    return None
