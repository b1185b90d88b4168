"""The fused forwards bound onto matched MLP modules, one per recipe form, and their memory modes.

    y = down_proj( act(gate_proj(x)) * up_proj(x) )              split form
    y = down_proj( act(g) * u ),  g, u = gate_up_proj(x).chunk(2)   packed form

Each keeps the module's own projection submodules (so LoRA wrappers, quantized linears and hooks
still run) and replaces the elementwise act(gate) * up with the fused op. What is saved for
backward, per token (H hidden, I intermediate; DESIGN.md "Memory policy"):

  default   x, gate, up           H + 2I   h = act(gate) * up is recomputed in backward
  tiled     x                     H        gate, up and h are recomputed per tile of tokens

Default mode. When down_proj is a plain nn.Linear (exact type, no hooks), _GLUDown computes
F.linear(h, W, b) and saves only gate and up; backward recomputes h with the fused op and forms
dW = dy^T h, db = sum(dy), dh = dy W with the same mm calls, in the same shapes, that stock
nn.Linear's autograd makes (mm_mat1/mm_mat2_backward), so fp32 gradients match stock bitwise.
Any other down_proj (PEFT LoRA wrapper, quantized, hooked) goes through _Recompute: gate and up
are saved, and backward re-runs down_proj(glu(gate, up)) under grad and differentiates it
(like a reentrant checkpoint, but the parameter gradients are returned, not accumulated, so
autograd accumulates each parameter once). That re-runs down_proj's forward (and its hooks).

Tiled mode (tile_tokens=N or "auto"). _TiledMLP saves x only; forward runs N tokens at a time;
backward recomputes gate/up per tile (2 GEMMs; down_proj's forward is NOT re-run) and
accumulates the weight gradients over tiles, returning them once, so DDP's per-parameter hooks
fire once per step. Accumulators are fp32 for low-precision (bf16/fp16) weights and the weight's
own dtype otherwise: summing T/N bf16 partials would add a bf16 rounding per tile, while an fp32
sum keeps the tiled result within fp32 rounding of the single-GEMM result (the GEMM itself
accumulates in fp32); the cost is one transient fp32 copy of the layer's weight gradients.
Modules whose projections are not all plain nn.Linear use _TiledRecompute (re-runs the fused
forward per tile under grad and differentiates it; saves x only as well).
"auto" picks N so that one tile's gate + up takes about AUTO_TILE_BYTES:
    N = max(64, floor(AUTO_TILE_BYTES / (2 * I * itemsize) / 64) * 64)
e.g. I = 14336 in bf16 -> 1152 tokens. The transient peak in backward is about 3x that
(gate, up, h, dh, dgate, dup).

Under torch.no_grad / inference_mode every mode runs the plain fused forward: nothing is saved,
so there is nothing to recompute (tiled mode with training-mode dropout inside the MLP, e.g.
LoRA dropout, still runs tile by tile there, so a reentrant checkpoint's recompute draws the same
masks; its masks differ from stock's, which draws one mask for all tokens).
Backwards recompute through ops.*_recompute twins, so torch.compile's CSE cannot turn the
recompute back into a saved forward value. _Recompute/_TiledRecompute call autograd.grad inside
backward and are not torch.compile(fullgraph=True)-traceable; the plain-Linear paths are.
"""

from __future__ import annotations

import contextlib
import numbers

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from . import ops
from .backend import use_triton
from .errors import InvalidInputError

AUTO_TILE_BYTES = 64 * 2**20  # one tile's gate + up
TILE_MULTIPLE = 64
AUTO_TILE_FALLBACK = 1024  # tokens, when the intermediate size cannot be read off the projection


# ---- options ----------------------------------------------------------------------------

