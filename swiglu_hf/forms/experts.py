"""The fused forward for Mixture-of-Experts "experts" modules (transformers 5), and its probe.

Transformers 5 keeps all experts of a layer in one module with 3D parameters (MixtralExperts,
Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GLM-4-MoE, PhiMoE, GraniteMoE, MiniMax, ...):

    gate_up_proj  [E, 2I, H]   gate = FIRST half along dim 1      (transposed layout: [E, H, 2I])
    down_proj     [E, H, I]                                        (transposed layout: [E, I, H])
    act_fn, optional gate_up_proj_bias [E, 2I] / down_proj_bias [E, H]
    forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)

Classes decorated with `@use_experts_implementation` dispatch on config._experts_implementation
(transformers.integrations.moe): "eager" runs the class's own per-expert loop; "grouped_mm" /
"batched_mm" (/ "deepgemm") run shared functions that sort or gather tokens per expert and call
`self._apply_gate(gate_up)` = act(gate) * up on the packed per-expert output. The fused forward
keeps every routing and accumulation step of the active implementation and only replaces
act(gate) * up:

  eager        the canonical per-expert loop (one_hot mask, index_add_), with the down
               projection through gated.GLUDown: saves x_e and gate_up (H + 2I per routed token),
               h = act(gate) * up is recomputed in backward.
  grouped_mm,  transformers' own function, called with `_apply_gate` = the fused op on the packed
  batched_mm   (S, 2I) output (halves read in place): act(gate) is never saved (H + 3I: gate_up,
               and h, which the stock grouped/batched down GEMM saves itself).
  bmm          Llama-4 style forward(hidden_states) over tokens pre-grouped per expert
               (torch.bmm with [E, H, 2I]); the fused op replaces up * act(gate).

tile_tokens does not apply to experts (each expert already sees a subset of tokens); they run in
the default mode. A class-specific `_apply_gate` is fused when the module's attributes describe it
(swiglu_hf.gate_spec: clamps from limit/swiglu_limit, alpha-scaled sigmoid with up + 1 from
alpha/swiglu_alpha; GPT-OSS, DeepSeek-V4, MiniMax-M3), interleaved gate/up columns included
(is_concatenated=False, GPT-OSS), and the probe confirms it. Refused with a reason (never patched):
any other `_apply_gate`, a post-expert norm, no act_fn and no alpha, differing expert counts in gate_up_proj
and down_proj (LongCat-Flash's zero-computation experts), shapes matching neither layout, a
forward signature other than the two above, an experts_implementation other than eager /
grouped_mm / batched_mm / deepgemm (e.g. sonicmoe), a class-specific experts_interface, and
expert-parallel modules (_is_expert_parallel, or a forward replaced on the instance: EP's
ep_forward). Routing arguments are bound as the class's own forward binds them (positional or
keyword). The probe (swiglu_hf.probe) runs stock and fused forwards on random hidden states and
random top-k routing at two scales (the second large enough to hit any clamp), through the active
implementation and, for decorated classes, the eager loop as well.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from ..gate_spec import read_spec
from ..gated import GLUDown, glu, resolve_gate
from .base import Form, bind_inputs, is_tensor_of_dim, positional_params, unwrapped_forward

# Implementations (transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS) that gate through _apply_gate.
GATED_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "deepgemm")
_PROBE_TOKENS = 7
_PROBE_GATE_SCALE = 32.0  # the large probe scales inputs so that max |gate_up| is about this


def _moe():
    from transformers.integrations import moe

    return moe


def _params(module, state):
    p = state.recipe.projections
    return getattr(module, p["gate_up"]), getattr(module, p["down"])


def _transposed(gate_up: torch.Tensor, down: torch.Tensor) -> bool | None:
    """False for [E, 2I, H] / [E, H, I], True for [E, H, 2I] / [E, I, H], None for neither."""
    if gate_up.shape[0] != down.shape[0]:
        return None
    if gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1]:
        return False
    if gate_up.shape[2] == 2 * down.shape[1] and gate_up.shape[1] == down.shape[2]:
        return True
    return None


def _signature(cls) -> str | None:
    """ "routed" for forward(hidden_states, top_k_index, top_k_weights), "bmm" for forward(hidden_states)."""
    params = positional_params(unwrapped_forward(cls))
    if params is None:
        return None
    names = [name for name, _ in params]
    if len(names) == 3:
        return "routed"
    if len(names) == 1:
        return "bmm"
    return None


def _bias(module, which: str):
    b = getattr(module, f"{which}_bias", None)
    return b if isinstance(b, torch.Tensor) else None


def _experts_interface(cls):
    """The ExpertsInterface a `@use_experts_implementation` class dispatches through (None if not decorated):
    a class attribute `experts_interface`, or the one captured by the decorator's forward wrapper."""
    found = getattr(cls, "experts_interface", None)
    if found is not None:
        return found
    fn = getattr(cls, "forward", None)
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is not None and cells and "experts_interface" in code.co_freevars:
        try:
            return cells[code.co_freevars.index("experts_interface")].cell_contents
        except ValueError:  # empty cell
            return None
    return None


