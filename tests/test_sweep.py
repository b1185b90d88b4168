"""A representative subset of `swiglu-hf sweep` (the full sweep writes docs/SUPPORTED_MODELS.md)."""

import argparse
import importlib.util
import subprocess
import sys

import pytest

from swiglu_hf.tools import sweep
from swiglu_hf.tools.sweep import configs as sweep_configs

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


# ---- configurations as checkpoints have them ---------------------------------------------------


def test_per_layer_configs_are_shrunk_consistently():
    # Gemma 4: full-attention layers override head_dim through per_layer_config (global_head_dim)
    cfg = sweep.tiny_config("gemma4_text")
    assert cfg.is_heterogeneous and cfg.layer_types == ["sliding_attention", "full_attention"]
    assert [cfg.per_layer_config[i].head_dim for i in range(2)] == [16, 32]
    # dots3: sliding layers have their own MLA sizes, and head_dim == qk_nope + qk_rope there
    text = sweep.tiny_config("dots3_note_text")
    swa = text.per_layer_config["sliding_attention"]
    assert text.is_heterogeneous and swa.head_dim == swa.qk_nope_head_dim + swa.qk_rope_head_dim
    # M-RoPE sections cover head_dim / 2 rotary frequencies
    vl = sweep.tiny_config("qwen2_vl").text_config
    assert sum(vl.rope_parameters["mrope_section"]) == vl.hidden_size // vl.num_attention_heads // 2
    # Mamba heads: n_heads * d_head == expand * hidden
    bamba = sweep.tiny_config("bamba")
    assert bamba.mamba_n_heads * bamba.mamba_d_head == bamba.mamba_expand * bamba.hidden_size


def test_every_kind_of_layer_is_kept():
    """A 2-layer prefix of a 40-layer pattern would drop MoE layers, hybrid blocks, full attention."""
    assert set(sweep.tiny_config("qwen3_5_text").layer_types) == {"linear_attention", "full_attention"}
    v4 = sweep.tiny_config("deepseek_v4")
    assert {"hash_moe", "moe"} <= set(v4.mlp_layer_types) and len(v4.mlp_layer_types) == v4.num_hidden_layers
    assert "hybrid" in sweep.tiny_config("zamba2").layers_block_type
    assert set(sweep.tiny_config("gemma3_text").layer_types) == {"sliding_attention", "full_attention"}


@pytest.mark.parametrize("model_type", ["gemma4_text", "qwen2_vl"])
def test_formerly_unbuilt_types_build_and_verify(model_type):
    r = sweep.check(model_type, bf16=True)
    assert r.status == "verified" and r.patched >= 2 and r.max_err > 0, (r.status, r.detail, r.refused)
    assert r.bf16 == "equal"


def test_gemma4_assistant_runs_on_its_target_state():
    """No input_ids: inputs_embeds and the target's shared KV states, built by the sweep."""
    r = sweep.check("gemma4_assistant")
    assert r.status == "verified" and r.patched == 2, (r.status, r.detail)


def test_sweep_records_non_gated_unbuildable_and_unavailable():
    assert sweep.check("gpt2").status == "no gated MLP"
    r = sweep.check("no_such_model_type")
    assert r.status == "not built" and "KeyError" in r.detail
    if importlib.util.find_spec("timm") is None:
        r = sweep.check("gemma3n")  # its vision tower is a timm model
        assert r.status == "unavailable" and "`timm`" in r.detail


def test_a_gated_forward_under_unknown_names_is_reported_unrecognised():
    """A feed-forward class computing act(a(x)) * b(x) under names no recipe has is listed, never 'no gated MLP'."""
    import torch.nn.functional as F
    from torch import nn

    class OddMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.c(F.silu(self.a(x)) * self.b(x))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = OddMLP()

    assert sweep._unrecognised(Block(), set()) == ["ffn (OddMLP)"]


