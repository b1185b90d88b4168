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
the recorded MLP inputs, and one MLP in float64 with its gradients. `compare_runs` is the float64
comparison of two whole runs (`_run` results): `full_reference`, the sweep and the tests use it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_flatten, tree_map

from .backend import resolve
from .forms import use_eager_experts
from .memory import LiveTensorBytes, _storages, resident_bytes, training_state
from .numerics import rel_err, ulp_diff
from .patch import REPORT_ATTR, STATE_ATTR, apply_swiglu_patch, is_patched, patched_modules, revert_swiglu_patch
from .probe import probe_copy

FACTOR = 2.0
FLOOR_ULPS = 4.0
TRITON_ULPS = 2
SHOWN_FAILURES = 12  # rows of failed checks the table lists one by one


@dataclass
class Check:
    """The float64 rule on one tensor: patched_err <= limit = FACTOR * stock_err + floor."""

    name: str
    stock_err: float
    patched_err: float
    limit: float
    detail: str = ""
    group: str = ""  # the table's summary row: "output", "grad input", "grad weights" (per-MLP checks)

    @property
    def ok(self) -> bool:
        return self.patched_err <= self.limit


@dataclass
class Diff:
    """Patched against stock, whole model, in the model's dtype: max ulps apart (0 = bitwise) and max
    |patched - stock| / max |stock|. limit is in ulps; math.inf: reported, not judged."""

    name: str
    ulps: float
    rel: float
    limit: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.ulps <= self.limit


