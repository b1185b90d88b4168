"""The real Triton kernels, run through the CPU interpreter, against a float64 reference.

bf16 is not tested here: the interpreter's bf16 arithmetic and fp32->bf16 rounding are not
faithful (docs/ARCHITECTURE.md); bf16 kernel checks live in tests/test_gpu.py, and bf16 on CPU is covered
through the PyTorch path in test_functional.py.
"""

import pytest
import torch

from swiglu_hf import swiglu
from swiglu_hf.activations import ACTIVATIONS
from tests.reference import assert_as_accurate_as_stock, eager_glu

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
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    ref = eager_glu(g64, u64, activation)
    assert fused.dtype == gate.dtype
    assert_as_accurate_as_stock(fused.detach(), stock.detach(), ref.detach(), f"{activation} forward")

    dh = torch.randn(fused.shape, dtype=gate.dtype)
    inputs = (gate, up) if packed is None else (packed,)
    got = torch.autograd.grad(fused, inputs, dh)
    if packed is not None:
        got = got[0].chunk(2, dim=-1)
    want = torch.autograd.grad(stock, (gate, up), dh)
    ref_grads = torch.autograd.grad(ref, (g64, u64), dh.double())
    for name, g, w, r in zip(("dgate", "dup"), got, want, ref_grads):
        assert_as_accurate_as_stock(g, w, r, f"{activation} {name}")


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
    assert torch.equal(torch.isnan(fused), torch.isnan(stock))
    assert torch.equal(torch.isinf(fused), torch.isinf(stock))
    finite = torch.isfinite(stock)
    torch.testing.assert_close(fused[finite], stock[finite], rtol=1e-6, atol=0)


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
