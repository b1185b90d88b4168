"""`verify`: prove a patched model equals the stock one, on one copy of the weights.

One model and one batch. The model runs stock, is patched in place, runs patched, and is put back
as it was (a model handed over already patched runs with its own stock forwards first and is left
patched). Two comparisons:

- The whole model in its own dtype, patched against stock: logits, loss, every parameter gradient
  (max ulps and max relative difference) and greedy generation with the KV cache (same tokens).
  The PyTorch path runs stock's own aten ops, so there all of it must be bitwise equal (0 ulps).
  On the Triton path (and in tiled mode) a last-bit difference in one MLP grows through the layers
  by an amount no rule bounds without a float64 model, so these rows are reported, not judged,
  except bf16/fp16 logits on the Triton path: at most TRITON_ULPS (the GPU kernels round as eager
  does, docs/ARCHITECTURE.md). The float64 rule is judged per MLP:
- Each patched MLP against float64. The stock pass records each patched module's real inputs and
  the gradient that reaches its output (hooks). Then, one module at a time, the module runs stock
  and fused in the model's dtype, and a float64 copy of that one module runs the same inputs. For
  the output, every input gradient and every weight gradient (err = rel_err(x, float64)):
      patched_err <= FACTOR * stock_err + FLOOR_ULPS * eps(dtype)
  The fused kernels round exactly where stock does, so their error is stock's own rounding error;
  FACTOR leaves room for a different but equally accurate exp/erf.
- full_reference=True adds the whole-model float64 rule, against a float64 copy of the model (about
  four times the weights of an fp32 model more: for small models).

Memory: the weights, one set of gradients (stock's, in the model dtype; each patched gradient is
compared the moment autograd accumulates it, then both are dropped), the batch's activations and
the recorded MLP inputs, and one MLP in float64 with its gradients.

This module runs the passes and the whole-model comparison; the rest is beside it: verify_rule.py (the
float64 rule: FACTOR, Check, `compare_runs` of two whole runs, `_run`; full_reference, the sweep and
the tests use it, from here), verify_mlp.py (each MLP against float64), verify_report.py (the report
and its table).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math

import torch

from .backend import resolve
from .forms import use_eager_experts
from .memory import LiveTensorBytes, resident_bytes, training_state
from .numerics import rel_err, ulp_diff
from .patch import apply_swiglu_patch, patched_modules, revert_swiglu_patch, suspended
from .verify_mlp import Recorder, mlp_checks
from .verify_report import Diff, VerifyReport
from .verify_rule import FACTOR, FLOOR_ULPS, Check, _run, compare_runs, rounding_sensitivity  # noqa: F401 - public here

TRITON_ULPS = 2


# ---- whole model, patched vs stock -----------------------------------------------------------------


def _greedy(model, prompt, new_tokens):
    with torch.no_grad():
        return model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, use_cache=True,
            pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
        )


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape == b.shape and torch.equal(a, b):
        return 0.0
    try:
        return float(ulp_diff(a, b))
    except (TypeError, RuntimeError):  # float64, shapes that differ
        return math.inf


def _diff(name: str, patched, stock, limit: float, detail: str = "") -> Diff:
    if patched is None or stock is None:
        return Diff(name, math.inf, math.inf, 0.0, f"no gradient in the {'patched' if patched is None else 'stock'} run")
    ulps = _ulps(patched, stock)
    return Diff(name, ulps, rel_err(patched, stock) if ulps else 0.0, limit, detail)


def _forward_backward(model, ids):
    """One training-mode-free pass: (logits, loss), gradients left in .grad."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach()


def _take_grads(model) -> dict:
    """The gradients of the last pass, moved out of the parameters (no copy)."""
    grads = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            grads[n], p.grad = p.grad, None
    return grads


def _patched_pass(model, ids, stock_grads: dict, limit: float, keep: bool):
    """Forward and backward of the patched model; each gradient is compared with stock's as autograd
    accumulates it, then both are dropped (keep=True: the patched ones are kept and returned)."""
    diffs, kept, handles = {}, {}, []

    def compare(name, p):
        s = stock_grads.get(name) if keep else stock_grads.pop(name, None)
        diffs[name] = _diff(f"grad {name}", p.grad, s, limit)
        if keep:
            kept[name] = p.grad
        p.grad = None

    for n, p in model.named_parameters():
        if p.requires_grad:
            handles.append(p.register_post_accumulate_grad_hook(functools.partial(compare, n)))
    try:
        logits, loss = _forward_backward(model, ids)
    finally:
        for h in handles:
            h.remove()
    for n in set(stock_grads) - set(diffs):
        diffs[n] = _diff(f"grad {n}", None, stock_grads[n], limit)
    return logits, loss, list(diffs.values()), kept


