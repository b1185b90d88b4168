"""Print the engine x order matrix of worker result files.

    python tests/distributed/report.py results.json [more.json ...]

Columns: patched MLPs, losses == stock (bitwise, every rank and step), weights == stock (bitwise, full
gathered weights), max |patched - stock| weight, saved-for-backward bytes of the first MLP forward
(per rank; `tokens` tokens), seconds, and the error with its innermost swiglu_hf frame.
"""

from __future__ import annotations

import json
import sys


def rows(results: dict) -> list[str]:
    cells = results["cells"]
    out = [f"{'engine/order':26} {'patched':>7} {'loss==':>6} {'w==':>5} {'max|dw|':>8} {'saved B':>8} {'tok':>4} "
           f"{'s':>5}  error"]
    stock: dict = {}
    for key, c in cells.items():
        if c["order"] == "stock":
            stock[c["engine"]] = c
        s = stock.get(c["engine"])
        same = None
        if c["order"] not in ("stock", "load") and s and not c["error"] and not s["error"]:
            same = c["losses_hex"] == s["losses_hex"]
        err = ""
        if c["error"]:
            err = c["error"].splitlines()[0][:160]
            if c.get("swiglu_frames"):
                err += f"  [{c['swiglu_frames'][-1]}]"
        out.append(
            f"{key:26} {_s(c.get('patched')):>7} {_s(same):>6} {_s(c.get('weights_equal')):>5} "
            f"{_s(c.get('max_abs_diff')):>8} {_s(c.get('saved_bytes')):>8} {_s(c.get('tokens')):>4} "
            f"{c.get('seconds', 0):>5}  {err}"
        )
    return out


def _s(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2g}"
    return str(v)


def main(paths: list[str]) -> None:
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        meta = results.get("meta", {})
        print(f"# {path}: {meta.get('worker')} {meta.get('engine', '')} swiglu_hf={meta.get('swiglu_hf')} "
              f"torch={meta.get('torch')} transformers={meta.get('transformers')} "
              f"deepspeed={meta.get('deepspeed', '-')} accelerate={meta.get('accelerate', '-')}")
        print("\n".join(rows(results)))


if __name__ == "__main__":
    main(sys.argv[1:])
