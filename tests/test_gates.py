"""Gates peers skip: clamped, alpha-scaled, interleaved, multiplied, relu², a sub-norm before down_proj.

GPT-OSS (experts: interleaved, clamps, x*sigmoid(alpha x), up + 1), DeepSeek-V4 (clamped gate and up,
dense and experts), MiniMax-M3 (GPT-OSS's gate over halves), BitNet (relu², RMSNorm over h), Falcon-H1
(gate and output multipliers). Each tiny model runs with its limits small enough that the clamps
bind, patched vs stock against float64 (verification.compare_runs), and the spec is read off the
module (swiglu_hf.gate). Look-alikes whose extra math the attributes do not describe are refused.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import swiglu_hf
from swiglu_hf import apply_swiglu_patch, patch_report, patched_modules, verification
from swiglu_hf.forms import use_eager_experts
from swiglu_hf.gate import GateSpec, parse
from swiglu_hf.memory import saved_activation_bytes
from swiglu_hf.tools import sweep


def tiny(model_type: str, impl: str | None = None, **overrides):
    from transformers import AutoModelForCausalLM

    cfg = sweep.tiny_config(model_type)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if impl is not None:
        model.set_experts_implementation(impl)
    return model


def _ids(vocab=128, shape=(2, 9)):
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(0))


def _assert_verified(stock, patched):
    ids = _ids()
    reference = use_eager_experts(copy.deepcopy(stock).to(torch.float64))
    ref = verification._run(reference, ids)
    s, p = verification._run(stock, ids), verification._run(patched, ids)
    bad = [c for c in verification.compare_runs(s, p, ref, torch.float32) if not c.ok]
    assert not bad, [(c.name, c.patched_err, c.limit) for c in bad]
    return s, p


def _binds(model, limit):
    """The clamps bind somewhere in this model's MLPs on the test batch (so they are tested, not idle)."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(i[0].detach().abs().max().item()))
             for n, m in model.named_modules() if n.endswith("mlp")]
    with torch.no_grad():
        model(_ids())
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_gpt_oss_experts(impl):
    stock = tiny("gpt_oss", impl, swiglu_limit=0.05)
    patched = apply_swiglu_patch(copy.deepcopy(stock))
    report = patch_report(patched)
    assert len(report.patched) == 2 and set(report.patched.values()) == {"experts"}
    spec = parse(patched.model.layers[0].mlp.experts._swiglu_hf.activation)
    assert spec == GateSpec("silu_alpha", alpha=stock.config.swiglu_alpha, gate_max=0.05, up_limit=0.05,
                            up_plus_one=True, interleaved=True)
    _assert_verified(stock, patched)


def test_gpt_oss_clamps_bind_and_an_unclamped_gate_would_differ():
    """With limit 0.05 the stock gate_up reaches far past it: a fused gate without the clamp differs."""
    from swiglu_hf import gate

    stock = tiny("gpt_oss", "eager", swiglu_limit=0.05)
    experts = stock.model.layers[0].mlp.experts
    gate_up = torch.randn(5, experts.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(1))
    spec = parse(apply_swiglu_patch(copy.deepcopy(stock)).model.layers[0].mlp.experts._swiglu_hf.activation)
    assert torch.equal(gate.apply(spec, *gate.split_packed(gate_up, spec)), experts._apply_gate(gate_up))
    unclamped = GateSpec(spec.activation, alpha=spec.alpha, up_plus_one=True, interleaved=True)
    assert not torch.allclose(gate.apply(unclamped, *gate.split_packed(gate_up, unclamped)), experts._apply_gate(gate_up))


def test_gpt_oss_eager_saves_gate_up_not_h():
    stock = tiny("gpt_oss", "eager", num_hidden_layers=1, swiglu_limit=0.05)
    patched = apply_swiglu_patch(copy.deepcopy(stock))
    x = torch.randn(11, stock.config.hidden_size, requires_grad=True)
    idx = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i))[:2] for i in range(11)])
    w = torch.rand(11, 2)
    sizes = {label: saved_activation_bytes(lambda: m.model.layers[0].mlp.experts(x, idx, w).sum())
             for label, m in (("stock", stock), ("patched", patched))}
    inter = stock.config.intermediate_size
    # stock keeps the clamped gate and up, sigmoid(alpha gate), the glu, up + 1 and the output: the
    # fused gate keeps gate_up (2I) per routed token and recomputes the rest
    assert sizes["patched"] < sizes["stock"] - 11 * 2 * 4 * 2 * inter, sizes


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_deepseek_v4_dense_and_experts(impl):
    stock = tiny("deepseek_v4", impl, swiglu_limit=0.05)
    patched = apply_swiglu_patch(copy.deepcopy(stock))
    forms = patch_report(patched).patched.values()
    assert "split" in forms and "experts" in forms
    dense = next(m for n, m in patched.named_modules() if type(m).__name__ == "DeepseekV4MLP")
    assert parse(dense._swiglu_hf.activation) == GateSpec("silu", gate_max=0.05, up_limit=0.05)
    with torch.no_grad():  # the PyTorch path runs DeepSeek-V4's own ops: the forward is bitwise
        assert torch.equal(patched(_ids()).logits, stock(_ids()).logits)


