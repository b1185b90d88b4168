"""A representative subset of `swiglu-hf sweep` (the full sweep writes docs/SUPPORTED_MODELS.md)."""

import subprocess
import sys

import pytest

from swiglu_hf.tools import sweep

VERIFIED = {  # model type -> recipe forms that must be among the patched units
    "llama": {"split"},
    "phi3": {"packed"},
    "gemma2": {"split"},
    "mixtral": {"experts"},
    "olmoe": {"experts"},
    "qwen2_moe": {"experts", "split"},  # shared expert
    "deepseek_v3": {"experts", "split"},  # dense first layer + shared experts
    "llava": {"split"},  # language tower of a vision-language model
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("model_type", sorted(VERIFIED))
def test_sweep_verifies(model_type, backend):
    r = sweep.check(model_type, backend=backend)
    assert r.status == "verified", (r.status, r.detail, r.refused)
    assert VERIFIED[model_type] <= set(r.forms) and not r.refused
    # the comparison against float64 ran (non-zero rounding error on both sides) over listed patched units
    assert r.max_err is not None and r.max_err > 0 and r.stock_err > 0
    assert r.patched > 0 and sum(r.forms.values()) == r.patched


def test_sweep_refuses_gpt_oss_with_reason():
    r = sweep.check("gpt_oss")
    assert r.status == "refused" and r.patched == 0 and r.refused
    assert all("interleaved" in reason for reason in r.refused.values())


def test_sweep_records_non_gated_and_unbuildable():
    assert sweep.check("gpt2").status == "no gated MLP"
    r = sweep.check("no_such_model_type")
    assert r.status == "not built" and "KeyError" in r.detail


def test_markdown_and_cli(tmp_path):
    out = tmp_path / "SUPPORTED.md"
    proc = subprocess.run([sys.executable, "-m", "swiglu_hf.cli", "sweep", "--types", "llama,gpt_oss", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert "transformers" in text and "| llama | verified | 2 (2 split)" in text
    assert "| gpt_oss | refused |" in text and "interleaved" in text


def test_patched_model_raising_is_a_mismatch_and_fails_the_exit_code(monkeypatch, tmp_path):
    import argparse

    from swiglu_hf import patch

    def broken(self, *args, **kwargs):
        raise RuntimeError("fused forward exploded")

    monkeypatch.setattr(patch, "_fused_forward", broken)  # bound at patch time; the probe itself is untouched
    r = sweep.check("llama")
    assert r.status == "mismatch" and "fused forward exploded" in r.detail and r.patched == 2
    args = argparse.Namespace(types="llama", out=str(tmp_path / "out.md"), timeout=60)
    assert sweep._main(args) == 1


def test_stock_model_raising_is_failed_not_mismatch(monkeypatch):
    from transformers import LlamaForCausalLM

    def broken(self, *args, **kwargs):
        raise RuntimeError("stock exploded")

    monkeypatch.setattr(LlamaForCausalLM, "forward", broken)
    r = sweep.check("llama")
    assert r.status == "failed" and "stock exploded" in r.detail
