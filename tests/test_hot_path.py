"""The per-call path (forms/dense.py _Plan): resolved once per instance, rebuilt when the module changes
under it, never carried to a copy, and bitwise equal to stock in every mode it serves."""

from __future__ import annotations

import copy

import torch
from torch import nn

from swiglu_hf import apply_swiglu_patch
from swiglu_hf.loading import build_tiny
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
