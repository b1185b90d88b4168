"""The patch engine: instance-level binding, exact revert, all-or-nothing failures, self-check."""

import copy

import pytest
import torch
from torch import nn

import swiglu_hf
from swiglu_hf import apply_swiglu_patch, patched_modules, revert_swiglu_patch
from swiglu_hf.tools.models import build_tiny, tiny_config
from tests.conftest import assert_like_stock


def _ids(vocab=96, shape=(2, 9), seed=0):
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _forwards(model):
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


def _assert_untouched(model, before_state, before_forwards):
    assert patched_modules(model) == []
    assert _forwards(model) == before_forwards
    after = model.state_dict()
    assert list(after) == list(before_state)
    assert all(torch.equal(after[k], before_state[k]) for k in after)


def test_patch_returns_same_object_and_lists_every_mlp():
    model = build_tiny("tiny-llama")
    assert apply_swiglu_patch(model) is model
    assert patched_modules(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    mlp = model.model.layers[0].mlp
    assert "forward" in mlp.__dict__ and type(mlp).__name__ == "LlamaMLP"  # no class rebinding


def test_state_dict_unchanged_and_projection_modules_kept():
    model = build_tiny("tiny-phi3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    children = {n: id(m) for n, m in model.named_modules()}
    apply_swiglu_patch(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in after)
    assert {n: id(m) for n, m in model.named_modules()} == children


def test_revert_is_identical_to_never_patched():
    stock = build_tiny("tiny-gemma")
    model = copy.deepcopy(stock)
    apply_swiglu_patch(model)
    revert_swiglu_patch(model)
    assert patched_modules(model) == []
    for (n, a), (_, b) in zip(model.named_modules(), stock.named_modules()):
        assert type(a) is type(b) and "forward" not in a.__dict__, n
        assert set(a.__dict__) == set(b.__dict__), n
    ids = _ids()
    assert torch.equal(model(ids).logits, stock(ids).logits)


def test_revert_restores_a_preexisting_instance_forward():
    model = build_tiny("tiny-llama")
    mlp = model.model.layers[0].mlp
    custom = mlp.forward  # a bound method stored on the instance, like other tools do
    mlp.forward = custom
    apply_swiglu_patch(model)
    assert mlp.forward is not custom
    revert_swiglu_patch(model)
    assert mlp.__dict__["forward"] is custom


def test_reapply_is_idempotent_and_backend_change_is_refused():
    model = build_tiny("tiny-llama")
    apply_swiglu_patch(model, backend="torch")
    forwards = _forwards(model)
    apply_swiglu_patch(model, backend="torch")
    assert _forwards(model) == forwards
    with pytest.raises(swiglu_hf.InvalidInputError, match="revert_swiglu_patch"):
        apply_swiglu_patch(model, backend="triton")
    assert _forwards(model) == forwards


def test_filter_fn_restricts_patching():
    model = build_tiny("tiny-qwen2")
    apply_swiglu_patch(model, filter_fn=lambda name, module: name.startswith("model.layers.1."))
    assert patched_modules(model) == ["model.layers.1.mlp"]


def test_no_gated_mlp_raises_naming_classes_seen():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(swiglu_hf.NoGatedMLPError, match="GPT2MLP") as info:
        apply_swiglu_patch(model)
    assert isinstance(info.value, ValueError) and "gate_proj" in str(info.value)


def test_unsupported_activation_names_module_and_leaves_model_unchanged():
    from transformers import AutoModelForCausalLM

    config = tiny_config("tiny-llama")
    config.hidden_act = "gelu_new"  # NewGELU: a different formula from gelu_tanh; not fused
    model = AutoModelForCausalLM.from_config(config)
    before, forwards = {k: v.clone() for k, v in model.state_dict().items()}, _forwards(model)
    with pytest.raises(swiglu_hf.UnsupportedActivationError, match=r"model\.layers\.0\.mlp.*NewGELUActivation"):
        apply_swiglu_patch(model)
    _assert_untouched(model, before, forwards)


def test_triton_backend_without_gpu_or_interpreter_fails_before_touching(no_interpreter):
    model = build_tiny("tiny-llama")
    before, forwards = {k: v.clone() for k, v in model.state_dict().items()}, _forwards(model)
    with pytest.raises(swiglu_hf.BackendUnavailableError, match="TRITON_INTERPRET"):
        apply_swiglu_patch(model, backend="triton")
    _assert_untouched(model, before, forwards)


@pytest.mark.parametrize("bad", [None, "llama", 3])
def test_non_module_is_rejected(bad):
    with pytest.raises(swiglu_hf.InvalidInputError, match="nn.Module"):
        apply_swiglu_patch(bad)


def test_unknown_backend_is_rejected():
    with pytest.raises(swiglu_hf.UnknownBackendError):
        apply_swiglu_patch(build_tiny("tiny-llama"), backend="cuda")


class SwappedPhi3MLP(nn.Module):
    """Looks like Phi-3's packed MLP but takes the UP half first: must never be patched."""

    def __init__(self, hidden=16, inter=24):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.activation_fn = nn.SiLU()

    def forward(self, x):
        up, gate = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.activation_fn(gate))


class _Split(nn.Module):
    def __init__(self, hidden=16, inter=24):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter)
        self.up_proj = nn.Linear(hidden, inter)
        self.down_proj = nn.Linear(inter, hidden)
        self.act_fn = nn.SiLU()


