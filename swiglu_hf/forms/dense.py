"""Dense gated MLPs: child projection modules, one token dimension.

    split    y = down_proj(act(gate_proj(x)) * up_proj(x))                 Llama, Mistral, Qwen, Gemma
    packed   y = down_proj(act(g) * u),  g, u = gate_up_proj(x).chunk(2)    Phi-3, GLM-4

The gate is any swiglu_hf.gate_spec spec the module's attributes describe (DeepSeek-V4's clamps,
Falcon-H1's gate multiplier, BitNet's relu²), plus steps a recipe names as optional roles and the
form applies when the module has them (the probe proves each):

    post         a module between the gate and down_proj (BitNet's and Dory's ffn_sub_norm,
                 ModernBERT-decoder's dropout)
    gate_scale,  per-channel vectors times a scalar attribute on a projection's output, before the
    up_scale,    gate (Dory: gate_proj(x) * (suv_gate * suv_scale))
    scale
    adapters,    a ModuleList of per-layer adapters added to the (first) projection's output,
    adapter_index  selected by forward(x, layer_idx) through a dict layer_idx -> list index (Zamba2)

and an output multiplier (Falcon-H1's down_multiplier).

Both keep the module's own projection submodules, so LoRA wrappers, quantized linears and hooks
still run; only act(gate) * up is fused (swiglu_hf.gated for the memory modes).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

from .. import ops
from ..backend import BACKEND_ENV
from ..distributed import is_partitioned
from ..gated import down_of_glu, gated_mlp, linear, plain_linear, plain_linears, resolve_gate
from ..tiled import TiledMLP, TiledRecompute, TiledZero3, _trainable, auto_tile_tokens, draws_random
from .base import PROBE_SCALES, Form

_PROBE_LAYERS = 2  # adapter layer indices the probe runs (an adapter and an identity, where both exist)


def _in_features(m: nn.Module) -> int | None:
    """The input width of a projection: its in_features or 2D weight, else that of the one nn.Linear it
    wraps (Gemma 4's vision ClippableLinear: clamps around an inner `linear`)."""
    hidden = getattr(m, "in_features", None)
    weight = getattr(m, "weight", None)
    if hidden is None and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        hidden = weight.shape[-1]
    if hidden is None:
        inner = [c for c in m.modules() if isinstance(c, nn.Linear)]
        hidden = inner[0].in_features if len(inner) == 1 else None
    return hidden


def _declared(m: nn.Module, attr: str) -> int | None:
    value = getattr(m, attr, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _attr(module: nn.Module, name: str):
    """getattr(module, name, None) without nn.Module.__getattr__'s raise-and-catch for an absent name:
    the optional roles below are looked up on every forward and are usually absent (host overhead)."""
    if type(module).__getattr__ is not nn.Module.__getattr__:  # a class with its own lookup: ask it
        return getattr(module, name, None)
    d = module.__dict__
    if name in d:
        return d[name]
    for store in ("_parameters", "_buffers", "_modules"):  # what nn.Module.__getattr__ searches
        if name in d.get(store, ()):
            return d[store][name]
    return getattr(module, name, None) if hasattr(type(module), name) else None


def _out_multiplier(module: nn.Module) -> float | None:
    value = _attr(module, "down_multiplier")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1.0
    return float(value) if ok else None


def _optional(module: nn.Module, projections: dict, role: str):
    attr = projections.get(role)
    return None if attr is None else _attr(module, attr)


def _adapters(module: nn.Module, projections: dict):
    """(ModuleList, dict layer_idx -> index) when the recipe names adapters and the module has them."""
    adapters, index = _optional(module, projections, "adapters"), _optional(module, projections, "adapter_index")
    if isinstance(adapters, nn.ModuleList) and isinstance(index, dict):
        return adapters, index
    return None


def _scale(module: nn.Module, projections: dict, role: str):
    """The per-channel multiplier the recipe names for a projection's output (vector * scalar), or None."""
    vector, scalar = _optional(module, projections, f"{role}_scale"), _optional(module, projections, "scale")
    if not isinstance(vector, torch.Tensor):
        return None
    return vector, scalar


def _projection(module: nn.Module, projections: dict, role: str, layer_idx, adapters):
    """The callable x -> this role's projection output, with the recipe's optional steps (`adapters`:
    the module's _adapters, which apply to the first role only)."""
    proj = getattr(module, projections[role])
    steps = []
    adapters = adapters if role == _first_role(projections) else None
    scale = _scale(module, projections, role)
    if adapters is None and scale is None:
        return proj
    if adapters is not None:
        steps.append(("adapter", adapters[0][adapters[1][layer_idx]]))
    if scale is not None:
        steps.append(("scale", scale))
    return functools.partial(_project, proj, tuple(steps))


def _first_role(projections: dict) -> str:
    """The role adapters apply to: the packed projection, or the gate."""
    return "gate_up" if "gate_up" in projections else "gate"


def _project(proj, steps, x):
    y = proj(x)
    for kind, step in steps:
        if kind == "adapter":  # as Zamba2: gate_up_proj(x) + adapter(x)
            y = y + step(x)
        else:  # as Dory: gate_proj(x) * (suv_gate * suv_scale)
            vector, scalar = step
            y = y * (vector if scalar is None else vector * scalar)
    return y


class DenseForm(Form):
    input_roles: tuple[str, ...] = ()
    optional_roles = ("post", "adapters", "adapter_index")

    def has_structure(self, module, projections):
        if not super().has_structure(module, {r: projections[r] for r in self.roles}):
            return False
        mods = [getattr(module, projections[r]) for r in self.roles]
        # a projection with stacked (3D) weights is an experts layer (JetMoE's ParallelExperts), not a linear
        if any(isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() > 2 for m in mods):
            return False
        return self._widths_agree(*mods)

    def _widths_agree(self, *mods) -> bool:
        return True

    def refusal(self, module, projections, act):
        adapters = _optional(module, projections, "adapters")
        if adapters is not None and _adapters(module, projections) is None:
            return (f"it has {projections['adapters']} but no {projections.get('adapter_index')} dict selecting one "
                    "per layer index")
        return None

    def probe_inputs(self, module, projections, generator):
        hidden = _in_features(getattr(module, projections[self.input_roles[0]]))
        param = next((p for p in module.parameters() if p.is_floating_point()), None)
        if hidden is None or param is None:
            return []
        x = torch.randn(2, 3, hidden, generator=generator, dtype=torch.float64).to(param.device, param.dtype)
        adapters = _adapters(module, projections)
        if adapters is None:
            return [(s * x,) for s in PROBE_SCALES]
        # every layer index runs through the same forward: probe one with an adapter and one without
        by_kind: dict[str, object] = {}
        for layer_idx, i in adapters[1].items():
            by_kind.setdefault(type(adapters[0][i]).__name__, layer_idx)
        layers = list(by_kind.values())[:_PROBE_LAYERS]
        return [(s * x, layer_idx) for layer_idx in layers for s in PROBE_SCALES]

    def forward(self, module, state, x=None, *args, **kwargs):
        p = state.recipe.projections
        adapters = _adapters(module, p)
        layer_idx = None
        if adapters is not None:  # forward(x, layer_idx): the stock signature of the adapter shape
            if args:
                (layer_idx,), args = args[:1], args[1:]
            elif "layer_idx" in kwargs:
                layer_idx = kwargs.pop("layer_idx")
        if x is None and len(kwargs) == 1 and not args:  # mlp(x=...) / mlp(hidden_states=...): one input either way
            (x,) = kwargs.values()
            kwargs = {}
        if args or kwargs or x is None:
            raise TypeError(
                f"{type(module).__name__}.forward takes one input tensor"
                + (" and a layer index" if adapters is not None else "")
                + f", got {len(args)} more positional and keyword arguments {sorted(kwargs)}"
            )
        projections = tuple(_projection(module, p, role, layer_idx, adapters) for role in self.input_roles)
        post = _optional(module, p, "post")
        return dense_mlp(module, x, projections, getattr(module, p["down"]), state.activation, state.backend,
                         state.tile_tokens, post=post if isinstance(post, nn.Module) else None,
                         out_mul=_out_multiplier(module))

    def make_plan(self, module, state):
        return _Plan(self, module, state)


class SplitForm(DenseForm):
    name, roles, input_roles = "split", ("gate", "up", "down"), ("gate", "up")
    optional_roles = (*DenseForm.optional_roles, "gate_scale", "up_scale", "scale")

    def _widths_agree(self, gate, up, down):
        widths = [_declared(gate, "out_features"), _declared(up, "out_features"), _declared(down, "in_features")]
        known = [w for w in widths if w is not None]
        return len(set(known)) <= 1


class PackedForm(DenseForm):
    name, roles, input_roles = "packed", ("gate_up", "down"), ("gate_up",)

    def _widths_agree(self, gate_up, down):
        # fc1/fc2 or input_linear/output_linear name plain MLPs too: a packed unit's first projection is
        # twice as wide as the down projection's input
        out, inp = _declared(gate_up, "out_features"), _declared(down, "in_features")
        return out is None or inp is None or out == 2 * inp


# ---- the per-call path ------------------------------------------------------------------------
# A patched call must cost no more host time than the stock one (decoding, small models: the GPU
# waits on Python). So everything that does not change between calls is resolved once per instance
# and the call only executes it: the projections and down_proj (F.linear directly while they are
# plain nn.Linear), the GateSpec object, the backend per (device, dtype), and the autograd path.

class _Plan:
    """A dense module's resolved forward (docs/ARCHITECTURE.md "The per-call path").

    Valid while the module's children are the same objects: a LoRA wrapper or any replacement made
    after the patch changes them, and the plan is rebuilt. Hooks added later (accelerate, ZeRO-3 after
    deepspeed.initialize) are seen per call by plain_linear, which decides between F.linear and
    calling the module. `lean` is False for what the general forward handles: tiled mode, optional
    roles (sub-norm, adapters, per-channel scales); then forward() runs."""

    __slots__ = ("children", "lean", "projections", "down", "linears", "spec", "backend", "has_out_mul", "_backends")

    def __init__(self, form: DenseForm, module: nn.Module, state):
        p = state.recipe.projections
        self.children = tuple(module._modules.values())
        optional = [r for r in form.optional_roles if r in p and _attr(module, p[r]) is not None]
        self.lean = state.tile_tokens is None and not optional
        self.projections = tuple(getattr(module, p[r]) for r in form.input_roles)
        self.down = getattr(module, p["down"])
        # Every projection an nn.Linear: grad mode runs the whole unit as one autograd node
        # (gated.GatedMLP) while they are still plain (no hooks added since: checked per call).
        mods = (*self.projections, self.down)
        self.linears = mods if all(type(m) is nn.Linear for m in mods) else ()
        self.spec = ops.as_spec(state.activation)
        self.backend = state.backend
        self.has_out_mul = "down_multiplier" in module.__dict__  # Falcon-H1: read per call, as stock does
        self._backends: dict = {}

    def stale(self, module: nn.Module) -> bool:
        return tuple(module._modules.values()) != self.children

    def run(self, module: nn.Module, x: Tensor) -> Tensor | None:
        """y, or None where the general forward must run: not lean, the children replaced, a tensor
        subclass, tracing (torch.compile, a dispatch mode, a functorch transform)."""
        if type(x) is not Tensor or not self.lean or self.stale(module) or not ops.eager_mode():
            return None
        device, spec = x.device, self.spec
        key = (device, x.dtype, os.environ.get(BACKEND_ENV) if self.backend == "auto" else None)  # env: "auto" only
        backend = self._backends.get(key)
        if backend is None:
            backend = self._backends[key] = resolve_gate(self.backend, spec, device, x.dtype)
        if not torch.is_grad_enabled():  # nothing saved: the fused op between the linears
            y = linear(self.down, ops.forward(tuple([linear(m, x) for m in self.projections]), spec, backend))
        else:
            params = self.linears and plain_linears(self.linears) and _weights_and_biases(self.linears)
            if params and x.is_contiguous() and not _forward_ad_on():
                y = gated_mlp(None if params[2] is None else x, x, spec, backend, *params)
            else:  # saves gate and up, never act or h (gated.down_of_glu picks the path)
                y = down_of_glu(self.down, tuple([linear(m, x) for m in self.projections]), spec, backend)
        if self.has_out_mul:
            out_mul = _out_multiplier(module)
            return y if out_mul is None else y * out_mul
        return y


# A non-contiguous x (stock forms its input grad in another layout) and forward-mode AD (the node has no
# jvp) take the module path. forward_ad keeps its level in a module global; a torch without it gets
# "off", and a dual input would then fail loudly in the node (no jvp), never silently.
_forward_ad_on = (lambda: forward_ad._current_level >= 0) if hasattr(forward_ad, "_current_level") else (
    lambda: False)


def _weights_and_biases(linears) -> tuple | None:
    """GatedMLP's parameter arguments: (W_1, b_1, W_2, b_2, W_d, b_d), W_2 and b_2 None for a packed unit;
    None when one is a tensor subclass (a quantized or distributed weight implements F.linear, not the
    matmuls the node's backward calls, and its own autograd must run)."""
    if len(linears) == 3:
        g, u, d = linears[0]._parameters, linears[1]._parameters, linears[2]._parameters
        params = g["weight"], g["bias"], u["weight"], u["bias"], d["weight"], d["bias"]
    else:
        gu, d = linears[0]._parameters, linears[1]._parameters
        params = gu["weight"], gu["bias"], None, None, d["weight"], d["bias"]
    for t in params:
        if t is not None and type(t) is not nn.Parameter and type(t) is not Tensor:
            return None
    return params


# ---- the general forward (split and packed forms, every memory mode) ------------------------

def _out_width(m: nn.Module) -> int | None:
    width = getattr(m, "out_features", None)
    if width is None and isinstance(getattr(m, "weight", None), torch.Tensor):
        width = m.weight.shape[0]
    return width


def dense_mlp(module: nn.Module, x, projections, down_proj, activation: str, backend: str, tile_tokens,
              post: nn.Module | None = None, out_mul: float | None = None):
    """down_proj(post(gate(...))) * out_mul with `projections` (gate_proj, up_proj) or (gate_up_proj,)."""
    y = _dense(module, x, projections, down_proj, activation, resolve_gate(backend, activation, x.device, x.dtype),
               tile_tokens, post)
    return y if out_mul is None else y * out_mul


def _dense(module, x, projections, down_proj, activation, backend, tile_tokens, post):
    def plain(x):
        h = ops.glu(tuple(p(x) for p in projections), activation, backend)
        return down_proj(h if post is None else post(h))

    random = tile_tokens is not None and draws_random(module)
    if tile_tokens is not None and (torch.is_grad_enabled() or random):
        width = _out_width(projections[0])
        if len(projections) == 1 and width is not None:
            width //= 2
        tile = auto_tile_tokens(width, x.element_size()) if tile_tokens == "auto" else tile_tokens
        if not torch.is_grad_enabled():
            # Only reached with random submodules: draw dropout masks tile by tile, as the grad-mode
            # path does, so a reentrant checkpoint's no-grad forward and its recompute agree.
            return TiledRecompute.apply(plain, tile, random, x)
        if post is None and all(plain_linear(m) for m in (*projections, down_proj)):
            weights = [t for m in (*projections, down_proj) for t in (m.weight, m.bias)]
            return TiledMLP.apply(activation, backend, tile, x, *weights)
        params = _trainable(module)
        if is_partitioned(module):
            anchor = None if x.requires_grad else x.new_empty(0).requires_grad_()
            return TiledZero3.apply(plain, tile, random, params, x, anchor)
        return TiledRecompute.apply(plain, tile, random, x, *params)
    if not torch.is_grad_enabled():
        return plain(x)
    return down_of_glu(down_proj, tuple(p(x) for p in projections), activation, backend, post)
