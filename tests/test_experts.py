"""MoE experts form, strict/non-strict refusals, nothing-left-behind coverage, class-level mode.

Numerics follow tests/reference.py / swiglu_hf.verification: against a float64 copy, the patched
error may be at most FACTOR (2) x the stock error + FLOOR_ULPS (4) eps.
"""

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

import swiglu_hf
from swiglu_hf.numerics import rel_err
from tests.conftest import FP32_NOISE, assert_like_stock
from swiglu_hf import apply_swiglu_patch, patch_report, patched_modules, revert_swiglu_patch
from swiglu_hf import verification
from swiglu_hf.forms.experts import implementation, use_eager_experts

_TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
MOE = {
    "mixtral": dict(intermediate_size=40, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=40, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                      head_dim=8, decoder_sparse_step=1, mlp_only_layers=[]),
    "olmoe": dict(intermediate_size=40, num_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=24,
                      num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
}


def tiny(model_type, seed=0, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**_TINY, **MOE.get(model_type, {}), **extra})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).eval()


def _ids(seed=0, shape=(2, 9)):
    return torch.randint(3, 96, shape, generator=torch.Generator().manual_seed(seed))


def _assert_matches_float64(stock, patched, ids):
    """Logits, loss and every gradient: patched err <= FACTOR * stock err + FLOOR eps (vs float64)."""
    reference = use_eager_experts(copy.deepcopy(stock).to(torch.float64))
    ref = verification._run(reference, ids)
    s, p = verification._run(stock, ids), verification._run(patched, ids)
    assert set(p[2]) == set(s[2]) == set(ref[2])
    bad = [c for c in verification.compare_runs(s, p, ref, torch.float32) if not c.ok]
    assert not bad, [f"{c.name}: patched {c.patched_err:.3e} vs stock {c.stock_err:.3e}" for c in bad]


CASES = [(m, impl, "torch") for m in ("mixtral", "qwen3_moe", "olmoe") for impl in ("grouped_mm", "eager", "batched_mm")]
CASES += [("mixtral", impl, "triton") for impl in ("grouped_mm", "eager", "batched_mm")] + [("olmoe", "eager", "triton")]


@pytest.mark.parametrize("model_type, impl, backend", CASES)
def test_experts_match_stock(model_type, impl, backend, monkeypatch):
    monkeypatch.setenv("SWIGLU_HF_BACKEND", backend)
    stock = tiny(model_type)
    stock.set_experts_implementation(impl)
    patched = apply_swiglu_patch(copy.deepcopy(stock))
    experts = [n for n in patched_modules(patched) if n.endswith("experts")]
    assert len(experts) == 2 and patch_report(patched).patched[experts[0]] == "experts"
    assert implementation(patched.model.layers[0].mlp.experts) == impl
    ids = _ids()
    _assert_matches_float64(stock, patched, ids)
    # the torch path runs the same aten ops: the forward is bitwise equal to stock
    with torch.no_grad():
        assert_like_stock(patched(ids).logits, stock(ids).logits, backend)


def test_experts_triton_interpreter_path():
    stock = tiny("mixtral", num_hidden_layers=1)
    patched = apply_swiglu_patch(copy.deepcopy(stock), backend="triton")
    assert len(patched_modules(patched)) == 1
    _assert_matches_float64(stock, patched, _ids(shape=(1, 6)))


def test_experts_eager_saves_no_activation_output():
    """Eager path: per expert only x_e and gate_up (2I) are saved, not act(gate), up or h."""
    from swiglu_hf.memory import saved_activation_bytes

    stock = tiny("mixtral", num_hidden_layers=1)
    stock.set_experts_implementation("eager")
    patched = apply_swiglu_patch(copy.deepcopy(stock), backend="torch")
    x = torch.randn(11, 32, requires_grad=True)
    idx = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i))[:2] for i in range(11)])
    w = torch.rand(11, 2)
    sizes = {}
    for label, model in (("stock", stock), ("patched", patched)):
        experts = model.model.layers[0].mlp.experts
        sizes[label] = saved_activation_bytes(lambda: experts(x, idx, w).sum())
    # stock saves gate, act(gate), up and h (4I) per routed token more than x; fused 2I
    routed = 11 * 2 * 4  # tokens * k * fp32 bytes
    assert sizes["stock"] - sizes["patched"] == routed * 2 * 40, sizes


