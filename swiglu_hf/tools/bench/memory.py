"""`swiglu-hf bench memory [MODEL]`: activation bytes saved for backward, per token per MLP layer.

Every row is measured the same way (swiglu_hf.memory.saved_activation_bytes: the saved-tensor
hooks see every tensor autograd keeps; storages counted once; parameters excluded) on one MLP
module and an input x that requires grad, as in training. The count is deterministic, so a few
tokens on CPU give the same bytes/token as a long sequence on a GPU.

Rows: stock eager, this patch (default and tiled), torch.compile of the stock module, and
Liger-Kernel's LigerSiLUMulFunction in the same MLP (needs liger-kernel and a CUDA device; the
row says so when skipped). On CPU torch.compile runs the aot_eager_decomp_partition backend:
inductor's decompositions and min-cut partitioner (which decide what is saved) without C++
code generation; on CUDA it runs inductor.
"""

from __future__ import annotations

import copy
import math

import torch

from ...errors import InvalidInputError, NoGatedMLPError
from ...memory import saved_activation_bytes
from ...patch import apply_swiglu_patch, revert_swiglu_patch
from ...recipes import match_recipe
from ...tiled import auto_tile_tokens
from ..peers import PeerUnavailable, liger_silu_mul

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _first_mlp(model):
    for name, module in model.named_modules():
        found = match_recipe(module)
        if found is not None:
            return name, module, found[0]
    classes = sorted({type(m).__name__ for m in model.modules()})
    raise NoGatedMLPError(
        f"no gated MLP found in {type(model).__name__} (module classes: {', '.join(classes[:20])}"
        f"{', ...' if len(classes) > 20 else ''}); bench memory needs a model with a gated MLP, "
        "or --hidden and --intermediate for an MLP-only measurement"
    )


def _sizes(module, recipe):
    p = recipe.projections
    first = getattr(module, p["gate"] if recipe.form_name == "split" else p["gate_up"])
    hidden, width = first.weight.shape[1], first.weight.shape[0]
    return hidden, width if recipe.form_name == "split" else width // 2


def _mlp_only(hidden: int, intermediate: int, dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    # one attention head: the MLP never reads it, and any --hidden divides by 1
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu",
                         num_attention_heads=1, num_key_value_heads=1)
    with torch.device("cpu"):
        return LlamaMLP(config).to(dtype)


def _liger_mlp(module, recipe):
    """The stock MLP with its act(gate) * up replaced by LigerSiLUMulFunction; or a skip reason."""
    try:
        silu_mul = liger_silu_mul()
    except PeerUnavailable as e:
        cuda = "" if torch.cuda.is_available() else "; it also needs a CUDA device, and this machine has none"
        return None, f"skipped: {e}{cuda}"
    if not torch.cuda.is_available():
        return None, "skipped: Liger-Kernel's Triton kernels need a CUDA device; this machine has none"
    if recipe.form_name != "split":
        return None, "skipped: only the split gate/up form is wired up for Liger here"
    p = recipe.projections

    def forward(x):
        gate, up = getattr(module, p["gate"])(x), getattr(module, p["up"])(x)
        return getattr(module, p["down"])(silu_mul(gate, up))

    return forward, ""


def _formula(elements_per_token: float, hidden: int, intermediate: int) -> str:
    k = (elements_per_token - hidden) / intermediate
    if abs(k - round(k)) < 1e-9:
        k = round(k)
        return "H" if k == 0 else f"H+{k}I" if k != 1 else "H+I"
    return f"H+{k:.3g}I"


def measure(module, recipe, *, tokens: int, tile, backend: str = "auto", compile_backend: str | None = None,
            on_row=None):
    """[(label, bytes per token or None, note)] for one MLP module (left as it was found).

    on_row(row), when given, is called as each row is measured (the CLI prints it at once, so a
    run stopped during the torch.compile row still shows the others). torch._dynamo's caches are
    left alone: a caller that compiles many modules in one process may want torch._dynamo.reset()
    between calls (the bench command resets once before it starts, see _main).
    """
    param = next(module.parameters())
    hidden, intermediate = _sizes(module, recipe)
    x = torch.randn(1, tokens, hidden, dtype=param.dtype, device=param.device, requires_grad=True)

    def per_token(fn):
        return saved_activation_bytes(lambda: fn(x)) / tokens

    rows = []

    def add(row):
        rows.append(row)
        if on_row is not None:
            on_row(row)

    add(("stock eager", per_token(module), ""))
    apply_swiglu_patch(module, backend=backend)
    try:
        add(("swiglu_hf default", per_token(module), "h recomputed in backward"))
    finally:
        revert_swiglu_patch(module)
    n = tile if tile != "auto" else auto_tile_tokens(intermediate, param.element_size())
    apply_swiglu_patch(module, backend=backend, tile_tokens=tile)
    try:
        add((f"swiglu_hf tiled ({n} tok)", per_token(module), "gate/up recomputed per tile"))
    finally:
        revert_swiglu_patch(module)

    liger, why = _liger_mlp(module, recipe)
    add(("Liger SiLUMul", per_token(liger) if liger else None, why))

    be = compile_backend or ("inductor" if param.device.type == "cuda" else "aot_eager_decomp_partition")
    try:
        compiled = torch.compile(copy.copy(module), backend=be)
        compiled(x)  # compile outside the measurement
        row = (f"torch.compile ({be})", per_token(compiled), "")
    except Exception as e:  # report, never hide: the row says why it is missing
        why = (str(e).splitlines() or [""])[0][:80]
        row = (f"torch.compile ({be})", None, f"skipped: {type(e).__name__}: {why}")
    add(row)
    return rows, hidden, intermediate


