"""`swiglu-hf bench kernel`: bandwidth of the fused h = silu(gate) * up, forward and backward.

Implementations, each timed with triton.testing.do_bench (median, L2 flushed between runs):

    swiglu_hf         swiglu(gate, up, backend="triton")          split gate / up tensors
    swiglu_hf_packed  swiglu(x, backend="triton")                 x = (T, 2I), halves read in place
    eager             F.silu(gate) * up with autograd             what a stock LlamaMLP runs
    liger             LigerSiLUMulFunction.apply(gate, up)        when liger-kernel is importable
    compile           torch.compile(eager)                        Inductor, default settings

Backward is timed as torch.autograd.grad(h, inputs, dh, retain_graph=True), the same call for
every implementation. GB/s counts the same ideal bytes for all of them (GB = 1e9 B):

    forward   reads gate, up; writes h                   3 * T * I * itemsize
    backward  reads dh, gate, up; writes dgate, dup      5 * T * I * itemsize

so eager's extra traffic (it writes and re-reads silu(gate)) shows as lower GB/s, not as more
bytes. Each number is also printed as a percentage of the device's copy bandwidth, measured
once as do_bench(dst.copy_(src)) on a 1 GiB buffer with bytes = read + write.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from ..peers import PeerUnavailable, liger_silu_mul, liger_version
from .args import int_list

NO_CUDA = "no CUDA device: kernel benchmark needs a GPU"
MODELS = {8192: "Llama-3.2-1B", 14336: "Llama-3-8B", 28672: "Llama-3-70B"}
TOKENS = (1024, 4096, 16384, 65536)
QUICK_TOKENS = (4096, 16384)
QUICK_INTERMEDIATE = (8192, 14336)
IMPLS = ("swiglu_hf", "swiglu_hf_packed", "eager", "liger", "compile")
FWD_TENSORS, BWD_TENSORS = 3, 5
COPY_BYTES = 1 << 30
DTYPES = ("bfloat16", "float16", "float32")
DEVICE = "cuda"  # module-level so a CPU smoke test can point it elsewhere


def _impl_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in IMPLS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown implementation(s) {bad}; choose from {', '.join(IMPLS)}")
    return names


def add_parser(sub) -> None:
    p = sub.add_parser(
        "kernel",
        help="GB/s of the fused kernel vs eager, Liger-Kernel and torch.compile (needs a GPU)",
        description=__doc__,
        epilog=(
            "Needs a CUDA device and the compiled Triton kernels. Without CUDA it prints "
            f"'{NO_CUDA}' and exits with status 2 (nothing was measured, which is not a success); "
            "with TRITON_INTERPRET=1 it exits with status 2 as well."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokens", type=int_list, default=None,
                   help=f"token counts T, comma separated, 'k' = 1024 (default {','.join(map(str, TOKENS))})")
    p.add_argument("--intermediate", type=int_list, default=None,
                   help="intermediate sizes I (default 8192,14336,28672: Llama-3.2-1B, Llama-3-8B, Llama-3-70B)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--impls", type=_impl_list, default=IMPLS,
                   help=f"implementations to time, comma separated (default all: {','.join(IMPLS)})")
    p.add_argument("--quick", action="store_true",
                   help=f"smaller subset: T in {QUICK_TOKENS}, I in {QUICK_INTERMEDIATE} (unless given explicitly)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time per measurement, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time per measurement, ms")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON (rewritten after each size)")
    p.add_argument("--md", metavar="PATH", help="write the results as a markdown table (rewritten after each size)")
    p.set_defaults(func=_main)


# ---- implementations ----------------------------------------------------------------------

def _eager(gate, up):
    return F.silu(gate) * up


def _liger():
    """LigerSiLUMulFunction.apply, or None with the reason it is unavailable."""
    try:
        return liger_silu_mul(), ""
    except PeerUnavailable as e:
        return None, str(e)


# ---- measuring ----------------------------------------------------------------------------

def _gbps(n_bytes: int, ms: float) -> float:
    return n_bytes / (ms * 1e-3) / 1e9


def copy_bandwidth(do_bench, warmup: int, rep: int) -> float:
    """Device copy bandwidth in GB/s: dst.copy_(src) on 1 GiB, counting read + write."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=warmup, rep=rep, return_mode="median")
    del src, dst
    torch.cuda.empty_cache()
    return _gbps(2 * COPY_BYTES, ms)


