"""`verify` on one copy of the weights: mutants it must catch (naming the module and the tensor), what
it leaves behind, and what it holds in memory (that the core never imports the tools: test_imports.py).

The mutants are fused MLPs the patch-time probe does not see: the probe runs the form's forward on a
float64 copy, while the model calls the forward bound at patch time (patch._fused_forward), so a
wrapper around the latter passes the probe and only verify can catch it. Swapped halves are what the
probe exists to refuse, so that test first shows the probe refusing them, then tells it to skip.
"""

import copy
import dataclasses

import pytest
import torch
from transformers import PreTrainedModel

from swiglu_hf import SelfCheckError, apply_swiglu_patch, patch_report, verify
from swiglu_hf import patch as patch_module
from swiglu_hf.loading import build_tiny, tiny_config

MLP = "model.layers.0.mlp"


def _failures(report) -> str:
    assert not report.ok, report.table()
    return "\n".join(report.failures())


def test_x1001_output_fails_naming_the_module_and_the_output(monkeypatch, patch_backend):
    real = patch_module._fused_forward

    def scaled(self, *args, **kwargs):
        return real(self, *args, **kwargs) * 1.001

    monkeypatch.setattr(patch_module, "_fused_forward", scaled)  # bound at patch time; the probe passes
    report = verify("tiny-llama", seq_len=8, new_tokens=2)
    failed = _failures(report)
    assert f"{MLP} output: error" in failed and f"MISMATCH {MLP} output" in report.table()
    assert next(c for c in report.checks if c.name == f"{MLP} output").patched_err > 5e-4


def test_swapped_halves_the_probe_was_told_to_skip_fail(monkeypatch, patch_backend):
    real_match = patch_module.match_recipe

    def swapped(module):  # a recipe naming the halves the wrong way round
        found = real_match(module)
        if found is None:
            return None
        recipe, act = found
        roles = {**recipe.projections, "gate": recipe.projections["up"], "up": recipe.projections["gate"]}
        return dataclasses.replace(recipe, projections=roles), act

    monkeypatch.setattr(patch_module, "match_recipe", swapped)
    with pytest.raises(SelfCheckError, match="differs from the module's own forward"):
        apply_swiglu_patch(build_tiny("tiny-llama"))  # what the probe is for
    monkeypatch.setattr(patch_module, "run_probe", lambda *args, **kwargs: True)  # told to skip
    report = verify("tiny-llama", seq_len=8, new_tokens=2)
    failed = _failures(report)
    for tensor in ("output", "grad input", "grad gate_proj.weight", "grad up_proj.weight"):
        assert f"{MLP} {tensor}: error" in failed, (tensor, failed)


class _WrongBackward(torch.autograd.Function):
    """The identity forward, a backward 0.1% off."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.001


def test_wrong_backward_fails_naming_the_gradients_and_not_the_output(monkeypatch, patch_backend):
    real = patch_module._fused_forward
    monkeypatch.setattr(patch_module, "_fused_forward", lambda self, x: _WrongBackward.apply(real(self, x)))
    report = verify("tiny-llama", seq_len=8, new_tokens=2)
    failed = _failures(report)
    assert all(c.ok for c in report.checks if c.group == "output"), report.table()
    for tensor in ("grad input", "grad gate_proj.weight", "grad up_proj.weight", "grad down_proj.weight"):
        assert f"{MLP} {tensor}: error" in failed, (tensor, failed)


def test_verify_works_in_place_and_leaves_the_model_as_given(monkeypatch):
    def no_whole_copies(obj, memo=None, _real=copy.deepcopy):
        assert not isinstance(obj, PreTrainedModel), "verify deep-copied the whole model"
        return _real(obj, memo)

    stock = build_tiny("tiny-llama")
    weights = {n: p.detach().clone() for n, p in stock.named_parameters()}
    stock.train()
    marker = torch.ones_like(stock.lm_head.weight)
    stock.lm_head.weight.grad = marker
    monkeypatch.setattr(copy, "deepcopy", no_whole_copies)
    assert verify(stock, seq_len=8, new_tokens=2).ok
    assert not patch_report(stock) and all("forward" not in m.__dict__ for m in stock.modules())
    assert stock.training and all(m.training for m in stock.modules())
    assert stock.lm_head.weight.grad is marker and stock.model.embed_tokens.weight.grad is None
    assert all(torch.equal(p, weights[n]) for n, p in stock.named_parameters())

    patched = apply_swiglu_patch(build_tiny("tiny-llama"))
    before = {n: (m.__dict__["_swiglu_hf"], m.__dict__["forward"]) for n, m in patched.named_modules()
              if "_swiglu_hf" in m.__dict__}
    report = verify(patched, seq_len=8, new_tokens=2)
    assert report.ok and report.patched == list(before)
    after = {n: (m.__dict__["_swiglu_hf"], m.__dict__["forward"]) for n, m in patched.named_modules()
             if "_swiglu_hf" in m.__dict__}
    assert all(a is b for n in before for a, b in zip(before[n], after[n])) and after.keys() == before.keys()


def test_suspended_runs_stock_and_puts_back_the_same_patch():
    from swiglu_hf.patch import is_patched, suspended

    model = apply_swiglu_patch(build_tiny("tiny-llama"), backend="torch")
    mlp = model.get_submodule(MLP)
    state, fused, report = mlp.__dict__["_swiglu_hf"], mlp.__dict__["forward"], patch_report(model)
    with suspended(model) as states:
        assert not is_patched(mlp) and patch_report(model) is None and states[MLP] is state
        assert mlp.forward.__func__ is type(mlp).forward  # the stock forward, no instance attribute left
    assert mlp.__dict__["_swiglu_hf"] is state and mlp.__dict__["forward"] is fused and patch_report(model) is report
    with pytest.raises(RuntimeError, match="inside"), suspended(model):
        raise RuntimeError("inside")
    assert mlp.__dict__["_swiglu_hf"] is state and mlp.__dict__["forward"] is fused and patch_report(model) is report


def test_peak_is_one_training_step_plus_one_mlp_in_float64():
    """verify's peak (report.peak_bytes: live tensor bytes on CPU) stays within what one stock training
    step of the batch needs (weights, gradients, activations) plus one MLP and its gradients in float64.
    The former verify held three more copies of the model (one in float64) and three sets of gradients
    in float64."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from swiglu_hf import verification

    config = tiny_config("tiny-llama")
    config.update(dict(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=4))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    step = SimpleNamespace(peak_bytes=None, peak_kind="")
    with verification._peak(model, torch.device("cpu"), step):
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    mlp = sum(p.numel() for p in model.model.layers[0].mlp.parameters())
    report = verify(model, seq_len=16, new_tokens=2)
    assert report.ok, report.table()
    assert report.peak_bytes <= step.peak_bytes + 2 * 8 * mlp, (report.peak_bytes, step.peak_bytes, mlp)


def test_full_reference_adds_the_whole_model_float64_rows():
    report = verify("tiny-qwen2", seq_len=8, new_tokens=2, full_reference=True)
    assert report.ok, report.table()
    groups = {c.group for c in report.checks}
    assert {"whole model logits", "whole model loss", "whole model grads", "output", "grad input", "grad weights"} <= groups


def test_cli_prints_the_peak(capsys):
    from swiglu_hf import cli

    assert cli.main(["verify", "tiny-llama", "--seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "peak memory:" in out and "live tensor bytes" in out and out.strip().endswith("PASS")
