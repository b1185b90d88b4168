"""Print a markdown table of `swiglu_hf.verify` errors for every built-in tiny model.

    TRITON_INTERPRET=1 python scripts/verify_table.py        # the numbers in docs/BENCHMARKS.md
"""

import torch

from swiglu_hf import verify
from swiglu_hf.loading import TINY_MODELS

CASES = [("torch", torch.float32), ("triton", torch.float32), ("torch", torch.bfloat16)]

print("| model | backend | dtype | logits err (stock / patched) | loss err | worst grad err | greedy | result |")
print("|---|---|---|---|---|---|---|---|")
for name in TINY_MODELS:
    for backend, dtype in CASES:
        r = verify(name, backend=backend, dtype=dtype, full_reference=True)  # the whole-model float64 rows
        c = {k: max((x for x in r.checks if x.group == f"whole model {k}"), key=lambda x: x.patched_err - x.limit)
             for k in ("logits", "loss", "grads")}
        cell = lambda k: f"{c[k].stock_err:.2e} / {c[k].patched_err:.2e}"  # noqa: E731
        print(f"| {name} | {backend} | {r.dtype} | {cell('logits')} | {cell('loss')} | {cell('grads')} "
              f"| {r.tokens} | {'PASS' if r.ok else 'FAIL'} |")