class GptOssLike(nn.Module):
    """GPT-OSS experts layout: interleaved halves, clamping, alpha-scaled gate, (up + 1)."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(4, 16, 2 * 24))
        self.down_proj = nn.Parameter(torch.randn(4, 24, 16))
        self.act_fn = nn.SiLU()  # a decoy: the forward does not use it

    def forward(self, hidden_states, router_indices, routing_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for k, e in enumerate(router_indices[t].tolist()):
                gu = hidden_states[t] @ self.gate_up_proj[e]
                gate, up = gu[::2].clamp(max=7.0), gu[1::2].clamp(-7.0, 7.0)
                h = (up + 1) * gate * torch.sigmoid(1.702 * gate)
                out[t] += routing_weights[t, k] * (h @ self.down_proj[e])
        return out


def test_real_gpt_oss_is_patched_from_its_attributes():
    """GPT-OSS's interleaved, clamped, alpha-scaled gate is read off swiglu_limit/alpha (tests/test_gates.py)."""
    model = tiny("gpt_oss", intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                 layer_types=["sliding_attention", "full_attention"])
    apply_swiglu_patch(model)
    assert set(patch_report(model).patched.values()) == {"experts"} and len(patched_modules(model)) == 2


def test_look_alike_refused_by_the_probe():
    model = nn.Sequential(GptOssLike())
    with pytest.raises(swiglu_hf.SelfCheckError, match="GptOssLike"):
        apply_swiglu_patch(model)
    assert patched_modules(model) == []


def test_strict_false_patches_the_rest_and_reports():
    from tests.test_patch import PlainMLP, ScaledMLP

    model = nn.Sequential(PlainMLP(), ScaledMLP(), GptOssLike())
    with pytest.warns(swiglu_hf.PatchRefusedWarning, match=r"2 gated module\(s\) left unpatched") as rec:
        assert apply_swiglu_patch(model, strict=False) is model
    assert "ScaledMLP" in str(rec[0].message) and "GptOssLike" in str(rec[0].message)
    report = patch_report(model)
    assert report.patched == {"0": "split"}
    assert set(report.refused) == {"1", "2"} and "differs from the module's own forward" in report.refused["1"]
    assert patched_modules(model) == ["0"]
    revert_swiglu_patch(model)
    assert patch_report(model) is None and patched_modules(model) == []


def test_strict_true_raises_and_touches_nothing():
    from tests.test_patch import PlainMLP

    model = nn.Sequential(PlainMLP(), GptOssLike())
    with pytest.raises(swiglu_hf.SelfCheckError, match="strict=False|GptOssLike"):
        apply_swiglu_patch(model)
    assert patched_modules(model) == [] and patch_report(model) is None


def test_shared_expert_and_dense_layers_are_patched():
    model = tiny("qwen2_moe")
    apply_swiglu_patch(model, backend="torch")
    report = patch_report(model).patched
    assert report == {
        "model.layers.0.mlp.experts": "experts", "model.layers.0.mlp.shared_expert": "split",
        "model.layers.1.mlp.experts": "experts", "model.layers.1.mlp.shared_expert": "split",
    }
    _assert_matches_float64(tiny("qwen2_moe"), model, _ids())


def test_deepseek_v3_dense_first_layer_and_shared_experts():
    from swiglu_hf.tools.sweep import build

    stock = build("deepseek_v3")
    patched = apply_swiglu_patch(copy.deepcopy(stock), backend="torch")
    assert patch_report(patched).patched == {
        "model.layers.0.mlp": "split", "model.layers.1.mlp.experts": "experts",
        "model.layers.1.mlp.shared_experts": "split",
    }
    _assert_matches_float64(stock, patched, _ids(shape=(2, 8)))


def test_multimodal_language_tower_is_patched():
    from swiglu_hf.tools.sweep import build

    stock = build("llava")
    patched = apply_swiglu_patch(copy.deepcopy(stock), backend="torch")
    names = patched_modules(patched)
    assert names and all(".language_model." in n for n in names), names
    assert len(names) == stock.config.text_config.num_hidden_layers
    _assert_matches_float64(stock, patched, _ids(shape=(2, 8)))


# ---- class-level mode ---------------------------------------------------------------------

def _base_attrs():
    from transformers import PreTrainedModel

    return {k: PreTrainedModel.__dict__.get(k) for k in ("__init__", "post_init", "from_pretrained")}


