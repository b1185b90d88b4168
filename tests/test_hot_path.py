"""The per-call path (forms/dense.py _Plan): resolved once per instance, rebuilt when the module changes
under it, never carried to a copy, and bitwise equal to stock in every mode it serves."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from swiglu_hf import apply_swiglu_patch
from swiglu_hf.loading import build_tiny, tiny_config
from swiglu_hf.patch import STATE_ATTR
from swiglu_hf.tools.bench import overhead as bench_overhead

from .conftest import assert_like_stock


def _mlp_pair(seed=0, backend="torch"):
    stock = build_tiny("tiny-llama", seed=seed)
    patched = apply_swiglu_patch(copy.deepcopy(stock), backend=backend)
    return stock, patched


def _grads(model, x):
    y = model(x)
    return y, torch.autograd.grad(y.square().sum(), [x, *model.parameters()])


def test_plan_serves_every_mode_like_stock_and_is_built_once(patch_backend):
    """Bitwise on the PyTorch path (stock's own ops); through the interpreter (GLUDown over the kernels)
    within fp32 noise."""
    stock, patched = _mlp_pair(backend="auto")
    mlp, ref = patched.model.layers[0].mlp, stock.model.layers[0].mlp
    x = torch.randn(2, 5, stock.config.hidden_size, requires_grad=True)
    with torch.no_grad():
        assert_like_stock(mlp(x), ref(x), patch_backend, "no-grad output")
    plan = mlp.__dict__[STATE_ATTR].plan
    assert plan is not None and plan.lean
    (y, g), (y_ref, g_ref) = _grads(mlp, x), _grads(ref, x)
    assert_like_stock(y, y_ref, patch_backend, "output")
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert_like_stock(a, b, patch_backend, f"grad {i}")
    assert mlp.__dict__[STATE_ATTR].plan is plan  # the same plan served both calls


def _tiny_with_bias():
    from transformers import AutoModelForCausalLM

    config = tiny_config("tiny-llama")
    config.mlp_bias = True
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("name", ["tiny-llama", "llama with MLP biases", "tiny-phi3"])  # split, bias, packed
@pytest.mark.parametrize("trainable", ["all", "down only", "input only"])
def test_training_call_is_one_node_with_stock_gradients(patch_backend, name, trainable):
    """Plain nn.Linear projections in grad mode: the whole unit is one autograd node (gated.GatedMLP),
    and every gradient it is asked for (frozen weights, a frozen input) equals stock's."""
    stock = _tiny_with_bias() if name == "llama with MLP biases" else build_tiny(name, seed=1)
    patched = apply_swiglu_patch(copy.deepcopy(stock), backend="auto")
    mlp, ref = patched.model.layers[0].mlp, stock.model.layers[0].mlp
    for m in (mlp, ref):
        for pname, p in m.named_parameters():
            p.requires_grad_(trainable == "all" or (trainable == "down only" and pname.startswith("down_proj")))
    x = torch.randn(2, 5, stock.config.hidden_size, requires_grad=trainable != "down only")
    y, y_ref = mlp(x), ref(x)
    assert type(y.grad_fn).__name__ == "GatedMLPBackward"
    wanted = [t for t in (x, *ref.parameters()) if t.requires_grad]
    got_wanted = [t for t in (x, *mlp.parameters()) if t.requires_grad]
    dy = torch.randn_like(y_ref)
    g_ref, g = torch.autograd.grad(y_ref, wanted, dy), torch.autograd.grad(y, got_wanted, dy)
    assert_like_stock(y, y_ref, patch_backend, "output")
    assert len(g) == len(g_ref) > 0
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert_like_stock(a, b, patch_backend, f"grad {i}")


def test_training_call_under_autocast_or_with_a_hook_keeps_the_module_path():
    """Autocast casts inside each linear (stock saves the low-precision copies) and a hook must see its
    module called: neither takes the one-node path, and both stay bitwise stock."""
    stock, patched = _mlp_pair()
    mlp, ref = patched.model.layers[0].mlp, stock.model.layers[0].mlp
    x = torch.randn(2, 3, stock.config.hidden_size, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = mlp(x), ref(x)
    assert type(y.grad_fn).__name__ != "GatedMLPBackward" and y.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(y.float().sum(), [x, *mlp.parameters()]),
                                                 torch.autograd.grad(y_ref.float().sum(), [x, *ref.parameters()])))
    seen = []
    mlp.up_proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    y = mlp(x)
    assert seen == [(2, 3, stock.config.intermediate_size)]
    assert type(y.grad_fn).__name__ != "GatedMLPBackward" and torch.equal(y, ref(x))


def test_a_child_replaced_after_the_first_call_rebuilds_the_plan():
    """A hooked down_proj swapped in after the plan was built: the hook runs, results stay stock's."""
    stock, patched = _mlp_pair()
    mlp, ref = patched.model.layers[0].mlp, stock.model.layers[0].mlp
    x = torch.randn(3, stock.config.hidden_size)
    with torch.no_grad():
        mlp(x)
    first = mlp.__dict__[STATE_ATTR].plan
    calls = []
    for m in (mlp, ref):
        new = nn.Linear(m.down_proj.in_features, m.down_proj.out_features, bias=False)
        new.weight = m.down_proj.weight
        new.register_forward_hook(lambda mod, i, o: calls.append(1))
        m.down_proj = new
    with torch.no_grad():
        assert torch.equal(mlp(x), ref(x))
    assert mlp.__dict__[STATE_ATTR].plan is not first and len(calls) == 2


def test_a_hook_added_later_is_honoured_without_a_rebuild():
    stock, patched = _mlp_pair()
    mlp = patched.model.layers[0].mlp
    x = torch.randn(3, stock.config.hidden_size)
    with torch.no_grad():
        mlp(x)
    seen = []
    mlp.gate_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    with torch.no_grad():
        mlp(x)
    assert seen == [x.shape]


def test_a_copy_builds_its_own_plan():
    _, patched = _mlp_pair()
    x = torch.arange(1, 6).unsqueeze(0)
    with torch.no_grad():
        patched(x)
    clone = copy.deepcopy(patched)
    assert clone.model.layers[0].mlp.__dict__[STATE_ATTR].plan is None
    with torch.no_grad():
        assert torch.equal(clone(x).logits, patched(x).logits)


def test_decode_bench_generates_stock_tokens_and_reports_rates():
    d = bench_overhead.decode(new_tokens=4, rounds=1)
    assert d["new_tokens"] == 4 and d["layers"] == 2
    assert d["stock_tokens_per_s"] > 0 and d["patched_tokens_per_s"] > 0
    assert d["patched_cpu_us_per_token"] > 0


def test_a_second_derivative_through_the_node_is_refused_clearly(patch_backend):
    """create_graph=True through the written-out backward would give a wrong second derivative or an error
    deep inside: HigherOrderGradError says what to do; the stock model (patch suspended) computes it."""
    from swiglu_hf import HigherOrderGradError
    from swiglu_hf.patch import suspended

    stock, patched = _mlp_pair(backend="auto")
    x = torch.randn(2, 3, stock.config.hidden_size, requires_grad=True)
    mlp = patched.model.layers[0].mlp
    with pytest.raises(HigherOrderGradError, match="create_graph=True"):
        torch.autograd.grad(mlp(x).square().sum(), x, create_graph=True)
    with suspended(patched):
        (g,) = torch.autograd.grad(mlp(x).square().sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), x)
    (g_ref,) = torch.autograd.grad(stock.model.layers[0].mlp(x).square().sum(), x, create_graph=True)
    assert torch.equal(gg, torch.autograd.grad(g_ref.sum(), x)[0])
