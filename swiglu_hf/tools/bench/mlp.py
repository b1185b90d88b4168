"""`swiglu-hf bench mlp`: one Llama MLP layer, forward + backward, time and peak memory on a GPU.

Variants, all with the same bf16 weights (a LlamaMLP built from a seed):

    stock     transformers' LlamaMLP, eager
    patched   apply_swiglu_patch (default mode: saves x, gate, up; h recomputed in backward)
    tiled     apply_swiglu_patch(tile_tokens="auto") (saves x only)
    liger     Liger-Kernel's LigerSwiGLUMLP with the same weights, when importable
    compile   torch.compile(stock)

One step is y = mlp(x); y.backward(dy) with x (T, H) requiring grad. Time: median of
triton.testing.do_bench over the step (parameter and input grads reset each run). Peak memory:
torch.cuda.max_memory_allocated during one step minus what was allocated before it (weights,
x, dy), i.e. what the step itself needs: saved activations plus backward temporaries and grads.
"""

from __future__ import annotations

import copy
import sys

import torch

from ..peers import liger_swiglu_mlp
from .args import int_list

VARIANTS = ("stock", "patched", "tiled", "liger", "compile")
NO_CUDA = "no CUDA device: the MLP benchmark needs a GPU"


def add_parser(sub) -> None:
    p = sub.add_parser("mlp", help="GPU: one MLP layer fwd+bwd time and peak memory, stock vs patched vs peers")
    p.add_argument("--hidden", type=int, default=4096, help="default: Llama-3-8B")
    p.add_argument("--intermediate", type=int, default=14336, help="default: Llama-3-8B")
    p.add_argument("--tokens", type=int_list, default=(8192, 32768), help="comma list, e.g. 8k,32k")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time per point, ms")
    p.set_defaults(func=_main)


def _build(name: str, stock):
    from ...patch import apply_swiglu_patch

    if name == "stock":
        return stock
    if name == "patched":
        return apply_swiglu_patch(copy.deepcopy(stock), backend="triton")
    if name == "tiled":
        return apply_swiglu_patch(copy.deepcopy(stock), backend="triton", tile_tokens="auto")
    if name == "compile":
        return torch.compile(copy.deepcopy(stock))
    if name == "liger":
        mlp = liger_swiglu_mlp(stock.config).to(device="cuda", dtype=torch.bfloat16)  # PeerUnavailable -> row note
        mlp.load_state_dict(stock.state_dict())
        return mlp
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


def measure(mlp, x, dy, rep: int) -> dict:
    from triton.testing import do_bench

    params = [p for p in mlp.parameters() if p.requires_grad]

    def step():
        mlp(x).backward(dy)

    step()  # compile / autotune / allocator warm-up outside the measurements
    torch.cuda.synchronize()
    ms = do_bench(step, rep=rep, grad_to_none=[x, *params], return_mode="median")
    for t in (x, *params):
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    for t in (x, *params):
        t.grad = None
    return {"ms": ms, "peak_bytes": peak}


def _main(args) -> int:
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)  # nothing measured: one line on stderr and status 2, as bench kernel
        return 2
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, hidden_act="silu")
    torch.manual_seed(0)
    stock = LlamaMLP(config).to(device="cuda", dtype=torch.bfloat16)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    names.sort(key=lambda n: n != "stock")  # stock first: the other rows are ratios to it
    print(f"MLP fwd+bwd, H={args.hidden}, I={args.intermediate}, bf16, {torch.cuda.get_device_name()}; "
          "median of triton.testing.do_bench; peak = max allocated during one step above the pre-step baseline; "
          "'vs stock' is '-' when stock was not measured")
    print("\n| tokens | variant | ms | vs stock | peak MiB | vs stock | note |\n|---|---|---|---|---|---|---|")
    for T in args.tokens:
        gen = torch.Generator(device="cuda").manual_seed(T)
        x = torch.randn(T, args.hidden, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        dy = torch.randn(T, args.hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
        stock_result = None
        for name in names:
            try:
                r = measure(_build(name, stock), x, dy, args.rep)
            except Exception as exc:  # one variant failing (missing peer, OOM) must not hide the others
                why = (str(exc).splitlines() or [""])[0][:80]
                print(f"| {T} | {name} | - | - | - | - | {type(exc).__name__}: {why} |", flush=True)
                torch.cuda.empty_cache()
                continue
            if name == "stock":
                stock_result = r
            print(f"| {T} | {name} | {r['ms']:.2f} | {_ratio(r, stock_result, 'ms')} | {r['peak_bytes'] / 2**20:,.0f} "
                  f"| {_ratio(r, stock_result, 'peak_bytes')} | |", flush=True)
            torch.cuda.empty_cache()
    return 0


def _ratio(result: dict, stock: dict | None, key: str) -> str:
    """result[key] / stock[key] as "1.23x"; "-" when stock failed or was not asked for."""
    if stock is None or not stock[key]:
        return "-"
    return f"{result[key] / stock[key]:.2f}x"
