"""The patch engine: find gated MLPs, prove the fused forward on each class, bind it per instance.

Contract (docs/ARCHITECTURE.md "Patch contract"): only `forward` of matched instances changes;
projection modules, state_dict and hooks stay as they are; nothing global changes; every failure
happens before the first module is touched; `revert_swiglu_patch` puts back exactly the forwards
that were there. The engine knows forms only through their interface (swiglu_hf.forms.base).
"""

from __future__ import annotations

import contextlib
import copy
import types
import warnings
from dataclasses import dataclass, field, fields
from typing import Callable, Iterator

import torch
from torch import nn

from .backend import ensure_triton
from .distributed import SHARDED_HINT, fsdp_units, sharded_params, under_fsdp
from .errors import (
    InvalidInputError, NoGatedMLPError, NotPicklableError, PatchRefusedWarning, SelfCheckError, SwigluError,
    UnsupportedActivationError, UnsupportedModuleError,
)
from .options import PatchOptions, patch_everything
from .probe import run_probe
from .recipes import Recipe, load_recipes, match_recipe

STATE_ATTR = "_swiglu_hf"
REPORT_ATTR = "_swiglu_hf_report"  # on the model apply_swiglu_patch was called with

@dataclass
class PatchState:
    recipe: Recipe
    activation: str
    backend: str
    attr: str  # "forward", or accelerate's "_old_forward" when a hook wraps the forward
    original: Callable | None  # the instance attribute we replaced; None = the class's forward
    tile_tokens: int | str | None = None  # None: default mode (saves H+2I); int or "auto": tiled (saves H)
    # (form.tiles False: always the default mode)
    probe_pending: str | None = None  # patched on meta weights or FSDP shards: the name whose probe runs at first forward
    plan: object = field(default=None, repr=False, compare=False)  # the form's per-call plan (built at first call)

    # A bound method of the fused forward cannot be unpickled (pickle stores it as
    # getattr(module, "_fused_forward")): torch.save(model) would write a file torch.load cannot
    # read. Refuse at save time instead; copy/deepcopy keep working.
    def __reduce_ex__(self, protocol):
        raise NotPicklableError(
            "a model patched by swiglu_hf cannot be pickled whole (torch.save(model)): save "
            "model.state_dict() or model.save_pretrained(dir) (the weights are the stock ones) and call "
            "apply_swiglu_patch after loading, or revert_swiglu_patch(model) before torch.save"
        )

    # A copy gets no plan: the plan holds the original module's children (the copy builds its own).
    def __copy__(self):
        return type(self)(**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "plan"})

    def __deepcopy__(self, memo):
        return type(self)(**{f.name: copy.deepcopy(getattr(self, f.name), memo) for f in fields(self) if f.name != "plan"})


@dataclass
class PatchReport:
    """What the last apply_swiglu_patch on a model did: patched units (name -> recipe form) and
    refused ones (name -> reason). strict=True never leaves a report with refusals (it raises)."""

    patched: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{len(self.patched)} gated module(s) patched, {len(self.refused)} refused"]
        lines += [f"  refused {name}: {reason}" for name, reason in self.refused.items()]
        return "\n".join(lines)


def _fused_forward(self, *args, **kwargs):
    state = self.__dict__[STATE_ATTR]
    one_input = len(args) == 1 and not kwargs
    if one_input and state.plan is not None and state.probe_pending is None:  # the per-call plan (forms/dense.py)
        y = state.plan.run(self, args[0])
        if y is not None:
            return y
    if state.probe_pending is not None:
        _deferred_probe(self, state)
    form = state.recipe.form
    if one_input and (state.plan is None or state.plan.stale(self)):  # first call, or children replaced
        state.plan = form.make_plan(self, state)
        y = None if state.plan is None else state.plan.run(self, args[0])
        if y is not None:
            return y
    return form.forward(self, state, *args, **kwargs)


def is_patched(module: nn.Module) -> bool:
    return STATE_ATTR in module.__dict__


def patched_modules(model: nn.Module) -> list[str]:
    """Qualified names of the modules whose forward is currently the fused one."""
    return [name for name, module in model.named_modules() if is_patched(module)]


def patch_report(model: nn.Module) -> PatchReport | None:
    """The PatchReport of the last apply_swiglu_patch(model, ...), or None if there was none."""
    return model.__dict__.get(REPORT_ATTR)


def _forward_attr(module: nn.Module) -> str:
    # accelerate's add_hook_to_module keeps the real forward in `_old_forward` and installs a
    # wrapper as `forward`; replacing `_old_forward` keeps its device/offload hooks in the loop.
    if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__:
        return "_old_forward"
    return "forward"


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _restore_forward(module: nn.Module, state: PatchState) -> None:
    """Put back the forward attribute apply_swiglu_patch replaced (or drop ours: the class's is back)."""
    if state.original is None:
        del module.__dict__[state.attr]
    else:
        module.__dict__[state.attr] = state.original


