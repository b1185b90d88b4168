"""Float64 reference and the derived tolerance rule shared by the numeric tests.

Rule: the fused result's max error against float64 may be at most FACTOR times the stock
(eager PyTorch) result's own max error, plus FLOOR_ULPS units of eps at the output's scale.
FACTOR = 2 allows a different-but-equally-accurate exp/erf (the interpreter's numpy functions);
a wrong formula or rounding order is off by orders of magnitude more.
"""

import torch

from swiglu_hf.activations import act_forward

FACTOR = 2.0
FLOOR_ULPS = 1.0


def eager_glu(gate, up, activation):
    """What a stock module computes: act in the input dtype, then multiply."""
    return act_forward(activation, gate) * up


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    finite = torch.isfinite(ref)
    return (x.double()[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0


def assert_as_accurate_as_stock(fused, stock, ref, what=""):
    """fused error <= FACTOR * stock error + FLOOR_ULPS * eps * scale, and identical non-finite pattern."""
    assert fused.shape == stock.shape == ref.shape, what
    assert torch.equal(torch.isnan(fused), torch.isnan(stock)), f"{what}: NaN pattern differs from stock"
    assert torch.equal(torch.isinf(fused), torch.isinf(stock)), f"{what}: Inf pattern differs from stock"
    if ref.numel() == 0:
        return
    scale = ref[torch.isfinite(ref)].abs().max().item() if torch.isfinite(ref).any() else 0.0
    limit = FACTOR * max_err(stock, ref) + FLOOR_ULPS * torch.finfo(fused.dtype).eps * scale
    err = max_err(fused, ref)
    assert err <= limit, f"{what}: fused error {err:.3e} > limit {limit:.3e} (stock error {max_err(stock, ref):.3e})"