def check_tile_tokens(value):
    """None (default mode), a positive int, or "auto"; anything else raises InvalidInputError."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == "auto":
            return value
        raise InvalidInputError(f'tile_tokens={value!r} is not understood; use a positive int, "auto" or None')
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInputError(
            f'tile_tokens must be a positive int, "auto" or None, not {type(value).__name__} {value!r}'
        )
    if value <= 0:
        raise InvalidInputError(f"tile_tokens must be a positive number of tokens, got {value}")
    return int(value)


def auto_tile_tokens(intermediate: int | None, itemsize: int) -> int:
    """Tokens per tile so that a tile's gate + up is about AUTO_TILE_BYTES (see the module doc)."""
    if not intermediate:
        return AUTO_TILE_FALLBACK
    n = AUTO_TILE_BYTES // (2 * intermediate * itemsize)
    return max(TILE_MULTIPLE, n // TILE_MULTIPLE * TILE_MULTIPLE)


def _plain_linear(m: nn.Module) -> bool:
    """An nn.Linear whose forward is exactly F.linear(x, weight, bias): safe to bypass."""
    return (
        type(m) is nn.Linear
        and "forward" not in m.__dict__
        and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
        and not (_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks)
        and not (_nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks)
    )


def _width(m: nn.Module) -> int | None:
    width = getattr(m, "out_features", None)
    if width is None and isinstance(getattr(m, "weight", None), torch.Tensor):
        width = m.weight.shape[0]
    return width


# ---- linear backward, as stock autograd forms it ----------------------------------------

def _linear_dinput(dy, weight, dtype):
    """d_inp = dy @ W of y = F.linear(inp, W, b), as stock autograd's mm forms it, in `dtype`."""
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, M)
    return dy2.mm(weight.to(dy.dtype)).view(*dy.shape[:-1], weight.shape[1]).to(dtype)  # (.., K)


def _linear_dparams(dy, inp, need_weight: bool, need_bias: bool):
    """(dW, db) = (dy^T @ inp, dy.sum(0)) over the flattened (N, .) views, in dy's dtype."""
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, M)
    dw = dy2.t().mm(inp.reshape(-1, inp.shape[-1]).to(dy.dtype)) if need_weight else None  # (M, K)
    db = dy2.sum(0) if need_bias else None  # (M,)
    return dw, db


def _linear_bwd(dy, inp, weight, need_input: bool, need_weight: bool, need_bias: bool):
    """Grads of y = F.linear(inp, weight, bias) (inp (.., K), weight (M, K), dy (.., M)).

    The mm calls stock autograd makes for a row-major input and weight.t():
    d_inp = dy @ W, dW = dy^T @ inp, db = dy.sum(0), over the flattened (N, .) views. Operands
    are cast to dy's dtype first (what autocast did in forward) and grads back to each's dtype.
    """
    d_inp = _linear_dinput(dy, weight, inp.dtype) if need_input else None
    return (d_inp, *_linear_dparams(dy, inp, need_weight, need_bias))


def _glu_grads_and_h(dh, a, b, act, triton):
    """(h, da, db) in one pass over gate and up; packed (b is None): (h, d gate_up, None)."""
    if b is None:
        return (*ops.glu_packed_bwd_with_h(dh, a, act, triton), None)
    return ops.glu_bwd_with_h(dh, a, b, act, triton)


def _cast(grad, like):
    return None if grad is None or like is None else grad.to(like.dtype)


# ---- default mode: h recomputed ---------------------------------------------------------

