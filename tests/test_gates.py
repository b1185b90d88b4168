"""Gates peers skip: clamped, alpha-scaled, interleaved, multiplied, relu², a sub-norm before down_proj.

GPT-OSS (experts: interleaved, clamps, x*sigmoid(alpha x), up + 1), DeepSeek-V4 (clamped gate and up,
dense and experts), MiniMax-M3 (GPT-OSS's gate over halves), BitNet (relu², RMSNorm over h), Falcon-H1
(gate and output multipliers). Each tiny model runs with its limits small enough that the clamps
bind, patched vs stock against float64 (verification.compare_runs), and the spec is read off the
module (swiglu_hf.gate_spec). Look-alikes whose extra math the attributes do not describe are refused.

The Triton kernels run every spec: below, through the interpreter (fp32/fp16), against the PyTorch
path and a float64 reference for each field, halves and interleaved, with inputs past the clamps,
fp16 rounding checked bitwise step by step, and each model above with SWIGLU_HF_BACKEND=triton.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import swiglu_hf
from swiglu_hf import apply_swiglu_patch, kernels, ops, patch_report, patched_modules, verification
from swiglu_hf import gate_spec as gate_mod
from swiglu_hf.forms import use_eager_experts
from swiglu_hf.gate_spec import GateSpec, parse
from swiglu_hf.memory import saved_activation_bytes
from swiglu_hf.tools import sweep
from tests import reference


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
    sens = verification.rounding_sensitivity(stock, ids, patched_modules(patched), ref)
    bad = [c for c in verification.compare_runs(s, p, ref, torch.float32, sens) if not c.ok]
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
    from swiglu_hf import gate_spec as gate

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


def test_triton_backend_patches_clamped_gates_onto_the_kernels(launches):
    """backend="triton" (not only "auto"): DeepSeek-V4's clamped gate runs on the kernels (interpreter)."""
    stock = tiny("deepseek_v4", swiglu_limit=0.05)
    patched = apply_swiglu_patch(copy.deepcopy(stock), backend="triton")
    keys = {m._swiglu_hf.activation for m in patched.modules() if swiglu_hf.patch.is_patched(m)}
    assert keys and all(parse(k).gate_max == 0.05 for k in keys), keys
    launches.update(fwd=0, bwd=0)
    _assert_verified(stock, patched)
    assert launches["fwd"] > 0 and launches["bwd"] > 0, launches


def test_rounding_sensitivity_widens_only_ill_conditioned_checks_and_still_catches_a_wrong_mlp():
    """DeepSeek-V4's hyper-connection scales sum every token and feature into 3 numbers, which cancel:
    a one-ulp nudge of the MLPs moves them by many eps of their value, while logits and loss stay within a
    few eps. A fused MLP off by 1e-5 (about 80 eps) still fails the rule on every MLP weight gradient."""
    stock = tiny("deepseek_v4", "grouped_mm", swiglu_limit=0.05)
    patched = apply_swiglu_patch(copy.deepcopy(stock), backend="torch")
    ids, eps = _ids(), torch.finfo(torch.float32).eps
    ref = verification._run(use_eager_experts(copy.deepcopy(stock).to(torch.float64)), ids)
    sens = verification.rounding_sensitivity(stock, ids, patched_modules(patched), ref)
    assert sens["grad model.hc_head.hc_scale"] > 100 * eps
    assert sens["logits"] < 20 * eps and sens["loss"] < 4 * eps
    for name in patched_modules(patched):
        patched.get_submodule(name).register_forward_hook(lambda m, a, out: out * (1 + 1e-5))
    s, p = verification._run(stock, ids), verification._run(patched, ids)
    bad = {c.name for c in verification.compare_runs(s, p, ref, torch.float32, sens) if not c.ok}
    assert {f"grad model.layers.{i}.mlp.shared_experts.{p}.weight" for i in range(3)
            for p in ("gate_proj", "up_proj", "down_proj")} <= bad


