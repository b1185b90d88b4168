"""Tiny Llama, Mistral, Qwen2, Qwen3, Gemma and Phi-3: patched vs stock, both backends.

Each case goes through swiglu_hf.verify: logits, loss and every parameter gradient of the whole
model are compared with stock's (bitwise on the PyTorch path); each patched MLP's output and
gradients are compared with that MLP run in float64, and the patched error must be at most
verify.FACTOR (2) times the stock module's own error plus verify.FLOOR_ULPS (4) eps; greedy
generate (KV cache) must produce the same tokens.
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
    assert {d.name for d in report.diffs} == {"logits", "loss", "grads (worst)"}
    assert {c.group for c in report.checks} == {"output", "grad input", "grad weights"}
    assert {c.name.split(" ")[0] for c in report.checks} == set(report.patched)


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


# ---- families whose gated units have their own names or shapes (patches/*.py) -----------------

# model type -> (recipe of the units that must be patched, classes patched). Built tiny from their own
# config classes, as the sweep builds them (swiglu_hf.tools.sweep.configs).
NAMED_FAMILIES = {
    "dbrx": ("expert_glu", {"DbrxExpertGLU"}),  # forward(x, w1, v1, w2) over one expert's slices
    "jetmoe": ("parallel_experts", {"JetMoeMoE"}),  # the whole routed layer over ParallelExperts
    "lfm2": ("split_w1_w3", {"Lfm2MLP"}),  # w2(F.silu(w1 x) * w3 x): silu by name
    "modernbert-decoder": ("packed_wi_wo", {"ModernBertDecoderMLP"}),  # dropout between gate and Wo
    "moshi": ("packed_fc", {"MoshiGatingMLP"}),
    "xlstm": ("split_xlstm", {"xLSTMFeedForward"}),
    "granitemoeshared": ("packed_linear_io", {"GraniteMoeSharedMLP"}),  # the shared MLP next to the experts
    "inkling_text": ("stacked_experts", {"InklingSharedExperts"}),  # bmm over [S, I, H], scaled by gammas
    "zamba2": ("packed", {"Zamba2MLP"}),  # forward(x, layer_idx): per-layer adapter added to gate_up
    "dory": ("split", {"DoryMLP"}),  # suv scales on gate and up, L2 sub-norm before down_proj
}


def _named_run(model, ids):
    from swiglu_hf.verification import _run

    return _run(model, ids)


@pytest.mark.parametrize("model_type", sorted(NAMED_FAMILIES))
def test_named_family_matches_stock(model_type, patch_backend):
    from swiglu_hf import patch_report
    from swiglu_hf.tools import sweep

    with sweep._one_thread():
        stock = sweep.build(model_type)
        patched = apply_swiglu_patch(copy.deepcopy(stock))
        recipe, classes = NAMED_FAMILIES[model_type]
        report = patch_report(patched)
        assert not report.refused, report.refused
        by_name = dict(patched.named_modules())
        assert classes == {type(by_name[n]).__name__ for n, r in report.patched.items() if r == recipe}, report.patched
        ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(4))
        (want_logits, want_loss, want_grads), (logits, loss, grads) = _named_run(stock, ids), _named_run(patched, ids)
    assert_like_stock(logits, want_logits, patch_backend, "logits")
    assert_like_stock(loss, want_loss, patch_backend, "loss")
    assert want_grads.keys() == grads.keys()
    for name, g in want_grads.items():
        assert_like_stock(grads[name], g, patch_backend, name)


def test_xlstm_fused_weight_mode_is_the_packed_shape():
    """weight_mode="fused": one proj_up_gate_z, split by torch.tensor_split at the intermediate size (the halves).
    (The whole tiny model does not initialise in that mode: the feed-forward block alone.)"""
    from transformers.models.xlstm import modeling_xlstm

    from swiglu_hf import patch_report
    from swiglu_hf.tools import sweep

    cfg = sweep.tiny_config("xlstm", scaled={"weight_mode": "fused", "use_bias": True})
    torch.manual_seed(0)
    stock = modeling_xlstm.xLSTMFeedForward(cfg)
    patched = apply_swiglu_patch(copy.deepcopy(stock), backend="torch")
    assert set(patch_report(patched).patched.values()) == {"packed_xlstm"}
    x = torch.randn(2, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(5), requires_grad=True)
    outs = []
    for m in (stock, patched):
        y = m(x)
        outs.append((y, *torch.autograd.grad(y.square().sum(), (x, *m.parameters()))))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_modernbert_decoder_dropout_between_gate_and_wo_draws_as_stock():
    """Training mode, mlp_dropout 0.5: the fused forward drops h with stock's RNG draws (eval probes cannot see it)."""
    from swiglu_hf.tools import sweep

    with sweep._one_thread():
        stock = sweep.build("modernbert-decoder", config=sweep.tiny_config("modernbert-decoder", scaled={"mlp_dropout": 0.5}))
        patched = apply_swiglu_patch(copy.deepcopy(stock), backend="torch")
        stock.train(), patched.train()
        ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(6))
        runs = []
        for model in (stock, patched):
            torch.manual_seed(0)
            runs.append(_named_run(model, ids))
    (want_logits, _, want_grads), (logits, _, grads) = runs
    assert torch.equal(logits, want_logits)
    assert all(torch.equal(grads[n], g) for n, g in want_grads.items())


def test_look_alike_names_are_not_gated_units():
    """fc1/fc2 and input_linear/output_linear also name plain MLPs and JetMoE's attention experts."""
    from torch import nn

    from swiglu_hf.recipes import match_recipe

    class PlainMLP(nn.Module):  # CLIP/OPT: fc2(act(fc1 x)), fc1 as wide as fc2's input
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.activation_fn = nn.Linear(8, 16), nn.Linear(16, 8), nn.GELU()

    class Gated(PlainMLP):  # Moshi: fc1 twice as wide
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 32)

    assert match_recipe(PlainMLP()) is None
    assert match_recipe(Gated())[0].name == "packed_fc"
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeMoA

    from swiglu_hf.tools import sweep

    assert match_recipe(JetMoeMoA(sweep.tiny_config("jetmoe"))) is None  # no activation, no gate