@dataclass
class VerifyReport:
    model: str
    dtype: str
    backend: str
    patched: list[str]
    checks: list[Check] = field(default_factory=list)  # the float64 rule: per MLP (and whole model with full_reference)
    diffs: list[Diff] = field(default_factory=list)  # whole model, patched vs stock
    tokens_equal: bool = True
    tokens: str = ""
    peak_bytes: int | None = None
    peak_kind: str = ""

    @property
    def ok(self) -> bool:
        return (bool(self.patched) and self.tokens_equal and all(c.ok for c in self.checks)
                and all(d.ok for d in self.diffs))

    def failures(self) -> list[str]:
        """One line per failed row, naming the module (or parameter) and the tensor."""
        out = [f"{c.name}: error {c.patched_err:.3e} vs float64 > limit {c.limit:.3e} (stock {c.stock_err:.3e})"
               + (f"; {c.detail}" if c.detail else "") for c in self.checks if not c.ok]
        out += [f"{d.name}: {d.ulps:g} ulps from stock > {d.limit:g}" + (f" ({d.detail})" if d.detail else "")
                for d in self.diffs if not d.ok]
        return out + ([] if self.tokens_equal else [f"greedy tokens differ: {self.tokens}"])

    def table(self) -> str:
        lines = [f"swiglu-hf verify: {self.model}, {self.dtype}, backend={self.backend}, "
                 f"{len(self.patched)} modules patched"]
        if self.diffs:
            lines += [f"whole model, patched vs stock in {self.dtype}",
                      f"  {'tensor':<30}{'ulps':>10}{'rel diff':>12}{'limit':>8}  result"]
            for d in self.diffs:
                limit, result = ("-", "reported") if math.isinf(d.limit) else (f"{d.limit:g}", "ok" if d.ok else "MISMATCH")
                lines.append(f"  {d.name:<30}{d.ulps:>10g}{d.rel:>12.3e}{limit:>8}  {result}"
                             + (f"  {d.detail}" if d.detail else ""))
        groups = {c.group or c.name: None for c in self.checks}
        if groups:
            lines += [f"against float64 (limit {FACTOR:g}x stock err + {FLOOR_ULPS:g} eps)",
                      f"  {'tensor':<30}{'stock err':>12}{'patched err':>13}{'limit':>12}  result"]
            for g in groups:
                group = [c for c in self.checks if (c.group or c.name) == g]
                worst = max(group, key=lambda c: c.patched_err - c.limit)
                label = f"{g} (worst of {len(group)})" if len(group) > 1 else g
                where = worst.name if len(group) > 1 or worst.name != label else worst.detail
                lines.append(f"  {label:<30}{worst.stock_err:>12.3e}{worst.patched_err:>13.3e}{worst.limit:>12.3e}  "
                             f"{'ok' if worst.ok else 'MISMATCH'}{'  ' + where if where else ''}")
        lines.append(f"{'greedy tokens':<32}{self.tokens:>22}  {'ok' if self.tokens_equal else 'MISMATCH'}")
        failed = self.failures()
        lines += [f"MISMATCH {line}" for line in failed[:SHOWN_FAILURES]]
        if len(failed) > SHOWN_FAILURES:
            lines.append(f"... and {len(failed) - SHOWN_FAILURES} more")
        if self.peak_bytes is not None:
            lines.append(f"peak memory: {self.peak_bytes / 2**20:,.1f} MiB ({self.peak_kind})")
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def _run(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().double(), out.loss.detach().double(), grads


def compare_runs(stock, patched, reference, dtype: torch.dtype, sensitivity: dict | None = None) -> list[Check]:
    """Check logits, loss and every gradient of two runs (_run results) against a float64 reference run:
    patched error <= FACTOR * max(stock error, sensitivity) + FLOOR_ULPS * eps(dtype), where sensitivity
    (rounding_sensitivity, by check name) is how far stock itself lands when its MLPs round one ulp
    differently. A gradient missing on one side fails."""
    floor = FLOOR_ULPS * torch.finfo(dtype).eps
    sensitivity = sensitivity or {}
    checks = []
    items = [("logits", stock[0], patched[0], reference[0]), ("loss", stock[1], patched[1], reference[1])]
    items += [(f"grad {n}", stock[2].get(n), patched[2].get(n), g) for n, g in reference[2].items()]
    for label, s, p, ref in items:
        if s is None or p is None:
            checks.append(Check(label, 0.0, float("inf"), 0.0, f"missing in the {'patched' if p is None else 'stock'} model"))
            continue
        se, pe = rel_err(s, ref), rel_err(p, ref)
        checks.append(Check(label, se, pe, FACTOR * max(se, sensitivity.get(label, 0.0)) + floor))
    return checks


SENSITIVITY_SEEDS = 3


def _nudge(t, generator):
    """t with every element moved one ulp up or down at random (a different, equally valid rounding)."""
    if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
        return t
    up = torch.rand(t.shape, generator=generator) < 0.5
    inf = torch.tensor(float("inf"), dtype=t.dtype, device=t.device)
    return torch.nextafter(t, torch.where(up.to(t.device), inf, -inf))


def rounding_sensitivity(model, ids, module_names, reference, seeds: int = SENSITIVITY_SEEDS) -> dict[str, float]:
    """How far from float64 the stock model lands when the named modules (the patched MLPs) round each
    output and each input gradient one ulp differently: max over `seeds` runs of rel_err per check.

    Why: the rule compares errors against float64, and the error of a quantity is its rounding noise
    times its conditioning. A gradient that sums many terms into a few numbers (DeepSeek-V4's
    hyper-connection scales: 3 numbers from every token and feature) can cancel to a value far below
    its terms, so the last-bit differences of a correct fused MLP (the interpreter's exp is not
    eager's) come out as 10-100 eps of that value, while stock's own error there can be near 0 by
    luck. A 1-ulp nudge of the MLPs measures that conditioning on the model itself; the fused MLP may
    be as far from float64 as stock is with any equally accurate MLP. Well-conditioned quantities
    keep a sensitivity of a few eps, so the rule stays as tight there as before."""
    modules = [model.get_submodule(n) for n in module_names]
    worst: dict[str, float] = {}
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        nudge = functools.partial(_nudge, generator=generator)
        handles = [h for m in modules for h in (
            m.register_forward_hook(lambda mod, args, out: tree_map(nudge, out)),
            m.register_full_backward_hook(lambda mod, gin, gout: tuple(tree_map(nudge, g) for g in gin)),
        )]
        try:
            run = _run(model, ids)
        finally:
            for h in handles:
                h.remove()
        for c in compare_runs(run, run, reference, torch.float32):
            worst[c.name] = max(worst.get(c.name, 0.0), c.stock_err)
    model.zero_grad(set_to_none=True)
    return worst


def _greedy(model, prompt, new_tokens):
    with torch.no_grad():
        return model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, use_cache=True,
            pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
        )


# ---- the model's state: patched and stock forwards, gradients, train flags ---------------------


def _fused(model) -> tuple[list, object]:
    """What revert_swiglu_patch removes: (module, patch state, fused forward) per patched module, and the report."""
    found = [(m, m.__dict__[STATE_ATTR]) for m in model.modules() if is_patched(m)]
    return [(m, s, m.__dict__[s.attr]) for m, s in found], model.__dict__.get(REPORT_ATTR)


def _rebind(model, fused) -> None:
    """Put back exactly the fused forwards _fused() saw (after revert_swiglu_patch ran the stock ones)."""
    bound, report = fused
    for m, state, forward in bound:
        m.__dict__[STATE_ATTR], m.__dict__[state.attr] = state, forward
    if report is not None:
        model.__dict__[REPORT_ATTR] = report


