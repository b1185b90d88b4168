"""Tiny Llama, Mistral, Qwen2, Qwen3, Gemma and Phi-3: patched vs stock, both backends.

Each case goes through swiglu_hf.verify: logits, loss and every parameter gradient are compared
with a float64 copy of the model, and the patched error must be at most verify.FACTOR (2) times
the stock model's own error plus verify.FLOOR_ULPS (4) eps; greedy generate (KV cache) must
produce the same tokens.
"""

import copy
import importlib
import subprocess
import sys

import pytest
import torch

from swiglu_hf.numerics import rel_err
from tests.conftest import assert_like_stock

from swiglu_hf import apply_swiglu_patch, patched_modules, verify
from swiglu_hf.tools.models import TINY_MODELS, build_tiny

FAMILIES = list(TINY_MODELS)
verification = importlib.import_module("swiglu_hf.verification")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", FAMILIES)
def test_family_matches_stock(name, backend):
    report = verify(name, backend=backend, seq_len=12, new_tokens=6)
    assert len(report.patched) == 2, report.table()
    assert report.ok, report.table()
    assert {c.name for c in report.checks} == {"logits", "loss", "grads (worst)"}


@pytest.mark.parametrize("name", FAMILIES)
def test_torch_backend_is_bitwise_equal_to_stock(name):
    stock = build_tiny(name)
    patched = apply_swiglu_patch(copy.deepcopy(stock), backend="torch")
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    a, b = stock(input_ids=ids, labels=ids), patched(input_ids=ids, labels=ids)
    a.loss.backward()
    b.loss.backward()
    assert torch.equal(a.logits, b.logits)
    for (n, p), q in zip(stock.named_parameters(), patched.parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_bf16_torch_path_forward_bitwise_equal():
    stock = build_tiny("tiny-llama", dtype=torch.bfloat16)
    patched = apply_swiglu_patch(copy.deepcopy(stock))
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    assert torch.equal(stock(ids).logits, patched(ids).logits)


def test_verify_detects_a_wrong_kernel(monkeypatch):
    def broken_patch(model, **kwargs):
        apply_swiglu_patch(model, **kwargs)
        for m in model.modules():
            if "_swiglu_hf" in m.__dict__:
                m._swiglu_hf.activation = "gelu"  # a subtly wrong activation after the probe
        return model

    monkeypatch.setattr(verification, "apply_swiglu_patch", broken_patch)
    report = verification.verify("tiny-llama")
    assert not report.ok
    assert "MISMATCH" in report.table()


def test_peft_lora_before_and_after_patching(patch_backend):
    from peft import LoraConfig, get_peft_model

    lora = dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"], init_lora_weights=False)
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(3))

    def run(model):
        torch.manual_seed(0)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits, [p.grad for p in model.parameters() if p.requires_grad]

    stock = get_peft_model(build_tiny("tiny-llama"), LoraConfig(**lora))
    after = apply_swiglu_patch(copy.deepcopy(stock))  # patch the PEFT model
    before = get_peft_model(apply_swiglu_patch(build_tiny("tiny-llama")), LoraConfig(**lora))  # patch, then wrap
    before.load_state_dict(stock.state_dict())
    assert len(patched_modules(after)) == len(patched_modules(before)) == 2
    want_logits, want_grads = run(stock)
    for model in (after, before):
        logits, grads = run(model)
        assert_like_stock(logits, want_logits, patch_backend, "logits")
        for i, (a, b) in enumerate(zip(grads, want_grads)):
            assert_like_stock(a, b, patch_backend, f"grad {i}")
    merged = after.merge_and_unload()
    with torch.no_grad():
        # merging adds B @ A into the base weight: one rounding per weight, not the same ops as stock
        assert rel_err(merged(ids).logits, want_logits) < 1e-5


def test_cli_verify_exit_codes():
    ok = subprocess.run([sys.executable, "-m", "swiglu_hf.cli", "verify", "tiny-qwen3"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip().endswith("PASS") and "greedy tokens" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "swiglu_hf.cli", "verify", "no-such-model"], capture_output=True, text=True)
    assert bad.returncode != 0 and "built-in" in bad.stderr


def test_local_directory_roundtrip_with_safetensors(tmp_path):
    model = build_tiny("tiny-mistral")
    model.save_pretrained(tmp_path, safe_serialization=True)
    report = verify(str(tmp_path), seq_len=8, new_tokens=4)
    assert report.ok, report.table()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="safetensors|config.json"):
        verify(str(empty))


def test_quickstart_example_runs():
    out = subprocess.run([sys.executable, "examples/quickstart.py"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "patched: ['model.layers.0.mlp', 'model.layers.1.mlp']" in out.stdout and "PASS" in out.stdout
