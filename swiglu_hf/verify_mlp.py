"""Each patched MLP against float64, on the inputs the model really gave it.

`Recorder` keeps each call's inputs and the gradient that reached its output during verify's stock
pass. `mlp_checks` then runs one recorded call three ways: a float64 copy of the module (the
reference), the module's stock forward and its fused forward in the model's dtype, and applies the
float64 rule (verify_rule) to the output, every input gradient and every weight gradient.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.utils._pytree import tree_flatten, tree_map

from .forms import use_eager_experts
from .numerics import rel_err
from .patch import PatchState, suspended
from .probe import probe_copy
from .verify_rule import FACTOR, Check


def _floating(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


class Recorder:
    """Forward hooks on the named modules: each call's inputs and the gradient reaching each floating output."""

    def __init__(self, model, names):
        modules = dict(model.named_modules())
        self.calls = {n: [] for n in names}
        self.handles = [modules[n].register_forward_hook(functools.partial(self._hook, n), with_kwargs=True)
                        for n in names]

    def _hook(self, name, module, args, kwargs, output):
        keep = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
        outs = [t for t in tree_flatten(output)[0] if _floating(t)]
        call = {"args": tree_map(keep, args), "kwargs": tree_map(keep, kwargs), "grads": [None] * len(outs)}
        for i, t in enumerate(outs):
            if t.requires_grad:
                t.register_hook(functools.partial(self._grad, call, i))
        self.calls[name].append(call)

    @staticmethod
    def _grad(call, i, g):
        call["grads"][i] = g.detach().clone()

    def remove(self):
        for h in self.handles:
            h.remove()


def _grads_of(forward, call, params, device=None, dtype=None) -> dict:
    """Run `forward` on a recorded call (cast to device/dtype when given) and backpropagate the recorded
    output gradients: {(group, label): tensor or None} for the outputs, input gradients and weight gradients."""
    cast = (lambda t: t.to(device, dtype) if _floating(t) else t) if dtype is not None else (lambda t: t)  # noqa: E731
    leaves, labels = [], []

    def leaf(label, t):
        if not _floating(t):
            return t
        t = cast(t).detach().requires_grad_()
        leaves.append(t)
        labels.append(("grad input", f"grad {label}"))
        return t

    args = [leaf("input" if i == 0 else f"input {i}", a) for i, a in enumerate(call["args"])]
    kwargs = {k: leaf(f"input {k}", v) for k, v in call["kwargs"].items()}
    with torch.enable_grad():
        outs = [t for t in tree_flatten(forward(*args, **kwargs))[0] if _floating(t)]
        pairs = [(o, cast(g) if g is not None else torch.zeros_like(o)) for o, g in zip(outs, call["grads"])
                 if o.requires_grad]
        wrt = leaves + [p for _, p in params]
        grads = (torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                 if pairs else [None] * len(wrt))
    found = {("output", f"output {i}" if len(outs) > 1 else "output"): o.detach() for i, o in enumerate(outs)}
    labels += [("grad weights", f"grad {n}") for n, _ in params]
    return found | dict(zip(labels, grads))


def mlp_checks(name: str, module, state: PatchState, call, floor: float) -> list[Check]:
    """The float64 rule for one recorded call of one patched module (`state`: its PatchState): its
    output(s), input gradients and weight gradients. The float64 copy runs first and is dropped; then
    stock's and the fused forward's tensors are each reduced to their errors and dropped, so one run's
    gradients are alive at a time."""
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    # a hook-free copy of the stock module (taken while its patch is suspended) on the module's own device,
    # then float64 there (a GPU converts in milliseconds); eager experts: grouped_mm has no float64 kernel
    with suspended(module):
        ref_module = use_eager_experts(probe_copy(module, float64=False)).to(torch.float64)
    try:
        ref_params = dict(ref_module.named_parameters())
        ref = _grads_of(getattr(ref_module, state.attr), call, [(n, ref_params[n].requires_grad_()) for n, _ in params],
                        device, torch.float64)
    except Exception as err:  # noqa: BLE001 - the reference itself failed: a failed check that says why
        return [Check(f"{name} float64 copy", 0.0, math.inf, 0.0, f"raised {type(err).__name__}: {err}", "output")]
    finally:  # the copy's bound forwards point back at it: break the cycle, free it now
        for key in ("forward", "_old_forward"):
            ref_module.__dict__.pop(key, None)
        del ref_module
    # the forward the module had before the patch (its own instance forward, or its class's), then the fused one
    stock = state.original if state.original is not None else type(module).forward.__get__(module)
    errs = {}  # (group, label) -> [stock err, patched err]; None: absent on that side
    for forward in (stock, getattr(module, state.attr)):
        run = _grads_of(forward, call, params)
        for key in [*ref, *(k for k in run if k not in ref)]:  # ref's order first: a stable table
            r, t = ref.get(key), run.get(key)
            absent = r is None or t is None or t.shape != r.shape
            errs.setdefault(key, []).append(None if absent else rel_err(t, r))
            if r is None and t is None:
                errs[key][-1] = 0.0  # unused on both sides (an input that reaches no output)
        del run
    checks = []
    for (group, label), pair in errs.items():
        if len(pair) != 2 or None in pair:
            checks.append(Check(f"{name} {label}", 0.0, math.inf, 0.0, "missing or misshapen on one side", group))
        else:
            checks.append(Check(f"{name} {label}", pair[0], pair[1], FACTOR * pair[0] + floor, "", group))
    return checks
