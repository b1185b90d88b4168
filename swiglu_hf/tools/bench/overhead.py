"""`swiglu-hf bench overhead`: host (Python / dispatch) time a patched MLP call adds, on CPU.

A tiny Llama-shaped MLP (default H=64, I=172) on CPU with the PyTorch path (backend="torch"), so
the arithmetic is small and what is measured is the per-call cost of the layers the patch puts
around it: the bound forward, the per-call plan and, in grad mode, the one autograd node of the
whole unit (gated.GatedMLP) with its recompute of h in backward. Per token count T (default 1 = decode, and 128):

    mlp  fwd_nograd   y = mlp(x)                     under torch.no_grad()
    mlp  fwd_grad     y = mlp(x)                     grad mode, x and the weights requiring grad
    mlp  fwd_bwd      torch.autograd.grad(mlp(x), (x, *weights), dy)
    op   (same modes) swiglu(gate, up, backend="torch")  vs  F.silu(gate) * up    (T=1 only)

stock = transformers' LlamaMLP, patched = the same instance's weights in a copy patched with
apply_swiglu_patch (backend="torch" on CPU; on CUDA, `--device cuda`, "auto": the Triton kernels, so
the rows measure the launcher's host cost per call).

    decode   tokens/s of `generate` (greedy, KV cache) on the tiny Llama, stock vs patched, whole
             rounds interleaved; the same tokens are required. Decoding is where a GPU waits on the
             host: one token per call through every layer's MLP.
 Timing: `batches` batches of `number` calls per variant,
stock and patched batches interleaved (so a load change on a shared machine hits both), `number`
calibrated so one batch takes about `batch_ms`; per-call time = batch time / number; the median
over batches is reported, in microseconds, as wall-clock time and as this thread's CPU time
(time.thread_time; with one intra-op thread all the work is on it, and on a shared, busy machine
it excludes the time the thread waited for a core). overhead = patched - stock.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from .args import int_list

MODES = ("fwd_nograd", "fwd_grad", "fwd_bwd")
TOKENS = (1, 128)
OP_TOKENS = (1,)
HIDDEN, INTERMEDIATE = 64, 172
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "overhead",
        help="CPU: host overhead per patched MLP call (tiny MLP, PyTorch path), stock vs patched",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokens", type=int_list, default=TOKENS, help="token counts T, comma separated")
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--intermediate", type=int, default=INTERMEDIATE)
    p.add_argument("--batches", type=int, default=21, help="timed batches per variant and point (median over them)")
    p.add_argument("--batch-ms", type=float, default=20.0, help="target duration of one batch, ms")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads while timing")
    p.add_argument("--device", default="cpu", help="cpu (PyTorch path) or cuda (the Triton kernels: launch cost)")
    p.add_argument("--decode-tokens", type=int, default=32,
                   help="new tokens per greedy generate of the tiny Llama, stock vs patched (0: skip)")
    p.add_argument("--autocast", choices=sorted(AUTOCAST), help="time every call under torch.autocast in this "
                   "dtype (fp32 weights and inputs, as accelerate's mixed precision runs them)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.set_defaults(func=_main)


# ---- timing ---------------------------------------------------------------------------------

def _calibrate(fn, batch_ms: float) -> int:
    """Calls per batch so that one batch takes about batch_ms (at least 1)."""
    fn()
    n, elapsed = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= batch_ms * 1e-3 / 4 or n >= 1 << 20:
            break
        n *= 4
    return max(1, round(n * batch_ms * 1e-3 / max(elapsed, 1e-9)))


def time_pair(stock, patched, batches: int = 21, batch_ms: float = 20.0, sync=lambda: None) -> dict:
    """Median per-call seconds of two callables, their batches interleaved (see the module doc).

    {"wall": (stock, patched), "cpu": (stock, patched)}: wall-clock time (perf_counter) and this
    thread's CPU time (thread_time), which a busy shared machine inflates much less.
    """
    number = max(_calibrate(stock, batch_ms), 1)
    number = min(number, max(_calibrate(patched, batch_ms), 1))  # same count for both: the slower decides
    wall: tuple[list[float], list[float]] = ([], [])
    cpu: tuple[list[float], list[float]] = ([], [])
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for b in range(batches):
            for which in ((0, 1) if b % 2 == 0 else (1, 0)):
                fn = (stock, patched)[which]
                c0, t0 = time.thread_time(), time.perf_counter()
                for _ in range(number):
                    fn()
                sync()  # CUDA: the batch's kernels have run before the clock is read
                t1, c1 = time.perf_counter(), time.thread_time()
                wall[which].append((t1 - t0) / number)
                cpu[which].append((c1 - c0) / number)
    finally:
        if was_enabled:
            gc.enable()
    return {"wall": tuple(map(statistics.median, wall)), "cpu": tuple(map(statistics.median, cpu)), "number": number}


# ---- what is timed --------------------------------------------------------------------------

def build_pair(hidden: int = HIDDEN, intermediate: int = INTERMEDIATE, dtype=torch.float32, seed: int = 0,
               device: str = "cpu"):
    """(stock LlamaMLP, patched copy with the same weights): CPU with the PyTorch path, or CUDA with "auto"."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from ...patch import apply_swiglu_patch, patched_modules

    # one attention head: LlamaConfig checks hidden % heads, and the MLP does not use them
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu",
                         num_attention_heads=1, num_key_value_heads=1)
    torch.manual_seed(seed)
    stock = LlamaMLP(config).to(device, dtype)
    holder = apply_swiglu_patch(torch.nn.Sequential(copy.deepcopy(stock)), backend=_backend(device))
    patched = holder[0]
    if not patched_modules(holder):
        raise RuntimeError("the tiny LlamaMLP was not patched")
    return stock, patched