MODEL_CASES = {  # model type, experts implementation, config overrides, the spec's activation
    "gpt_oss": ("gpt_oss", "grouped_mm", {"swiglu_limit": 0.05}, "silu_alpha"),  # interleaved, clamps, up + 1
    "minimax_m3": ("minimax_m3_vl_text", None, {"swiglu_limit": 0.05}, "silu_alpha"),  # halves
    "deepseek_v4": ("deepseek_v4", "grouped_mm", {"swiglu_limit": 0.05}, "silu"),  # clamps, dense and experts
    "bitnet": ("bitnet", None, {}, "relu2"),
    "falcon_h1": ("falcon_h1", None, {"mlp_multipliers": [0.88, 0.59]}, "silu"),  # gate_mul
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_auto_with_triton_forced_runs_these_gates_on_the_kernels(case, monkeypatch, launches):
    """SWIGLU_HF_BACKEND=triton (what the suite's patch_backend fixture sets): every spec now runs
    through the Triton kernels (interpreter), forward and backward, as accurate as stock vs float64."""
    monkeypatch.setenv("SWIGLU_HF_BACKEND", "triton")
    model_type, impl, overrides, activation = MODEL_CASES[case]
    stock = tiny(model_type, impl, **overrides)
    patched = apply_swiglu_patch(copy.deepcopy(stock))
    keys = {m._swiglu_hf.activation for m in patched.modules() if swiglu_hf.patch.is_patched(m)}
    assert keys and all(parse(k).activation == activation and not parse(k).plain for k in keys), keys
    assert all(ops.kernel_gate(k) for k in keys)
    launches.update(fwd=0, bwd=0)
    _assert_verified(stock, patched)
    assert launches["fwd"] > 0 and launches["bwd"] > 0, launches


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


# ---- the Triton kernels run every spec (interpreter: fp32 and fp16) ---------------------------
# Against the PyTorch path (gate.apply / gate.backward: eager's ops, bitwise stock) and the
# independent float64 reference (tests/reference.py, autograd over the formulas), forward,
# backward and backward-with-h, halves and interleaved, inputs far past the clamps. In fp16 the
# rounding of every intermediate is then checked bitwise against eager's order computed here
# from the kernels' own fp32 transcendentals (test_fp16_rounds_every_step_like_eager).


KERNEL_SPECS = {  # limits exact in fp16, so the float64 reference clamps where the kernels do
    "gpt_oss": GateSpec("silu_alpha", alpha=1.702, gate_max=1.0, up_limit=1.0, up_plus_one=True, interleaved=True),
    "minimax_m3": GateSpec("silu_alpha", alpha=1.702, gate_max=1.0, up_limit=1.0, up_plus_one=True),
    "deepseek_v4": GateSpec("silu", gate_max=0.75, up_limit=1.5),
    "falcon_h1": GateSpec("silu", gate_mul=0.88),
    "bitnet": GateSpec("relu2"),
    "relu2_all": GateSpec("relu2", gate_max=1.5, up_limit=0.5, up_plus_one=True, gate_mul=-1.25, interleaved=True),
    "gelu_tanh_mix": GateSpec("gelu_tanh", gate_mul=1.3, gate_max=0.5, interleaved=True),
    "sigmoid_up1": GateSpec("sigmoid", up_limit=0.5, up_plus_one=True),
    "gelu_mul_max": GateSpec("gelu", gate_mul=0.5, gate_max=0.25),
    "relu_interleaved": GateSpec("relu", interleaved=True),
}
SPEC_IDS = list(KERNEL_SPECS)


@pytest.fixture
def launches(monkeypatch):
    """Counts the Triton launches (kernels.glu_fwd / glu_bwd calls) a test makes."""
    count = {"fwd": 0, "bwd": 0}
    for name in count:
        real = getattr(kernels, f"glu_{name}")

        def counted(*args, _real=real, _name=name, **kwargs):
            count[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernels, f"glu_{name}", counted)
    return count


def _spec_inputs(dtype, seed, rows=(3, 37), n=45):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*rows, 2 * n, generator=gen) * 3).to(dtype)  # |x| up to ~12: every clamp binds
    dh = torch.randn(*rows, n, generator=gen).to(dtype)
    return x, dh


