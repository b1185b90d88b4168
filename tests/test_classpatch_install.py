"""Class-level patching installs its three wrappers all or none."""

from __future__ import annotations

import pytest
from transformers import PreTrainedModel

from swiglu_hf import classpatch


def _attrs() -> dict:
    return {name: PreTrainedModel.__dict__.get(name) for name in classpatch._WRAPPED}


def test_failure_part_way_through_install_restores_earlier_wrappers(monkeypatch):
    before = _attrs()

    def broken(original):  # the last of the three assignments fails, after two are installed
        raise RuntimeError("wrapper failed")

    monkeypatch.setattr(classpatch, "_wrap_from_pretrained", broken)
    with pytest.raises(RuntimeError, match="wrapper failed"):
        classpatch.enable_class_patching(backend="torch")
    after = _attrs()
    assert all(after[name] is before[name] for name in classpatch._WRAPPED)  # the same objects
    assert not classpatch.class_patching_enabled() and not classpatch._saved

    monkeypatch.undo()  # and the next enable installs and removes cleanly
    token = classpatch.enable_class_patching(backend="torch")
    try:
        assert all(_attrs()[name] is not before[name] for name in classpatch._WRAPPED)
    finally:
        classpatch.disable_class_patching(token)
    assert all(_attrs()[name] is before[name] for name in classpatch._WRAPPED)