# ---- peak memory -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _peak(model, device: torch.device, report: VerifyReport):
    """report.peak_bytes for the block: CUDA's max_memory_allocated (its peak counter is reset first); on
    CPU the bytes of the model's weights, buffers and gradients plus the peak of live tensors the block
    creates (swiglu_hf.memory.LiveTensorBytes)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield
        torch.cuda.synchronize(device)
        report.peak_bytes, report.peak_kind = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
        return
    resident = training_state(model, None)
    mode = LiveTensorBytes()  # a view of a weight shares the op's input storage: never counted
    with mode:
        yield
    report.peak_bytes = resident_bytes(resident) + mode.peak
    report.peak_kind = "live tensor bytes: weights, buffers, gradients at the start plus the peak of tensors verify created"


# ---- verify ---------------------------------------------------------------------------------------


def _prepare(model, dtype, device, seed, trust_remote_code, label):
    """(model to check, its name): the caller's module itself when its dtype and device are the ones asked for."""
    if not isinstance(model, torch.nn.Module):
        from .loading import load_model

        loaded = load_model(model, dtype=dtype or torch.float32, seed=seed, trust_remote_code=trust_remote_code)
        return loaded.to(device), label or f"{model} ({type(loaded).__name__})"
    name = label or type(model).__name__
    first = next(model.parameters(), None)
    want_dtype = dtype or (first.dtype if first is not None else torch.float32)
    same_device = first is None or (first.device.type == device.type and device.index in (None, first.device.index))
    if same_device and (first is None or first.dtype == want_dtype):
        return model, name
    # another dtype or device was asked for: check a converted copy, leave the caller's model as it is
    return copy.deepcopy(model).to(device=device, dtype=want_dtype), name


def verify(
    model: str | torch.nn.Module = "tiny-llama",
    *,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    seed: int = 0,
    batch: int = 2,
    seq_len: int = 16,
    new_tokens: int = 8,
    trust_remote_code: bool = False,
    full_reference: bool = False,
    label: str | None = None,
) -> VerifyReport:
    """Compare stock vs patched on one batch (see the module doc): whole model in its dtype, each MLP vs float64.

    `model`: a module (checked in place and left as it was given, unless `dtype`/`device` differ from
    its own: then on a converted copy) or a name/path for swiglu_hf.loading.load_model (dtype
    default float32). `full_reference=True` adds the whole-model float64 check (a float64 copy of the model).
    """
    device = torch.device(device)
    model, name = _prepare(model, dtype, device, seed, trust_remote_code, label)
    dtype = next(model.parameters()).dtype
    given_patched = bool(patched_modules(model))
    report = VerifyReport(name, str(dtype).removeprefix("torch."), backend, [])
    ids = torch.randint(3, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    ids, prompt = ids.to(device), ids[:, : max(1, seq_len // 2)].to(device)
    with _peak(model, device, report):
        if not given_patched:
            apply_swiglu_patch(model, backend=backend)
        stock_tokens, patched_tokens = _check(model, report, given_patched, ids, prompt, new_tokens, full_reference)
    new = stock_tokens[:, prompt.shape[1]:]
    report.tokens_equal = torch.equal(stock_tokens, patched_tokens)
    same = (new == patched_tokens[:, prompt.shape[1]:]).sum().item()
    report.tokens = f"{same}/{new.numel()} equal"
    return report


def _check(model, report, given_patched, ids, prompt, new_tokens, full_reference):
    """verify's passes on a patched model: stock with the patch suspended, then patched; left patched only
    if it was given so. (stock tokens, patched tokens)."""
    params = list(model.parameters())
    dtype, device = params[0].dtype, params[0].device
    saved_grads = {p: p.grad for p in params}
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with suspended(model) as states:
            names = report.patched = list(states)
            ran = {resolve(s.backend, device, dtype) for s in states.values()}
            report.backend = ",".join(sorted(ran)) or report.backend
            exact = ran == {"torch"} and all(s.tile_tokens is None for s in states.values())
            ref_run = None
            if full_reference:
                reference = use_eager_experts(copy.deepcopy(model).to(torch.float64))
                ref_run = _run(reference, ids)
                del reference
            recorder = Recorder(model, names)
            try:
                stock_logits, stock_loss = _forward_backward(model, ids)
            finally:
                recorder.remove()
            stock_grads = _take_grads(model)
            stock_tokens = _greedy(model, prompt, new_tokens)

        limit = 0.0 if exact else math.inf
        logits, loss, grad_diffs, patched_grads = _patched_pass(model, ids, stock_grads, limit, keep=full_reference)
        ulps_16 = TRITON_ULPS if dtype in (torch.bfloat16, torch.float16) else math.inf
        report.diffs += [_diff("logits", logits, stock_logits, limit if exact else ulps_16),
                         _diff("loss", loss, stock_loss, limit)]
        if grad_diffs:
            worst = max(grad_diffs, key=lambda d: (not d.ok, d.ulps, d.rel))
            report.diffs.append(Diff("grads (worst)", worst.ulps, worst.rel, worst.limit,
                                     worst.detail or worst.name.removeprefix("grad ")))
            report.diffs += [d for d in grad_diffs if not d.ok and d is not worst]
        if ref_run is not None:
            whole = compare_runs((stock_logits, stock_loss, stock_grads), (logits, loss, patched_grads), ref_run, dtype)
            for c in whole:
                c.group = f"whole model {c.name if c.name in ('logits', 'loss') else 'grads'}"
                c.name = f"whole model {c.name}"
            report.checks += whole
        del stock_grads, patched_grads, ref_run
        patched_tokens = _greedy(model, prompt, new_tokens)

        floor = FLOOR_ULPS * torch.finfo(dtype).eps
        modules = dict(model.named_modules())
        for n in names:
            for i, call in enumerate(recorder.calls.pop(n)):
                report.checks += mlp_checks(n if i == 0 else f"{n} (call {i + 1})", modules[n], states[n], call, floor)
    finally:
        if not given_patched:
            revert_swiglu_patch(model)
        for m, mode in training.items():
            m.training = mode
        for p, g in saved_grads.items():
            p.grad = g
    return stock_tokens, patched_tokens