def test_patching_context_patches_models_built_inside_and_restores_classes():
    before = _base_attrs()
    with swiglu_hf.patching(backend="torch"):
        assert _base_attrs() != before
        model = tiny("qwen2_moe")
    assert _base_attrs() == before
    assert all(after is b for after, b in zip(_base_attrs().values(), before.values()))
    assert len(patched_modules(model)) == 4
    assert len(patched_modules(tiny("mixtral"))) == 0  # built outside: untouched
    _assert_matches_float64(tiny("qwen2_moe"), model, _ids())


def test_patching_nested_and_exception_inside_restore_everything():
    before = _base_attrs()
    with pytest.raises(RuntimeError, match="boom"):
        with swiglu_hf.patching(backend="torch"):
            with swiglu_hf.patching(backend="torch", tile_tokens=4):
                inner = tiny("mixtral")
            outer = tiny("mixtral")
            raise RuntimeError("boom")
    assert _base_attrs() == before and not swiglu_hf.classpatch.class_patching_enabled()
    states = [m._swiglu_hf.tile_tokens for m in inner.modules() if "_swiglu_hf" in m.__dict__]
    assert states == [4, 4]
    assert [m._swiglu_hf.tile_tokens for m in outer.modules() if "_swiglu_hf" in m.__dict__] == [None, None]


def test_enable_disable_pair_and_inner_models_patched_once(monkeypatch):
    from swiglu_hf import patch as patch_module
    from swiglu_hf.tools.sweep import build

    calls, real = [], patch_module.apply_swiglu_patch

    @functools.wraps(real)
    def counting(model, **kwargs):
        calls.append(model)
        return real(model, **kwargs)

    monkeypatch.setattr(patch_module, "apply_swiglu_patch", counting)
    token = swiglu_hf.enable_class_patching(backend="torch")
    try:
        model = build("llava")  # vision tower + language model: only the outer model is patched
    finally:
        swiglu_hf.disable_class_patching(token)
    assert patched_modules(model) and patch_report(model) is not None
    assert calls == [model]  # once, on the outer model; not on the inner towers during their own construction
    assert patch_report(model.model.language_model) is None
    assert not swiglu_hf.classpatch.class_patching_enabled()
    with pytest.raises(swiglu_hf.InvalidInputError, match="unknown"):
        swiglu_hf.enable_class_patching(bakend="torch")
    assert not swiglu_hf.classpatch.class_patching_enabled()