def _deferred_probe(module: nn.Module, state: PatchState) -> None:
    """The probe of a module patched while its weights were on the meta device or FSDP shards, at its
    first real forward (where FSDP has gathered them).

    The fused forward never runs unchecked: if the probe fails, the module gets its stock forward back
    (as if never patched) and this forward raises SelfCheckError; later forwards run stock.
    """
    # The probe copies the module and compares with the forward the copy holds: put the one we replaced
    # back for it (an instance forward or accelerate's _old_forward), else it would probe the fused one.
    fused = module.__dict__[state.attr]
    _restore_forward(module, state)
    try:
        done = run_probe(state.probe_pending, module, state)
    except SelfCheckError as err:
        del module.__dict__[STATE_ATTR]  # stays on its stock forward
        text = str(err).replace("it was left unpatched", "swiglu_hf put its stock forward back (later forwards run stock)")
        raise SelfCheckError(text + (SHARDED_HINT if sharded_params(module) else "")) from err.__cause__
    module.__dict__[state.attr] = fused
    if done:
        state.probe_pending = None


def _mlp_like_classes(model: nn.Module) -> list[str]:
    keys = ("mlp", "feedforward", "ffn", "expert")
    return sorted({type(m).__name__ for m in model.modules() if any(k in type(m).__name__.lower() for k in keys)})


def _candidate(name: str, module: nn.Module, recipe: Recipe, act) -> str:
    """The gate-spec key of a matched module, or a typed error saying why it cannot be patched."""
    cls = type(module).__name__
    reason = recipe.form.refusal(module, recipe.projections, act)
    if reason is not None:
        raise UnsupportedModuleError(f"{name} ({cls}) has the {recipe.name} structure but {reason}")
    spec = recipe.form.gate(module, recipe.projections, act)
    if isinstance(spec, str):
        raise UnsupportedActivationError(f"{name} ({cls}): {spec}")
    return spec.key()  # every spec the forms read has Triton kernels (ops.kernel_gate)


_STRICT_HINT = (
    ". Nothing was patched; exclude it with filter_fn=..., or pass strict=False to patch the rest "
    "and get a report (swiglu_hf.patch_report(model))."
)


