"""The per-call path (forms/dense.py _Plan): resolved once per instance, rebuilt when the module changes
under it, never carried to a copy, and bitwise equal to stock in every mode it serves."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from swiglu_hf import apply_swiglu_patch
from swiglu_hf.loading import build_tiny, tiny_config
from swiglu_hf.numerics import rel_err
from swiglu_hf.patch import STATE_ATTR
from swiglu_hf.tools.bench import overhead as bench_overhead

from .conftest import FP32_NOISE, assert_like_stock


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


@pytest.mark.parametrize("leaf", [True, False])
def test_training_call_under_autocast_is_one_node_like_stock_and_a_hook_keeps_the_module_path(leaf):
    """Autocast: the node casts x and the weights as autocast's linears do and keeps the casts. Bitwise
    output and fp32 grads, for a leaf x (autocast caches its one cast: the projections' grads meet in
    bf16) and a computed one (two casts, their grads meet in fp32). Saved bytes: stock's minus act and h,
    and minus stock's second cast of a computed x. A hook must see its module called: the module path."""
    from swiglu_hf.memory import saved_activation_bytes

    stock, patched = _mlp_pair()
    mlp, ref = patched.model.layers[0].mlp, stock.model.layers[0].mlp
    hidden, inter = stock.config.hidden_size, stock.config.intermediate_size
    x0 = torch.randn(2, 3, hidden, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = x0 if leaf else x0 * 1.0
        y, y_ref = mlp(x), ref(x)
        saved = [saved_activation_bytes(lambda m=m: m(x)) for m in (mlp, ref)]
    assert type(y.grad_fn).__name__ == "GatedMLPBackward" and y.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)
    grads = [torch.autograd.grad(out.float().sum(), [x0, *m.parameters()], retain_graph=True)
             for out, m in ((y, mlp), (y_ref, ref))]
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(*grads))
    tokens = 2 * 3
    assert saved[1] - saved[0] == 2 * tokens * inter * 2 + (0 if leaf else tokens * hidden * 2)
    seen = []
    mlp.up_proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    y = mlp(x0)
    assert seen == [(2, 3, inter)]
    assert type(y.grad_fn).__name__ != "GatedMLPBackward" and torch.equal(y, ref(x0))


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


def test_a_second_derivative_through_the_node_equals_stocks(patch_backend):
    """create_graph=True differentiates a recompute of the unit with eager's ops: double backward (a
    gradient penalty, hvp) works as on stock; with the projection weights frozen x was not kept, and
    HigherOrderGradError says what to do."""
    from swiglu_hf import HigherOrderGradError

    stock, patched = _mlp_pair(backend="auto")
    mlp, ref = patched.model.layers[0].mlp, stock.model.layers[0].mlp
    x = torch.randn(2, 3, stock.config.hidden_size, requires_grad=True)
    second = []
    for m in (mlp, ref):
        g = torch.autograd.grad(m(x).square().sum(), [x, *m.parameters()], create_graph=True)
        second.append(torch.autograd.grad(sum(t.square().sum() for t in g), [x, *m.parameters()]))
    for i, (a, b) in enumerate(zip(*second)):  # not bitwise: the double backward sums in another order
        assert rel_err(a, b) <= FP32_NOISE, f"second derivative {i}: {rel_err(a, b):.3g}"
    for p in mlp.parameters():
        p.requires_grad_(False)
    with pytest.raises(HigherOrderGradError, match="create_graph=True"):
        torch.autograd.grad(mlp(x).square().sum(), x, create_graph=True)