def _inputs(impl, T, I, dtype):
    """Leaf tensors (requiring grad) and the callable producing h from them."""
    from ...functional import swiglu

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_()

    if impl == "swiglu_hf_packed":
        return (randn(T, 2 * I),), lambda x: swiglu(x, backend="triton")
    leaves = (randn(T, I), randn(T, I))
    if impl == "swiglu_hf":
        return leaves, lambda g, u: swiglu(g, u, backend="triton")
    if impl == "eager":
        return leaves, _eager
    raise AssertionError(impl)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def measure(fn, leaves, dh, do_bench, warmup, rep) -> dict:
    """first-call seconds (JIT / compile included), then median forward and backward ms."""
    _sync()
    t0 = time.perf_counter()
    h = fn(*leaves)
    torch.autograd.grad(h, leaves, dh, retain_graph=True)
    _sync()
    first_s = time.perf_counter() - t0
    fwd_ms = do_bench(lambda: fn(*leaves), warmup=warmup, rep=rep, return_mode="median")
    bwd_ms = do_bench(lambda: torch.autograd.grad(h, leaves, dh, retain_graph=True),
                      warmup=warmup, rep=rep, return_mode="median")
    return {"first_call_s": first_s, "fwd_ms": fwd_ms, "bwd_ms": bwd_ms}