class _GLUDown(torch.autograd.Function):
    """y = F.linear(glu(gate, up), W, b), saving gate and up only (packed: gate_up only)."""

    @staticmethod
    def forward(ctx, a, b, weight, bias, activation, triton):
        # split: a = gate, b = up; packed: a = gate_up (.., 2I), b = None
        h = ops.glu_fwd(a, b, activation, triton) if b is not None else ops.glu_packed_fwd(a, activation, triton)
        ctx.save_for_backward(a, b, weight)
        ctx.activation, ctx.triton = activation, triton
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(h, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        a, b, weight = ctx.saved_tensors
        need_a, need_b, need_w, need_bias = ctx.needs_input_grad[:4]
        act, triton = ctx.activation, ctx.triton
        h = dgate = dup = None  # packed: dgate is the grad of gate_up, dup stays None
        if need_a or need_b:  # dh needs only W; h for dW comes out of the same pass as dgate, dup
            h, dgate, dup = _glu_grads_and_h(_linear_dinput(dy, weight, a.dtype), a, b, act, triton)
        elif need_w:
            h = _recompute_glu(a, b, act, triton)
        dw, dbias = _linear_dparams(dy, h, need_w, need_bias)
        dbias = None if dbias is None else dbias.to(ctx.bias_dtype)
        return dgate, dup, _cast(dw, weight), dbias, None, None


def _rng_capture(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def _rng_replay(state, device: torch.device):
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _amp_capture(device: torch.device):
    """The forward's autocast state, re-entered around a backward recompute (as checkpoint does)."""
    t = device.type
    return t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t), torch.is_autocast_cache_enabled()


def _amp_replay(state):
    t, enabled, dtype, cache = state
    return torch.autocast(device_type=t, enabled=enabled, dtype=dtype, cache_enabled=cache)


def _random(module: nn.Module) -> bool:
    """True when a forward draws random numbers (training-mode dropout): replay them in backward."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in module.modules())


def _trainable(*modules: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _grads_of(fn, inputs, params, dy, need_inputs, need_params):
    """Re-run fn(*inputs) under grad and return (input grads, param grads), None where not needed."""
    leaves = [t.detach().requires_grad_(need) for t, need in zip(inputs, need_inputs)]
    with torch.enable_grad():
        y = fn(*leaves)
    wanted = [t for t, need in zip(leaves + list(params), list(need_inputs) + list(need_params)) if need]
    got = iter(torch.autograd.grad(y, wanted, dy, allow_unused=True) if wanted else ())
    grads = [next(got) if need else None for need in list(need_inputs) + list(need_params)]
    return grads[: len(leaves)], grads[len(leaves):]


class _Recompute(torch.autograd.Function):
    """y = fn(*inputs), saving `inputs` only; backward re-runs fn and returns input and param grads.

    `params` are the trainable parameters fn uses: passing them here makes their gradients flow
    out of this node once, through autograd's own accumulation (DDP hooks fire once).
    """

    @staticmethod
    def forward(ctx, fn, n_inputs, rng, *tensors):
        inputs, params = tensors[:n_inputs], tensors[n_inputs:]
        ctx.fn, ctx.n_inputs, ctx.rng, ctx.params = fn, n_inputs, rng, params
        ctx.amp = _amp_capture(inputs[0].device)
        ctx.save_for_backward(*inputs)
        return fn(*inputs)

    @staticmethod
    def backward(ctx, dy):
        inputs, n = ctx.saved_tensors, ctx.n_inputs
        needs = ctx.needs_input_grad[3:]
        with _rng_replay(ctx.rng, dy.device), _amp_replay(ctx.amp):
            d_inputs, d_params = _grads_of(ctx.fn, list(inputs), ctx.params, dy, needs[:n], needs[n:])
        return (None, None, None, *d_inputs, *d_params)


def _recompute(fn, inputs, module):
    rng = _rng_capture(inputs[0].device) if _random(module) else None
    return _Recompute.apply(fn, len(inputs), rng, *inputs, *_trainable(module))


# ---- tiled mode: only x saved -----------------------------------------------------------

def _tiles(n: int, tile: int):
    return [(s, min(s + tile, n)) for s in range(0, max(n, 1), tile)]


class _Accumulator:
    """Sums per-tile weight-gradient partials in fp32 (low-precision weights) or the weight dtype."""

    def __init__(self, like):
        self.like, self.total = like, None

    def add(self, part):
        if part is None or self.like is None:
            return
        dtype = torch.float32 if self.like.element_size() < 4 else self.like.dtype
        # the first partial is copied: add_ must never write into a tensor autograd handed us
        self.total = part.to(dtype, copy=True) if self.total is None else self.total.add_(part.to(dtype))

    def result(self):
        return None if self.total is None else self.total.to(self.like.dtype)


def _tile_gate_up(xt, w1, b1, w2, b2, linear=F.linear):
    """gate/up (split) or gate_up (packed, w2 is None) of one tile."""
    if w2 is None:
        return linear(xt, w1, b1), None
    return linear(xt, w1, b1), linear(xt, w2, b2)


def _tile_glu(a, b, act, triton):
    return ops.glu_fwd(a, b, act, triton) if b is not None else ops.glu_packed_fwd(a, act, triton)


def _recompute_gate_up(xt, w1, b1, w2, b2, dtype):
    """_tile_gate_up in backward: opaque ops (see ops.py), in the dtype forward computed in (autocast)."""
    cast = [None if t is None else t.to(dtype) for t in (xt, w1, b1, w2, b2)]
    return _tile_gate_up(*cast, linear=ops.linear_recompute)


def _recompute_glu(a, b, act, triton):
    return ops.glu_fwd_recompute(a, b, act, triton) if b is not None else ops.glu_packed_fwd_recompute(a, act, triton)


class _TiledMLP(torch.autograd.Function):
    """The whole MLP over tiles of tokens for plain nn.Linear projections; saves x only.

    Weights: (w1, b1) = gate_proj (split) or gate_up_proj (packed); (w2, b2) = up_proj or None;
    (wd, bd) = down_proj.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, wd, bd, activation, triton, tile):
        x2 = x.reshape(-1, x.shape[-1])  # (N, H)
        y = None
        for s, e in _tiles(x2.shape[0], tile):
            a, b = _tile_gate_up(x2[s:e], w1, b1, w2, b2)
            yt = F.linear(_tile_glu(a, b, activation, triton), wd, bd)  # (n, H)
            if y is None:
                y, ctx.dtype = yt.new_empty((x2.shape[0], yt.shape[-1])), a.dtype
            y[s:e] = yt
        ctx.save_for_backward(x, w1, b1, w2, b2, wd, bd)
        ctx.activation, ctx.triton, ctx.tile = activation, triton, tile
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, w1, b1, w2, b2, wd, bd = ctx.saved_tensors
        nx, nw1, nb1, nw2, nb2, nwd, nbd = ctx.needs_input_grad[:7]
        act, triton = ctx.activation, ctx.triton
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = torch.empty_like(x2) if nx else None
        acc = {k: _Accumulator(t) for k, t in zip(("w1", "b1", "w2", "b2", "wd", "bd"), (w1, b1, w2, b2, wd, bd))}
        for s, e in _tiles(x2.shape[0], ctx.tile):
            xt, dyt = x2[s:e], dy2[s:e]
            a, b = _recompute_gate_up(xt, w1, b1, w2, b2, ctx.dtype)  # (n, I) each, or (n, 2I)
            h, dgate, dup = _glu_grads_and_h(_linear_dinput(dyt, wd, a.dtype), a, b, act, triton)
            dwd, dbd = _linear_dparams(dyt, h, nwd, nbd)
            acc["wd"].add(dwd)
            acc["bd"].add(dbd)
            dxt, dw1, db1 = _linear_bwd(dgate, xt, w1, nx, nw1, nb1)  # packed: dgate is d gate_up
            if b is not None:
                dxu, dw2, db2 = _linear_bwd(dup, xt, w2, nx, nw2, nb2)
                acc["w2"].add(dw2)
                acc["b2"].add(db2)
                if nx:
                    dxt = dxt + dxu  # x feeds both projections: autograd sums the two the same way
            acc["w1"].add(dw1)
            acc["b1"].add(db1)
            if nx:
                dx[s:e] = dxt
        grads = [a.result() for a in acc.values()]
        return (None if dx is None else dx.view(x.shape), *grads, None, None, None)