def test_patching_from_pretrained_patches_after_weights_load(tmp_path):
    stock = tiny("mixtral")
    stock.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    with swiglu_hf.patching(backend="torch"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no meta-device warning on this path
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert len(patched_modules(loaded)) == 2
    loaded.eval()
    with torch.no_grad():
        ids = _ids()
        assert torch.equal(loaded(ids).logits, stock(ids).logits)


def test_tile_tokens_on_experts_is_said_out_loud():
    model = tiny("mixtral")
    with pytest.warns(UserWarning, match="does not apply to MoE experts"):
        apply_swiglu_patch(model, backend="torch", tile_tokens=4)
    assert any("experts" in name for name in patched_modules(model))


# ---- review fixes: compile, keyword calls, refusals, probe scale, biases ---------------------

def _routing(tokens=9, experts=4, k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 32, generator=gen)
    idx = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    return x, idx, torch.rand(tokens, k, generator=gen)


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_compile_fullgraph_patched_experts_matches_stock(impl, patch_backend):
    """torch.compile(fullgraph=True) traces through the fused experts forward (the _FusedGate proxy)."""
    torch._dynamo.reset()
    stock = tiny("mixtral", num_hidden_layers=1)
    stock.set_experts_implementation(impl)
    patched = apply_swiglu_patch(copy.deepcopy(stock))
    ids = _ids()
    out = {}
    for label, model in (("stock", stock), ("patched", patched)):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        try:
            res = compiled(input_ids=ids, labels=ids)
        except torch._dynamo.exc.TorchDynamoException as err:
            if label == "stock":  # e.g. transformers 5.17's grouped_mm guards on data-dependent sizes
                pytest.skip(f"the stock model itself does not compile fullgraph with {impl} here: {type(err).__name__}")
            raise
        res.loss.backward()
        out[label] = (res.logits.detach(), {n: p.grad for n, p in model.named_parameters()})
        torch._dynamo.reset()
    assert_like_stock(out["patched"][0], out["stock"][0], patch_backend, "logits")
    # gradients: the same derived rule as everywhere (vs float64), through the compiled graphs
    _assert_matches_float64(stock, patched, ids)
    for name, grad in out["stock"][1].items():
        other = out["patched"][1][name]
        assert (grad is None) == (other is None), name
        if grad is not None:  # compiled graphs may reorder the grouped/batched reductions: not bitwise
            limit = 64 * torch.finfo(torch.float32).eps if patch_backend == "torch" else FP32_NOISE
            assert rel_err(other, grad) <= limit, name


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_experts_keyword_calls_equal_stock(impl):
    stock = tiny("mixtral", num_hidden_layers=1)
    stock.set_experts_implementation(impl)
    patched = apply_swiglu_patch(copy.deepcopy(stock), backend="torch")
    es, ep = stock.model.layers[0].mlp.experts, patched.model.layers[0].mlp.experts
    x, idx, w = _routing()
    want = es(x, idx, w)
    with torch.no_grad():
        for got in (ep(x, idx, top_k_weights=w), ep(x, top_k_index=idx, top_k_weights=w),
                    ep(hidden_states=x, top_k_index=idx, top_k_weights=w)):
            assert torch.equal(got, want.detach())


@pytest.mark.parametrize("impl, error, reason", [
    ("sonicmoe", swiglu_hf.UnsupportedModuleError, "experts_implementation='sonicmoe' is not supported"),
    ("deepgemm", swiglu_hf.SelfCheckError, r"module's own forward \(not the fused one\) raised ValueError"),  # deepgemm needs bf16
])
def test_probe_and_unsupported_implementation_errors_are_typed_and_respect_strict(impl, error, reason):
    model = tiny("mixtral", num_hidden_layers=1)
    model.config._experts_implementation_internal = impl
    with pytest.raises(error, match=reason):
        apply_swiglu_patch(model, backend="torch")
    assert patched_modules(model) == []
    with pytest.warns(swiglu_hf.PatchRefusedWarning):
        apply_swiglu_patch(model, backend="torch", strict=False)
    refused = patch_report(model).refused
    assert list(refused) == ["model.layers.0.mlp.experts"] and __import__("re").search(reason, refused[
        "model.layers.0.mlp.experts"])
    assert patched_modules(model) == []


def test_expert_parallel_modules_are_refused():
    model = tiny("mixtral", num_hidden_layers=1)
    experts = model.model.layers[0].mlp.experts
    experts._is_expert_parallel = True  # what transformers' expert-parallel sharding sets
    with pytest.raises(swiglu_hf.UnsupportedModuleError, match="expert-parallel"):
        apply_swiglu_patch(model, backend="torch")
    experts._is_expert_parallel = False
    original = experts.forward
    experts.forward = lambda *a, **k: original(*a, **k)  # like EP's install_forward (module.forward = ep_forward)
    with pytest.raises(swiglu_hf.UnsupportedModuleError, match="replaced on the instance"):
        apply_swiglu_patch(model, backend="torch")
    assert patched_modules(model) == []


def test_eager_uses_module_num_experts_like_stock():
    """Stock masks ids >= module.num_experts (per-rank count under EP); the fused loop must too."""
    stock = tiny("mixtral", num_hidden_layers=1)
    stock.set_experts_implementation("eager")
    patched = apply_swiglu_patch(copy.deepcopy(stock), backend="torch")
    es, ep = stock.model.layers[0].mlp.experts, patched.model.layers[0].mlp.experts
    es.num_experts = ep.num_experts = 3  # id 3 is now the sentinel: skipped
    x, idx, w = _routing()
    assert (idx == 3).any()
    with torch.no_grad():
        try:
            want = es(x, idx, w)
        except RuntimeError as err:  # transformers before the sentinel id (e.g. 5.17) rejects id 3
            pytest.skip(f"this transformers' stock experts have no sentinel expert id: {err}")
        assert torch.equal(ep(x, idx, w), want)


def test_custom_experts_interface_is_refused():
    from transformers.integrations.moe import ExpertsInterface

    model = tiny("mixtral", num_hidden_layers=1)
    cls = type(model.model.layers[0].mlp.experts)
    assert swiglu_hf.forms.experts._experts_interface(cls) is swiglu_hf.forms.experts._moe().ALL_EXPERTS_FUNCTIONS
    custom = type(cls.__name__, (cls,), {"experts_interface": ExpertsInterface()})
    model.model.layers[0].mlp.experts.__class__ = custom
    with pytest.raises(swiglu_hf.UnsupportedModuleError, match="its own experts_interface"):
        apply_swiglu_patch(model, backend="torch")


def test_longcat_style_expert_count_mismatch_says_so():
    class ZeroExperts(nn.Module):  # LongCat-Flash: gate_up_proj includes zero-computation experts
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(6, 24, 16))
            self.down_proj = nn.Parameter(torch.randn(4, 16, 12))
            self.act_fn = nn.SiLU()

        def forward(self, hidden_states, top_k_index, top_k_weights):
            return hidden_states

    with pytest.raises(swiglu_hf.UnsupportedModuleError, match="expert counts differ"):
        apply_swiglu_patch(nn.Sequential(ZeroExperts()))