def _calls(module_or_fn, inputs: tuple, params: list, mode: str, amp: torch.dtype | None = None):
    """A zero-argument callable running one call of `mode` (its forward under autocast in `amp`, if given)."""
    amp_on = functools.partial(torch.autocast, inputs[0].device.type, dtype=amp, enabled=amp is not None)
    if mode == "fwd_nograd":
        def call():
            with torch.no_grad(), amp_on():
                module_or_fn(*inputs)
    elif mode == "fwd_grad":
        def call():
            with amp_on():
                module_or_fn(*inputs)
    elif mode == "fwd_bwd":
        wrt = (*inputs, *params)

        def call():
            with amp_on():
                y = module_or_fn(*inputs)
            torch.autograd.grad(y, wrt, torch.ones_like(y))
    else:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return call


def _eager_glu(gate, up):
    return F.silu(gate) * up


def _backend(device: str) -> str:
    return "torch" if device == "cpu" else "auto"


def _sync(device: str):
    return (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)


def run(tokens=TOKENS, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE, modes=MODES, op_tokens=OP_TOKENS,
        batches: int = 21, batch_ms: float = 20.0, threads: int | None = 1, dtype=torch.float32,
        device: str = "cpu", autocast: torch.dtype | None = None) -> list[dict]:
    """One row per (what, tokens, mode): stock_us, patched_us, overhead_us (patched - stock)."""
    from ...functional import swiglu

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    sync = _sync(device)
    try:
        stock, patched = build_pair(hidden, intermediate, dtype, device=device)
        rows = []
        gen = torch.Generator().manual_seed(1)
        for T in tokens:
            x = torch.randn(T, hidden, generator=gen, dtype=dtype).to(device).requires_grad_()
            for mode in modes:
                pair = [_calls(m, (x,), list(m.parameters()), mode, autocast) for m in (stock, patched)]
                rows.append(_row("mlp", T, mode, time_pair(*pair, batches=batches, batch_ms=batch_ms, sync=sync)))
        for T in op_tokens:
            gate, up = (torch.randn(T, intermediate, generator=gen, dtype=dtype).to(device).requires_grad_()
                        for _ in range(2))
            fused = lambda g, u: swiglu(g, u, backend=_backend(device))  # noqa: E731
            for mode in modes:
                pair = [_calls(f, (gate, up), [], mode, autocast) for f in (_eager_glu, fused)]
                rows.append(_row("op", T, mode, time_pair(*pair, batches=batches, batch_ms=batch_ms, sync=sync)))
        return rows
    finally:
        torch.set_num_threads(old_threads)