def _expert_parallel(module) -> str | None:
    """Why `module` looks expert-parallel (transformers.distributed.expert_parallel), or None."""
    if getattr(module, "_is_expert_parallel", False):
        return "it is expert-parallel (_is_expert_parallel=True: experts sharded across ranks)"
    # EP installs `module.forward = ep_forward` (dispatch/combine around the local experts); accelerate's
    # hooks also set an instance forward but keep the real one in `_old_forward`, which is what gets patched.
    if "forward" in module.__dict__ and not (hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__):
        return (
            "its forward is replaced on the instance (e.g. transformers' expert-parallel ep_forward, which "
            "dispatches tokens across ranks); patching would bypass that wrapper"
        )
    return None


def _interleaved(module) -> bool:
    """transformers' experts decorator marks GPT-OSS's even/odd gate/up columns with is_concatenated=False."""
    return getattr(module, "is_concatenated", True) is False


def refusal(module: nn.Module, projections: dict, act) -> str | None:
    """Why an experts-shaped module cannot take the fused forward, or None if it can (probe pending)."""
    cls = type(module).__name__
    gate_up, down = getattr(module, projections["gate_up"]), getattr(module, projections["down"])
    if gate_up.shape[0] != down.shape[0]:
        return (
            f"gate_up_proj has {gate_up.shape[0]} experts and down_proj {down.shape[0]} (shapes "
            f"{tuple(gate_up.shape)} / {tuple(down.shape)}): the expert counts differ, e.g. extra "
            "zero-computation experts; not one gated MLP per expert"
        )
    transposed = _transposed(gate_up, down)
    if transposed is None:
        return (
            f"expert weights gate_up_proj {tuple(gate_up.shape)} / down_proj {tuple(down.shape)} match neither "
            "[E, 2I, H] / [E, H, I] nor the transposed [E, H, 2I] / [E, I, H]"
        )
    if hasattr(module, "is_transposed") and bool(module.is_transposed) != transposed:
        return f"is_transposed={module.is_transposed} disagrees with the weight shapes"
    if getattr(module, "has_gate", True) is False:
        return "has_gate=False: not a gated MLP"
    if getattr(module, "has_post_expert_norm", False):
        return "a norm is applied to each expert's output (has_post_expert_norm=True)"
    gate_fn = getattr(type(module), "_apply_gate", None)
    spec = read_spec(module, act, interleaved=_interleaved(module))
    if isinstance(spec, str):
        return spec
    if gate_fn is not None and gate_fn is not _moe()._default_apply_gate and spec.plain:
        return f"{cls}._apply_gate " + _own_gate(module, gate_fn, act)
    bias = _bias(module, projections["gate_up"]), _bias(module, projections["down"])
    if hasattr(module, "has_bias") and bool(module.has_bias) != all(b is not None for b in bias):
        return f"has_bias={module.has_bias} disagrees with the bias parameters found"
    signature = _signature(type(module))
    if signature is None:
        return "forward signature is neither (hidden_states, top_k_index, top_k_weights) nor (hidden_states)"
    if signature == "bmm" and (not transposed or any(b is not None for b in bias)):
        return "forward(hidden_states) experts are supported for the bias-free [E, H, 2I] bmm layout only"
    ep = _expert_parallel(module)
    if ep is not None:
        return ep
    interface = _experts_interface(type(module))
    if interface is not None and interface is not _moe().ALL_EXPERTS_FUNCTIONS:
        return (
            f"{cls} dispatches through its own experts_interface ({type(interface).__name__}), not transformers' "
            "ALL_EXPERTS_FUNCTIONS: its implementations are unknown to the fused forward"
        )
    impl = implementation(module)
    if signature == "routed" and impl not in ("eager", *GATED_IMPLEMENTATIONS):
        return (
            f"experts_implementation={impl!r} is not supported by the fused forward (supported: eager, "
            f"{', '.join(GATED_IMPLEMENTATIONS)}); switch with model.set_experts_implementation(...) first"
        )
    return None


