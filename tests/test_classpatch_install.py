"""Class-level patching: its wrappers install all or none; models it sees (tuples from
from_pretrained, models without post_init, models without a gated MLP); the shared option check."""

from __future__ import annotations

import pytest
from transformers import PreTrainedModel

from swiglu_hf import classpatch


def _attrs() -> dict:
    return {name: PreTrainedModel.__dict__.get(name) for name in classpatch._WRAPPED}


def test_failure_part_way_through_install_restores_earlier_wrappers(monkeypatch):
    before = _attrs()

    def broken(original):  # the loader wrappers fail, after post_init's is installed
        raise RuntimeError("wrapper failed")

    monkeypatch.setattr(classpatch, "_wrap_loader", broken)
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


# ---- class-level mode behaviour: from_pretrained tuples, models without post_init, non-gated models

def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)


def test_from_pretrained_with_output_loading_info_is_patched(tmp_path):
    import swiglu_hf
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    LlamaForCausalLM(_llama_config()).save_pretrained(tmp_path)
    with swiglu_hf.patching(backend="torch"):
        model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(info, dict) and len(swiglu_hf.patched_modules(model)) == 1


def test_model_without_post_init_does_not_disable_later_patching():
    import swiglu_hf
    from torch import nn
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

    class Head(LlamaPreTrainedModel):  # a user model that never calls post_init
        def __init__(self, config):
            super().__init__(config)
            self.lin = nn.Linear(4, 4)

    with swiglu_hf.patching(backend="torch"):
        head = Head(_llama_config())  # kept alive: its construction is over, it must not count as "outer"
        model = LlamaForCausalLM(_llama_config())
    assert len(swiglu_hf.patched_modules(model)) == 1 and swiglu_hf.patched_modules(head) == []


def test_model_without_gated_mlp_inside_patching_is_skipped_with_a_warning():
    import swiglu_hf
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    with swiglu_hf.patching(backend="torch"):
        with pytest.warns(UserWarning, match="GPT2LMHeadModel left unpatched.*no gated MLP"):
            gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
        llama = LlamaForCausalLM(_llama_config())
    assert swiglu_hf.patched_modules(gpt2) == [] and len(swiglu_hf.patched_modules(llama)) == 1


def test_callback_takes_every_apply_option_validated_like_apply():
    import swiglu_hf
    from swiglu_hf.integrations import SwigluCallback

    callback = SwigluCallback(strict=False, backend="torch", tile_tokens=4, filter_fn=lambda n, m: True)
    from swiglu_hf.options import PatchOptions

    assert set(callback.patch_kwargs) == set(PatchOptions().as_kwargs()) == {"backend", "filter_fn", "tile_tokens", "strict"}
    with pytest.raises(swiglu_hf.InvalidInputError, match="strict"):
        SwigluCallback(strict="no")
    with pytest.raises(swiglu_hf.InvalidInputError, match="filter_fn"):
        SwigluCallback(filter_fn="mlp")
    with pytest.raises(swiglu_hf.InvalidInputError, match="strict"):
        swiglu_hf.enable_class_patching(strict=1)
    with pytest.raises(swiglu_hf.InvalidInputError, match="unknown apply_swiglu_patch argument"):
        SwigluCallback(tile=4)
    assert not classpatch.class_patching_enabled()


def test_nested_model_is_patched_once_and_the_outer_report_covers_it():
    """A model built inside another's __init__ (no loading classmethod) is patched at its own post_init;
    the outer model's patch finds it patched with the same options and reports every unit."""
    import swiglu_hf
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

    class Wrapper(LlamaPreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.inner = LlamaForCausalLM(config)
            self.post_init()

    with swiglu_hf.patching(backend="torch"):
        outer = Wrapper(_llama_config())
    assert swiglu_hf.patched_modules(outer) == ["inner.model.layers.0.mlp"]
    assert list(swiglu_hf.patch_report(outer).patched) == ["inner.model.layers.0.mlp"]


def test_model_built_inside_patching_trains_like_stock(patch_backend):
    """Class mode with backend="auto": the model it patches runs the PyTorch path or the kernels
    (interpreter) and matches a stock copy of the same weights."""
    import torch
    from transformers import LlamaForCausalLM

    import swiglu_hf
    from tests.conftest import assert_like_stock

    torch.manual_seed(0)
    stock = LlamaForCausalLM(_llama_config())
    with swiglu_hf.patching():
        torch.manual_seed(0)
        patched = LlamaForCausalLM(_llama_config())
    assert len(swiglu_hf.patched_modules(patched)) == 1
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    for model in (stock, patched):
        model(input_ids=ids, labels=ids).loss.backward()
    for (n, a), b in zip(stock.named_parameters(), patched.parameters()):
        assert_like_stock(b.grad, a.grad, patch_backend, n)