def _head(budget_gb: float | None) -> list[str]:
    head = f"{'mode':<44}{'bytes/token/layer':>18}{'elements':>10}{'vs stock':>10}"
    if budget_gb is not None:
        head += f"{'max tokens':>14}"
    return [head, "-" * len(head)]


def _line(row, stock, hidden, intermediate, itemsize, *, layers: int, budget_gb: float | None) -> str:
    label, b, note = row
    if b is None:
        pad = 14 if budget_gb is not None else 0
        return f"{label:<44}{'-':>18}{'':>20}{'':>{pad}}  {note}"
    line = f"{label:<44}{b:>18,.0f}{_formula(b / itemsize, hidden, intermediate):>10}{b / stock:>9.2f}x"
    if budget_gb is not None:
        line += f"{math.floor(budget_gb * 2**30 / (b * layers)):>14,}"
    return line + (f"  {note}" if note else "")


def table(rows, hidden, intermediate, itemsize, *, layers: int, budget_gb: float | None) -> str:
    stock = rows[0][1]
    lines = _head(budget_gb)
    lines += [_line(r, stock, hidden, intermediate, itemsize, layers=layers, budget_gb=budget_gb) for r in rows]
    return "\n".join(lines)


def add_parser(bench_sub) -> None:
    p = bench_sub.add_parser("memory", help="activation bytes saved for backward per token per MLP layer")
    p.add_argument("model", nargs="?", default="tiny-llama",
                   help="built-in tiny model (swiglu_hf.tools.models.TINY_MODELS) or local HF directory (default tiny-llama)")
    p.add_argument("--hidden", type=int, help="MLP-only measurement: hidden size (with --intermediate)")
    p.add_argument("--intermediate", type=int, help="MLP-only measurement: intermediate size (with --hidden)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--tokens", type=int, default=64, help="tokens measured (bytes/token does not depend on it)")
    p.add_argument("--tile-tokens", default="auto", help='tile size of the tiled row: an int or "auto"')
    p.add_argument("--budget-gb", type=float, help="also print the longest sequence whose MLP activations fit")
    p.add_argument("--layers", type=int, help="MLP layers for --budget-gb (default: the model's; 1 for MLP-only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=_main)


def _main(args) -> int:
    """The command; a SwigluError (bad sizes, no gated MLP) reaches the CLI: one line, exit status 2."""
    dtype = DTYPES[args.dtype]
    tile = "auto" if args.tile_tokens == "auto" else int(args.tile_tokens)
    if (args.hidden is None) != (args.intermediate is None):
        raise InvalidInputError("--hidden and --intermediate go together")
    if args.hidden is not None:
        from ...recipes import load_recipes

        module = _mlp_only(args.hidden, args.intermediate, dtype).to(args.device)
        recipe = next(r for r in load_recipes() if r.form_name == "split")
        where, layers = "LlamaMLP (MLP only)", args.layers or 1
    else:
        from ..models import load_model

        model = load_model(args.model, dtype=dtype).to(args.device)
        name, module, recipe = _first_mlp(model)
        layers = args.layers or getattr(model.config, "num_hidden_layers", 1)
        where = f"{args.model}: {name} ({type(module).__name__}, {recipe.form_name})"
    module.train()
    hidden, intermediate = _sizes(module, recipe)
    itemsize = torch.finfo(dtype).bits // 8
    print(f"swiglu-hf bench memory: {where}, H={hidden}, I={intermediate}, {args.dtype}, "
          f"{args.tokens} tokens, {args.device}; saved-for-backward bytes per token per MLP layer")
    print("\n".join(_head(args.budget_gb)), flush=True)
    stock = []

    def print_row(row):  # as measured: the torch.compile row comes last and takes longest
        stock.append(row[1])
        print(_line(row, stock[0], hidden, intermediate, itemsize, layers=layers, budget_gb=args.budget_gb), flush=True)

    # This command owns its process: start torch.compile from empty dynamo caches, so the compile
    # row is a fresh compile of this module rather than a cache hit or a recompile-limit fallback.
    torch._dynamo.reset()
    measure(module, recipe, tokens=args.tokens, tile=tile, on_row=print_row)
    if args.budget_gb is not None:
        print(f"max tokens: longest sequence (batch 1) whose MLP activations over {layers} layer(s) fit "
              f"{args.budget_gb:g} GiB; attention, norms, logits and weights are not counted.")
    return 0