def _own_gate(module, gate_fn, act) -> str:
    """What a class-specific `_apply_gate` computes, as far as its behaviour on a float64 input shows."""
    generic = ("computes its own gating, and no attribute (limit/swiglu_limit, alpha/swiglu_alpha, gate_multiplier) "
               "says which: e.g. an activation taking (gate, up) together")
    try:
        x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
        with torch.no_grad():
            got = gate_fn(module, x)
            gate, up = x.chunk(2, dim=-1)
            upcast = (act(gate.float()) * up.float()).to(x.dtype)
            plain = act(gate) * up
    except Exception:  # noqa: BLE001 - a gate we cannot run on its own: the generic reason
        return generic
    if isinstance(got, torch.Tensor) and got.shape == upcast.shape and torch.equal(got, upcast) and not torch.equal(got, plain):
        # Beam: the fused gate rounds act(gate) to the input dtype before the multiply, as eager does for
        # act(gate) * up; a float32 gate rounds only once (no GateSpec field says so)
        return ("computes (act(gate.float()) * up.float()).to(dtype): the activation and product in float32, "
                "rounded once, which no gate spec describes (the fused gate rounds act(gate) to the input dtype first)")
    return generic


def implementation(module: nn.Module) -> str:
    """The experts implementation the module's stock forward dispatches to ("eager" if not decorated)."""
    if not hasattr(module, "is_concatenated") or getattr(module, "config", None) is None:
        return "eager"
    impl = getattr(module.config, "_experts_implementation", None)
    return "eager" if impl in (None, "eager") else impl


# ---- the forwards -----------------------------------------------------------------------

class _FusedGate:
    """`module` as seen by transformers' shared experts functions, with `_apply_gate` fused.

    Plain __dict__ storage (no __slots__, no object.__setattr__, no attribute access inside
    __getattr__ that could recurse): torch.compile(fullgraph=True) traces through it.
    """

    def __init__(self, module, gate):
        self.__dict__["_module"] = module
        self.__dict__["_gate"] = gate

    def __getattr__(self, name):
        return getattr(self.__dict__["_module"], name)

    def _apply_gate(self, gate_up):
        return self.__dict__["_gate"](gate_up)


def _eager(module, state, hidden_states, top_k_index, top_k_weights, backend):
    """The canonical per-expert loop of transformers 5 (MixtralExperts.forward), fused."""
    gate_up_w, down_w = _params(module, state)
    p = state.recipe.projections
    gate_up_b, down_b = _bias(module, p["gate_up"]), _bias(module, p["down"])
    transposed = _transposed(gate_up_w, down_w)
    # as the stock loop: module.num_experts (the per-rank count under expert parallelism), not the weights'
    num_experts, act = getattr(module, "num_experts", gate_up_w.shape[0]), state.activation
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        x = hidden_states[token_idx]  # (n, H)
        w1, wd = gate_up_w[expert_idx], down_w[expert_idx]
        if transposed:
            w1, wd = w1.t(), wd.t()
        b1 = None if gate_up_b is None else gate_up_b[expert_idx]
        bd = None if down_b is None else down_b[expert_idx]
        gate_up = F.linear(x, w1, b1)  # (n, 2I), gate first
        if torch.is_grad_enabled():
            y = GLUDown.apply(wd, bd, act, backend, gate_up)  # saves gate_up, not h
        else:
            y = F.linear(glu((gate_up,), act, backend), wd, bd)
        y = y * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, y.to(final.dtype))
    return final


def _bmm(module, state, hidden_states, backend):
    """Llama-4 style: tokens pre-grouped per expert, [E, H, 2I] / [E, I, H] weights."""
    gate_up_w, down_w = _params(module, state)
    hidden = gate_up_w.shape[1]
    x = hidden_states.view(gate_up_w.shape[0], -1, hidden)  # (E, n, H)
    gate_up = torch.bmm(x, gate_up_w)  # (E, n, 2I)
    h = glu((gate_up,), state.activation, backend)  # (E, n, I)
    return torch.bmm(h, down_w).view(-1, hidden)


def _packed_gate(gate_up, activation, backend):
    return glu((gate_up,), activation, backend)


