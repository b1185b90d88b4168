"""The real Triton kernels, run through the CPU interpreter, against a float64 reference.

bf16 is not tested here: the interpreter's bf16 arithmetic and fp32->bf16 rounding are not
faithful (docs/ARCHITECTURE.md); bf16 kernel checks live in tests/test_gpu.py, and bf16 on CPU is covered
through the PyTorch path in test_functional.py.

The reference (tests/reference.py) is written out from the formulas in float64 and imports nothing
from swiglu_hf. Results are compared by the derived rule (2x stock's error + 1 eps) where the
interpreter's numpy exp/erf legitimately differ from eager's, and bitwise everywhere else: the
PyTorch path, a second backward, and the kernels' rounding order (test_*_rounds_like_eager).
"""

import pytest
import torch
import triton
import triton.language as tl

from swiglu_hf import ops, swiglu
from swiglu_hf.activations import ACTIVATIONS
from tests import reference
from tests.reference import (
    assert_as_accurate_as_stock,
    eager_glu,
    ref_act,
    ref_act_grad,
    ref_glu,
    ref_glu_grads,
)

DTYPES = [torch.float32, torch.float16]


def _check(gate, up, activation, packed=None):
    """Fused (triton) vs stock (eager in dtype) vs float64, forward and backward."""
    gate = gate.detach().requires_grad_()
    up = up.detach().requires_grad_()
    if packed is None:
        fused = swiglu(gate, up, activation=activation, backend="triton")
    else:
        fused = swiglu(packed, activation=activation, backend="triton")
    stock = eager_glu(gate, up, activation)
    ref = ref_glu(gate, up, activation)
    assert fused.dtype == gate.dtype
    assert_as_accurate_as_stock(fused.detach(), stock.detach(), ref, f"{activation} forward")

    dh = torch.randn(fused.shape, dtype=gate.dtype)
    inputs = (gate, up) if packed is None else (packed,)
    got = torch.autograd.grad(fused, inputs, dh)
    if packed is not None:
        got = got[0].chunk(2, dim=-1)
    want = torch.autograd.grad(stock, (gate, up), dh)
    ref_grads = ref_glu_grads(dh, gate, up, activation)
    for name, g, w, r in zip(("dgate", "dup"), got, want, ref_grads):
        assert_as_accurate_as_stock(g, w, r, f"{activation} {name}")