def _stock_forward(module):
    """The forward a patched module had before the patch (its own instance forward, or its class's)."""
    state = module.__dict__[STATE_ATTR]
    return state.original if state.original is not None else type(module).forward.__get__(module)


# ---- whole model, patched vs stock -----------------------------------------------------------------


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


# ---- each patched MLP against float64 -----------------------------------------------------------


def _floating(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


class _Recorder:
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


def _module_checks(name: str, module, call, floor: float) -> list[Check]:
    """The float64 rule for one recorded call of one patched module: its output(s), input gradients and
    weight gradients. The float64 copy runs first and is dropped; then stock's and the fused forward's
    tensors are each reduced to their errors and dropped, so one run's gradients are alive at a time."""
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    # a hook-free copy on the module's own device, then float64 there (a GPU converts in milliseconds);
    # eager experts: grouped_mm has no float64 kernel
    ref_module = use_eager_experts(probe_copy(module, float64=False)).to(torch.float64)
    try:
        ref_params = dict(ref_module.named_parameters())
        ref = _grads_of(_stock_forward(ref_module), call, [(n, ref_params[n].requires_grad_()) for n, _ in params],
                        device, torch.float64)
    except Exception as err:  # noqa: BLE001 - the reference itself failed: a failed check that says why
        return [Check(f"{name} float64 copy", 0.0, math.inf, 0.0, f"raised {type(err).__name__}: {err}", "output")]
    finally:  # the copy's patch state and bound forwards point back at it: break the cycle, free it now
        for key in (STATE_ATTR, "forward", "_old_forward"):
            ref_module.__dict__.pop(key, None)
        del ref_module
    errs = {}  # (group, label) -> [stock err, patched err]; None: absent on that side
    for forward in (_stock_forward(module), module.__dict__[module.__dict__[STATE_ATTR].attr]):
        run = _grads_of(forward, call, params)
        for key in ref.keys() | run.keys():
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
    mode = LiveTensorBytes()
    # The tracker counts every storage an op returns; a view of a weight (the W.t() of each linear) returns
    # the weight's storage, already counted in `resident`: mark those as seen, holding their Python
    # storage objects so that an op returning a view of them returns the same object.
    held = [st for t in resident for st in _storages(t)]
    mode._refs.update((id(st), weakref.ref(st)) for st in held)
    with mode:
        yield
    del held
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
        fused = _fused(model)
        stock_tokens, patched_tokens = _check(model, report, fused, given_patched, ids, prompt, new_tokens, full_reference)
    new = stock_tokens[:, prompt.shape[1]:]
    report.tokens_equal = torch.equal(stock_tokens, patched_tokens)
    same = (new == patched_tokens[:, prompt.shape[1]:]).sum().item()
    report.tokens = f"{same}/{new.numel()} equal"
    return report


def _check(model, report, fused, given_patched, ids, prompt, new_tokens, full_reference):
    """verify's passes on a patched model (`fused`: its fused forwards), left patched only if it was given so;
    (stock tokens, patched tokens)."""
    params = list(model.parameters())
    dtype, device = params[0].dtype, params[0].device
    saved_grads = {p: p.grad for p in params}
    training = {m: m.training for m in model.modules()}
    names = report.patched = patched_modules(model)
    states = [s for _, s, _ in fused[0]]
    ran = {resolve(s.backend, device, dtype) for s in states}
    report.backend = ",".join(sorted(ran)) or report.backend
    exact = ran == {"torch"} and all(s.tile_tokens is None for s in states)
    try:
        model.eval()
        revert_swiglu_patch(model)
        ref_run = None
        if full_reference:
            reference = use_eager_experts(copy.deepcopy(model).to(torch.float64))
            ref_run = _run(reference, ids)
            del reference
        recorder = _Recorder(model, names)
        try:
            stock_logits, stock_loss = _forward_backward(model, ids)
        finally:
            recorder.remove()
        stock_grads = _take_grads(model)
        stock_tokens = _greedy(model, prompt, new_tokens)

        _rebind(model, fused)
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
                report.checks += _module_checks(n if i == 0 else f"{n} (call {i + 1})", modules[n], call, floor)
    finally:
        revert_swiglu_patch(model)
        if given_patched:
            _rebind(model, fused)
        for m, mode in training.items():
            m.training = mode
        for p, g in saved_grads.items():
            p.grad = g
    return stock_tokens, patched_tokens
