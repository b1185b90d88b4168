"""What `verify` returns: the whole-model rows (`Diff`), the float64 rows (`verify_rule.Check`) and the
table `swiglu-hf verify` prints."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .verify_rule import FACTOR, FLOOR_ULPS, Check

SHOWN_FAILURES = 12  # rows of failed checks the table lists one by one


@dataclass
class Diff:
    """Patched against stock, whole model, in the model's dtype: max ulps apart (0 = bitwise) and max
    |patched - stock| / max |stock|. limit is in ulps; math.inf: reported, not judged."""

    name: str
    ulps: float
    rel: float
    limit: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.ulps <= self.limit


@dataclass
class VerifyReport:
    model: str
    dtype: str
    backend: str
    patched: list[str]
    checks: list[Check] = field(default_factory=list)  # the float64 rule: per MLP (and whole model with full_reference)
    diffs: list[Diff] = field(default_factory=list)  # whole model, patched vs stock
    tokens_equal: bool = True
    tokens: str = ""
    peak_bytes: int | None = None
    peak_kind: str = ""

    @property
    def ok(self) -> bool:
        return (bool(self.patched) and self.tokens_equal and all(c.ok for c in self.checks)
                and all(d.ok for d in self.diffs))

    def failures(self) -> list[str]:
        """One line per failed row, naming the module (or parameter) and the tensor."""
        out = [f"{c.name}: error {c.patched_err:.3e} vs float64 > limit {c.limit:.3e} (stock {c.stock_err:.3e})"
               + (f"; {c.detail}" if c.detail else "") for c in self.checks if not c.ok]
        out += [f"{d.name}: {d.ulps:g} ulps from stock > {d.limit:g}" + (f" ({d.detail})" if d.detail else "")
                for d in self.diffs if not d.ok]
        return out + ([] if self.tokens_equal else [f"greedy tokens differ: {self.tokens}"])

    def table(self) -> str:
        lines = [f"swiglu-hf verify: {self.model}, {self.dtype}, backend={self.backend}, "
                 f"{len(self.patched)} modules patched"]
        if self.diffs:
            lines += [f"whole model, patched vs stock in {self.dtype}",
                      f"  {'tensor':<30}{'ulps':>10}{'rel diff':>12}{'limit':>8}  result"]
            for d in self.diffs:
                limit, result = ("-", "reported") if math.isinf(d.limit) else (f"{d.limit:g}", "ok" if d.ok else "MISMATCH")
                lines.append(f"  {d.name:<30}{d.ulps:>10g}{d.rel:>12.3e}{limit:>8}  {result}"
                             + (f"  {d.detail}" if d.detail else ""))
        groups = {c.group or c.name: None for c in self.checks}
        if groups:
            lines += [f"against float64 (limit {FACTOR:g}x stock err + {FLOOR_ULPS:g} eps)",
                      f"  {'tensor':<30}{'stock err':>12}{'patched err':>13}{'limit':>12}  result"]
            for g in groups:
                group = [c for c in self.checks if (c.group or c.name) == g]
                worst = max(group, key=lambda c: c.patched_err - c.limit)
                label = f"{g} (worst of {len(group)})" if len(group) > 1 else g
                where = worst.name if len(group) > 1 or worst.name != label else worst.detail
                lines.append(f"  {label:<30}{worst.stock_err:>12.3e}{worst.patched_err:>13.3e}{worst.limit:>12.3e}  "
                             f"{'ok' if worst.ok else 'MISMATCH'}{'  ' + where if where else ''}")
        lines.append(f"{'greedy tokens':<32}{self.tokens:>22}  {'ok' if self.tokens_equal else 'MISMATCH'}")
        failed = self.failures()
        lines += [f"MISMATCH {line}" for line in failed[:SHOWN_FAILURES]]
        if len(failed) > SHOWN_FAILURES:
            lines.append(f"... and {len(failed) - SHOWN_FAILURES} more")
        if self.peak_bytes is not None:
            lines.append(f"peak memory: {self.peak_bytes / 2**20:,.1f} MiB ({self.peak_kind})")
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)
