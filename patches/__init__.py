"""Recipes: one small file per gated-MLP *shape*, each a plain-data RECIPE dict.

Installed as `swiglu_hf.patches`. A recipe names the projection submodules of its shape and the
attributes where the shape keeps its activation; `swiglu_hf.recipes` turns each into a Recipe and
the patch engine matches modules structurally (any class with these children), then proves the
match with a probe. A new family whose MLP has a known shape needs no new code.
"""
