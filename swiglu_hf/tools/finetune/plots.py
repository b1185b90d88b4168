"""PNG plots of `swiglu-hf finetune` results: loss curves, tokens/s per step, memory.

Built with matplotlib's object API (no pyplot: no global backend or figure state). Without
matplotlib the plots are skipped with a message saying what to install.
"""

from __future__ import annotations

from pathlib import Path

from ...peak import LABELS
from .report import MIB, loss_agreement, speed_vs_stock

MARKERS = ("o", "s", "^", "D", "v")
DASHES = ("-", "--", ":", "-.", (0, (3, 1, 1, 1)))


def _loss_plot(results: dict, fig) -> None:
    ax = fig.subplots()
    variants = results["variants"]
    for i, (name, v) in enumerate(variants.items()):
        steps = range(1, len(v["losses"]) + 1)
        # decreasing marker sizes and offset marker positions: equal curves stay distinguishable
        ax.plot(steps, v["losses"], label=name, linestyle=DASHES[i % 5], marker=MARKERS[i % 5],
                markersize=9 - 2 * (i % 4), markevery=(i % 3, 3), fillstyle="none" if i else "full", linewidth=1.2)
    notes = [f"{name}: max |loss − stock| = {loss_agreement(v)}" for name, v in variants.items() if name != "stock"]
    if notes and "stock" in variants:
        ax.text(0.98, 0.97, "\n".join(notes), transform=ax.transAxes, ha="right", va="top", fontsize=9,
                bbox=dict(boxstyle="round", facecolor="white", alpha=0.85))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="optimizer step", ylabel="training loss",
           title="loss: same initial weights, same batches" + (" (LoRA)" if results["lora"] else ""))
    ax.legend(loc="lower left")


def _speed_plot(results: dict, fig) -> bool:
    variants = {n: v for n, v in results["variants"].items() if v.get("tokens_per_s")}
    if not variants:
        return False
    ax = fig.subplots()
    data = [v["timed_tokens_per_s"] for v in variants.values()]
    # whis=(0, 100): whiskers at min and max, so every timed step is inside the drawing
    ax.boxplot(data, tick_labels=list(variants), whis=(0, 100), medianprops=dict(color="black", linewidth=2))
    stock = variants.get("stock")
    noisy = []
    for x, (name, v) in enumerate(variants.items(), 1):
        label = f"{v['tokens_per_s']:,.0f}"
        verdict = speed_vs_stock(v, stock)
        if verdict.endswith("x"):
            label += f"\n{verdict} stock"
        elif verdict:
            label += "\nwithin noise" if verdict.startswith("within") else "\nnot compared"
            noisy.append(name)
        ax.annotate(label, (x, v["tokens_per_s"]), xytext=(42, 0), textcoords="offset points", va="center", fontsize=8)
    runs = results.get("repeats", 1)
    ax.set(ylabel=f"tokens/s per step ({len(results['timed_steps'])} timed steps x {runs} run(s))",
           title=f"speed: {results['device_name']}, engine {results['engine']['name']}")
    if noisy:
        fig.text(0.01, -0.02, f"{', '.join(noisy)}: no ratio to stock, the per-step tokens/s IQRs overlap stock's "
                 "(or too few timed steps)", fontsize=8, va="top")
    return True


def _memory_plot(results: dict, fig) -> None:
    """Per variant: the peak (stacked by its breakdown where the run has one: CPU) and the bytes saved
    for backward, side by side."""
    ax = fig.subplots()
    variants = results["variants"]
    names = list(variants)
    width = 0.38
    xs = [x - width / 2 for x in range(len(names))]
    peaks = [variants[n].get("peak_memory_bytes") for n in names]
    if all(variants[n].get("peak_breakdown") for n in names):
        bottom = [0.0] * len(names)
        for key, label in LABELS.items():
            heights = [variants[n]["peak_breakdown"][key] / MIB for n in names]
            if any(heights):
                ax.bar(xs, heights, width, bottom=bottom, label=f"peak: {label}")
                bottom = [b + h for b, h in zip(bottom, heights)]
        totals = ax.bar(xs, bottom, width, fill=False, linewidth=0)  # invisible: carries the labels
    else:
        totals = ax.bar(xs, [(b or 0) / MIB for b in peaks], width, label="peak memory")
    saved = [variants[n].get("saved_activation_bytes") for n in names]
    bars = ax.bar([x + width / 2 for x in range(len(names))], [(b or 0) / MIB for b in saved], width,
                  label="saved for backward (one micro-batch)", color="0.6")
    for drawn, raw, key in ((totals, peaks, "peak_memory_bytes"), (bars, saved, "saved_activation_bytes")):
        ref = variants.get("stock", {}).get(key)
        labels = ["n/a" if b is None else f"{b / MIB:.1f}" + ("" if n == "stock" or ref is None else
                  f"\n({(b - ref) / MIB:+.1f})") for n, b in zip(names, raw)]
        ax.bar_label(drawn, labels=labels, fontsize=8)
    ax.set_xticks(list(range(len(names))), names)
    cuda = results["device"].startswith("cuda")
    kind = "CUDA max allocated (no breakdown)" if cuda else "live tensor bytes (CPU), by what is live at the peak"
    ax.set(ylabel="MiB", title=f"memory: peak = {kind}; (difference to stock)")
    tops = [b / MIB for b in (*peaks, *saved) if b is not None]
    ax.set_ylim(0, 1.2 * max(tops, default=1.0))  # room for the two-line labels above the tallest bar
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)


def write_plots(results: dict, out: Path) -> list[Path]:
    """loss_curves.png, tokens_per_s.png, memory.png in `out`; none (with a message) without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: skipping plots (pip install matplotlib)")
        return []
    if not results["variants"]:
        return []
    paths = []
    for name, draw in (("loss_curves.png", _loss_plot), ("tokens_per_s.png", _speed_plot), ("memory.png", _memory_plot)):
        fig = Figure(figsize=(7, 4.5))
        if draw(results, fig) is False:
            continue
        paths.append(Path(out) / name)
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    return paths