def bench_size(T, I, dtype, impls, fns, do_bench, warmup, rep) -> list[dict]:
    """All implementations at one (T, I); failures (OOM, an import error) become a note."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    fwd_bytes, bwd_bytes = FWD_TENSORS * T * I * itemsize, BWD_TENSORS * T * I * itemsize
    rows = []
    for impl in impls:
        row = {"impl": impl, "tokens": T, "intermediate": I, "model": MODELS.get(I, ""),
               "fwd_bytes": fwd_bytes, "bwd_bytes": bwd_bytes, "note": ""}
        rows.append(row)
        if impl in fns and fns[impl][0] is None:
            row["note"] = fns[impl][1]
            continue
        leaves = dh = None
        try:
            if impl in fns:  # liger, compile: split gate / up
                leaves = tuple(torch.randn(T, I, device=DEVICE, dtype=dtype).requires_grad_() for _ in range(2))
                fn = fns[impl][0]
            else:
                leaves, fn = _inputs(impl, T, I, dtype)
            dh = torch.randn(T, I, device=DEVICE, dtype=dtype)
            row.update(measure(fn, leaves, dh, do_bench, warmup, rep))
            row["fwd_gbps"] = _gbps(fwd_bytes, row["fwd_ms"])
            row["bwd_gbps"] = _gbps(bwd_bytes, row["bwd_ms"])
        except torch.cuda.OutOfMemoryError:
            row["note"] = "out of memory"
        except Exception as e:  # keep the other implementations' numbers
            row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        finally:
            del leaves, dh
            torch.cuda.empty_cache()
    eager = next((r for r in rows if r["impl"] == "eager" and "fwd_ms" in r), None)
    for r in rows:
        if eager and "fwd_ms" in r:
            r["fwd_speedup_vs_eager"] = eager["fwd_ms"] / r["fwd_ms"]
            r["bwd_speedup_vs_eager"] = eager["bwd_ms"] / r["bwd_ms"]
    return rows


# ---- reporting ----------------------------------------------------------------------------

def _fmt(r, key, spec):
    """r[key] formatted with `spec` ("9.3f"), or "-" of the same width when it was not measured."""
    return format(r[key], spec) if key in r else format("-", ">" + spec.split(".")[0].rstrip("f"))


def table(result: dict) -> str:
    copy = result["copy_gbps"]
    lines = [
        f"{'I':>6} {'T':>6} {'impl':<17}{'fwd ms':>9}{'GB/s':>7}{'%copy':>6}{'bwd ms':>9}{'GB/s':>7}"
        f"{'%copy':>6}{'1st s':>7}  note"
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['intermediate']:>6} {r['tokens']:>6} {r['impl']:<17}"
            f"{_fmt(r, 'fwd_ms', '9.3f')}{_fmt(r, 'fwd_gbps', '7.0f')}{_pct(r, 'fwd_gbps', copy):>6}"
            f"{_fmt(r, 'bwd_ms', '9.3f')}{_fmt(r, 'bwd_gbps', '7.0f')}{_pct(r, 'bwd_gbps', copy):>6}"
            f"{_fmt(r, 'first_call_s', '7.2f')}  {r['note']}"
        )
    return "\n".join(lines)


def _pct(r, key, copy) -> str:
    return f"{100 * r[key] / copy:.0f}%" if key in r and copy else "-"


def _header(result: dict) -> str:
    return (
        f"{result['date']}, {result['device']}, torch {result['torch']}, triton {result['triton']}, "
        f"liger-kernel {result['liger'] or 'absent'}, {result['dtype']}; "
        f"device copy bandwidth {result['copy_gbps']:.0f} GB/s (1 GiB dst.copy_(src), read + write)"
    )


def markdown(result: dict) -> str:
    copy = result["copy_gbps"]
    out = [
        "## Fused SwiGLU kernel bandwidth",
        "",
        _header(result) + ".",
        "",
        "Ideal bytes for every implementation: forward 3 tensors (gate, up -> h), backward 5 "
        "(dh, gate, up -> dgate, dup); GB = 1e9 B; median of triton.testing.do_bench; "
        "%copy = share of the measured copy bandwidth; x eager = eager time / this time; "
        "1st call = first forward + backward, JIT / compile included.",
        "",
        "| model (I) | tokens | impl | fwd ms | fwd GB/s | fwd %copy | fwd x eager "
        "| bwd ms | bwd GB/s | bwd %copy | bwd x eager | 1st call s | note |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        out.append(
            f"| {r['model']} ({r['intermediate']}) | {r['tokens']} | {r['impl']} "
            f"| {_fmt(r, 'fwd_ms', '.3f')} | {_fmt(r, 'fwd_gbps', '.0f')} | {_pct(r, 'fwd_gbps', copy)} "
            f"| {_fmt(r, 'fwd_speedup_vs_eager', '.2f')} "
            f"| {_fmt(r, 'bwd_ms', '.3f')} | {_fmt(r, 'bwd_gbps', '.0f')} | {_pct(r, 'bwd_gbps', copy)} "
            f"| {_fmt(r, 'bwd_speedup_vs_eager', '.2f')} "
            f"| {_fmt(r, 'first_call_s', '.2f')} | {r['note']} |"
        )
    return "\n".join(out) + "\n"


def _write(result: dict, json_path, md_path) -> None:
    for path, text in ((json_path, lambda: json.dumps(result, indent=2) + "\n"), (md_path, lambda: markdown(result))):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                f.write(text())
            os.replace(tmp, path)  # a run cut short by a timeout leaves the last complete file


# ---- entry point --------------------------------------------------------------------------

def _main(args) -> int:
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1: the kernel benchmark measures compiled kernels; unset it", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench

    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    inters = args.intermediate or (QUICK_INTERMEDIATE if args.quick else tuple(MODELS))
    dtype = getattr(torch, args.dtype)

    fns = {}
    if "liger" in args.impls:
        fns["liger"] = _liger()
    if "compile" in args.impls:
        # Default settings, as a user would write it: static for the first shape, dynamic after.
        fns["compile"] = (torch.compile(_eager), "")

    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "host": platform.node(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "liger": liger_version(),
        "dtype": args.dtype,
        "bytes_model": "forward 3 tensors (gate, up -> h), backward 5 (dh, gate, up -> dgate, dup)",
        "timing": f"triton.testing.do_bench median, warmup {args.warmup} ms, rep {args.rep} ms",
        "copy_gbps": copy_bandwidth(do_bench, args.warmup, args.rep),
        "rows": [],
    }
    print(_header(result), flush=True)
    print(table(result), flush=True)  # the column header
    for I in inters:
        for T in tokens:
            rows = bench_size(T, I, dtype, args.impls, fns, do_bench, args.warmup, args.rep)
            result["rows"].extend(rows)
            print(table({**result, "rows": rows}).split("\n", 1)[1], flush=True)
            _write(result, args.json, args.md)
    _write(result, args.json, args.md)
    return 0