def test_input_grad_adds_in_stocks_order_when_x_also_feeds_a_residual(patch_backend):
    """Post-norm models (OLMo2, EXAONE-4) add the MLP input to its output: x's grad is the sum of three
    terms, and stock adds them as (residual + up's) + gate's. The node hands the engine up's and gate's
    grads separately, so the sum is stock's: bitwise on the PyTorch path (fp32 and bf16); through the
    interpreter (fp32: its bf16 is unreliable) within fp32 noise."""
    for dtype in (torch.float32, torch.bfloat16) if patch_backend == "torch" else (torch.float32,):
        stock, patched = _mlp_pair(backend="auto")
        mlp, ref = patched.model.layers[0].mlp.to(dtype), stock.model.layers[0].mlp.to(dtype)
        torch.manual_seed(0)
        pre = nn.Linear(stock.config.hidden_size, stock.config.hidden_size).to(dtype)
        x = torch.randn(4, 7, stock.config.hidden_size, dtype=dtype, requires_grad=True)
        grads = []
        for m in (mlp, ref):
            h = pre(x)
            out = h + m(h)
            grads.append(torch.autograd.grad(out.square().sum(), [x, *pre.parameters(), *m.parameters()]))
        assert type(mlp(pre(x)).grad_fn).__name__ == "GatedMLPBackward"
        for i, (a, b) in enumerate(zip(*grads)):
            assert_like_stock(a, b, patch_backend, f"{dtype} grad {i}")


def test_a_probe_deferred_past_a_meta_call_still_runs_before_real_weights(patch_backend):
    """A model patched on the meta device and called there once (shape inference) has a plan but no
    probe yet: the first call with real weights runs the probe, which refuses a forward that is not the
    plain gated unit."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from swiglu_hf import SelfCheckError

    class DoubledMLP(LlamaMLP):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * 2

    with torch.device("meta"):
        model = nn.Sequential(DoubledMLP(LlamaConfig(hidden_size=64, intermediate_size=96)))
    apply_swiglu_patch(model, backend="auto", strict=False)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, device="meta"))
    model.to_empty(device="cpu")
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    with pytest.raises(SelfCheckError):
        model(torch.randn(2, 3, 64))


def test_what_the_node_cannot_serve_takes_the_module_path_like_stock():
    """Forward-mode AD (no jvp), a non-contiguous x (stock forms its input grad in another layout) and
    weights of a tensor subclass (they implement F.linear, not the node's matmuls): each runs the module
    path and matches stock; frozen projection weights keep x out of the node, as stock's linears do."""
    import torch.autograd.forward_ad as fwAD

    stock, patched = _mlp_pair()
    mlp, ref = patched.model.layers[0].mlp, stock.model.layers[0].mlp
    hidden = stock.config.hidden_size
    x, t = torch.randn(2, 3, hidden), torch.randn(2, 3, hidden)
    tangents = []
    for m in (mlp, ref):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent)
    assert torch.equal(*tangents)

    for dtype in (torch.float16, torch.bfloat16):
        xt = torch.randn(1, hidden, 5, dtype=dtype).transpose(1, 2).requires_grad_()  # column-major rows
        m16, r16 = copy.deepcopy(mlp).to(dtype), copy.deepcopy(ref).to(dtype)
        y, y_ref = m16(xt), r16(xt)
        assert type(y.grad_fn).__name__ != "GatedMLPBackward"
        dy = torch.randn_like(y_ref)
        assert torch.equal(torch.autograd.grad(y, xt, dy)[0], torch.autograd.grad(y_ref, xt, dy)[0])

    class Marked(torch.Tensor):  # a subclass that only passes through
        pass

    m_sub = copy.deepcopy(mlp)
    m_sub.gate_proj.weight = nn.Parameter(m_sub.gate_proj.weight.detach().as_subclass(Marked))
    xg = torch.randn(2, 3, hidden, requires_grad=True)
    y = m_sub(xg)
    assert type(y.grad_fn).__name__ != "GatedMLPBackward" and torch.equal(y, ref(xg))

    for p in mlp.parameters():
        p.requires_grad_(False)
    xf = torch.randn(2, 3, hidden, requires_grad=True)
    y = mlp(xf)
    with torch.no_grad():
        xf.mul_(2)  # stock's linears keep no x when their weights are frozen; neither does the node
    (g,) = torch.autograd.grad(y.sum(), xf)
    assert type(y.grad_fn).__name__ == "GatedMLPBackward" and g.shape == xf.shape