def apply_swiglu_patch(
    model: nn.Module,
    *,
    backend: str = "auto",
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    tile_tokens: int | str | None = None,
    strict: bool = True,
) -> nn.Module:
    """Replace the gated-MLP forward of every matching module of `model` with the fused one.

    In place; returns `model`. `backend`: "auto" (Triton on CUDA, PyTorch elsewhere), "triton"
    or "torch". `filter_fn(name, module) -> bool` restricts which matched modules are patched.
    Raises before touching the model if nothing matches or the backend cannot run.

    strict=True (default): a module with a gated structure that cannot be patched (unsupported
    activation or layout, or the patch-time probe shows the fused forward disagreeing) raises and
    the model is left untouched. strict=False: those modules are left as they are, the rest is
    patched, and a PatchRefusedWarning lists each refused module with its reason; the same is in
    `swiglu_hf.patch_report(model).refused`.

    Memory (per token, saved for backward; swiglu_hf.gated): by default x, gate and up (H + 2I; h is
    recomputed in backward). `tile_tokens=N` (or "auto") runs the MLP N tokens at a time and saves
    only x (H; gate and up are recomputed per tile in backward). MoE experts modules always run the
    default mode.

    filter_fn takes (name, module), the order `model.named_modules()` yields them, not torchao's
    (module, fqn): swapping the order of an existing filter could not be detected, and a wrong
    guess would silently patch the wrong modules.
    """
    opts = PatchOptions(backend=backend, filter_fn=filter_fn, tile_tokens=tile_tokens, strict=strict)
    backend, tile_tokens = opts.backend, opts.tile_tokens
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"apply_swiglu_patch expects a torch.nn.Module, got {type(model).__name__}")
    if backend == "triton":
        ensure_triton(_model_device(model))
    keep = filter_fn or patch_everything

    plans, already, refused, filtered = [], [], {}, []
    for name, module in model.named_modules():
        if is_patched(module):
            state = module.__dict__[STATE_ATTR]
            if state.backend != backend or state.tile_tokens != tile_tokens:
                raise InvalidInputError(
                    f"{name} is already patched with backend={state.backend!r}, tile_tokens={state.tile_tokens!r}; "
                    f"call revert_swiglu_patch(model) before re-applying with backend={backend!r}, "
                    f"tile_tokens={tile_tokens!r}"
                )
            already.append(name)
            continue
        found = match_recipe(module)
        if found is None:
            continue
        if not keep(name, module):
            filtered.append(name)
            continue
        recipe, act = found
        try:
            activation = _candidate(name, module, recipe, act)
        except SwigluError as err:
            if strict:
                raise type(err)(f"{err}{_STRICT_HINT}") from None
            refused[name] = str(err)
            continue
        attr = _forward_attr(module)
        plans.append(
            (name, module, PatchState(recipe, activation, backend, attr, module.__dict__.get(attr), tile_tokens))
        )

    if not plans and not already and not refused and filtered:
        raise NoGatedMLPError(
            f"filter_fn excluded all {len(filtered)} gated MLP(s) of {type(model).__name__} "
            f"(e.g. {filtered[0]}); nothing to patch. Check the names it is given (module qualified names)."
        )
    if not plans and not already and not refused:
        shapes = "; ".join(f"{r.name}: {', '.join(r.projections.values())}" for r in load_recipes())
        raise NoGatedMLPError(
            f"no gated MLP found in {type(model).__name__}. MLP-like classes seen: "
            f"{', '.join(_mlp_like_classes(model)) or 'none'}. Recognised shapes (child modules or, for "
            f"experts, 3D weights): {shapes}."
        )

    # Under FSDP (patched after accelerator.prepare / fully_shard) a module's weights are shards except
    # inside the forward of its FSDP unit, where FSDP has gathered them: the probe runs there, at each
    # instance's first forward (no collective of ours; every rank probes the same full weights).
    fsdp = fsdp_units(model)
    checked, failed, deferred = set(), {}, set()
    for name, module, state in plans:
        key = (type(module), state.recipe.name, state.activation)
        if key not in checked:
            checked.add(key)
            try:
                if under_fsdp(name, fsdp) or not run_probe(name, module, state):
                    deferred.add(key)
            except SelfCheckError as err:
                hint = SHARDED_HINT if sharded_params(module) else ""
                if strict:
                    if hint:
                        raise SelfCheckError(f"{err}{hint}") from err.__cause__
                    raise
                failed[key] = f"{err}{hint}"
        if key in deferred:  # no data yet: every instance probes at its own first real forward
            state.probe_pending = name
    if failed:
        for name, module, state in plans:
            key = (type(module), state.recipe.name, state.activation)
            if key in failed:
                refused[name] = failed[key] if failed[key].startswith(f"{name} ") else f"same class as: {failed[key]}"
        plans = [p for p in plans if (type(p[1]), p[2].recipe.name, p[2].activation) not in failed]

    for _, module, state in plans:
        module.__dict__[STATE_ATTR] = state
        module.__dict__[state.attr] = types.MethodType(_fused_forward, module)
    model.__dict__[REPORT_ATTR] = PatchReport(
        {name: m.__dict__[STATE_ATTR].recipe.name for name, m in model.named_modules() if is_patched(m)}, refused
    )
    if refused:
        warnings.warn(
            f"swiglu_hf (strict=False): {len(refused)} gated module(s) left unpatched:\n"
            + "\n".join(f"  {reason}" for reason in refused.values()),
            PatchRefusedWarning,
            stacklevel=2,
        )
    untiled = [name for name, _, state in plans if tile_tokens is not None and not state.recipe.form.tiles]
    if untiled:
        warnings.warn(
            f"swiglu_hf: tile_tokens={tile_tokens!r} does not apply to MoE experts modules; these {len(untiled)} "
            f"run the default mode (saves gate/up, recomputes h): {', '.join(untiled[:4])}"
            + (", ..." if len(untiled) > 4 else ""),
            UserWarning,
            stacklevel=2,
        )
    return model


def revert_swiglu_patch(model: nn.Module) -> nn.Module:
    """Restore exactly the forwards that apply_swiglu_patch replaced. In place; returns `model`."""
    model.__dict__.pop(REPORT_ATTR, None)
    for _, module in model.named_modules():
        state = module.__dict__.pop(STATE_ATTR, None)
        if state is not None:
            _restore_forward(module, state)
    return model


@contextlib.contextmanager
def suspended(model: nn.Module) -> Iterator[dict[str, PatchState]]:
    """Run `model` (or any module in it) stock for the block: revert_swiglu_patch, yield the PatchState
    of each module it unpatched by name, and afterwards (also when the block raises) put back exactly
    those PatchState objects, their fused forwards and the model's PatchReport.

        with suspended(model) as states:
            stock_logits = model(ids).logits  # every gated MLP runs its own forward
    """
    found = [(name, m, m.__dict__[STATE_ATTR]) for name, m in model.named_modules() if is_patched(m)]
    bound = [(m, state, m.__dict__[state.attr]) for _, m, state in found]
    report = model.__dict__.get(REPORT_ATTR)
    revert_swiglu_patch(model)
    try:
        yield {name: state for name, _, state in found}
    finally:
        revert_swiglu_patch(model)  # whatever the block patched goes; what was patched comes back
        for m, state, forward in bound:
            m.__dict__[STATE_ATTR], m.__dict__[state.attr] = state, forward
        if report is not None:
            model.__dict__[REPORT_ATTR] = report