def experts_forward(module, state, /, *args, impl: str | None = None, **kwargs):
    """The fused forward bound on an experts module; `impl` overrides the dispatch (probe only)."""
    values = bind_inputs(module, args, kwargs)
    hidden_states = values[0]
    backend = resolve_gate(state.backend, state.activation, hidden_states.device, hidden_states.dtype)
    if _signature(type(module)) == "bmm":
        return _bmm(module, state, hidden_states, backend)
    top_k_index, top_k_weights = values[1], values[2]
    impl = impl or implementation(module)
    if impl == "eager":
        return _eager(module, state, hidden_states, top_k_index, top_k_weights, backend)
    if impl in GATED_IMPLEMENTATIONS:
        fn = _moe().ALL_EXPERTS_FUNCTIONS[impl]
        gate = functools.partial(_packed_gate, activation=state.activation, backend=backend)
        return fn(_FusedGate(module, gate), hidden_states, top_k_index, top_k_weights)
    raise UnsupportedModuleError(
        f"{type(module).__name__}: experts_implementation={impl!r} is not supported by the fused forward "
        f"(supported: eager, {', '.join(GATED_IMPLEMENTATIONS)}); call revert_swiglu_patch(model) first"
    )


# ---- the probe inputs and the form ------------------------------------------------------

def _probe_inputs(module, projections, generator, scale_to: float | None):
    gate_up_w, down_w = getattr(module, projections["gate_up"]), getattr(module, projections["down"])
    transposed = _transposed(gate_up_w, down_w)
    experts, hidden = gate_up_w.shape[0], gate_up_w.shape[1] if transposed else gate_up_w.shape[2]
    dev, dtype = gate_up_w.device, gate_up_w.dtype

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dev, dtype)

    if _signature(type(module)) == "bmm":
        x, route = randn(experts * 3, hidden), ()
    else:
        k = min(2, experts)
        x = randn(_PROBE_TOKENS, hidden)
        idx = torch.stack([torch.randperm(experts, generator=generator)[:k] for _ in range(_PROBE_TOKENS)]).to(dev)
        w = (torch.rand(_PROBE_TOKENS, k, generator=generator, dtype=torch.float64) + 0.5).to(dev, dtype)
        route = (idx, w)
    if scale_to is not None:
        w1 = gate_up_w if transposed else gate_up_w.transpose(1, 2)
        peak = (x.double() @ w1.double()).abs().max().item()
        if peak > 0:
            x = x * (scale_to / peak)
    return (x, *route)


class ExpertsForm(Form):
    name, roles, tiles = "experts", ("gate_up", "down"), False

    def has_structure(self, module, projections):
        return all(is_tensor_of_dim(getattr(module, attr, None), 3) for attr in projections.values())

    def refusal(self, module, projections, act):
        return refusal(module, projections, act)

    def gate(self, module, projections, act):
        return read_spec(module, act, interleaved=_interleaved(module))

    def probe_inputs(self, module, projections, generator):
        return [_probe_inputs(module, projections, generator, scale) for scale in (None, _PROBE_GATE_SCALE)]

    def probe_pairs(self, module, stock_forward):
        """The active implementation and, for decorated classes, the eager loop as well.

        torch's grouped_mm has no float64 kernel: a float64 probe copy compares the fused gate through
        transformers' batched_mm function instead, which calls the same `_apply_gate`."""
        impl = implementation(module)
        pairs = [(impl, stock_forward, {})]
        if impl == "grouped_mm" and next(module.parameters()).dtype == torch.float64:
            batched = functools.partial(_moe().ALL_EXPERTS_FUNCTIONS["batched_mm"], module)
            pairs = [("batched_mm", batched, {"impl": "batched_mm"})]
        original = getattr(type(module).forward, "__wrapped__", None)
        if impl != "eager" and original is not None and _signature(type(module)) == "routed":
            pairs.append(("eager", functools.partial(original, module), {"impl": "eager"}))
        return pairs

    def forward(self, module, state, *args, **kwargs):
        return experts_forward(module, state, *args, **kwargs)


def use_eager_experts(model: nn.Module) -> nn.Module:
    """Switch every decorated experts module of `model` to the "eager" implementation, in place.

    For float64 reference copies: torch's grouped_mm has no float64 kernel. Affects the configs of
    this model only (a deepcopy has its own).
    """
    for m in model.modules():
        config = getattr(m, "config", None)
        if hasattr(m, "is_concatenated") and config is not None and hasattr(config, "_experts_implementation_internal"):
            config._experts_implementation_internal = "eager"
    return model