# Types whose gated units were unrecognised (names or shapes no recipe knew), unpatched inside a verified
# model, or refused, until patches/*.py got their recipes: each must stay verified, every gated unit patched,
# bf16 bitwise and the non-identity values verified too. model type -> recipes among the patched units.
NEWLY_VERIFIED = {
    "dbrx": {"expert_glu"},
    "jetmoe": {"parallel_experts"},
    "lfm2": {"split_w1_w3"},
    "lfm3": {"split_w1_w3"},
    "lfm2_moe": {"experts", "split_w1_w3"},
    "modernbert-decoder": {"packed_wi_wo"},
    "moshi": {"packed_fc"},
    "xlstm": {"split_xlstm"},
    "granitemoeshared": {"experts", "packed_linear_io"},
    "granitemoehybrid": {"experts", "packed_linear_io"},
    "granitemoe_swa": {"experts", "packed_linear_io"},
    "inkling_text": {"experts", "stacked_experts"},
    "zamba2": {"packed"},
    "dory": {"split"},
    "gemma4": {"split"},  # its vision MLP's projections wrap an nn.Linear in clamps (ClippableLinear)
}


# math beyond act(gate) * up that identity values could hide: Dory's suv scales (ones at init), Zamba2's adapters,
# Inkling's gammas, JetMoE's output bias (zeros at init); the full sweep runs the pass on every type
NON_IDENTITY = {"dory", "zamba2", "inkling_text", "jetmoe"}


@pytest.mark.parametrize("model_type", sorted(NEWLY_VERIFIED))
def test_formerly_unpatched_units_verify(model_type):
    r = sweep.check(model_type, bf16=True)
    assert r.status == "verified" and not r.refused and not r.unrecognised, (r.status, r.detail, r.refused, r.unrecognised)
    assert NEWLY_VERIFIED[model_type] <= set(r.forms), r.forms
    assert r.bf16 == "equal" and r.max_err > 0
    if model_type in NON_IDENTITY:
        s = sweep.check(model_type, scaled=True)
        assert s.status == "verified" and not s.refused, (s.status, s.detail, s.refused)


# One type per status, run through the sweep itself (all passes) rather than read from the generated doc.
COUNTED = {"llama": "verified", "falcon_h1": "verified", "phi4_multimodal": "partly verified", "beam": "refused",
           "gpt2": "no gated MLP"}


def test_supported_models_table_counts():
    """The sweep's counts, from a run: a model with refused units (phi4_multimodal: 48 of 50 refused) is
    "partly verified", never counted among the verified."""
    rows = sweep.run(list(COUNTED), log=None)
    assert {row.defaults.model_type: row.defaults.status for row in rows} == COUNTED
    phi4 = next(row.defaults for row in rows if row.defaults.model_type == "phi4_multimodal")
    assert phi4.patched == 2 and len(phi4.refused) == 48
    text = sweep.markdown(rows)
    assert ("Summary, fp32 (config defaults): 2 verified, 1 partly verified (some units refused or unpatched, "
            "below), 1 refused (reasons below), 1 no gated MLP.") in text
    assert "Summary, bf16 (PyTorch path, bitwise): 3 of 3 verified or partly verified types equal to stock." in text
    assert ("Summary, non-identity (4 types with gated units): 2 verified, 1 partly verified (some units refused or "
            "unpatched, below), 1 refused (reasons below).") in text
    assert "- phi4_multimodal (48 of 50 units; the others patched and verified): fused forward" in text
    assert "| phi4_multimodal | partly verified | 2 (2 packed) |" in text and not any(r.failed for r in rows)