def _noise(dtype):
    from tests.conftest import FP32_NOISE

    # fp16: an ulp-level fp32 exp/erf difference between the interpreter and CPU eager may flip a
    # rounding (1 ulp <= 1 eps of the largest entry): 2 eps, far below a wrong step (tens of eps or O(1))
    return FP32_NOISE if dtype == torch.float32 else 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", SPEC_IDS)
def test_spec_kernels_match_pytorch_path_and_float64(name, dtype, launches):
    from swiglu_hf.numerics import rel_err

    spec = KERNEL_SPECS[name]
    key = spec.key()
    assert ops.kernel_gate(key)
    x, dh = _spec_inputs(dtype, 20)
    gate, up = gate_mod.split_packed(x, spec)
    h_ref, dg_ref, du_ref = reference.ref_spec_grads(dh, gate, up, spec)
    want_h = ops._glu_packed_fwd_impl(x, key, "torch")
    want_dx = ops._glu_packed_bwd_impl(dh, x, key, "torch")
    got_h = ops._glu_packed_fwd_impl(x, key, "triton")
    got_dx = ops._glu_packed_bwd_impl(dh, x, key, "triton")
    hh, dx2 = ops._glu_packed_bwd_with_h_impl(dh, x, key, "triton")
    assert launches == {"fwd": 1, "bwd": 2}
    assert torch.equal(hh, got_h) and torch.equal(dx2, got_dx), "backward-with-h differs from forward / backward"
    # the packed gradient's layout is gate.interleave's: halves, or gate/up in even/odd columns
    got_dg, got_du = gate_mod.split_packed(got_dx, spec)
    want_dg, want_du = gate_mod.split_packed(want_dx, spec)
    for what, got, want, ref in (("h", got_h, want_h, h_ref), ("dgate", got_dg, want_dg, dg_ref),
                                 ("dup", got_du, want_du, du_ref)):
        err = rel_err(got, want)
        assert err <= _noise(dtype), f"{name} {dtype} {what}: {err:.3g} from the PyTorch path"
        reference.assert_as_accurate_as_stock(got, want, ref, f"{name} {dtype} {what}")
    # clamped elements get exactly zero gradient, as clamp's backward gives
    if spec.up_limit is not None:
        outside = up.abs() > spec.up_limit
        assert outside.float().mean() > 0.2 and torch.all(got_du[outside] == 0)
    # the split form (separate gate and up tensors) runs the same kernels
    g, u = gate.contiguous(), up.contiguous()
    assert torch.equal(ops._glu_fwd_impl(g, u, key, "triton"), got_h)
    sg, su = ops._glu_bwd_impl(dh, g, u, key, "triton")
    assert torch.equal(sg, got_dg) and torch.equal(su, got_du)
    h3, sg3, su3 = ops._glu_bwd_with_h_impl(dh, g, u, key, "triton")
    assert torch.equal(h3, got_h) and torch.equal(sg3, sg) and torch.equal(su3, su)


def test_interleaved_spec_reads_and_writes_in_place(launches, monkeypatch):
    """gate/up are strided views of the packed input (no copy); dgate/dup views of one (.., 2I) grad."""
    spec = KERNEL_SPECS["gpt_oss"]
    x, dh = _spec_inputs(torch.float32, 21)
    seen = []
    real_fwd, real_bwd = kernels.glu_fwd, kernels.glu_bwd
    monkeypatch.setattr(kernels, "glu_fwd", lambda g, u, out, s: (seen.append((g, u)), real_fwd(g, u, out, s)))
    monkeypatch.setattr(kernels, "glu_bwd", lambda dh_, g, u, dg, du, s, h=None: (
        seen.append((g, u, dg, du)), real_bwd(dh_, g, u, dg, du, s, h)))
    ops._glu_packed_fwd_impl(x, spec.key(), "triton")
    dx = ops._glu_packed_bwd_impl(dh, x, spec.key(), "triton")
    (g, u), (g2, u2, dg, du) = seen
    size = x.element_size()
    for a, b, base in ((g, u, x), (g2, u2, x), (dg, du, dx)):
        assert a.stride(1) == b.stride(1) == 2 and a.stride(0) == b.stride(0) == x.shape[-1]
        assert a.data_ptr() == base.data_ptr() and b.data_ptr() == base.data_ptr() + size


