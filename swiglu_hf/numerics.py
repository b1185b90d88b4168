"""The one error metric used by the probe, `verify`, the sweep and the tests.

    rel_err(x, ref) = max |x - ref| / max |ref|      over finite entries, in float64

Entries that are not finite must agree in place (NaN where NaN, the same infinities); otherwise
the error is infinite. `ulp_diff` counts how many representable values of a 16-bit or 32-bit
dtype lie between two tensors, for comparing patched and stock outputs of the same dtype. Both work
through the tensors CHUNK elements at a time, so comparing a whole embedding's gradient needs a few
buffers of CHUNK elements, not float64 and int64 copies of the tensor.
"""

from __future__ import annotations

import torch


CHUNK = 1 << 22  # elements per step: bounds the float64/int64 temporaries of one comparison to a few 32 MiB buffers


def _chunks(*tensors: torch.Tensor):
    """Aligned slices of the flattened tensors, CHUNK elements at a time."""
    flat = [t.detach().reshape(-1) for t in tensors]
    for start in range(0, flat[0].numel(), CHUNK):
        yield [f[start:start + CHUNK] for f in flat]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.shape != ref.shape:
        return float("inf")
    bad = torch.zeros((), dtype=torch.bool, device=ref.device)
    diff = torch.zeros((), dtype=torch.float64, device=ref.device)
    scale = torch.zeros((), dtype=torch.float64, device=ref.device)
    for xc, rc in _chunks(x, ref):
        xc, rc = xc.double(), rc.double()
        finite = torch.isfinite(rc)
        # not finite: must agree in place (NaN where NaN, the same infinities)
        bad |= (finite != torch.isfinite(xc)).any() | (~finite & (xc.nan_to_num(0.0) != rc.nan_to_num(0.0))).any()
        diff = torch.maximum(diff, torch.where(finite, (xc - rc).abs(), 0.0).max())
        scale = torch.maximum(scale, torch.where(finite, rc.abs(), 0.0).max())
    if bad.item():
        return float("inf")
    return (diff / scale.clamp_min(torch.finfo(torch.float64).tiny)).item()


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
    if a.shape != b.shape:
        raise TypeError(f"ulp_diff needs two tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    worst = torch.zeros((), dtype=torch.int64, device=a.device)
    for ac, bc in _chunks(a, b):
        worst = torch.maximum(worst, (_ordered(ac) - _ordered(bc)).abs().max())
    return int(worst.item())
