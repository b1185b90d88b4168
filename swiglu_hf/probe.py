"""The patch-time probe: before a module class is patched, prove the fused forward computes what the
module's own forward computes, on a copy, so that the module itself is left exactly as it was.

The copy: each plain parameter and buffer is replaced by a float64 CPU copy (when the module is all
plain floating tensors and its float64 copy fits in F64_COPY_BYTES), or by a clone in its own dtype
and device (quantized weights such as bitsandbytes' Params4bit, or a module too large); hooks are not
copied (ZeRO-3, accelerate, user hooks). Under ZeRO-3 the module's parameters are gathered for the
copy and released again. The copy runs in eval mode, under no_grad, with inputs from a private
generator: the original's parameters, buffers, flags, hooks and the global RNG are untouched. A copy
whose own forward fails under no_grad runs in grad mode, as training calls it (see _run_pair); one
whose own forward fails both ways is refused with that said, so the fused forward is never blamed.

The rule: in float64, the fused forward (PyTorch path) must agree with stock to F64_RTOL, far below
any real change of math (a x1.0001 multiplier is 1e-4) and far above float64 rounding; in the
native-dtype fallback, it must be bitwise equal (the PyTorch path runs stock's own aten ops). The
kernels themselves are held to stock by the test suite, not here: the probe checks the math of the
form (halves, activation, extra operations) on this module.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from .errors import SelfCheckError
from .distributed import gathered
from .numerics import rel_err

F64_RTOL = 1e-12
F32_LEVEL = 1e-6  # below this a float64 mismatch is float32 rounding: a cast to float32 inside the unit
F64_COPY_BYTES = 1 << 30
_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def _plain(t) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)


def _tensors(module: nn.Module):
    return [t for m in module.modules() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]


def _fits_float64(module: nn.Module) -> bool:
    tensors = _tensors(module)
    floating = [t for t in tensors if t.is_floating_point()]
    return (
        all(_plain(t) for t in tensors)
        and all(t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.bool) for t in tensors)
        and sum(8 * t.numel() for t in floating) <= F64_COPY_BYTES
    )


def probe_copy(module: nn.Module, float64: bool) -> nn.Module:
    """A hook-free copy of `module` for the probe (see the module doc); parameters must hold data."""
    memo: dict = {}
    for m in module.modules():
        for attr in _HOOK_DICTS:
            if attr in m.__dict__:
                memo[id(m.__dict__[attr])] = collections.OrderedDict()
        if "_hf_hook" in m.__dict__:
            memo[id(m.__dict__["_hf_hook"])] = None
    for t in _tensors(module):
        if id(t) in memo or not _plain(t):
            continue
        data = t.detach()
        data = data.to("cpu", torch.float64) if float64 and t.is_floating_point() else data.clone()
        memo[id(t)] = nn.Parameter(data, requires_grad=False) if isinstance(t, nn.Parameter) else data
    clone = copy.deepcopy(module, memo)
    return clone.eval()


def _stock_forward(clone: nn.Module, state):
    if state.original is not None:
        return clone.__dict__[state.attr]  # deepcopy rebinds the instance's own forward to the copy
    return clone.__class__.forward.__get__(clone)


def _with_grad(args):
    """The probe inputs as training passes them: floating tensors requiring grad."""
    return tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def _run_pair(name: str, cls: str, label: str, stock, fused, args):
    """(stock output, fused output) on one probe input, under no_grad.

    A module whose own forward raises under no_grad gets a second try in grad mode, the way training
    calls it: bitsandbytes' Linear4bit repacks its weights for inference on CPUs with AVX512-BF16 in
    eval mode when the input needs no grad, and asserts on an output width that is not a multiple of
    32, while the same layer trains. Both forwards then run in grad mode (the fused one calls the same
    projections, so it fails where stock fails). A stock forward that raises both ways is reported as
    the module's own failure, not the fused forward's."""
    grad_mode = False
    try:
        want = stock(*args)
    except Exception as first:
        args, grad_mode = _with_grad(args), True
        try:
            with torch.enable_grad():
                want = stock(*args)
        except Exception:
            raise SelfCheckError(
                f"{name} ({cls}): the module's own forward (not the fused one) raised {type(first).__name__}: {first} "
                f"on a probe input of shape {tuple(getattr(args[0], 'shape', ()))}, under no_grad and in grad mode, so "
                "the fused forward cannot be checked against it. It was left unpatched; fix the module or exclude it "
                "with filter_fn=..."
            ) from first
    try:
        with torch.enable_grad() if grad_mode else contextlib.nullcontext():
            got = fused(*args)
    except Exception as err:
        raise SelfCheckError(
            f"{name} ({cls}): the patch-time probe (random inputs through the module's own forward and "
            f"the fused one, through {label!r}) raised {type(err).__name__} in the fused forward: {err}. It was "
            "left unpatched; exclude it with filter_fn=..."
        ) from err
    if grad_mode:
        want, got = (t.detach() if isinstance(t, torch.Tensor) else t for t in (want, got))
    return want, got


def _run(name: str, module: nn.Module, state, float64: bool) -> None:
    cls = type(module).__name__
    form, projections = state.recipe.form, state.recipe.projections
    clone = probe_copy(module, float64)
    probe_state = dataclasses.replace(state, backend="torch", tile_tokens=None, probe_pending=None, plan=None)
    generator = torch.Generator().manual_seed(0)
    inputs = form.probe_inputs(clone, projections, generator)
    if not inputs:
        raise SelfCheckError(f"{name} ({cls}): cannot build a probe input (no in_features/weight to size it)")
    device_type = next(iter(clone.parameters()), torch.empty(0)).device.type
    with torch.no_grad(), torch.autocast(device_type, enabled=False):  # compare in the copy's own dtype
        for label, stock, fused_kwargs in form.probe_pairs(clone, _stock_forward(clone, state)):
            def fused(*args, _kw=fused_kwargs):
                return form.forward(clone, probe_state, *args, **_kw)

            for scale, args in enumerate(inputs):
                want, got = _run_pair(name, cls, label, stock, fused, args)
                if not isinstance(want, torch.Tensor) or want.shape != got.shape:
                    raise SelfCheckError(
                        f"{name} ({cls}) returns {type(want).__name__} of shape {getattr(want, 'shape', None)}, "
                        f"not a tensor like the fused forward's {tuple(got.shape)}; it is not a plain "
                        f"{state.recipe.name} gated MLP. Exclude it with filter_fn=..."
                    )
                err, limit = rel_err(got, want), (F64_RTOL if float64 else 0.0)
                if err > limit:
                    where = "in float64" if float64 else f"in {want.dtype} (bitwise required)"
                    # a float64 run that agrees to float32 rounding only: the module casts inside the unit
                    why = ("It agrees only to about float32 rounding: the module likely computes part of the unit in "
                           "float32 (e.g. act(gate.float()) * up.float()), which the fused gate does not" if float64 and err < F32_LEVEL
                           else "The module does extra math or orders its halves differently")
                    raise SelfCheckError(
                        f"{name} ({cls}): fused forward ({state.recipe.name}, {state.activation}, through {label!r}) "
                        f"differs from the module's own forward {where} on probe input #{scale + 1} of {len(inputs)} "
                        f"(inputs grow in scale to reach clamps; relative error {err:.3g} > {limit:g}). {why}; it "
                        "was left unpatched. Exclude it with filter_fn=... if this is expected."
                    )


def run_probe(name: str, module: nn.Module, state) -> bool:
    """Probe `module`; raise SelfCheckError on disagreement. False when its weights are not there yet
    (meta device, fake tensors): the caller probes at the first real forward."""
    with gathered(module):
        if any(p.is_meta or is_fake(p) for p in module.parameters()):  # no data yet: probe at the first real forward
            return False
        float64 = _fits_float64(module)
        try:
            _run(name, module, state, float64)
        except SelfCheckError as err:
            # a stock forward with no float64 kernel (grouped_mm): the native-dtype rule decides
            if not (float64 and isinstance(err.__cause__, (RuntimeError, NotImplementedError, TypeError))):
                raise
            _run(name, module, state, False)
    return True
