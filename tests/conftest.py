"""Run the real Triton kernels on CPU through the interpreter; must be set before triton imports."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# No network in tests: a library that would fetch from the Hub on import (bitsandbytes' CPU kernel on
# AVX512-BF16 machines) fails at once instead, as under swiglu-hf's own commands.
from swiglu_hf.cli import OFFLINE  # noqa: E402  (the cli module imports nothing heavy)

os.environ.setdefault(*OFFLINE)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def no_interpreter(monkeypatch):
    """Pretend TRITON_INTERPRET is unset (the backend check reads it at call time)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(params=["torch", "triton"])
def patch_backend(request, monkeypatch):
    """Run the test with backend="auto" meaning the PyTorch path, then the Triton kernels (interpreter,
    fp32/fp16 only), through SWIGLU_HF_BACKEND, which spawned ranks inherit."""
    monkeypatch.setenv("SWIGLU_HF_BACKEND", request.param)
    return request.param


def assert_like_stock(got, want, backend: str, what: str = "", noise: float | None = None) -> None:
    """Bitwise on the PyTorch path (it runs stock's own ops). Through the interpreter the kernels' exp/erf
    differ from eager's by an ulp or so: within FP32_NOISE of the tensor's largest entry (TRAINED_NOISE
    for weights after optimizer steps), which a wrong formula (O(1)) or a dropped term cannot meet."""
    from swiglu_hf.numerics import rel_err

    if backend == "torch":
        assert torch.equal(got, want), what
    else:
        limit = FP32_NOISE if noise is None else noise
        err = rel_err(got, want)
        assert err <= limit, f"{what}: relative error {err:.3g} > {limit:g}"


FP32_NOISE = 1e-5  # about 80 fp32 eps, after a few layers
# Adam normalises each update: where a gradient is near zero, an ulp-level difference in it can move
# the weight by up to lr per step, so trained weights get a wider (still far from O(1)) bound
TRAINED_NOISE = 1e-3


if os.environ.get("SWIGLU_HF_BREAK_TRITON") == "1":
    # Measurement aid (scripts/break_triton.sh): every Triton launch raises, to show which test files
    # actually exercise the kernels. Never set in CI.
    def _broken(*args, **kwargs):
        raise RuntimeError("SWIGLU_HF_BREAK_TRITON: Triton launch")

    import swiglu_hf.kernels as _kernels  # noqa: E402

    _kernels.glu_fwd = _kernels.glu_bwd = _broken
