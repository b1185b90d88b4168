"""OUTDIR/summary.md for scripts/gpu_check.sh: every step's status and the key numbers.

    python scripts/gpu_summary.py OUTDIR STEPS_TSV BUDGET_S ELAPSED_S

STEPS_TSV has one line per step: name, exit status (or "skip"), seconds, limit, note, log path.
Standard library only, and every section optional: a step that failed or never ran leaves its
file out, and the summary says what there is.
"""

from __future__ import annotations

import json
import os
import re
import sys

PYTEST_FINAL = re.compile(r"^=+ .*\b(passed|failed|skipped|error|errors|no tests ran)\b.* =+$")


def _read(path: str) -> list[str]:
    with open(path, errors="replace") as f:
        return f.read().splitlines()


def steps_table(steps: list[list[str]], budget: str, elapsed: str) -> list[str]:
    lines = [f"Total {elapsed} s of a {budget} s budget.", "",
             "| step | exit | seconds | limit s | note |", "|---|---:|---:|---:|---|"]
    lines += [f"| {name} | {rc} | {secs} | {limit} | {note} |" for name, rc, secs, limit, note, _ in steps]
    return lines


def gpu_tests(path: str) -> list[str]:
    text = _read(path)
    final = [line for line in text if PYTEST_FINAL.match(line)]
    failed = [line for line in text if line.startswith(("FAILED ", "ERROR "))]
    lines = ["", "## GPU tests", "", f"`{final[-1].strip('= ')}`" if final else "no pytest summary line"]
    return lines + [f"- {line}" for line in failed[:40]]


def kernel(path: str) -> list[str]:
    with open(path) as f:
        k = json.load(f)
    copy = k.get("copy_gbps") or 0
    rows = k.get("rows", [])
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    sizes = list(dict.fromkeys((r["intermediate"], r["tokens"]) for r in rows))
    by_key = {(r["intermediate"], r["tokens"], r["impl"]): r for r in rows}
    lines = ["", "## Kernel bandwidth (GB/s, % of copy)", "",
             f"{k.get('device')}, {k.get('dtype')}, torch {k.get('torch')}, triton {k.get('triton')}, "
             f"liger-kernel {k.get('liger') or 'absent'}; device copy {copy:.0f} GB/s.", ""]
    for d, title in (("fwd", "Forward"), ("bwd", "Backward")):
        lines += [f"{title}:", "", "| I | T | " + " | ".join(impls) + " |", "|---:|---:|" + "---:|" * len(impls)]
        for inter, tokens in sizes:
            cells = []
            for impl in impls:
                g = by_key.get((inter, tokens, impl), {}).get(f"{d}_gbps")
                cells.append(f"{g:.0f} ({100 * g / copy:.0f}%)" if g and copy else "-")
            lines.append(f"| {inter} | {tokens} | " + " | ".join(cells) + " |")
        lines.append("")
    notes = sorted({f"{r['impl']}: {r['note']}" for r in rows if r.get("note")})
    return lines + [f"- {n}" for n in notes[:10]]


def main(out: str, steps_path: str, budget: str, elapsed: str) -> None:
    steps = [line.split("\t") for line in _read(steps_path) if line.strip()]
    lines = ["# GPU check summary", "", *steps_table(steps, budget, elapsed)]

    if os.path.exists(os.path.join(out, "gpu_tests.log")):
        lines += gpu_tests(os.path.join(out, "gpu_tests.log"))
    if os.path.exists(os.path.join(out, "kernel.json")):
        try:
            lines += kernel(os.path.join(out, "kernel.json"))
        except (ValueError, KeyError, TypeError) as e:  # a half-written file: say so, keep the rest
            lines += ["", "## Kernel bandwidth", "", f"kernel.json unreadable: {type(e).__name__}: {e}"]
    for name, path in (("Memory", "memory.md"), ("Fine-tuning", os.path.join("finetune", "results.md"))):
        if os.path.exists(os.path.join(out, path)):
            lines += ["", f"## {name} ({path}, first lines)", "", *_read(os.path.join(out, path))[:80]]

    for name, rc, _, _, _, log in steps:
        if rc not in ("0", "skip") and log and os.path.exists(log):
            lines += ["", f"## {name}: last lines of its log", "", "```", *_read(log)[-30:], "```"]

    files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    if "summary.md" not in files:
        files.append("summary.md")
    lines += ["", "## Files", "", *[f"- {f}" for f in files]]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__.split("\n\n")[1])
    main(*sys.argv[1:])
