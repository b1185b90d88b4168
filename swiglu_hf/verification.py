"""`verify`: prove a patched model equals the stock one, measured against a float64 reference.

Stock and patched copies of the same weights run the same batch; a float64 copy of the stock
model is the reference. For logits, loss and every parameter gradient we compute each model's
error against the reference (max abs difference, relative to the reference's max magnitude) and
require   patched_err <= FACTOR * stock_err + FLOOR_ULPS * eps(dtype).
The fused kernels round exactly where stock does, so their error is stock's own rounding error;
FACTOR leaves room for a different but equally accurate exp/erf. Greedy generation with the KV
cache must produce the same tokens. In bfloat16/float16 the patched logits are also compared with
stock's in ulps: 0 (bitwise) on the PyTorch path, which runs stock's own ops; at most TRITON_ULPS on
the Triton path, whose GPU kernels are written to round as eager does (docs/ARCHITECTURE.md).
`compare_runs` is the one comparison: verify, the sweep and the tests use it.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_map

from .backend import resolve
from .forms import use_eager_experts
from .numerics import rel_err, ulp_diff
from .patch import apply_swiglu_patch, patched_modules, revert_swiglu_patch

FACTOR = 2.0
FLOOR_ULPS = 4.0
TRITON_ULPS = 2


@dataclass
class Check:
    name: str
    stock_err: float
    patched_err: float
    limit: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.patched_err <= self.limit


@dataclass
class VerifyReport:
    model: str
    dtype: str
    backend: str
    patched: list[str]
    checks: list[Check] = field(default_factory=list)
    tokens_equal: bool = True
    tokens: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.patched) and self.tokens_equal and all(c.ok for c in self.checks)

    def table(self) -> str:
        lines = [
            f"swiglu-hf verify: {self.model}, {self.dtype}, backend={self.backend}, "
            f"{len(self.patched)} modules patched",
            f"{'check':<14}{'stock err':>12}{'patched err':>13}{'limit':>12}  result",
        ]
        for c in self.checks:
            lines.append(
                f"{c.name:<14}{c.stock_err:>12.3e}{c.patched_err:>13.3e}{c.limit:>12.3e}  "
                f"{'ok' if c.ok else 'MISMATCH'}{'  ' + c.detail if c.detail else ''}"
            )
        lines.append(f"{'greedy tokens':<14}{self.tokens:>37}  {'ok' if self.tokens_equal else 'MISMATCH'}")
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


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


SENSITIVITY_SEEDS = 3


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


def _greedy(model, prompt, new_tokens):
    with torch.no_grad():
        return model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, use_cache=True,
            pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
        )


def verify(
    model: str | torch.nn.Module = "tiny-llama",
    *,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    seed: int = 0,
    batch: int = 2,
    seq_len: int = 16,
    new_tokens: int = 8,
    trust_remote_code: bool = False,
) -> VerifyReport:
    """Compare stock vs patched (logits, loss, all gradients, greedy tokens) on one batch."""
    from .tools.models import load_model

    given = None
    if isinstance(model, torch.nn.Module):
        given = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        # an already patched model is checked as it is, against its reverted (stock) copy
        stock, name = revert_swiglu_patch(copy.deepcopy(given)), type(model).__name__
    else:
        stock = load_model(model, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code).to(device)
        name = f"{model} ({type(stock).__name__})"
    stock.eval()
    reference = use_eager_experts(copy.deepcopy(stock).to(torch.float64))  # grouped_mm has no float64 kernel
    if given is not None and patched_modules(given):
        patched = given
    else:
        patched = apply_swiglu_patch(copy.deepcopy(stock), backend=backend)

    gen = torch.Generator().manual_seed(seed)
    vocab = stock.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq_len), generator=gen).to(device)
    ref_run = _run(reference, ids)
    stock_run, patched_run = _run(stock, ids), _run(patched, ids)
    report = VerifyReport(name, str(dtype).removeprefix("torch."), backend, patched_modules(patched))
    checks = compare_runs(stock_run, patched_run, ref_run, dtype)
    report.checks += checks[:2]
    worst = max(checks[2:], key=lambda c: c.patched_err - c.limit)
    report.checks.append(Check("grads (worst)", worst.stock_err, worst.patched_err, worst.limit,
                               worst.detail or worst.name.removeprefix("grad ")))
    if dtype in (torch.bfloat16, torch.float16):
        ran = resolve(backend, torch.device(device), dtype)
        bound = 0 if ran == "torch" else TRITON_ULPS
        ulps = ulp_diff(patched_run[0].to(dtype), stock_run[0].to(dtype))
        report.checks.append(Check("logits ulps", 0.0, float(ulps), float(bound), f"vs stock, {ran} backend"))

    prompt = ids[:, : max(1, seq_len // 2)]
    stock_tokens, patched_tokens = _greedy(stock, prompt, new_tokens), _greedy(patched, prompt, new_tokens)
    new = stock_tokens[:, prompt.shape[1]:]
    report.tokens_equal = torch.equal(stock_tokens, patched_tokens)
    same = (new == patched_tokens[:, prompt.shape[1]:]).sum().item()
    report.tokens = f"{same}/{new.numel()} equal"
    return report
