"""`swiglu-hf verify [MODEL]`: the command-line face of swiglu_hf.verify (a table with verify's peak
memory, exit 1 on mismatch)."""

from __future__ import annotations

import torch

from ..verification import verify

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="compare a patched model with the stock one: whole model, and each MLP against float64")
    p.add_argument("model", nargs="?", default="tiny-llama",
                   help="built-in tiny model name, local HF directory (safetensors) or .gguf file")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--full-reference", action="store_true",
                   help="also compare the whole model with a float64 copy of it (small models: about 5x the fp32 weights more)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code")
    p.set_defaults(func=_main)


def _main(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = verify(
        args.model, dtype=DTYPES[args.dtype], backend=args.backend, device=device, seed=args.seed,
        seq_len=args.seq_len, full_reference=args.full_reference, trust_remote_code=args.trust_remote_code,
    )
    print(report.table())
    return 0 if report.ok else 1