def decode(new_tokens: int = 32, rounds: int = 7, device: str = "cpu", threads: int | None = 1,
           model: str = "tiny-llama") -> dict:
    """Greedy `generate` tokens/s, stock vs patched, rounds interleaved (ABBA): the median round of each.

    Both generate the same `new_tokens` from the same prompt; the tokens must be equal (else this
    raises: a speed of a wrong answer is no result)."""
    from ...loading import build_tiny
    from ...patch import apply_swiglu_patch

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    sync = _sync(device)
    try:
        stock = build_tiny(model).to(device).eval()
        patched = apply_swiglu_patch(copy.deepcopy(stock), backend=_backend(device))
        prompt = torch.arange(1, 9, device=device).unsqueeze(0)
        kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      do_sample=False, use_cache=True, pad_token_id=0)
        outs, wall, cpu = {}, {"stock": [], "patched": []}, {"stock": [], "patched": []}
        for r in range(rounds + 1):  # round 0 warms up (allocator, Triton cache) and is not counted
            for name in (("stock", "patched") if r % 2 else ("patched", "stock")):
                m = stock if name == "stock" else patched
                c0, t0 = time.thread_time(), time.perf_counter()
                with torch.no_grad():
                    outs[name] = m.generate(prompt, **kwargs)
                sync()
                if r:
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.thread_time() - c0)
        if not torch.equal(outs["stock"], outs["patched"]):
            raise RuntimeError("patched generate produced other tokens than stock: see `swiglu-hf verify`")
        med = {k: statistics.median(v) for k, v in wall.items()}
        return {"model": model, "device": device, "new_tokens": new_tokens, "rounds": rounds,
                "layers": stock.config.num_hidden_layers,
                "stock_tokens_per_s": new_tokens / med["stock"], "patched_tokens_per_s": new_tokens / med["patched"],
                "stock_cpu_us_per_token": statistics.median(cpu["stock"]) / new_tokens * 1e6,
                "patched_cpu_us_per_token": statistics.median(cpu["patched"]) / new_tokens * 1e6}
    finally:
        torch.set_num_threads(old_threads)


def _row(what: str, tokens: int, mode: str, timed: dict) -> dict:
    (stock, patched), (stock_cpu, patched_cpu) = timed["wall"], timed["cpu"]
    return {"what": what, "tokens": tokens, "mode": mode, "calls_per_batch": timed["number"],
            "stock_us": stock * 1e6, "patched_us": patched * 1e6, "overhead_us": (patched - stock) * 1e6,
            "stock_cpu_us": stock_cpu * 1e6, "patched_cpu_us": patched_cpu * 1e6,
            "overhead_cpu_us": (patched_cpu - stock_cpu) * 1e6}


# ---- reporting ------------------------------------------------------------------------------

_WHAT = {"mlp": "LlamaMLP", "op": "op: F.silu(g)*u vs swiglu(g, u)"}


def markdown(rows: list[dict]) -> str:
    out = ["| what | T | mode | stock µs | patched µs | overhead µs | stock CPU µs | patched CPU µs | overhead CPU µs |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {_WHAT.get(r['what'], r['what'])} | {r['tokens']} | {r['mode']} | {r['stock_us']:.1f} "
                   f"| {r['patched_us']:.1f} | {r['overhead_us']:+.1f} | {r['stock_cpu_us']:.1f} "
                   f"| {r['patched_cpu_us']:.1f} | {r['overhead_cpu_us']:+.1f} |")
    return "\n".join(out) + "\n"


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def decode_markdown(d: dict) -> str:
    return ("| decode (generate) | new tokens | stock tokens/s | patched tokens/s | ratio | stock CPU µs/token "
            "| patched CPU µs/token |\n|---|---:|---:|---:|---:|---:|---:|\n"
            f"| {d['model']} ({d['layers']} layers), {d['device']} | {d['new_tokens']} | {d['stock_tokens_per_s']:.0f} "
            f"| {d['patched_tokens_per_s']:.0f} | {d['patched_tokens_per_s'] / d['stock_tokens_per_s']:.2f} "
            f"| {d['stock_cpu_us_per_token']:.0f} | {d['patched_cpu_us_per_token']:.0f} |\n")


def _main(args) -> int:
    rows = run(tokens=args.tokens, hidden=args.hidden, intermediate=args.intermediate,
               batches=args.batches, batch_ms=args.batch_ms, threads=args.threads, device=args.device,
               autocast=AUTOCAST.get(args.autocast))
    dec = decode(args.decode_tokens, device=args.device, threads=args.threads) if args.decode_tokens else None
    header = (f"{datetime.date.today().isoformat()}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}, commit {_git_commit()}; "
              f"H={args.hidden}, I={args.intermediate}, fp32"
              f"{f' under autocast {args.autocast}' if args.autocast else ''}, device {args.device}, "
              f"backend={_backend(args.device)!r}, "
              f"{args.threads} thread(s); median of {args.batches} interleaved batches of ~{args.batch_ms:g} ms")
    print(header)
    print()
    print(markdown(rows), end="")
    if dec is not None:
        print()
        print(decode_markdown(dec), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows, "decode": dec}, f, indent=2)
    return 0