# fp16 rounding, step by step. The interpreter's arithmetic is IEEE fp32 (numpy) and its fp32 -> fp16
# cast is torch's (tests/test_kernels.py checks it), so eager's rounding order can be predicted
# exactly; the transcendental parts (sigmoid, silu and their backwards) are taken from the plain
# fp32 kernels, which the spec kernels share.

def _k32(fn, *args):
    return fn(*(a.float() for a in args))


_KERNEL32 = {}  # (what, input bytes) -> result: the skip variants re-ask for the same values


def _cached(what, fn, *xs):
    key = (what, *(x.numpy().tobytes() for x in xs))
    if key not in _KERNEL32:
        _KERNEL32.clear() if len(_KERNEL32) > 16 else None
        _KERNEL32[key] = fn(*xs)
    return _KERNEL32[key]


def _sigmoid32(t):  # the kernels' fp32 sigmoid: the plain fp32 forward with up = 1
    return _act32("sigmoid", t)


def _act32(name, x):
    return _cached(name, lambda x: ops.glu_fwd(x, torch.ones_like(x), name, "triton"), x)


def _act_bwd32(name, d, x):  # the plain fp32 backward with up = 1: dact = d * 1, exact
    return _cached(name + "'", lambda d, x: ops.glu_bwd(d, x, torch.ones_like(x), name, "triton")[0], d, x)


def _eager_order(spec, gate, up, dh, skip=()):
    """(h, dgate, dup) in fp16 as eager rounds them (gate.apply / gate.backward op by op), from fp16
    inputs, all arithmetic in fp32 with an explicit fp16 rounding per step; `skip` leaves out named
    roundings (to show that the inputs exercise them)."""
    def R(x, step):
        return x if step in skip else x.half().float()

    f32 = torch.float32
    g, u, d = gate.float(), up.float(), dh.float()
    g1 = R(g * torch.tensor(spec.gate_mul, dtype=f32), "gate_mul") if spec.gate_mul is not None else g
    hi = torch.tensor(spec.gate_max or 0.0).half().float()
    gc = torch.where(g1 > hi, hi, g1) if spec.gate_max is not None else g1
    lim = torch.tensor(spec.up_limit or 0.0).half().float()
    uc = torch.where(u > lim, lim, torch.where(u < -lim, -lim, u)) if spec.up_limit is not None else u
    alpha = torch.tensor(spec.alpha or 0.0, dtype=f32)
    if spec.activation == "silu_alpha":
        t = R(gc * alpha, "alpha")
        s = R(_sigmoid32(t), "sigmoid")
        a = R(gc * s, "act")
    elif spec.activation == "relu2":
        r = torch.where(gc < 0, torch.zeros_like(gc), gc)
        a = R(r * r, "act")
    else:
        a = R(_act32(spec.activation, gc), "act")
    u1 = R(uc + 1, "up1") if spec.up_plus_one else uc
    h = (u1 * a).half()
    dact = R(d * u1, "dact")
    du = d * a
    if spec.up_limit is not None:
        du = torch.where((u >= -lim) & (u <= lim), du, torch.zeros_like(du))
    if spec.activation == "silu_alpha":
        q = R(dact * gc, "q")
        sb = R(R(q * R(1 - s, "one_minus_s"), "sb_inner") * s, "sb")
        dg = R(R(dact * s, "p1") + R(sb * alpha, "sb_alpha"), "sum")
    elif spec.activation == "relu2":
        dg = torch.where(r <= 0, torch.zeros_like(r), R(dact * R(2 * r, "two_r"), "d_two_r"))
    elif spec.activation == "sigmoid":  # aten sigmoid_backward on the saved fp16 output, each step in fp16
        dg = R(R(dact * R(1 - a, "sig_one_minus_a"), "sig_inner") * a, "dgc")
    else:
        dg = R(_act_bwd32(spec.activation, dact, gc), "dgc")
    if spec.gate_max is not None:
        dg = torch.where(g1 <= hi, dg, torch.zeros_like(dg))
    if spec.gate_mul is not None:
        dg = dg * torch.tensor(spec.gate_mul, dtype=f32)  # dg is a rounded fp16 value already
    return h, dg.half(), du.half()


