"""`verify`: prove a patched model equals the stock one, measured against a float64 reference.

Stock and patched copies of the same weights run the same batch; a float64 copy of the stock
model is the reference. For logits, loss and every parameter gradient we compute each model's
error against the reference (max abs difference, relative to the reference's max magnitude) and
require   patched_err <= FACTOR * stock_err + FLOOR_ULPS * eps(dtype).
The fused kernels round exactly where stock does, so their error is stock's own rounding error;
FACTOR leaves room for a different but equally accurate exp/erf. Greedy generation with the KV
cache must produce the same tokens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .experts import use_eager_experts
from .patch import apply_swiglu_patch, patched_modules, revert_swiglu_patch

FACTOR = 2.0
FLOOR_ULPS = 4.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Check:
    name: str
    stock_err: float
    patched_err: float
    limit: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.patched_err <= self.limit


@dataclass
class VerifyReport:
    model: str
    dtype: str
    backend: str
    patched: list[str]
    checks: list[Check] = field(default_factory=list)
    tokens_equal: bool = True
    tokens: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.patched) and self.tokens_equal and all(c.ok for c in self.checks)

    def table(self) -> str:
        lines = [
            f"swiglu-hf verify: {self.model}, {self.dtype}, backend={self.backend}, "
            f"{len(self.patched)} modules patched",
            f"{'check':<14}{'stock err':>12}{'patched err':>13}{'limit':>12}  result",
        ]
        for c in self.checks:
            lines.append(
                f"{c.name:<14}{c.stock_err:>12.3e}{c.patched_err:>13.3e}{c.limit:>12.3e}  "
                f"{'ok' if c.ok else 'MISMATCH'}{'  ' + c.detail if c.detail else ''}"
            )
        lines.append(f"{'greedy tokens':<14}{self.tokens:>37}  {'ok' if self.tokens_equal else 'MISMATCH'}")
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return ((x.double() - ref).abs().max() / scale).item()


def _run(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().double(), out.loss.detach().double(), grads


def _greedy(model, prompt, new_tokens):
    with torch.no_grad():
        return model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, use_cache=True,
            pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
        )


def verify(
    model: str | torch.nn.Module = "tiny-llama",
    *,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    seed: int = 0,
    batch: int = 2,
    seq_len: int = 16,
    new_tokens: int = 8,
    trust_remote_code: bool = False,
) -> VerifyReport:
    """Compare stock vs patched (logits, loss, all gradients, greedy tokens) on one batch."""
    from .models import load_model

    given = None
    if isinstance(model, torch.nn.Module):
        given = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        # an already patched model is checked as it is, against its reverted (stock) copy
        stock, name = revert_swiglu_patch(copy.deepcopy(given)), type(model).__name__
    else:
        stock = load_model(model, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code).to(device)
        name = f"{model} ({type(stock).__name__})"
    stock.eval()
    reference = use_eager_experts(copy.deepcopy(stock).to(torch.float64))  # grouped_mm has no float64 kernel
    if given is not None and patched_modules(given):
        patched = given
    else:
        patched = apply_swiglu_patch(copy.deepcopy(stock), backend=backend)

    gen = torch.Generator().manual_seed(seed)
    vocab = stock.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq_len), generator=gen).to(device)
    ref_logits, ref_loss, ref_grads = _run(reference, ids)
    results = {label: _run(m, ids) for label, m in (("stock", stock), ("patched", patched))}

    floor = FLOOR_ULPS * torch.finfo(dtype).eps
    report = VerifyReport(name, str(dtype).removeprefix("torch."), backend, patched_modules(patched))

    def check(label, idx, ref):
        s, p = _rel_err(results["stock"][idx], ref), _rel_err(results["patched"][idx], ref)
        report.checks.append(Check(label, s, p, FACTOR * s + floor))

    check("logits", 0, ref_logits)
    check("loss", 1, ref_loss)
    worst = None
    for pname, ref in ref_grads.items():
        s = _rel_err(results["stock"][2][pname], ref)
        p = _rel_err(results["patched"][2][pname], ref)
        c = Check("grads (worst)", s, p, FACTOR * s + floor, pname)
        if worst is None or p - c.limit > worst.patched_err - worst.limit:
            worst = c
    report.checks.append(worst)

    prompt = ids[:, : max(1, seq_len // 2)]
    stock_tokens, patched_tokens = _greedy(stock, prompt, new_tokens), _greedy(patched, prompt, new_tokens)
    new = stock_tokens[:, prompt.shape[1]:]
    report.tokens_equal = torch.equal(stock_tokens, patched_tokens)
    same = (new == patched_tokens[:, prompt.shape[1]:]).sum().item()
    report.tokens = f"{same}/{new.numel()} equal"
    return report


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="compare a patched model with the stock one against a float64 reference")
    p.add_argument("model", nargs="?", default="tiny-llama",
                   help="built-in tiny model name, local HF directory (safetensors) or .gguf file")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code")
    p.set_defaults(func=_main)


def _main(args) -> int:
    report = verify(
        args.model, dtype=DTYPES[args.dtype], backend=args.backend, device=args.device,
        seed=args.seed, seq_len=args.seq_len, trust_remote_code=args.trust_remote_code,
    )
    print(report.table())
    return 0 if report.ok else 1