H_, I_ = 16, 12


def _loop(module, hidden_states, top_k_index, top_k_weights, gate_fn):
    """The canonical per-expert loop (MixtralExperts.forward), with biases when present."""
    final = torch.zeros_like(hidden_states)
    for e in range(module.num_experts):
        tok, pos = torch.where(top_k_index == e)
        if tok.numel() == 0:
            continue
        gate_up = nn.functional.linear(hidden_states[tok], module.gate_up_proj[e],
                                       None if module.gate_up_proj_bias is None else module.gate_up_proj_bias[e])
        gate, up = gate_up.chunk(2, dim=-1)
        h = gate_fn(module, gate, up)
        y = nn.functional.linear(h, module.down_proj[e], None if module.down_proj_bias is None else module.down_proj_bias[e])
        final.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(final.dtype))
    return final


def _experts_class(gate_fn, *, decorated, bias, scale=1.0):
    from transformers.integrations.moe import use_experts_implementation

    class LookAlikeExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.num_experts = 4
            self.gate_up_proj = nn.Parameter(torch.randn(4, 2 * I_, H_, generator=gen) * scale)
            self.down_proj = nn.Parameter(torch.randn(4, H_, I_, generator=gen) * scale)
            self.gate_up_proj_bias = nn.Parameter(torch.randn(4, 2 * I_, generator=gen)) if bias else None
            self.down_proj_bias = nn.Parameter(torch.randn(4, H_, generator=gen)) if bias else None
            self.act_fn = nn.SiLU()

        def forward(self, hidden_states, top_k_index, top_k_weights):
            return _loop(self, hidden_states, top_k_index, top_k_weights, gate_fn)

    return use_experts_implementation(LookAlikeExperts, has_bias=bias) if decorated else LookAlikeExperts


def _config(impl):
    from transformers import MixtralConfig

    config = MixtralConfig()
    config._experts_implementation_internal = impl
    return config


def test_probe_32x_scale_catches_a_gate_clamp():
    """Concatenated halves, plain act_fn, only gate.clamp(max=7): equal at unit scale, caught at 32x."""
    cls = _experts_class(lambda m, g, u: m.act_fn(g.clamp(max=7.0)) * u, decorated=False, bias=False, scale=0.05)
    model = nn.Sequential(cls(None))
    with pytest.raises(swiglu_hf.SelfCheckError, match="probe input #2 of 2"):
        apply_swiglu_patch(model, backend="torch")
    assert patched_modules(model) == []


def test_probe_checks_the_eager_loop_of_a_decorated_class_under_grouped_mm():
    """The active grouped_mm path uses the default _apply_gate and agrees; the class's own loop does not."""
    cls = _experts_class(lambda m, g, u: m.act_fn(u) * g, decorated=True, bias=False)  # halves swapped
    model = nn.Sequential(cls(_config("grouped_mm")))
    assert implementation(model[0]) == "grouped_mm"
    with pytest.raises(swiglu_hf.SelfCheckError, match="through 'eager'"):
        apply_swiglu_patch(model, backend="torch")
    assert patched_modules(model) == []


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_biased_decorated_experts_match_stock(impl):
    cls = _experts_class(lambda m, g, u: m.act_fn(g) * u, decorated=True, bias=True)
    stock = nn.Sequential(cls(_config(impl)))
    patched = apply_swiglu_patch(copy.deepcopy(stock), backend="torch")
    assert patched_modules(patched) == ["0"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, H_, generator=gen)
    idx = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(9)])
    w = torch.rand(9, 2, generator=gen)
    grads = []
    for model in (stock, patched):
        xx = x.clone().requires_grad_()
        y = model[0](xx, idx, w)
        y.square().sum().backward()
        grads.append([y.detach(), xx.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        if impl == "eager":  # this test's loop gathers each expert's tokens in (token, slot) order, transformers'
            # canonical loop (which the fused eager path follows) in (slot, token) order: the weight-gradient
            # sums run in another order, so equal to rounding, not bitwise
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * a.abs().max().item())
        else:  # grouped_mm / batched_mm: transformers' own function around the fused gate: bitwise
            assert torch.equal(a, b)
