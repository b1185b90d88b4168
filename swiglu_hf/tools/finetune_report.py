"""Results of `swiglu-hf finetune` as a text table, results.json, results.md and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

MIB = 2**20
HEADERS = ("variant", "tokens/s", "step ms", "peak mem MiB", "saved act MiB", "final loss", "max rel loss diff vs stock")


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / MIB:.1f}"


def _rows(results: dict) -> list[tuple[str, ...]]:
    rows = []
    for name, v in results["variants"].items():
        diff = v["max_rel_loss_diff_vs_stock"]
        rows.append((
            name, f"{v['tokens_per_s']:,.0f}", f"{v['step_time_s'] * 1e3:.1f}", _mib(v["peak_memory_bytes"]),
            _mib(v["saved_activation_bytes"]), f"{v['losses'][-1]:.4f}", "n/a" if diff is None else f"{diff:.2e}",
        ))
    return rows


def _header(results: dict) -> list[str]:
    r = results
    extras = [opt for opt in ("lora", "gradient_checkpointing") if r[opt]]
    return [
        f"model: {r['model']} ({r['tokenizer']} tokens)",
        f"device: {r['device']}; params {r['dtype']}, mixed precision {r['mixed_precision']}"
        + (f"; {', '.join(extras)}" if extras else ""),
        f"steps: {r['steps']} ({r['warmup_steps']} warm-up, excluded from the medians); "
        f"{r['batch_size']} x {r['seq_len']} tokens x {r['grad_accum']} micro-batches x {r['num_processes']} process(es) per step",
        f"peak mem: {r['peak_memory_kind']}",
        "saved act: bytes autograd saves for backward in one micro-batch forward (storages deduplicated, params excluded)",
    ]


def _skipped(results: dict) -> list[str]:
    lines = [f"skipped {name}: {why}" for name, why in results["skipped"].items()]
    if results.get("pending"):  # written part-way: the run may have been stopped before these
        lines.append(f"not run yet: {', '.join(results['pending'])} (results are written after each variant)")
    return lines


def format_table(results: dict) -> str:
    rows = [HEADERS, *_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    return "\n".join([*_header(results), "", *lines, *_skipped(results)])


def markdown(results: dict) -> str:
    table = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    table += ["| " + " | ".join(row) + " |" for row in _rows(results)]
    notes = [f"- {line}" for line in (*_header(results), *_skipped(results))]
    return "\n".join(["# swiglu-hf finetune", "", *notes, "", *table, ""])


def write_plots(results: dict, out: Path) -> list[Path]:
    """loss_curves.png, tokens_per_s.png, memory.png; none (with a message) without matplotlib."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    except ImportError:
        print("matplotlib is not installed: skipping plots (pip install matplotlib)")
        return []
    variants = results["variants"]
    names = list(variants)
    paths = []

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for i, (name, v) in enumerate(variants.items()):  # distinct dashes: equal curves stay visible
        ax.plot(range(1, len(v["losses"]) + 1), v["losses"], label=name, linestyle=("-", "--", ":", "-.")[i % 4])
    ax.set(xlabel="optimizer step", ylabel="training loss", title="loss (same weights, same batches)")
    ax.legend()
    paths.append(out / "loss_curves.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.bar(names, [variants[n]["tokens_per_s"] for n in names])
    ax.set(ylabel="tokens/s (median after warm-up)", title=results["device"])
    paths.append(out / "tokens_per_s.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    width = 0.4
    xs = range(len(names))
    for offset, key, label in ((-width / 2, "peak_memory_bytes", "peak memory"),
                               (width / 2, "saved_activation_bytes", "saved for backward, one micro-batch")):
        ax.bar([x + offset for x in xs], [(variants[n][key] or 0) / MIB for n in names], width, label=label)
    ax.set_xticks(list(xs), names)
    ax.set(ylabel="MiB", title="memory")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=2)  # below the bars
    paths.append(out / "memory.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    return paths


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


def write_outputs(results: dict, out: Path) -> list[Path]:
    """results.json, results.md and the plots in `out` (created if needed); returns the paths."""
    return [*write_results(results, out), *write_plots(results, Path(out))]