class _TiledRecompute(torch.autograd.Function):
    """y = fn(x) over tiles of tokens for any projections; saves x only, re-runs fn per tile."""

    @staticmethod
    def forward(ctx, fn, tile, random, x, *params):
        x2 = x.reshape(-1, x.shape[-1])
        y, rngs = None, []
        for s, e in _tiles(x2.shape[0], tile):
            rngs.append(_rng_capture(x.device) if random else None)
            yt = fn(x2[s:e])
            if y is None:
                y = yt.new_empty((x2.shape[0], yt.shape[-1]))
            y[s:e] = yt
        ctx.fn, ctx.tile, ctx.rngs, ctx.params = fn, tile, rngs, params
        ctx.amp = _amp_capture(x.device)
        ctx.save_for_backward(x)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        need_x, need_params = ctx.needs_input_grad[3], ctx.needs_input_grad[4:]
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = torch.empty_like(x2) if need_x else None
        acc = [_Accumulator(p) for p in ctx.params]
        for (s, e), rng in zip(_tiles(x2.shape[0], ctx.tile), ctx.rngs):
            with _rng_replay(rng, x.device), _amp_replay(ctx.amp):
                (dxt,), dps = _grads_of(ctx.fn, [x2[s:e]], ctx.params, dy2[s:e], [need_x], need_params)
            for a, g in zip(acc, dps):
                a.add(g)
            if need_x:
                dx[s:e] = dxt
        return (None, None, None, None if dx is None else dx.view(x.shape), *(a.result() for a in acc))


