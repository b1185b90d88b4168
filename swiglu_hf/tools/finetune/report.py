"""Results of `swiglu-hf finetune` as text: the header, the table, results.json and results.md."""

from __future__ import annotations

import json
from pathlib import Path

from ...peak import LABELS

MIB = 2**20
HEADERS = ("variant", "backend", "tokens/s median [IQR]", "vs stock", "peak MiB", "vs stock", "saved MiB",
           "eval loss", "final loss", "max abs loss diff vs stock")


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / MIB:.2f}"


def _delta_mib(v: dict, stock: dict | None, key: str) -> str:
    if stock is None or v is stock or v.get(key) is None or stock.get(key) is None:
        return ""
    return f"{(v[key] - stock[key]) / MIB:+.2f}"


def loss_agreement(v: dict) -> str:
    diff = v.get("max_abs_loss_diff_vs_stock")
    if diff is None:
        return "n/a"
    return "0 (bitwise)" if v.get("losses_bitwise_equal_stock") else f"{diff:.3g}"


# Show a speed ratio only where the spread allows it: the interquartile ranges of the per-step
# tokens/s of the variant and of stock (every timed step of every repeat) must not overlap, with at
# least MIN_TIMED_STEPS steps on each side. Disjoint IQRs mean most of one variant's steps are
# faster than most of the other's; the rule needs no resampling (the same results.json always
# reads the same), it is what the boxes of tokens_per_s.png show, and it is stricter than a 95%
# bootstrap interval of the ratio of medians at these sample sizes. On a shared host it says
# "within noise" far more often than it states a ratio, which is the point.
MIN_TIMED_STEPS = 5


def speed_vs_stock(v: dict, stock: dict | None) -> str:
    """"1.52x" when the spread allows a ratio; else "within noise (IQR ...)" or why it is not compared."""
    if stock is None or v is stock or not v.get("tokens_per_s") or not stock.get("tokens_per_s"):
        return ""
    steps = min(len(v.get("timed_tokens_per_s") or []), len(stock.get("timed_tokens_per_s") or []))
    if steps < MIN_TIMED_STEPS:
        return f"not compared ({steps} timed steps, < {MIN_TIMED_STEPS})"
    (lo, hi), (slo, shi) = v["tokens_per_s_iqr"], stock["tokens_per_s_iqr"]
    if lo <= shi and slo <= hi:
        return f"within noise (IQR {lo:,.0f}-{hi:,.0f} overlaps stock's {slo:,.0f}-{shi:,.0f})"
    return f"{v['tokens_per_s'] / stock['tokens_per_s']:.2f}x"


def _tps(v: dict) -> str:
    if v.get("tokens_per_s") is None:
        return "n/a (no timed step)"
    low, high = v["tokens_per_s_iqr"]
    return f"{v['tokens_per_s']:,.0f} [{low:,.0f}-{high:,.0f}]"


def _rows(results: dict) -> list[tuple[str, ...]]:
    stock = results["variants"].get("stock")
    rows = []
    for name, v in results["variants"].items():
        rows.append((
            name, v["backend"], _tps(v), speed_vs_stock(v, stock), _mib(v.get("peak_memory_bytes")),
            _delta_mib(v, stock, "peak_memory_bytes"), _mib(v.get("saved_activation_bytes")),
            "n/a" if v.get("eval_loss") is None else f"{v['eval_loss']:.4f}", f"{v['losses'][-1]:.4f}",
            "(reference)" if v is stock else loss_agreement(v),
        ))
    return rows


def format_header(r: dict) -> str:
    d = r["data"]
    extras = [opt for opt in ("lora", "gradient_checkpointing") if r[opt]]
    if r.get("loss") == "chunked":
        extras.append("chunked loss (swiglu_hf.loss)")
    processes = f"{r['num_processes']} process" + ("es" if r["num_processes"] != 1 else "")
    lines = [
        f"swiglu-hf finetune: {r['task']}",
        f"model:  {r['model']}",
        f"data:   {d['source']}, {d['tokenizer']} tokens: {d['train_windows']} training windows, "
        f"{d['held_out_windows']} held out ({d['eval_windows']} evaluated), {r['seq_len']} tokens each",
        f"device: {r['device']} ({r['device_name']}); engine {r['engine']['name']}, {processes}; "
        f"{r['dtype']} weights, mixed precision {r['mixed_precision']}" + (f"; {', '.join(extras)}" if extras else ""),
        f"steps:  {r['steps']} per variant run: {r['warmup_steps']} warm-up, {len(r['timed_steps'])} timed, the last "
        f"measures memory (not timed); {r['batch_size']} x {r['seq_len']} tokens x {r['grad_accum']} micro-batch(es) "
        f"x {processes} per step; {r.get('repeats', 1)} run(s) of each variant, alternating order",
        f"memory: {r['peak_memory_kind']}",
    ]
    return "\n".join([*lines, *(f"notice: {n}" for n in r.get("notices", []))])


