"""The float64 rule: a patched result is as accurate as stock's when

    patched_err <= FACTOR * stock_err + FLOOR_ULPS * eps(dtype)      err = rel_err(x, float64 reference)

`Check` is the rule on one tensor; `compare_runs` applies it to two whole runs (`_run` results) against
a float64 run, and `rounding_sensitivity` measures how far stock itself moves when its MLPs round one
ulp differently. verify (per MLP, and with full_reference on the whole model), the sweep and the tests
judge with it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_map

from .numerics import rel_err

FACTOR = 2.0
FLOOR_ULPS = 4.0
SENSITIVITY_SEEDS = 3


@dataclass
class Check:
    """The float64 rule on one tensor: patched_err <= limit = FACTOR * stock_err + floor."""

    name: str
    stock_err: float
    patched_err: float
    limit: float
    detail: str = ""
    group: str = ""  # the table's summary row: "output", "grad input", "grad weights" (per-MLP checks)

    @property
    def ok(self) -> bool:
        return self.patched_err <= self.limit


def _run(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().double(), out.loss.detach().double(), grads


def compare_runs(stock, patched, reference, dtype: torch.dtype, sensitivity: dict | None = None) -> list[Check]:
    """Check logits, loss and every gradient of two runs (_run results) against a float64 reference run:
    patched error <= FACTOR * max(stock error, sensitivity) + FLOOR_ULPS * eps(dtype), where sensitivity
    (rounding_sensitivity, by check name) is how far stock itself lands when its MLPs round one ulp
    differently. A gradient missing on one side fails."""
    floor = FLOOR_ULPS * torch.finfo(dtype).eps
    sensitivity = sensitivity or {}
    checks = []
    items = [("logits", stock[0], patched[0], reference[0]), ("loss", stock[1], patched[1], reference[1])]
    items += [(f"grad {n}", stock[2].get(n), patched[2].get(n), g) for n, g in reference[2].items()]
    for label, s, p, ref in items:
        if s is None or p is None:
            checks.append(Check(label, 0.0, float("inf"), 0.0, f"missing in the {'patched' if p is None else 'stock'} model"))
            continue
        se, pe = rel_err(s, ref), rel_err(p, ref)
        checks.append(Check(label, se, pe, FACTOR * max(se, sensitivity.get(label, 0.0)) + floor))
    return checks


def _nudge(t, generator):
    """t with every element moved one ulp up or down at random (a different, equally valid rounding)."""
    if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
        return t
    up = torch.rand(t.shape, generator=generator) < 0.5
    inf = torch.tensor(float("inf"), dtype=t.dtype, device=t.device)
    return torch.nextafter(t, torch.where(up.to(t.device), inf, -inf))


def rounding_sensitivity(model, ids, module_names, reference, seeds: int = SENSITIVITY_SEEDS) -> dict[str, float]:
    """How far from float64 the stock model lands when the named modules (the patched MLPs) round each
    output and each input gradient one ulp differently: max over `seeds` runs of rel_err per check.

    Why: the rule compares errors against float64, and the error of a quantity is its rounding noise
    times its conditioning. A gradient that sums many terms into a few numbers (DeepSeek-V4's
    hyper-connection scales: 3 numbers from every token and feature) can cancel to a value far below
    its terms, so the last-bit differences of a correct fused MLP (the interpreter's exp is not
    eager's) come out as 10-100 eps of that value, while stock's own error there can be near 0 by
    luck. A 1-ulp nudge of the MLPs measures that conditioning on the model itself; the fused MLP may
    be as far from float64 as stock is with any equally accurate MLP. Well-conditioned quantities
    keep a sensitivity of a few eps, so the rule stays as tight there as before."""
    modules = [model.get_submodule(n) for n in module_names]
    worst: dict[str, float] = {}
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        nudge = functools.partial(_nudge, generator=generator)
        handles = [h for m in modules for h in (
            m.register_forward_hook(lambda mod, args, out: tree_map(nudge, out)),
            m.register_full_backward_hook(lambda mod, gin, gout: tuple(tree_map(nudge, g) for g in gin)),
        )]
        try:
            run = _run(model, ids)
        finally:
            for h in handles:
                h.remove()
        for c in compare_runs(run, run, reference, torch.float32):
            worst[c.name] = max(worst.get(c.name, 0.0), c.stock_err)
    model.zero_grad(set_to_none=True)
    return worst