def test_deepseek_v4_dense_saves_h_plus_2i():
    stock = tiny("deepseek_v4", swiglu_limit=0.05)
    mlp = next(m for m in stock.modules() if type(m).__name__ == "DeepseekV4MLP")
    patched = apply_swiglu_patch(nn.Sequential(copy.deepcopy(mlp)))
    x = torch.randn(2, 7, stock.config.hidden_size, requires_grad=True)
    hidden, inter = stock.config.hidden_size, mlp.gate_proj.out_features
    assert saved_activation_bytes(lambda: patched(x), exclude=[x]) == 2 * inter * 4 * 14
    assert saved_activation_bytes(lambda: mlp(x), exclude=[x]) > (2 * inter + inter) * 4 * 14
    _ = hidden


def test_minimax_m3_gate_over_halves():
    stock = tiny("minimax_m3_vl_text", swiglu_limit=0.05)
    patched = apply_swiglu_patch(copy.deepcopy(stock))
    spec = parse(next(m for m in patched.modules() if swiglu_hf.patch.is_patched(m))._swiglu_hf.activation)
    assert spec.activation == "silu_alpha" and spec.up_plus_one and not spec.interleaved and spec.gate_max == 0.05
    _assert_verified(stock, patched)


def test_bitnet_relu2_and_sub_norm():
    stock = tiny("bitnet")
    patched = apply_swiglu_patch(copy.deepcopy(stock))
    assert len(patched_modules(patched)) == 2
    assert parse(patched.model.layers[0].mlp._swiglu_hf.activation) == GateSpec("relu2")
    s, p = _assert_verified(stock, patched)
    assert torch.equal(s[0], p[0]) and torch.equal(s[1], p[1])  # PyTorch path: BitNet's own ops


@pytest.mark.parametrize("multipliers", [[0.88, 0.59], [1.02, 0.99]])
def test_falcon_h1_multipliers(multipliers):
    stock = tiny("falcon_h1", mlp_multipliers=multipliers)
    patched = apply_swiglu_patch(copy.deepcopy(stock))
    mlp = patched.model.layers[0].feed_forward
    assert parse(mlp._swiglu_hf.activation) == GateSpec("silu", gate_mul=multipliers[0])
    ids = _ids(shape=(1, 6))
    for m in (stock, patched):
        m.zero_grad(set_to_none=True)
    out = [m(input_ids=ids, labels=ids) for m in (stock, patched)]
    for o in out:
        o.loss.backward()
    assert torch.equal(out[0].logits, out[1].logits)  # the PyTorch path: Falcon-H1's own ops, bitwise
    for (n, a), b in zip(stock.named_parameters(), patched.parameters()):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), n


class _Clamped(nn.Module):
    def __init__(self, limit, used):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(16, 24), nn.Linear(16, 24), nn.Linear(24, 16)
        self.act_fn, self.limit, self.used = nn.SiLU(), limit, used

    def forward(self, x):
        gate = self.gate_proj(x).clamp(max=self.used)
        return self.down_proj(self.act_fn(gate) * self.up_proj(x).clamp(-self.used, self.used))


def test_clamp_the_attributes_do_not_describe_is_refused_never_patched_wrong():
    torch.manual_seed(0)
    ok = nn.Sequential(_Clamped(limit=0.3, used=0.3))
    assert patched_modules(apply_swiglu_patch(ok)) == ["0"]
    wrong = nn.Sequential(_Clamped(limit=0.3, used=0.6))  # the attribute says 0.3, the forward clamps at 0.6
    with pytest.raises(swiglu_hf.SelfCheckError, match="differs"):
        apply_swiglu_patch(wrong)
    hidden = nn.Sequential(_Clamped(limit=None, used=0.3))  # a clamp with no attribute describing it
    with pytest.raises(swiglu_hf.SelfCheckError, match="differs from the module's own forward in float64"):
        apply_swiglu_patch(hidden)
    assert patched_modules(wrong) == patched_modules(hidden) == []


def test_triton_backend_refuses_gates_the_kernels_do_not_implement():
    stock = tiny("deepseek_v4", swiglu_limit=0.05)
    with pytest.raises(swiglu_hf.UnsupportedActivationError, match="Triton kernels do not implement"):
        apply_swiglu_patch(stock, backend="triton")
    assert patched_modules(stock) == []


def test_auto_with_triton_forced_keeps_such_gates_on_the_pytorch_path(monkeypatch):
    monkeypatch.setenv("SWIGLU_HF_BACKEND", "triton")
    stock = tiny("gpt_oss", "eager", swiglu_limit=0.05)
    patched = apply_swiglu_patch(copy.deepcopy(stock))
    _assert_verified(stock, patched)


def test_identity_multipliers_leave_a_plain_gate_for_the_kernels(patch_backend):
    """Falcon-H1 with multipliers [1, 1] is a plain SwiGLU: the spec is plain and, with
    SWIGLU_HF_BACKEND=triton, the kernels run it (interpreter), matching stock."""
    from tests.conftest import assert_like_stock

    stock = tiny("falcon_h1", mlp_multipliers=[1.0, 1.0])
    patched = apply_swiglu_patch(copy.deepcopy(stock))
    assert parse(patched.model.layers[0].feed_forward._swiglu_hf.activation) == GateSpec("silu")
    ids = _ids(shape=(1, 6))
    with torch.no_grad():
        assert_like_stock(patched(ids).logits, stock(ids).logits, patch_backend, "logits")