def _notes(results: dict) -> list[str]:
    stock = results["variants"].get("stock")
    lines = ["saved MiB: bytes autograd saves for backward in one micro-batch forward (storages once, parameters excluded)"]
    if stock is not None:
        lines.append(f"vs stock (speed): ratio of median tokens/s, shown only when the per-step tokens/s IQRs of "
                     f"the variant and stock do not overlap ({results.get('repeats', 1)} run(s) of each variant in "
                     f"the order {', '.join(results.get('run_order', results['variants']))}; timed steps pooled)")
        for name, v in results["variants"].items():
            if v is stock or v.get("peak_memory_bytes") is None or stock.get("peak_memory_bytes") is None:
                continue
            peak = (stock["peak_memory_bytes"] - v["peak_memory_bytes"]) / MIB
            saved = (stock["saved_activation_bytes"] - v["saved_activation_bytes"]) / MIB
            line = f"{name}: peak memory {peak:.2f} MiB below stock; saved activations {saved:.2f} MiB below stock"
            if v.get("peak_breakdown") and stock.get("peak_breakdown"):
                mlp = (stock["peak_breakdown"]["activations_mlp"] - v["peak_breakdown"]["activations_mlp"]) / MIB
                line += f"; MLP activations at the peak {mlp:.2f} MiB below stock's (peak is {v['peak_is']})"
            lines.append(line)
    lines += [f"{name}: {v['memory_note']}" for name, v in results["variants"].items() if v.get("memory_note")]
    lines += [f"{name}: --save failed: {v['save_error']}" for name, v in results["variants"].items() if v.get("save_error")]
    lines += [f"skipped {name}: {why}" for name, why in results["skipped"].items()]
    if results.get("pending"):  # written part-way: the run may have been stopped before these
        lines.append(f"not run yet: {', '.join(results['pending'])} (results are written after each variant)")
    return lines


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    rows = [HEADERS, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    return ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]


def breakdown_rows(results: dict) -> list[tuple[str, ...]] | None:
    """The breakdown at each variant's measured peak (MiB): header row first; None when no variant has one."""
    have = {n: v for n, v in results["variants"].items() if v.get("peak_breakdown")}
    if not have:
        return None
    rows = [("variant", "peak MiB", "peak is", "at", *LABELS.values())]
    for name, v in have.items():
        b = v["peak_breakdown"]
        rows.append((name, _mib(v["peak_memory_bytes"]), v["peak_is"], v["peak_phase"], *(_mib(b[k]) for k in LABELS)))
    return rows


def _breakdown_lines(results: dict) -> list[str]:
    rows = breakdown_rows(results)
    if rows is None:
        notes = {v["peak_breakdown_note"] for v in results["variants"].values() if v.get("peak_breakdown_note")}
        return [f"breakdown at the peak: {n}" for n in notes]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["", "breakdown at the measured peak (MiB; categories sum to the peak; act = made in a module's forward "
            "or its recompute, alive at the peak):",
            *["  ".join(c.ljust(w) if i in (0, 2, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in rows]]


def format_table(results: dict) -> str:
    return "\n".join(["", *_table(_rows(results)), *_notes(results), *_breakdown_lines(results)])


def markdown(results: dict) -> str:
    table = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    table += ["| " + " | ".join(row) + " |" for row in _rows(results)]
    v = results["versions"]
    git = results.get("git") or {}
    ran = [
        f"command: `{results['command']}`",
        f"when: {results['created_utc']} (UTC); git {git.get('commit', 'n/a')}" + (" (dirty)" if git.get("dirty") else ""),
        "versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k] is not None),
    ]
    header = format_header(results).splitlines()
    notes = [f"- {line}" for line in (*header[1:], *ran, *_notes(results))]
    rows = breakdown_rows(results)
    if rows is None:
        breakdown = [f"- breakdown at the peak: {line.split(': ', 1)[1]}" for line in _breakdown_lines(results)]
    else:
        breakdown = ["## Breakdown at the measured peak (MiB)", "",
                     "Categories sum to the peak exactly (`peak_breakdown` in results.json); act = made in a module's "
                     "forward or its recompute and alive at the peak; transient = backward's and the optimizer's "
                     "temporaries.", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0]),
                     *["| " + " | ".join(r) + " |" for r in rows[1:]]]
    return "\n".join(["# swiglu-hf finetune", "", header[0].removeprefix("swiglu-hf finetune: "), "", *notes, "",
                      *table, "", *breakdown, ""])


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename it, so a run killed mid-write leaves the old file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_results(results: dict, out: Path) -> list[Path]:
    """results.json and results.md in `out` (created if needed); called after every variant."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    _write_atomic(out / "results.md", markdown(results))
    return [out / "results.json", out / "results.md"]