class ScaledMLP(_Split):
    """A split MLP with extra math (an alpha-scaled gate, as in GPT-OSS)."""

    def forward(self, x):
        return self.down_proj(self.act_fn(1.702 * self.gate_proj(x)) * self.up_proj(x))


class PlainMLP(_Split):
    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("bad_cls", [SwappedPhi3MLP, ScaledMLP])
def test_self_check_refuses_look_alikes_and_patches_nothing(bad_cls):
    model = nn.Sequential(PlainMLP(), bad_cls())
    before, forwards = {k: v.clone() for k, v in model.state_dict().items()}, _forwards(model)
    with pytest.raises(swiglu_hf.SelfCheckError, match=bad_cls.__name__):
        apply_swiglu_patch(model)
    _assert_untouched(model, before, forwards)
    apply_swiglu_patch(model, filter_fn=lambda name, m: not isinstance(m, bad_cls))
    assert patched_modules(model) == ["0"]


def test_patching_does_not_consume_global_rng():
    model = build_tiny("tiny-llama")
    state = torch.get_rng_state()
    apply_swiglu_patch(model)
    assert torch.equal(torch.get_rng_state(), state)


def test_deepcopy_stays_patched_and_bound_to_the_copy():
    model = apply_swiglu_patch(build_tiny("tiny-llama"))
    clone = copy.deepcopy(model)
    assert patched_modules(clone) == patched_modules(model)
    mlp = clone.model.layers[0].mlp
    assert mlp.forward.__self__ is mlp
    with torch.no_grad():
        clone.model.layers[0].mlp.down_proj.weight.zero_()
    ids = _ids()
    assert not torch.equal(clone(ids).logits, model(ids).logits)


def test_accelerate_hook_stays_in_the_call_path():
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    model = build_tiny("tiny-llama")
    mlp = model.model.layers[0].mlp
    add_hook_to_module(mlp, Count())
    wrapper = mlp.forward
    apply_swiglu_patch(model)
    assert mlp.forward is wrapper and mlp._old_forward.__func__.__name__ == "_fused_forward"
    model(_ids())
    assert Count.calls == 1
    revert_swiglu_patch(model)
    assert mlp.forward is wrapper and mlp._old_forward.__func__ is type(mlp).forward
    remove_hook_from_module(mlp)
    assert mlp.forward.__func__ is type(mlp).forward


def test_compiled_patched_model_has_no_graph_breaks(patch_backend):
    model = apply_swiglu_patch(build_tiny("tiny-phi3"))
    stock = build_tiny("tiny-phi3")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = _ids()
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    ref = stock(input_ids=ids, labels=ids)
    ref.loss.backward()
    assert_like_stock(out.logits, ref.logits, patch_backend, "logits")
    for (n, p), q in zip(model.named_parameters(), stock.parameters()):
        assert_like_stock(p.grad, q.grad, patch_backend, n)


def test_inductor_compiles_the_fused_op(patch_backend):
    from swiglu_hf import swiglu

    fn = torch.compile(lambda g, u: swiglu(g, u).sum(), fullgraph=True)
    g = torch.randn(8, 32, requires_grad=True)
    u = torch.randn(8, 32, requires_grad=True)
    fn(g, u).backward()
    g2, u2 = g.detach().requires_grad_(), u.detach().requires_grad_()
    (torch.nn.functional.silu(g2) * u2).sum().backward()
    assert_like_stock(g.grad, g2.grad, patch_backend, "gate grad")
    assert_like_stock(u.grad, u2.grad, patch_backend, "up grad")


def test_self_check_in_train_mode_with_dropout_keeps_training_flags():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny("tiny-llama"), LoraConfig(r=4, lora_dropout=0.5, target_modules=["up_proj"]))
    model.train()
    apply_swiglu_patch(model)
    assert len(patched_modules(model)) == 2
    assert all(m.training for m in model.modules())


class ClampedMLP(_Split):
    """Equal to a plain SwiGLU MLP for small gates; clamps large ones (a swiglu-limit look-alike)."""

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x).clamp(max=4.0)) * self.up_proj(x))


def test_self_check_probes_large_gates_too():
    model = nn.Sequential(ClampedMLP())  # unit-scale probe gates (std ~0.6) stay below the clamp
    with pytest.raises(swiglu_hf.SelfCheckError, match="probe input #2 of 2"):
        apply_swiglu_patch(model)


def test_keyword_input_reaches_the_fused_forward():
    model = apply_swiglu_patch(build_tiny("tiny-phi3"))
    mlp, stock = model.model.layers[0].mlp, build_tiny("tiny-phi3").model.layers[0].mlp
    x = torch.randn(2, 3, 64)
    assert torch.equal(mlp(hidden_states=x), stock(hidden_states=x))


def test_filter_excluding_every_match_says_so():
    with pytest.raises(swiglu_hf.NoGatedMLPError, match="filter_fn"):
        apply_swiglu_patch(build_tiny("tiny-llama"), filter_fn=lambda name, module: False)
