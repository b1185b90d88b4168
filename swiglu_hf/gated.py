"""The gated unit  y = down_proj(act(gate) * up)  with its memory modes, for every MLP form.

`parts` is (gate, up), two (.., I) tensors, or (gate_up,), one packed (.., 2I) tensor with the gate
first; `glu(parts, ...)` is the fused op on either. What is saved for backward, per token (H hidden,
I intermediate; docs/ARCHITECTURE.md "Memory policy"):

  default   x, gate, up     H + 2I   h = act(gate) * up is recomputed in backward
  tiled     x               H        gate, up and h are recomputed per tile of tokens

Default mode, down_proj a plain nn.Linear (exact type, no hooks): GLUDown computes
F.linear(h, W, b) saving gate and up only; backward recomputes h in the same pass as dgate/dup and
forms dW = dy^T h, db = sum(dy), dh = dy W with the mm calls, in the shapes, that stock nn.Linear's
autograd makes, so gradients match stock bitwise.
Default mode, any other down_proj (PEFT LoRA wrapper, quantized, hooked, partitioned by DeepSpeed
ZeRO-3): down_proj is called as stock calls it (grad mode on, its input requiring grad), and a
saved-tensor hook replaces h, wherever down_proj saves it, with a recipe to recompute it from gate
and up on unpack (the way non-reentrant checkpointing keeps tensors out of memory). The module sees
a training forward and its own hooks run once; outer saved-tensor hooks (checkpointing, byte
accounting) still see every other tensor, and gate/up through the recipe.

Tiled mode (tile_tokens=N or "auto"): TiledMLP saves x only; forward runs N tokens at a time;
backward recomputes gate/up per tile (2 GEMMs; down_proj's forward is not re-run) and accumulates
the weight gradients over tiles, returning them once, so DDP's per-parameter hooks fire once per
step. Accumulators are fp32 for 16-bit weights (a bf16 sum of T/N partials would add a rounding per
tile). Projections that are not all plain nn.Linear use TiledRecompute: it re-runs the fused forward
per tile under grad and differentiates it (saves x only as well). Under DeepSpeed ZeRO-3 (partitioned
parameters) TiledZero3 re-runs it per tile and back-propagates into the parameters through ZeRO's own
hooks instead of returning their gradients (see its doc).
"auto" picks N so that one tile's gate + up takes about AUTO_TILE_BYTES:
    N = max(64, floor(AUTO_TILE_BYTES / (2 * I * itemsize) / 64) * 64)
e.g. I = 14336 in bf16 -> 1152 tokens.

Under torch.no_grad / inference_mode every mode runs the plain fused forward: nothing is saved.
Backwards recompute through the ops.*_recompute twins, so torch.compile's CSE cannot turn a
recompute back into a saved forward value.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from . import ops
from .backend import resolve

AUTO_TILE_BYTES = 64 * 2**20  # one tile's gate + up
TILE_MULTIPLE = 64
AUTO_TILE_FALLBACK = 1024  # tokens, when the intermediate size cannot be read off the projection


def auto_tile_tokens(intermediate: int | None, itemsize: int) -> int:
    """Tokens per tile so that a tile's gate + up is about AUTO_TILE_BYTES (see the module doc)."""
    if not intermediate:
        return AUTO_TILE_FALLBACK
    n = AUTO_TILE_BYTES // (2 * intermediate * itemsize)
    return max(TILE_MULTIPLE, n // TILE_MULTIPLE * TILE_MULTIPLE)


glu = ops.glu  # act(gate) * up of (gate, up) or of (gate_up,); see ops.py for the eager fast path
_glu_recompute = ops.glu_recompute
_glu_grads_and_h = ops.glu_grads_and_h


def plain_linear(m: nn.Module) -> bool:
    """An nn.Linear whose forward is exactly F.linear(x, weight, bias): safe to bypass."""
    return (
        type(m) is nn.Linear
        and "forward" not in m.__dict__
        and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
        and not (_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks)
        and not (_nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks)
    )


def _out_width(m: nn.Module) -> int | None:
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
    """Grads of y = F.linear(inp, weight, bias): the mm calls stock autograd makes (see above).

    Operands are cast to dy's dtype first (what autocast did in forward), grads back to each's dtype.
    """
    d_inp = _linear_dinput(dy, weight, inp.dtype) if need_input else None
    return (d_inp, *_linear_dparams(dy, inp, need_weight, need_bias))


def _cast(grad, like):
    return None if grad is None or like is None else grad.to(like.dtype)


# ---- default mode, plain down_proj ------------------------------------------------------

class GLUDown(torch.autograd.Function):
    """y = F.linear(glu(parts), W, b), saving the parts only (gate and up, or gate_up)."""

    @staticmethod
    def forward(ctx, weight, bias, activation, backend, *parts):
        h = glu(parts, activation, backend)
        ctx.save_for_backward(weight, *parts)
        ctx.activation, ctx.backend = activation, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(h, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        weight, *parts = ctx.saved_tensors
        need_w, need_bias = ctx.needs_input_grad[:2]
        need_parts = any(ctx.needs_input_grad[4:])
        d_parts = [None] * len(parts)
        if need_parts:  # dh needs only W; h for dW comes out of the same pass as the part grads
            h, d_parts = _glu_grads_and_h(_linear_dinput(dy, weight, parts[0].dtype), parts, ctx.activation, ctx.backend)
        elif need_w:
            h = _glu_recompute(parts, ctx.activation, ctx.backend)
        dw, dbias = _linear_dparams(dy, h, need_w, need_bias) if (need_w or need_bias) else (None, None)
        dbias = None if dbias is None else dbias.to(ctx.bias_dtype)
        return (_cast(dw, weight), dbias, None, None, *d_parts)


# ---- default mode, any down_proj: h dropped by a saved-tensor hook ----------------------

class _Recomputed:
    """What a saved-tensor hook keeps instead of (a view of) h: the view geometry."""

    __slots__ = ("size", "stride", "offset")

    def __init__(self, t: torch.Tensor):
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


def _storage_id(t: torch.Tensor):
    return t.device, t.untyped_storage().data_ptr()


@contextlib.contextmanager
def _drop_saved(h: torch.Tensor, parts, activation: str, backend: str):
    """Within the block, tensors saved for backward that share h's storage are replaced by a recipe
    that recomputes h from the parts on unpack. Other tensors, and the parts the recipe holds, go
    through the enclosing saved-tensor hooks (checkpointing, byte accounting) as they would."""
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    outer_pack, outer_unpack = outer if outer is not None else (None, None)
    key, dtype = _storage_id(h), h.dtype
    packed_parts: list = []
    cache: list = []

    def pack(t):
        if t.dtype == dtype and t.untyped_storage().data_ptr() and _storage_id(t) == key:
            if not packed_parts:
                packed_parts.extend(outer_pack(p) if outer_pack else p for p in parts)
            return _Recomputed(t)
        return outer_pack(t) if outer_pack else t

    def unpack(saved):
        if not isinstance(saved, _Recomputed):
            return outer_unpack(saved) if outer_unpack else saved
        if not cache:
            real = [outer_unpack(p) if outer_unpack else p for p in packed_parts]
            cache.append(_glu_recompute(real, activation, backend))
        return cache[0].as_strided(saved.size, saved.stride, saved.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def down_of_glu(down_proj: nn.Module, parts, activation: str, backend: str, post: nn.Module | None = None):
    """down_proj(post(glu(parts))) in default mode: saves the parts (H + 2I), never h. `post` is a module
    between the gate and down_proj (BitNet's ffn_sub_norm); what it saves other than h it keeps."""
    if post is None and plain_linear(down_proj):
        return GLUDown.apply(down_proj.weight, down_proj.bias, activation, backend, *parts)
    h = glu(parts, activation, backend)
    with _drop_saved(h, parts, activation, backend):
        return down_proj(h if post is None else post(h))


def resolve_gate(backend: str, activation: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs this gate: "auto" keeps gates the kernels do not implement on the PyTorch path."""
    ran = resolve(backend, device, dtype)
    return "torch" if ran == "triton" and not ops.kernel_gate(activation) else ran


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


def draws_random(module: nn.Module) -> bool:
    """True when a forward draws random numbers (training-mode dropout): replay them in backward."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in module.modules())


def _trainable(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def _tile_parts(xt, weights, linear=F.linear):
    """The parts of one tile: [(w, b)] for gate_up, [(wg, bg), (wu, bu)] for gate and up."""
    return tuple(linear(xt, w, b) for w, b in weights)


def _recompute_parts(xt, weights, dtype):
    """_tile_parts in backward: opaque ops (see ops.py), in the dtype forward computed in (autocast)."""
    cast = [(w.to(dtype), None if b is None else b.to(dtype)) for w, b in weights]
    return _tile_parts(xt.to(dtype), cast, linear=ops.linear_recompute)


class TiledMLP(torch.autograd.Function):
    """The whole MLP over tiles of tokens for plain nn.Linear projections; saves x only.

    Arguments after the options: x, then (weight, bias) of each input projection (gate_up, or gate
    and up), then down_proj's weight and bias.
    """

    @staticmethod
    def forward(ctx, activation, backend, tile, x, *weights):
        pairs = list(zip(weights[0::2], weights[1::2]))
        proj, (wd, bd) = pairs[:-1], pairs[-1]
        x2 = x.reshape(-1, x.shape[-1])  # (N, H)
        y = None
        for s, e in _tiles(x2.shape[0], tile):
            parts = _tile_parts(x2[s:e], proj)
            yt = F.linear(glu(parts, activation, backend), wd, bd)  # (n, H)
            if y is None:
                y, ctx.dtype = yt.new_empty((x2.shape[0], yt.shape[-1])), parts[0].dtype
            y[s:e] = yt
        ctx.save_for_backward(x, *weights)
        ctx.activation, ctx.backend, ctx.tile = activation, backend, tile
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:]
        need_x = ctx.needs_input_grad[3]
        pairs = list(zip(weights[0::2], weights[1::2]))
        pair_needs = list(zip(needs[0::2], needs[1::2]))
        proj, (wd, _) = pairs[:-1], pairs[-1]
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = torch.empty_like(x2) if need_x else None
        acc = [_Accumulator(t) for t in weights]
        for s, e in _tiles(x2.shape[0], ctx.tile):
            xt, dyt = x2[s:e], dy2[s:e]
            parts = _recompute_parts(xt, proj, ctx.dtype)  # (n, I) each, or (n, 2I)
            dh = _linear_dinput(dyt, wd, parts[0].dtype)
            h, d_parts = _glu_grads_and_h(dh, parts, ctx.activation, ctx.backend)
            for a, g in zip(acc[-2:], _linear_dparams(dyt, h, *pair_needs[-1])):
                a.add(g)
            dxt = None
            for i, ((w, _), dpart) in enumerate(zip(proj, d_parts)):
                d_in, dw, db = _linear_bwd(dpart, xt, w, need_x, *pair_needs[i])
                acc[2 * i].add(dw)
                acc[2 * i + 1].add(db)
                if need_x:  # x feeds both projections: autograd sums the two the same way
                    dxt = d_in if dxt is None else dxt + d_in
            if need_x:
                dx[s:e] = dxt
        return (None, None, None, None if dx is None else dx.view(x.shape), *(a.result() for a in acc))


def _grads_of(fn, x, params, dy, need_x, need_params):
    """Re-run fn(x) under grad and return (dx, param grads), None where not needed."""
    leaf = x.detach().requires_grad_(need_x)
    with torch.enable_grad():
        y = fn(leaf)
    wanted = [t for t, need in zip([leaf, *params], [need_x, *need_params]) if need]
    got = iter(torch.autograd.grad(y, wanted, dy, allow_unused=True) if wanted else ())
    grads = [next(got) if need else None for need in [need_x, *need_params]]
    return grads[0], grads[1:]


def _tiled_forward(ctx, fn, tile, random, x, params):
    """y = fn(x) a tile of tokens at a time, saving only x (and each tile's RNG state when `random`)."""
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


class TiledRecompute(torch.autograd.Function):
    """y = fn(x) over tiles of tokens for any projections; saves x only, re-runs fn per tile."""

    @staticmethod
    def forward(ctx, fn, tile, random, x, *params):
        return _tiled_forward(ctx, fn, tile, random, x, params)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        need_x, need_params = ctx.needs_input_grad[3], ctx.needs_input_grad[4:]
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = torch.empty_like(x2) if need_x else None
        acc = [_Accumulator(p) for p in ctx.params]
        for (s, e), rng in zip(_tiles(x2.shape[0], ctx.tile), ctx.rngs):
            with _rng_replay(rng, x.device), _amp_replay(ctx.amp):
                dxt, dps = _grads_of(ctx.fn, x2[s:e], ctx.params, dy2[s:e], need_x, need_params)
            for a, g in zip(acc, dps):
                a.add(g)
            if need_x:
                dx[s:e] = dxt
        return (None, None, None, None if dx is None else dx.view(x.shape), *(a.result() for a in acc))


def zero3_partitioned(params) -> bool:
    """Whether DeepSpeed ZeRO-3 manages these parameters (each carries a ds_id). Read at every forward:
    a model patched before deepspeed.initialize is partitioned only afterwards."""
    return any(hasattr(p, "ds_id") for p in params)


class TiledZero3(torch.autograd.Function):
    """y = fn(x) over tiles of tokens when DeepSpeed ZeRO-3 partitions the weights; saves x only.

    ZeRO-3 keeps each weight as an empty shard outside its module's forward and reduces a gradient
    through a hook on the parameter's grad accumulation, so a Function can neither read the weights
    in backward nor return their gradients (the weight it was given had shape [0]). Here backward
    re-runs fn per tile through the modules' own forwards (ZeRO's pre-forward hooks gather the
    weights) under grad and calls torch.autograd.backward on the tile's output, so the weight
    gradients reach the parameters through ZeRO's own autograd functions and accumulate in
    param.grad (autograd sums the tiles in the parameter's dtype). `ds_grad_is_ready = False` on all
    tiles but the last tells ZeRO not to reduce a partial sum (what DeepSpeed's own
    runtime.sequence_parallel TiledMLP does). Nothing but x is an input that needs a gradient:
    `anchor` (an empty tensor requiring grad) makes the output require grad when x does not.
    """

    @staticmethod
    def forward(ctx, fn, tile, random, params, x, anchor):
        return _tiled_forward(ctx, fn, tile, random, x, params)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[4]
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = torch.empty_like(x2) if need_x else None
        tiles = _tiles(x2.shape[0], ctx.tile)
        try:
            for i, ((s, e), rng) in enumerate(zip(tiles, ctx.rngs)):
                for p in ctx.params:  # ZeRO reduces param.grad once, after the last tile has added to it
                    p.ds_grad_is_ready = i == len(tiles) - 1
                leaf = x2[s:e].detach().requires_grad_(need_x)
                with _rng_replay(rng, x.device), _amp_replay(ctx.amp), torch.enable_grad():
                    yt = ctx.fn(leaf)
                if yt.requires_grad:
                    torch.autograd.backward(yt, dy2[s:e].to(yt.dtype))
                if need_x:
                    dx[s:e] = leaf.grad if leaf.grad is not None else 0
        finally:
            for p in ctx.params:
                p.ds_grad_is_ready = True
        return (None, None, None, None, None if dx is None else dx.view(x.shape), None)


# ---- the dense MLP (split and packed forms) ---------------------------------------------

def dense_mlp(module: nn.Module, x, projections, down_proj, activation: str, backend: str, tile_tokens,
              post: nn.Module | None = None, out_mul: float | None = None):
    """down_proj(post(gate(...))) * out_mul with `projections` (gate_proj, up_proj) or (gate_up_proj,)."""
    y = _dense(module, x, projections, down_proj, activation, resolve_gate(backend, activation, x.device, x.dtype),
               tile_tokens, post)
    return y if out_mul is None else y * out_mul


def _dense(module, x, projections, down_proj, activation, backend, tile_tokens, post):
    def plain(x):
        h = glu(tuple(p(x) for p in projections), activation, backend)
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
        if zero3_partitioned(module.parameters()):
            anchor = None if x.requires_grad else x.new_empty(0).requires_grad_()
            return TiledZero3.apply(plain, tile, random, params, x, anchor)
        return TiledRecompute.apply(plain, tile, random, x, *params)
    if not torch.is_grad_enabled():
        return plain(x)
    return down_of_glu(down_proj, tuple(p(x) for p in projections), activation, backend, post)
