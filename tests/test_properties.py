"""Property-based tests of `swiglu` against float64 (tests/reference.py), with hypothesis.

Shapes include 0- and 1-sized dimensions; layouts include contiguous, transposed leading dims,
column-strided and row-sliced views; both the split (gate, up) and the packed (.., 2I) forms;
every activation; forward and both gradients. The Triton kernels run through the interpreter in
fp32 and fp16 (its bf16 is unreliable, docs/ARCHITECTURE.md); the PyTorch path runs fp32, fp16 and bf16 and
must be bitwise equal to eager (torch.equal, no tolerance). The float64 reference is written out
from the formulas (tests/reference.py), not from the library. Derandomized, so CI sees the same
examples every run.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swiglu_hf import swiglu
from swiglu_hf.activations import ACTIVATIONS
from tests.reference import assert_as_accurate_as_stock, eager_glu, ref_glu, ref_glu_grads

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
LAYOUTS = ("contiguous", "transposed", "column-strided", "row-sliced")


@st.composite
def cases(draw, dtypes):
    lead = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    if draw(st.booleans()):
        lead = [max(d, 1) for d in lead]  # mostly non-empty, with 0-size dims drawn now and then
    width = draw(st.integers(1, 40))
    return dict(
        lead=tuple(lead), width=width, dtype=draw(st.sampled_from(dtypes)),
        activation=draw(st.sampled_from(ACTIVATIONS)), layout=draw(st.sampled_from(LAYOUTS)),
        packed=draw(st.booleans()), seed=draw(st.integers(0, 2**16)), scale=draw(st.sampled_from([1.0, 4.0])),
    )


def _lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A view of `t`'s values in the requested memory layout (same shape, same values)."""
    if layout == "transposed" and t.dim() >= 3:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "column-strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "row-sliced" and t.dim() >= 2:
        tall = torch.zeros(t.shape[0] * 2 + 1, *t.shape[1:], dtype=t.dtype)
        tall[1::2] = t
        return tall[1::2]
    return t


def _inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (*case["lead"], 2 * case["width"] if case["packed"] else case["width"])
    make = lambda: (torch.randn(shape, generator=gen) * case["scale"]).to(case["dtype"])  # noqa: E731
    if case["packed"]:
        x = _lay_out(make(), case["layout"])
        n = case["width"]
        return x, x[..., :n], x[..., n:]
    return None, _lay_out(make(), case["layout"]), _lay_out(make(), case["layout"])


def _run(case, backend):
    """(fused, stock, float64 ref) outputs and gradient triples for one case."""
    x, gate, up = _inputs(case)
    act = case["activation"]
    if x is not None:
        xl = x.detach().requires_grad_()
        fused = swiglu(xl, activation=act, backend=backend)
    else:
        gl, ul = gate.detach().requires_grad_(), up.detach().requires_grad_()
        fused = swiglu(gl, ul, activation=act, backend=backend)
    # stock runs eager on the very same layout (CPU kernels may round differently per layout):
    # on the views for the split form, on the chunk halves of the packed tensor, as Phi-3 does
    if x is not None:
        sx = x.detach().requires_grad_()
        stock = eager_glu(*sx.chunk(2, dim=-1), act)
    else:
        sg, su = gate.detach().requires_grad_(), up.detach().requires_grad_()
        stock = eager_glu(sg, su, act)
    ref = ref_glu(gate, up, act)
    assert fused.shape == stock.shape and fused.dtype == stock.dtype
    dh = torch.randn(fused.shape, generator=torch.Generator().manual_seed(case["seed"] + 1)).to(case["dtype"])
    if x is not None:
        (dx,) = torch.autograd.grad(fused, xl, dh)
        assert dx.shape == x.shape
        got = dx.chunk(2, dim=-1)
    else:
        got = torch.autograd.grad(fused, (gl, ul), dh)
    want = torch.autograd.grad(stock, sx, dh)[0].chunk(2, dim=-1) if x is not None else torch.autograd.grad(stock, (sg, su), dh)
    best = ref_glu_grads(dh, gate, up, act)
    return (fused.detach(), stock.detach(), ref), list(zip(("dgate", "dup"), got, want, best))


@settings(max_examples=100, **SETTINGS)
@given(cases([torch.float32, torch.float16]))
def test_triton_kernels_as_accurate_as_stock(case):
    out, grads = _run(case, "triton")
    assert_as_accurate_as_stock(*out, f"{case} forward")
    for name, got, want, best in grads:
        assert_as_accurate_as_stock(got, want, best, f"{case} {name}")


@settings(max_examples=200, **SETTINGS)
@given(cases([torch.float32, torch.float16, torch.bfloat16]))
def test_torch_path_bitwise_equals_eager(case):
    (fused, stock, ref), grads = _run(case, "torch")
    assert torch.equal(fused, stock), case
    for name, got, want, _ in grads:
        assert torch.equal(got, want), f"{case} {name}"
    assert_as_accurate_as_stock(fused, stock, ref, f"{case} forward")  # and the rule holds trivially


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_examples_reach_empty_and_single_element_shapes(backend):
    # Hypothesis may or may not draw these; pin the edges explicitly.
    for lead, width in (((0,), 3), ((1,), 1), ((3, 0, 2), 5), ((), 1), ((1, 1, 1), 1)):
        for packed in (False, True):
            case = dict(lead=lead, width=width, dtype=torch.float32, activation="silu", layout="contiguous",
                        packed=packed, seed=7, scale=1.0)
            out, grads = _run(case, backend)
            assert_as_accurate_as_stock(*out, f"{case} forward")
            for name, got, want, best in grads:
                assert_as_accurate_as_stock(got, want, best, f"{case} {name}")
