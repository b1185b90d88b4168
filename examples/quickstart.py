"""The shortest complete use of swiglu_hf: patch, check against stock, train a step, revert.

    python examples/quickstart.py
"""

import copy

import torch

from swiglu_hf import apply_swiglu_patch, patched_modules, revert_swiglu_patch, verify
from swiglu_hf.tools.models import build_tiny

model = build_tiny("tiny-llama")  # any Llama-family transformers model; built from a config here
stock = copy.deepcopy(model)

apply_swiglu_patch(model)  # in place: every gated MLP now runs the fused op
print("patched:", patched_modules(model))

ids = torch.randint(3, model.config.vocab_size, (2, 16))
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
print(f"loss {loss.item():.6f} (stock {stock(input_ids=ids, labels=ids).loss.item():.6f})")

print(verify(model).table())  # logits, loss, every gradient and greedy tokens vs a float64 reference

revert_swiglu_patch(model)
assert patched_modules(model) == []
