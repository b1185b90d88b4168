"""An independent float64 reference, the stock expressions, and the derived tolerance rule.

Nothing here comes from swiglu_hf: the reference activations and their derivatives are written
out from the formulas, in float64, and the "stock" expressions are the calls a stock module makes
(torch.nn.functional), so a wrong formula in the library cannot hide in its own reference.

    sigmoid(x)    1 / (1 + exp(-x))                           s' = s (1 - s)
    silu(x)       x * sigmoid(x)                              s + x s (1 - s) = s (1 + x (1 - s))
    gelu(x)       0.5 x (1 + erf(x / sqrt 2))                 Phi(x) + x phi(x),  phi(x) = exp(-x^2/2) / sqrt(2 pi)
    gelu_tanh(x)  0.5 x (1 + tanh(u)),                        0.5 (1 + t) + 0.5 x (1 - t^2) u',
                  u = sqrt(2/pi) (x + 0.044715 x^3)           t = tanh(u), u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    relu(x)       max(x, 0)                                   1 where x > 0, else 0 (as threshold_backward)

Tolerance rule: the fused result's max error against float64 may be at most FACTOR times the
stock (eager PyTorch) result's own max error, plus FLOOR_ULPS units of eps at the output's scale.
FACTOR = 2 allows a different-but-equally-accurate exp/erf (the interpreter's numpy functions);
a wrong formula or rounding order is off by orders of magnitude more. Where a result must be
bitwise (the PyTorch path against eager), tests use torch.equal, never this rule.
"""

import math

import torch
import torch.nn.functional as F

FACTOR = 2.0
FLOOR_ULPS = 1.0

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "sigmoid", "relu")

# The calls a stock module makes, in its dtype (tests/test_gpu.py's EAGER too).
STOCK_ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
}

_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_KAPPA = 0.044715


def eager_glu(gate, up, activation):
    """What a stock module computes: act in the input dtype (a dtype tensor), then a dtype multiply."""
    return STOCK_ACT[activation](gate) * up


def _sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


# 1 + erf(z) and 1 + tanh(u) cancel for large negative arguments (x < -6 loses most digits even in
# float64); the same quantities without the cancellation: 1 + erf(z) = erfc(-z),
# 1 + tanh(u) = 2 / (1 + exp(-2u)).
def _one_plus_erf(z):
    return torch.special.erfc(-z)


def _one_plus_tanh(u):
    return 2.0 / (1.0 + torch.exp(-2.0 * u))


def ref_act(x: torch.Tensor, activation: str) -> torch.Tensor:
    """act(x) from the formula, in float64."""
    x = x.detach().double()
    if activation == "sigmoid":
        return _sigmoid(x)
    if activation == "silu":
        return x * _sigmoid(x)
    if activation == "gelu":
        return 0.5 * x * _one_plus_erf(x / _SQRT2)
    if activation == "gelu_tanh":
        return 0.5 * x * _one_plus_tanh(_SQRT_2_OVER_PI * (x + _KAPPA * x**3))
    if activation == "relu":
        return torch.where(x < 0, torch.zeros_like(x), x)  # NaN passes through
    raise ValueError(activation)


def ref_act_grad(x: torch.Tensor, activation: str) -> torch.Tensor:
    """d act / dx from the hand-written derivative, in float64."""
    x = x.detach().double()
    if activation == "sigmoid":
        s = _sigmoid(x)
        return s * (1.0 - s)
    if activation == "silu":
        s = _sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    if activation == "gelu":
        return 0.5 * _one_plus_erf(x / _SQRT2) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    if activation == "gelu_tanh":
        u = _SQRT_2_OVER_PI * (x + _KAPPA * x**3)
        t = torch.tanh(u)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _KAPPA * x * x)
        return 0.5 * _one_plus_tanh(u) + 0.5 * x * (1.0 - t * t) * du
    if activation == "relu":
        return torch.where(torch.isnan(x), x, (x > 0).double())
    raise ValueError(activation)


def ref_glu(gate, up, activation):
    """act(gate) * up in float64."""
    return ref_act(gate, activation) * up.detach().double()


def ref_glu_grads(dh, gate, up, activation):
    """(dgate, dup) of act(gate) * up for upstream dh, in float64."""
    dh = dh.detach().double()
    return dh * up.detach().double() * ref_act_grad(gate, activation), dh * ref_act(gate, activation)


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


# ---- gate specs (swiglu_hf.gate_spec.GateSpec, read by its fields only) -------------------------
#
#     g = gate * gate_mul;  g = min(g, gate_max);  u = clamp(up, -up_limit, up_limit)
#     a = act(g)  relu2: max(g, 0)^2   silu_alpha: g * sigmoid(alpha g)
#     h = (u + 1) * a  if up_plus_one  else  u * a
#
# Clamps are written with `where` so that float64 autograd gives clamp's derivative convention
# (1 where gate <= gate_max and -up_limit <= up <= up_limit, 0 elsewhere and where NaN).

def ref_spec_act(x: torch.Tensor, spec) -> torch.Tensor:
    x = x.double()
    if spec.activation == "relu2":
        return torch.where(x > 0, x, torch.zeros_like(x)) ** 2
    if spec.activation == "silu_alpha":
        return x * _sigmoid(spec.alpha * x)
    if spec.activation in ("silu", "sigmoid"):  # differentiable forms of ref_act
        return x * _sigmoid(x) if spec.activation == "silu" else _sigmoid(x)
    if spec.activation == "gelu":
        return 0.5 * x * _one_plus_erf(x / _SQRT2)
    if spec.activation == "gelu_tanh":
        return 0.5 * x * _one_plus_tanh(_SQRT_2_OVER_PI * (x + _KAPPA * x**3))
    if spec.activation == "relu":
        return torch.where(x > 0, x, torch.zeros_like(x))
    raise ValueError(spec.activation)


def ref_spec_glu(gate, up, spec):
    """h of the spec in float64, differentiable (inputs may require grad)."""
    g, u = gate, up
    if spec.gate_mul is not None:
        g = g * spec.gate_mul
    if spec.gate_max is not None:
        g = torch.where(g > spec.gate_max, torch.full_like(g, spec.gate_max), g)
    if spec.up_limit is not None:
        lim = spec.up_limit
        u = torch.where(u > lim, torch.full_like(u, lim), torch.where(u < -lim, torch.full_like(u, -lim), u))
    a = ref_spec_act(g, spec)
    return (u + 1 if spec.up_plus_one else u) * a


def ref_spec_grads(dh, gate, up, spec):
    """(h, dgate, dup) of the spec for upstream dh, in float64 (autograd over ref_spec_glu)."""
    g = gate.detach().double().requires_grad_()
    u = up.detach().double().requires_grad_()
    h = ref_spec_glu(g, u, spec)
    dg, du = torch.autograd.grad(h, (g, u), dh.detach().double())
    return h.detach(), dg, du