def test_reference_covers_every_activation():
    assert set(reference.ACTIVATIONS) == set(ACTIVATIONS)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_matches_float64_autograd(activation):
    """The hand-written float64 formulas and derivatives agree with torch's float64 eager + autograd."""
    x = torch.cat([torch.linspace(-12, 12, 2001, dtype=torch.float64), torch.tensor([0.0, 1e-8, -1e-8, 40.0, -40.0])])
    xg = x.clone().requires_grad_()
    y = eager_glu(xg, torch.ones_like(x), activation)
    (dy,) = torch.autograd.grad(y.sum(), xg)
    # atol: torch's float64 gelu cancels in 1 + erf(x / sqrt 2) for x < -6 (|error| ~ 1e-16 there)
    torch.testing.assert_close(ref_act(x, activation), y.detach(), rtol=1e-12, atol=1e-14)
    nonzero = x != 0  # relu's derivative at exactly 0 is a convention (0 in both)
    torch.testing.assert_close(ref_act_grad(x, activation)[nonzero], dy[nonzero], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_odd_2d_shape(activation, dtype):
    torch.manual_seed(0)
    _check(torch.randn(1823, 781, dtype=dtype) * 3, torch.randn(1823, 781, dtype=dtype), activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_reads_halves_in_place(activation, dtype):
    torch.manual_seed(1)
    x = (torch.randn(7, 33, 2 * 431, dtype=dtype) * 3).requires_grad_()
    gate, up = x.detach().chunk(2, dim=-1)
    _check(gate, up, activation, packed=x)


def test_4d_odd_shape():
    torch.manual_seed(2)
    shape = (6, 42, 123, 431)
    _check(torch.randn(shape), torch.randn(shape), "silu")


def test_non_contiguous_inputs():
    torch.manual_seed(3)
    base = torch.randn(64, 2, 300)
    gate = base[:, 0, ::2]  # column stride 2: copied once
    up = torch.randn(150, 64).t()  # transposed
    _check(gate, up, "silu")
    packed = torch.randn(40, 6, 2 * 50).transpose(0, 1).requires_grad_()  # leading dims not mergeable
    g, u = packed.detach().chunk(2, dim=-1)
    _check(g, u, "silu", packed=packed)


@pytest.mark.parametrize("shape", [(0, 16), (3, 0, 8), (5, 0)])
def test_empty_inputs(shape):
    gate = torch.randn(shape, requires_grad=True)
    up = torch.randn(shape, requires_grad=True)
    h = swiglu(gate, up, backend="triton")
    assert h.shape == gate.shape
    h.sum().backward()
    assert gate.grad.shape == gate.shape and up.grad.shape == up.shape
    packed = torch.randn(*shape[:-1], 2 * shape[-1], requires_grad=True)
    assert swiglu(packed, backend="triton").shape == shape


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_and_inf_propagate_like_stock(activation):
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0, 30.0, -30.0, 100.0])
    gate = specials.repeat_interleave(len(specials)).reshape(10, 10)
    up = specials.repeat(len(specials)).reshape(10, 10)
    fused = swiglu(gate, up, activation=activation, backend="triton")
    stock = eager_glu(gate, up, activation)
    if activation == "gelu":
        # CPU eager's vectorized gelu returns NaN for +inf; CUDA eager (which the kernel matches)
        # evaluates x * 0.5 * (1 + erf(x / sqrt 2)) = +inf there. Expect CUDA's formula.
        cuda_gelu = gate * 0.5 * (1 + torch.erf(gate * 0.7071067811865476))
        stock = torch.where(torch.isinf(gate), cuda_gelu * up, stock)
    # NaN / Inf patterns equal to stock's, finite entries within the derived rule
    assert_as_accurate_as_stock(fused, stock, ref_glu(gate, up, activation), f"{activation} specials")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_second_backward_through_retained_graph_is_identical(backend):
    torch.manual_seed(4)
    gate = torch.randn(17, 96, requires_grad=True)
    x = torch.randn(17, 2 * 96, requires_grad=True)
    up = torch.randn(17, 96, requires_grad=True)
    loss = swiglu(gate, up, backend=backend).square().sum() + swiglu(x, backend=backend).square().sum()
    first = torch.autograd.grad(loss, (gate, up, x), retain_graph=True)
    second = torch.autograd.grad(loss, (gate, up, x))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not any(torch.equal(g, torch.zeros_like(g)) for g in first)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_backward_with_h_equals_forward_and_plain_backward(backend, activation):
    from swiglu_hf import ops

    torch.manual_seed(5)
    gate, up, dh = torch.randn(3, 40, 77), torch.randn(3, 40, 77), torch.randn(3, 40, 77)
    h, dgate, dup = ops.glu_bwd_with_h(dh, gate, up, activation, backend)
    assert torch.equal(h, ops.glu_fwd(gate, up, activation, backend))
    want = ops.glu_bwd(dh, gate, up, activation, backend)
    assert torch.equal(dgate, want[0]) and torch.equal(dup, want[1])
    packed = torch.cat((gate, up), dim=-1)
    h2, dx = ops.glu_packed_bwd_with_h(dh, packed, activation, backend)
    # vs the packed ops, not the split ones: CPU eager rounds strided halves on another code path
    assert torch.equal(h2, ops.glu_packed_fwd(packed, activation, backend))
    assert torch.equal(dx, ops.glu_packed_bwd(dh, packed, activation, backend))


# ---- the kernels' intermediate rounding, bitwise -----------------------------------------
# The kernels round act(gate) to the input dtype before `* up`, and dh * up to the input dtype
# before the activation's derivative (swiglu_hf/kernels.py docstring), as eager does. In fp16 the
# interpreter's arithmetic is numpy's IEEE float32 and its fp32 -> fp16 cast is numpy's correctly
# rounded astype (test_interpreter_rounds_fp32_to_fp16_like_torch), so the kernels' results can be
# predicted exactly. The only inexact input is the fp32 activation itself (numpy's exp / erf, not
# eager's): it is taken from the kernel, as the fp32 forward with up = 1 (a * 1.0 is exact).


@triton.jit
def _to_fp16_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(tl.float16), mask=mask)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_interpreter_rounds_fp32_to_fp16_like_torch():
    """Every fp16 midpoint (the ties), its fp32 neighbours, subnormals, overflow, inf and NaN."""
    h = torch.arange(0, 0x7C00, dtype=torch.int16).view(torch.float16)  # every finite fp16 >= 0
    lo, hi = h[:-1].double(), h[1:].double()
    mid = ((lo + hi) / 2).float()  # exact in fp32: the ties, even and odd
    up, down = torch.nextafter(mid, torch.tensor(float("inf"))), torch.nextafter(mid, torch.tensor(-float("inf")))
    edges = torch.tensor([65504.0, 65519.99609375, 65520.0, 1e10, float("inf"), float("nan"), 2.0**-25, 2.0**-26])
    x = torch.cat([mid, up, down, h.float(), edges])
    x = torch.cat([x, -x])
    y = torch.empty(x.shape, dtype=torch.float16)
    _to_fp16_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096)
    assert torch.equal(_bits(y), _bits(x.half())), "the interpreter's fp32 -> fp16 cast is not torch's round-to-nearest-even"