def _tiled(module, state, x, projections, down, glu_fwd):
    """Tiled forward; `projections` are (gate, up) or (gate_up,), glu_fwd the untiled plain forward."""
    width = _width(projections[0])
    if len(projections) == 1 and width is not None:
        width //= 2
    tile = state.tile_tokens
    if tile == "auto":
        tile = auto_tile_tokens(width, x.element_size())
    random = _random(module)
    if not torch.is_grad_enabled():
        # Only reached with random submodules: draw dropout masks tile by tile, as the grad-mode
        # path does, so a reentrant checkpoint's no-grad forward and its recompute agree.
        return _TiledRecompute.apply(glu_fwd, tile, random, x)
    triton = use_triton(state.backend, x.device, x.dtype)
    if all(_plain_linear(m) for m in (*projections, down)):
        (w1, b1), (w2, b2) = [(m.weight, m.bias) for m in projections] + [(None, None)] * (2 - len(projections))
        return _TiledMLP.apply(x, w1, b1, w2, b2, down.weight, down.bias, state.activation, triton, tile)
    return _TiledRecompute.apply(glu_fwd, tile, random, x, *_trainable(module))


# ---- the forwards bound by the patch engine ---------------------------------------------

def split_forward(module, state, x):
    p = state.recipe.projections
    gate_proj, up_proj, down_proj = getattr(module, p["gate"]), getattr(module, p["up"]), getattr(module, p["down"])
    act, triton = state.activation, use_triton(state.backend, x.device, x.dtype)

    def plain(x):
        return down_proj(ops.glu_fwd(gate_proj(x), up_proj(x), act, triton))

    if state.tile_tokens is not None and (torch.is_grad_enabled() or _random(module)):
        return _tiled(module, state, x, (gate_proj, up_proj), down_proj, plain)
    if not torch.is_grad_enabled():
        return plain(x)
    gate, up = gate_proj(x), up_proj(x)  # (.., I) each
    if _plain_linear(down_proj):
        return _GLUDown.apply(gate, up, down_proj.weight, down_proj.bias, act, triton)
    return _recompute(lambda g, u: down_proj(ops.glu_fwd(g, u, act, triton)), (gate, up), down_proj)


def packed_forward(module, state, x):
    p = state.recipe.projections
    gate_up_proj, down_proj = getattr(module, p["gate_up"]), getattr(module, p["down"])
    act, triton = state.activation, use_triton(state.backend, x.device, x.dtype)

    def plain(x):
        return down_proj(ops.glu_packed_fwd(gate_up_proj(x), act, triton))

    if state.tile_tokens is not None and (torch.is_grad_enabled() or _random(module)):
        return _tiled(module, state, x, (gate_up_proj,), down_proj, plain)
    if not torch.is_grad_enabled():
        return plain(x)
    gate_up = gate_up_proj(x)  # (.., 2I), gate first
    if _plain_linear(down_proj):
        return _GLUDown.apply(gate_up, None, down_proj.weight, down_proj.bias, act, triton)
    return _recompute(lambda gu: down_proj(ops.glu_packed_fwd(gu, act, triton)), (gate_up,), down_proj)


from .experts import experts_forward  # noqa: E402  (MoE experts form: swiglu_hf/experts.py)

FORWARDS = {"split": split_forward, "packed": packed_forward, "experts": experts_forward}
