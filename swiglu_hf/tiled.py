"""Tiled mode (tile_tokens=N or "auto"): the whole gated MLP a tile of tokens at a time, saving only x.

    forward:  y[tile] = down_proj(gate(gate_proj(x[tile]), up_proj(x[tile])))   for each tile of N tokens
    backward: per tile, recompute gate and up (2 GEMMs; down_proj's forward is not re-run), then the
              grads of the tile; weight gradients are summed over tiles and returned once

Saved for backward per token: H (x only), against H + 2I for the default mode (swiglu_hf.gated).

TiledMLP is for plain nn.Linear projections: it does the linear algebra itself, in the shapes stock
autograd uses, and accumulates the weight gradients over tiles in fp32 for 16-bit weights (a bf16 sum
of T/N partials would add a rounding per tile), returning each once, so DDP's per-parameter hooks fire
once per step. Projections that are not all plain nn.Linear use TiledRecompute: it re-runs the fused
forward per tile under grad and differentiates it (saves x only as well). Under DeepSpeed ZeRO-3
(partitioned parameters) TiledZero3 re-runs it per tile and back-propagates into the parameters
through ZeRO's own hooks instead of returning their gradients (see its doc). Dropout in the MLP:
each tile's RNG state is captured in forward and replayed in backward, as checkpointing does.

"auto" picks N so that one tile's gate + up takes about AUTO_TILE_BYTES:
    N = max(64, floor(AUTO_TILE_BYTES / (2 * I * itemsize) / 64) * 64)
e.g. I = 14336 in bf16 -> 1152 tokens.
Backwards recompute through the ops.*_recompute twins, so torch.compile's CSE cannot turn a recompute
back into a saved forward value.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .gated import _linear_bwd, _linear_dinput, _linear_dparams

AUTO_TILE_BYTES = 64 * 2**20  # one tile's gate + up
TILE_MULTIPLE = 64
AUTO_TILE_FALLBACK = 1024  # tokens, when the intermediate size cannot be read off the projection


def auto_tile_tokens(intermediate: int | None, itemsize: int) -> int:
    """Tokens per tile so that a tile's gate + up is about AUTO_TILE_BYTES (see the module doc)."""
    if not intermediate:
        return AUTO_TILE_FALLBACK
    n = AUTO_TILE_BYTES // (2 * intermediate * itemsize)
    return max(TILE_MULTIPLE, n // TILE_MULTIPLE * TILE_MULTIPLE)


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
    if not torch.amp.is_autocast_available(t):  # e.g. meta (swiglu-hf plan): no autocast to re-enter
        return t, False, None, torch.is_autocast_cache_enabled()
    return t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t), torch.is_autocast_cache_enabled()


def _amp_replay(state):
    t, enabled, dtype, cache = state
    if dtype is None:
        return contextlib.nullcontext()
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
            yt = F.linear(ops.glu(parts, activation, backend), wd, bd)  # (n, H)
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
            h, d_parts = ops.glu_grads_and_h(dh, parts, ctx.activation, ctx.backend)
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