def _act32(gate16: torch.Tensor, activation: str) -> torch.Tensor:
    """The kernels' own fp32 activation of fp16 gate values: the fp32 forward with up = 1."""
    g = gate16.float()
    return ops.glu_fwd(g, torch.ones_like(g), activation, "triton")


def _rounding_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    gate = (torch.randn(64, 1000, generator=gen) * 3).half()
    up = (torch.rand(64, 1000, generator=gen) * 6 - 3).half()
    dh = (torch.randn(64, 1000, generator=gen) * 2).half()
    return gate, up, dh


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "sigmoid"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_forward_rounds_act_to_fp16_before_up(activation, packed):
    """h == round16(round16(act(g)) * u) bitwise, and != round16(act(g) * u) on a share of elements."""
    gate, up, _ = _rounding_inputs(10)
    a32 = _act32(gate, activation)
    eager_order = (a32.half().float() * up.float()).half()  # act_fn(gate) returns fp16, then fp16 * fp16
    unrounded = (a32 * up.float()).half()  # act kept in fp32 up to the product
    differ = eager_order != unrounded
    assert differ.float().mean() > 0.01, "the inputs do not exercise the intermediate rounding"
    if packed:
        h = ops.glu_packed_fwd(torch.cat((gate, up), dim=-1), activation, "triton")
    else:
        h = ops.glu_fwd(gate, up, activation, "triton")
    same = torch.equal(_bits(h), _bits(eager_order))
    assert same, f"{(h != eager_order).sum().item()} of {h.numel()} elements differ from round16(round16(act) * up)"
    assert not torch.equal(h[differ], unrounded[differ])
    # and the recomputed h of the backward-with-h kernel is the same bits
    h2, _, _ = ops.glu_bwd_with_h(torch.ones_like(gate), gate, up, activation, "triton")
    same = torch.equal(_bits(h2), _bits(eager_order))
    assert same, f"backward's recomputed h: {(h2 != eager_order).sum().item()} elements differ"


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_backward_rounds_dh_times_up_to_fp16(packed):
    """sigmoid, whose backward is arithmetic on the rounded activation a (no fma, no exp). aten's
    sigmoid_backward computes in the tensor dtype on CUDA (and on CPU for fp16), each step rounded:

        dact  = round16(dh * u)                 dgate = round16(round16(dact * round16(1 - a)) * a)
        dup   = round16(dh * a)                 a     = round16(sigmoid32(g))

    dgate must equal eager's own sigmoid_backward on those fp16 tensors bitwise, and differ from the
    same formula computed in fp32 with dact left unrounded."""
    gate, up, dh = _rounding_inputs(11)
    a = _act32(gate, "sigmoid").half()
    dact = (dh.float() * up.float()).half()
    eager_order = torch.ops.aten.sigmoid_backward(dact, a)
    stepwise = ((dact.float() * (1.0 - a.float()).half().float()).half().float() * a.float()).half()
    assert torch.equal(_bits(eager_order), _bits(stepwise)), "CPU fp16 sigmoid_backward is not the stepwise form"
    unrounded = (dh.float() * up.float() * (1.0 - a.float()) * a.float()).half()
    differ = eager_order != unrounded
    assert differ.float().mean() > 0.01, "the inputs do not exercise the intermediate rounding"
    if packed:
        dx = ops.glu_packed_bwd(dh, torch.cat((gate, up), dim=-1), "sigmoid", "triton")
        dgate, dup = dx.chunk(2, dim=-1)
    else:
        dgate, dup = ops.glu_bwd(dh, gate, up, "sigmoid", "triton")
    same = torch.equal(_bits(dup.contiguous()), _bits((dh.float() * a.float()).half()))
    assert same, "dup != round16(dh * round16(sigmoid(g)))"
    same = torch.equal(_bits(dgate.contiguous()), _bits(eager_order))
    assert same, f"{(dgate != eager_order).sum().item()} of {dgate.numel()} elements differ from aten.sigmoid_backward in fp16"
    assert not torch.equal(dgate[differ], unrounded[differ])
