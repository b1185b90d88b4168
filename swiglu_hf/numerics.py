"""The one error metric used by the probe, `verify`, the sweep and the tests.

    rel_err(x, ref) = max |x - ref| / max |ref|      over finite entries, in float64

Entries that are not finite must agree in place (NaN where NaN, the same infinities); otherwise
the error is infinite. `ulp_diff` counts how many representable values of a 16-bit or 32-bit
dtype lie between two tensors, for comparing patched and stock outputs of the same dtype.
"""

from __future__ import annotations

import torch


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(x)) or not torch.equal(x[~finite].nan_to_num(0.0), ref[~finite].nan_to_num(0.0)):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = ref[finite].abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return ((x[finite] - ref[finite]).abs().max() / scale).item()


_INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """The bits of t as integers that order like the values (negative floats flipped)."""
    bits = t.contiguous().view(_INT_OF[t.dtype]).to(torch.int64)
    sign = 1 << (8 * t.element_size() - 1)
    return torch.where(bits < 0, -(bits + sign), bits)  # two's-complement view of a sign-magnitude float


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest number of representable steps between a and b (same dtype; 0 means bitwise equal)."""
    if a.dtype != b.dtype or a.dtype not in _INT_OF:
        raise TypeError(f"ulp_diff needs two float32/float16/bfloat16 tensors of one dtype, got {a.dtype}, {b.dtype}")
    if a.numel() == 0:
        return 0
    return int((_ordered(a) - _ordered(b)).abs().max().item())
