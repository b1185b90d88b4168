"""Run the real Triton kernels on CPU through the interpreter; must be set before triton imports."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def no_interpreter(monkeypatch):
    """Pretend TRITON_INTERPRET is unset (the backend check reads it at call time)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