ROUNDING_STEPS = {  # the roundings each spec's inputs must demonstrably exercise
    "gpt_oss": ("alpha", "sigmoid", "act", "up1", "dact", "q", "one_minus_s", "sb_inner", "p1", "sb_alpha"),
    "falcon_h1": ("gate_mul", "act", "dact", "dgc"),
    "bitnet": ("act", "dact"),
    "relu2_all": ("gate_mul", "act", "up1", "dact"),
    "sigmoid_up1": ("act", "up1", "dact", "sig_one_minus_a", "sig_inner"),
}


@pytest.mark.parametrize("name", list(ROUNDING_STEPS))
def test_fp16_rounds_every_step_like_eager(name):
    spec = KERNEL_SPECS[name]
    x, dh = _spec_inputs(torch.float16, 22, rows=(64,), n=500)
    x = x * 0.5  # most elements inside the clamps, many outside
    gate, up = gate_mod.split_packed(x, spec)
    got_h = ops._glu_packed_fwd_impl(x, spec.key(), "triton")
    got_dg, got_du = gate_mod.split_packed(ops._glu_packed_bwd_impl(dh, x, spec.key(), "triton"), spec)
    got = (got_h, got_dg, got_du)
    want = _eager_order(spec, gate, up, dh)
    for what, g, w in zip(("h", "dgate", "dup"), got, want):
        diff = (g.float() != w.float()) & ~(g.isnan() & w.isnan())
        assert not diff.any(), f"{name} {what}: {diff.sum().item()} of {w.numel()} elements differ from eager's rounding order"
    for step in ROUNDING_STEPS[name]:
        other = _eager_order(spec, gate, up, dh, skip=(step,))
        assert any(not torch.equal(g, o) for g, o in zip(got, other)), f"{name}: the inputs do not exercise the {step!r} rounding"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["gpt_oss", "relu2_all", "deepseek_v4", "falcon_h1", "bitnet"])
def test_spec_nan_and_inf_like_pytorch_path(name, dtype):
    """Specials, the clamp bounds themselves (1.0 for gpt_oss: `<=` keeps their gradient) and, in fp16,
    values whose intermediates overflow (relu2: 2 r = 80000 -> inf, as eager's rounded 2 * r)."""
    spec = KERNEL_SPECS[name]
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 30.0, -30.0,
                             40000.0, 1e-3], dtype=dtype)
    n = len(specials)
    gate = specials.repeat_interleave(n).reshape(n, n)
    up = specials.repeat(n).reshape(n, n)
    x = gate_mod.interleave(gate, up, spec)
    dh = torch.full((n, n), 0.125, dtype=dtype)
    want_h = ops._glu_packed_fwd_impl(x, spec.key(), "torch")
    want_dx = ops._glu_packed_bwd_impl(dh, x, spec.key(), "torch")
    got_h = ops._glu_packed_fwd_impl(x, spec.key(), "triton")
    got_dx = ops._glu_packed_bwd_impl(dh, x, spec.key(), "triton")
    for what, g, w in (("h", got_h, want_h), ("dx", got_dx, want_dx)):
        assert torch.equal(g.isnan(), w.isnan()), f"{name} {what}: NaN pattern differs"
        assert torch.equal(g.isinf(), w.isinf()) and torch.equal(g[g.isinf()], w[w.isinf()]), f"{name} {what}: Inf differs"
        ok = torch.isfinite(w)
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-3, "atol": 1e-5}
        torch.testing.assert_close(g[ok], w[ok], **tol, msg=f"{name} {what}")
