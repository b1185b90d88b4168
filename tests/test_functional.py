"""The functional API: the seed's example, typed errors, and the PyTorch path's bitwise equality."""

import doctest

import pytest
import torch

import swiglu_hf
from swiglu_hf import functional, swiglu
from swiglu_hf.activations import ACTIVATIONS
from tests.reference import eager_glu


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_seed_worked_example(backend):
    # The seed splits x into halves (a, b) = ([4, -1], [5, 2]) and computes b * sigmoid(a).
    x = torch.tensor([4.0, -1.0, 5.0, 2.0])
    out = swiglu(x, activation="sigmoid", backend=backend)
    if backend == "torch":  # eager's own ops: bitwise
        assert torch.equal(out, eager_glu(x[:2], x[2:], "sigmoid"))
    # against the exact values: fp32 eps-level, as the interpreter's exp is not eager's
    assert out.tolist() == pytest.approx([5 / (1 + torch.e ** -4), 2 / (1 + torch.e)], rel=2 * torch.finfo(torch.float32).eps)
    assert [round(v, 3) for v in out.tolist()] == [4.91, 0.538]


def test_docstring_examples_run():
    result = doctest.testmod(functional)
    assert result.attempted >= 1 and result.failed == 0


def test_llama_silu_differs_from_seed_sigmoid():
    x = torch.tensor([4.0, -1.0, 5.0, 2.0])
    silu = swiglu(x, backend="torch")  # the default activation: up * gate * sigmoid(gate), eager's bits
    assert torch.equal(silu, eager_glu(x[:2], x[2:], "silu"))
    assert silu.tolist() == pytest.approx([5 * 4 / (1 + torch.e ** -4), 2 * -1 / (1 + torch.e)], rel=2 * torch.finfo(torch.float32).eps)
    assert not torch.equal(silu, swiglu(x, activation="sigmoid", backend="torch"))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_torch_path_bitwise_equals_eager(activation, dtype):
    g = torch.randn(37, 129, dtype=dtype, requires_grad=True)
    u = torch.randn(37, 129, dtype=dtype, requires_grad=True)
    dh = torch.randn(37, 129, dtype=dtype)
    h = swiglu(g, u, activation=activation, backend="torch")
    ref = eager_glu(g, u, activation)
    assert torch.equal(h, ref)
    got = torch.autograd.grad(h, (g, u), dh)
    want = torch.autograd.grad(ref, (g, u), dh)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_packed_torch_path_bitwise_equals_chunk(activation):
    x = torch.randn(3, 5, 2 * 71, dtype=torch.bfloat16, requires_grad=True)
    h = swiglu(x, activation=activation, backend="torch")
    gate, up = x.chunk(2, dim=-1)
    ref = eager_glu(gate, up, activation)
    assert torch.equal(h, ref)
    dh = torch.randn_like(h)
    (got,) = torch.autograd.grad(h, x, dh)
    (want,) = torch.autograd.grad(ref, x, dh)
    assert torch.equal(got, want)


def test_float64_runs_on_torch_path():
    g, u = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(swiglu(g, u), eager_glu(g, u, "silu"))


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: swiglu(torch.randn(2, 3), torch.randn(2, 4)), swiglu_hf.InvalidInputError, "shape"),
        (lambda: swiglu(torch.randn(2, 5)), swiglu_hf.InvalidInputError, "odd"),
        (lambda: swiglu(torch.ones(2, 4, dtype=torch.int64)), swiglu_hf.InvalidDtypeError, "int64"),
        (lambda: swiglu(torch.randn(2, 3), torch.randn(2, 3).half()), swiglu_hf.InvalidDtypeError, "cast"),
        (lambda: swiglu(torch.randn(2, 3), torch.randn(2, 3, device="meta")), swiglu_hf.InvalidInputError, "device"),
        (lambda: swiglu(torch.randn(4), activation="swish2"), swiglu_hf.UnsupportedActivationError, "gelu_tanh"),
        (lambda: swiglu(torch.randn(4), backend="cuda"), swiglu_hf.UnknownBackendError, "'triton'"),
        (lambda: swiglu(torch.tensor(1.0), torch.tensor(2.0)), swiglu_hf.InvalidInputError, "0-d"),
        (lambda: swiglu([1.0, 2.0]), swiglu_hf.InvalidDtypeError, "torch.Tensor"),
        (lambda: swiglu(torch.randn(4, dtype=torch.float64), backend="triton"), swiglu_hf.InvalidDtypeError, "float64"),
    ],
)
def test_bad_arguments_raise_typed_errors(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_errors_are_standard_exception_types():
    assert issubclass(swiglu_hf.InvalidInputError, ValueError)
    assert issubclass(swiglu_hf.InvalidDtypeError, TypeError)
    assert issubclass(swiglu_hf.NoGatedMLPError, ValueError)
    assert issubclass(swiglu_hf.BackendUnavailableError, RuntimeError)


def test_triton_on_cpu_without_interpreter_is_refused(no_interpreter):
    with pytest.raises(swiglu_hf.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        swiglu(torch.randn(4, 8), torch.randn(4, 8), backend="triton")


def test_import_does_not_load_triton_or_cuda():
    import subprocess
    import sys

    code = "import sys, swiglu_hf, torch; print('triton' in sys.modules, torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