def test_the_generated_table_has_no_unrecognised_units_and_lists_the_newly_verified():
    """docs/SUPPORTED_MODELS.md as last generated (a full sweep; the counts themselves are tested above)."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "SUPPORTED_MODELS.md").read_text()
    assert "| unrecognised |" not in text and "no recipe knows, left unpatched" not in text
    for model_type in NEWLY_VERIFIED:
        assert f"| {model_type} | verified |" in text, model_type


def test_beam_refusals_name_the_float32_gate():
    """Beam gates as (act(gate.float()) * up.float()).to(dtype): one rounding, which no gate spec describes."""
    r = sweep.check("beam")
    assert r.status == "refused", (r.status, r.detail)
    reasons = " ".join(r.refused.values())
    assert "(act(gate.float()) * up.float()).to(dtype)" in reasons  # BeamExperts._apply_gate
    assert "3.96e-08" in reasons or "e-08" in reasons  # BeamMLP: the float64 probe sees float32 rounding


# ---- the non-identity pass ---------------------------------------------------------------------


def test_non_identity_values_are_chosen_for_scaling_and_clamping_fields():
    values = sweep_configs.flat(sweep_configs.scaled_values("falcon_h1"))
    assert values["mlp_multipliers"] == [0.88, 0.59] and values["embedding_multiplier"] == 0.88
    assert sweep_configs.scaled_values("gpt_oss")["swiglu_limit"] == sweep_configs.LIMIT  # 7.0 never binds
    assert sweep_configs.scaled_values("llama") == {"mlp_bias": True, "attention_bias": True}  # both off by default
    assert sweep_configs.scaled_values("gpt2") == {}
    assert sweep.tiny_config("falcon_h1", scaled={"mlp_multipliers": [0.88, 0.59]}).mlp_multipliers == [0.88, 0.59]


def test_falcon_h1_multipliers_verified_or_refused_never_silent():
    r = sweep.check("falcon_h1", scaled=True)
    assert r.scaled["mlp_multipliers"] == [0.88, 0.59]
    assert r.status in ("verified", "refused"), (r.status, r.detail)
    if r.status == "verified":  # the patched forward matched stock with the multipliers binding
        assert r.patched == 2 and r.max_err is not None and r.max_err > 0
    else:
        assert r.refused and "mlp_multipliers" in r.detail


def test_the_non_identity_pass_catches_math_that_identity_defaults_hide(monkeypatch):
    """A fused forward that drops Falcon-H1's multipliers verifies with the defaults (1.0) and not otherwise."""
    from swiglu_hf import patch

    def drops_multipliers(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    monkeypatch.setattr(patch, "_fused_forward", drops_multipliers)  # bound at patch time, the probe untouched
    assert sweep.check("falcon_h1").status == "verified"  # the hole identity values leave
    r = sweep.check("falcon_h1", scaled=True)
    assert r.status in ("mismatch", "refused"), (r.status, r.detail)
    if r.status == "mismatch":  # a failure of the sweep (non-zero exit), not a row among the verified
        assert sweep.Row(sweep.Result("falcon_h1", "verified"), r).failed


def test_the_non_identity_pass_gives_zero_initialised_biases_values(monkeypatch):
    """HF initialises biases to 0: a fused forward dropping down_proj's bias passes unless they are perturbed."""
    import torch.nn.functional as F

    from swiglu_hf import patch

    r = sweep.check("llama", scaled=True)  # with biases, all 0 at init, and norm weights, all 1: perturbed
    assert r.status == "verified" and r.perturbed > 0 and r.scaled["mlp_bias"] is True

    def drops_down_bias(self, x):
        return F.linear(self.act_fn(self.gate_proj(x)) * self.up_proj(x), self.down_proj.weight)

    monkeypatch.setattr(patch, "_fused_forward", drops_down_bias)
    assert sweep.check("llama").status == "verified"  # no bias by default: nothing to drop
    r = sweep.check("llama", scaled={"mlp_bias": True})
    assert r.status == "mismatch" and r.perturbed > 0, (r.status, r.detail)


# ---- the bf16 pass -----------------------------------------------------------------------------


def test_bf16_pass_is_bitwise_on_llama():
    r = sweep.check("llama", bf16=True)
    assert r.status == "verified" and r.bf16 == "equal"


def test_bf16_pass_sees_a_rounding_order_that_fp32_does_not(monkeypatch):
    """Multiplying in fp32 and rounding once is as accurate as stock in fp32, but not stock's bits in bf16."""
    from swiglu_hf import patch

    def one_rounding(self, x):
        return self.down_proj((self.act_fn(self.gate_proj(x).float()) * self.up_proj(x).float()).to(x.dtype))

    monkeypatch.setattr(patch, "_fused_forward", one_rounding)
    r = sweep.check("llama", bf16=True)
    assert r.status == "verified" and r.bf16.startswith("differs")
    assert sweep.Row(r).failed


# ---- failures are failures ---------------------------------------------------------------------


def test_patched_model_raising_is_a_mismatch_and_fails_the_exit_code(monkeypatch, tmp_path):
    from swiglu_hf import patch

    def broken(self, *args, **kwargs):
        raise RuntimeError("fused forward exploded")

    monkeypatch.setattr(patch, "_fused_forward", broken)  # bound at patch time; the probe itself is untouched
    r = sweep.check("llama")
    assert r.status == "mismatch" and "fused forward exploded" in r.detail and r.patched == 2
    args = argparse.Namespace(types="llama", out=str(tmp_path / "out.md"), timeout=60, passes="defaults")
    assert sweep._main(args) == 1


def test_stock_model_raising_is_failed_not_mismatch(monkeypatch):
    from transformers import LlamaForCausalLM

    def broken(self, *args, **kwargs):
        raise RuntimeError("stock exploded")

    monkeypatch.setattr(LlamaForCausalLM, "forward", broken)
    r = sweep.check("llama")
    assert r.status == "failed" and "stock exploded" in r.detail


# ---- the table ---------------------------------------------------------------------------------


def test_markdown_reports_every_pass_and_the_refusals():
    verified = sweep.Result("llama", "verified", patched=2, forms={"split": 2}, max_err=6e-7, stock_err=6e-7, bf16="equal")
    refused = sweep.Result("somemodel", "refused", refused={"model.layers.0.mlp": "model.layers.0.mlp (X) uses activation Y"})
    only_identity = sweep.Result("falcon_h1", "refused", refused={"m": "m (FalconH1MLP) differs from the module's own forward"},
                                 scaled={"mlp_multipliers": [0.88, 0.59]}, detail="refused only with mlp_multipliers=[0.88, 0.59]")
    rows = [sweep.Row(verified), sweep.Row(refused),
            sweep.Row(sweep.Result("falcon_h1", "verified", patched=2, forms={"split": 2}, max_err=1e-6, stock_err=1e-6,
                                   bf16="equal"), only_identity),
            sweep.Row(sweep.Result("gpt2", "no gated MLP"))]
    text = sweep.markdown(rows)
    assert "Summary, fp32 (config defaults): 2 verified, 1 refused (reasons below), 1 no gated MLP." in text
    assert "Summary, bf16 (PyTorch path, bitwise): 2 of 2 verified or partly verified types equal to stock." in text
    assert "Summary, non-identity (1 types with gated units): 1 refused (reasons below)." in text
    assert "- somemodel: uses activation Y" in text
    assert "- falcon_h1 (non-identity: mlp_multipliers=[0.88, 0.59]): differs from the module's own forward" in text
    assert "| llama | verified | 2 (2 split) | 6.0e-07 (6.0e-07) | equal | - | - |  |" in text
    assert "| falcon_h1 | verified |" in text and "refused (verified only with identity values)" in text


def test_cli_writes_the_table(tmp_path):
    out = tmp_path / "SUPPORTED.md"
    proc = subprocess.run([sys.executable, "-m", "swiglu_hf.cli", "sweep", "--types", "llama,gpt2", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert "transformers" in text and "| llama | verified | 2 (2 split) |" in text and "| equal |" in text
    assert "| gpt2 | no gated MLP |" in text
