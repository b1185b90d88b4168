"""A representative subset of `swiglu-hf sweep` (the full sweep writes docs/SUPPORTED_MODELS.md)."""

import subprocess
import sys

import pytest

from swiglu_hf import sweep

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


@pytest.mark.parametrize("model_type", sorted(VERIFIED))
def test_sweep_verifies(model_type):
    r = sweep.check(model_type)
    assert r.status == "verified", (r.status, r.detail, r.refused)
    assert VERIFIED[model_type] <= set(r.forms) and not r.refused
    assert r.max_err is not None and r.max_err <= 2 * r.stock_err + 4 * 1.2e-7


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
