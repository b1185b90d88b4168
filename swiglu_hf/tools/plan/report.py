"""The output of `swiglu-hf plan`: what was assumed, a table for people, JSON for scripts, a plot."""

from __future__ import annotations

import json
from pathlib import Path

from ...loss import CHUNK_TOKENS
from ...peak import LABELS
from .search import GIB

COLUMNS = (*LABELS.items(), ("cublas_workspace", "cuBLAS"))


def assumptions(result: dict) -> dict:
    s = result["settings"]
    cuda = s["target"] == "cuda"
    return {
        "step": (f"one training step of the transformers model class on the meta device (no storage): forward "
                 + ("`model(input_ids, labels=input_ids).loss`" if s.get("loss", "model") == "model" else
                    f"the decoder, then the chunked causal-LM loss (swiglu_hf.loss, {CHUNK_TOKENS} tokens a chunk)")
                 + f", backward, {s['optimizer']} step, zero_grad(set_to_none); "
                 + ("the optimizer state exists before the measured step (steady state)" if s["steps"] > 1
                    else "the first step (the optimizer creates its state during it)")
                 + (f"; LoRA r=8 on q,k,v,o,gate,up,down (the main job's)" if s["lora"] else "")
                 + ("; gradient checkpointing, non-reentrant (the main job's)" if s["gradient_checkpointing"] else "")),
        "attention": ", ".join(result.get("attention", [])) + ": output and a float32 logsumexp per query are kept "
                     "for backward, no T x T matrix",
        "counted": ("every tensor an op returns, from its creation until it is freed, each storage once; weights, "
                    "buffers and optimizer state from the start" + ("; each storage rounded up to 512 bytes (the CUDA "
                    "caching allocator's block, which max_memory_allocated counts); the optimizer runs foreach (torch's "
                    "CUDA default); cuBLAS workspaces: 2 x 32 MiB (Hopper's default size, one per thread that runs GEMMs)"
                    if cuda else "; exact bytes, as the main job's CPU tracker counts them")),
        "not_counted": ("memory a kernel allocates for itself without returning it: flash attention's backward "
                        "workspace (float32 dQ accumulator, B*T*heads*head_dim*4 bytes, plus expanded dK/dV with GQA), "
                        "cuDNN/NCCL workspaces; the CUDA context (outside the allocator: kept out by --reserve-gb); "
                        "allocator fragmentation (reserved minus allocated); input ids (B*T*8 bytes)"
                        if cuda else "memory CPU kernels allocate internally; input ids"),
        "fits": (f"peak <= memory_gb - reserve_gb = {s['memory_gb']:g} - {s['reserve_gb']:g} GiB "
                 f"= {s['budget_bytes'] / GIB:.2f} GiB"),
    }


def _gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def format_table(result: dict) -> str:
    s = result["settings"]
    head = (f"swiglu-hf plan: {result['model']}, {s['dtype']}, batch {s['batch_size']}, seq {s['seq_len']}"
            + (", LoRA" if s["lora"] else "") + (", gradient checkpointing" if s["gradient_checkpointing"] else "")
            + (", chunked loss" if s.get("loss") == "chunked" else "")
            + f", {s['optimizer']}, {s['memory_gb']:g} GiB ({s['target']})")
    used = [(k, label) for k, label in COLUMNS
            if any(v["breakdown"].get(k) for v in result["variants"].values())]
    cols = ["variant", f"peak GiB @{s['seq_len']}", "fits", "peak is", *[f"{label}" for _, label in used]]
    search = s["search"]
    if search:
        cols += ["max seq len", "peak is (at max)"]
    rows = []
    for name, v in result["variants"].items():
        row = [name, _gib(v["peak_bytes"]), "yes" if v["fits"] else "no", v["peak_is"],
               *[_gib(v["breakdown"].get(k, 0)) for k, _ in used]]
        if search:
            limit = " (cap)" if v.get("max_seq_len_limited_by") == "cap" else ""
            row += [f"{v['max_seq_len']}{limit}", v.get("peak_is_at_max", "-")]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
    out = [head, line(cols), line(["-" * w for w in widths]), *map(line, rows)]
    notes = assumptions(result)
    out += ["", "breakdown at the peak (GiB): act = kept from forward (or recomputed) at the peak, by where it was made"]
    out += [f"{k}: {v}" for k, v in notes.items()]
    return "\n".join(out)


def write_json(result: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "assumptions": assumptions(result)}, indent=2) + "\n")
    return path


def plot(result: dict, path: Path) -> Path | None:
    """Stacked bars: the breakdown at the peak per variant at --seq-len, and at each one's longest fit."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    s = result["settings"]
    bars = []
    for name, v in result["variants"].items():
        bars.append((f"{name}\n@{s['seq_len']}", v["breakdown"]))
        if v.get("breakdown_at_max"):
            bars.append((f"{name}\n@{v['max_seq_len']} (max)", v["breakdown_at_max"]))
    fig, ax = plt.subplots(figsize=(1.3 * len(bars) + 3, 4.5))
    bottom = [0.0] * len(bars)
    for key, label in COLUMNS:
        heights = [b.get(key, 0) / GIB for _, b in bars]
        if any(heights):
            ax.bar(range(len(bars)), heights, bottom=bottom, label=label)
            bottom = [x + h for x, h in zip(bottom, heights)]
    ax.axhline(s["budget_bytes"] / GIB, color="black", linestyle="--", linewidth=1, label="budget")
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("GiB at the peak")
    ax.set_title(f"{result['model']}: peak of one training step ({s['target']})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
