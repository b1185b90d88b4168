"""The gated unit  y = down_proj(act(gate) * up)  with its memory modes, for every MLP form.

`parts` is (gate, up), two (.., I) tensors, or (gate_up,), one packed (.., 2I) tensor with the gate
first; `glu(parts, ...)` is the fused op on either. What is saved for backward, per token (H hidden,
I intermediate; docs/ARCHITECTURE.md "Memory policy"):

  default   x, gate, up     H + 2I   h = act(gate) * up is recomputed in backward
  tiled     x               H        gate, up and h are recomputed per tile of tokens

Default mode, every projection a plain nn.Linear, eager, with or without autocast (the per-call plan's
common case): GatedMLP is the whole unit as one autograd node, saving x, gate and up, its backward
forming every linear's grads the way the next paragraph describes (one node instead of five: host time).
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

Tiled mode (tile_tokens=N or "auto", H per token) is swiglu_hf.tiled. Under torch.no_grad /
inference_mode every mode runs the plain fused forward: nothing is saved. Backwards recompute
through the ops.*_recompute twins when traced, so torch.compile's CSE cannot turn a recompute back
into a saved forward value.

The gate travels as a GateSpec in eager mode (never a key string parsed per call) and as its key
under tracing (torch.compile, fake-tensor modes), where the custom ops need a string.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from . import gate_spec, ops
from .activations import EAGER
from .backend import resolve
from .errors import HigherOrderGradError
from .gate_spec import GateSpec

glu = ops.glu  # act(gate) * up of (gate, up) or of (gate_up,); see ops.py for the eager fast path


def plain_linears(mods) -> bool:
    """Every module an nn.Linear whose forward is exactly F.linear(x, weight, bias), with its weight a
    registered parameter: safe to bypass (the global hooks are read once for all of them: host time)."""
    if (_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
            or _nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks):
        return False
    for m in mods:
        if (type(m) is not nn.Linear or "forward" in m.__dict__ or "weight" not in m._parameters
                or m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks):
            return False
    return True


def plain_linear(m: nn.Module) -> bool:
    return plain_linears((m,))


def linear(m: nn.Module, x):
    """m(x), with F.linear directly when m is a plain nn.Linear (no module-call machinery per call; its
    parameters read from _parameters, not through nn.Module.__getattr__: host time)."""
    if plain_linear(m):
        params = m._parameters
        return F.linear(x, params["weight"], params["bias"])
    return m(x)


# ---- linear backward, as stock autograd forms it ----------------------------------------

def _to(t, dtype):
    """t in dtype; no call at all when it already is (each no-op .to() is a dispatch: host time)."""
    return t if t.dtype == dtype else t.to(dtype)


def _flat(t):
    """(N, last) view of t: no call at all for a 2-D tensor (host time)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _linear_dinput(dy, weight, dtype):
    """d_inp = dy @ W of y = F.linear(inp, W, b), as stock autograd's mm forms it, in `dtype`
    (matmul folds the leading dims into one mm of (N, M) x (M, K), the call stock makes)."""
    return _to(dy.matmul(_to(weight, dy.dtype)), dtype)  # (.., K)


def _linear_dparams(dy, inp, need_weight: bool, need_bias: bool):
    """(dW, db) = (dy^T @ inp, dy.sum(0)) over the flattened (N, .) views, in dy's dtype."""
    dy2 = _flat(dy)  # (N, M)
    dw = dy2.t().mm(_to(_flat(inp), dy.dtype)) if need_weight else None  # (M, K)
    db = dy2.sum(0) if need_bias else None  # (M,)
    return dw, db


def _linear_bwd(dy, inp, weight, need_input: bool, need_weight: bool, need_bias: bool):
    """Grads of y = F.linear(inp, weight, bias): the mm calls stock autograd makes (see above).

    Operands are cast to dy's dtype first (what autocast did in forward), grads back to each's dtype.
    """
    d_inp = _linear_dinput(dy, weight, inp.dtype) if need_input else None
    return (d_inp, *_linear_dparams(dy, inp, need_weight, need_bias))


def _no_second_order(why: str) -> HigherOrderGradError:
    return HigherOrderGradError(
        f"a backward with create_graph=True (a second derivative) reached a patched MLP {why}; run that "
        "computation on the stock model (revert_swiglu_patch(model), or `with swiglu_hf.patch.suspended(model):`)")


def _first_order_only() -> None:
    """A node's backward runs in grad mode only under create_graph=True: its written-out ops would give a
    second derivative that is wrong or an error deep inside; say so instead."""
    if torch.is_grad_enabled():
        raise _no_second_order("whose backward is written out and not differentiable")


def _cast(grad, like):
    return None if grad is None or like is None else _to(grad, like.dtype)


# ---- default mode, plain down_proj ------------------------------------------------------

class GLUDown(torch.autograd.Function):
    """y = F.linear(glu(parts), W, b), saving the parts only (gate and up, or gate_up). `gate` is a
    GateSpec in eager mode, its key under tracing (see the module doc)."""

    @staticmethod
    def forward(ctx, weight, bias, gate, backend, *parts):
        # a GateSpec comes only from callers that just checked ops.eager_ok: the body runs directly
        h = ops.forward(parts, gate, backend) if type(gate) is GateSpec else glu(parts, gate, backend)
        ctx.save_for_backward(weight, *parts)
        ctx.gate, ctx.backend = gate, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(h, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        _first_order_only()
        weight, *parts = ctx.saved_tensors
        need_w, need_bias = ctx.needs_input_grad[:2]
        need_parts = any(ctx.needs_input_grad[4:])
        d_parts = [None] * len(parts)
        if need_parts:  # dh needs only W; h for dW comes out of the same pass as the part grads
            h, d_parts = ops.glu_grads_and_h(_linear_dinput(dy, weight, parts[0].dtype), parts, ctx.gate, ctx.backend)
        elif need_w:
            h = ops.glu_recompute(parts, ctx.gate, ctx.backend)
        dw, dbias = _linear_dparams(dy, h, need_w, need_bias) if (need_w or need_bias) else (None, None)
        dbias = None if dbias is None else _to(dbias, ctx.bias_dtype)
        return (_cast(dw, weight), dbias, None, None, *d_parts)


# ---- default mode, every projection a plain nn.Linear: the whole unit as one node ----------

class GatedMLP(torch.autograd.Function):
    """y = F.linear(gate(parts), W_d, b_d), parts = (F.linear(x, W_1, b_1), F.linear(x, W_2, b_2)) or,
    packed, (F.linear(x, W_1, b_1),) with W_2 None: the whole unit as one autograd node (eager, plain
    nn.Linear projections with plain parameters, x contiguous: the per-call plan in forms/dense.py checks
    that).

    Saves the parts (2I), x (H) when a projection weight needs its grad (as stock's linears do), and the
    parameters (aliases: no bytes). Backward recomputes h in the same pass as the part grads and forms
    every linear's grads with the mm calls stock autograd makes for a contiguous input (see above).
    x comes in twice, up's first: the engine then adds the two input grads into x's in the order stock's
    nodes deliver them (up_proj's node runs first), which matters when x feeds a third consumer (the
    residual of post-norm models: OLMo2, EXAONE-4): (r + dx_up) + dx_gate, bitwise stock. Under
    create_graph=True it differentiates a recompute with eager's ops instead (a second derivative).

    Under autocast it casts x and the parameters as autocast's linears do (floating, not float64, to
    autocast's dtype) and keeps the casts, as stock's linears keep theirs: one cast of x where stock
    keeps two (one per projection). Grads come back in each input's own dtype, as through stock's
    casts' backward.

    One node instead of three linears, the gate's nodes and saved-tensor hooks: a training call costs
    about stock's host time (docs/BENCHMARKS.md "Host overhead")."""

    @staticmethod
    def forward(ctx, x_up, x, spec, backend, w1, b1, w2, b2, wd, bd):  # x_up: x again, or None (packed)
        params = (w1, b1, w2, b2, wd, bd)
        ctx.dtypes = None
        if _any_autocast() and torch.is_autocast_enabled(x.device.type):
            low = torch.get_autocast_dtype(x.device.type)
            ctx.dtypes = (x.dtype, *(None if t is None else t.dtype for t in params))
            # autocast caches the cast of a leaf that requires grad: both projections then share one cast
            # of x, and their input grads meet in its dtype before the cast's backward
            ctx.one_x_cast = x.is_leaf and x.requires_grad and torch.is_autocast_cache_enabled()
            x, params = _autocast_cast(x, low), tuple(_autocast_cast(t, low) for t in params)
            w1, b1, w2, b2, wd, bd = params
        parts = (F.linear(x, w1, b1),) if w2 is None else (F.linear(x, w1, b1), F.linear(x, w2, b2))
        needs = ctx.needs_input_grad
        ctx.save_for_backward(x if needs[4] or needs[6] else None, *params, *parts)
        ctx.spec, ctx.backend = spec, backend
        return F.linear(ops.forward(parts, spec, backend), wd, bd)

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True
            return _gated_mlp_second_order(ctx, dy)
        x, w1, _, w2, _, wd, _, *parts = ctx.saved_tensors
        needs = ctx.needs_input_grad
        h, d_parts = ops.grads(dy.matmul(wd), parts, ctx.spec, ctx.backend, with_h=True)
        dx_up = d_parts[1].matmul(w2) if needs[0] else None
        dx = d_parts[0].matmul(w1) if needs[1] else None
        grads_1 = _linear_dparams(d_parts[0], x, needs[4], needs[5])
        grads_2 = (None, None) if w2 is None else _linear_dparams(d_parts[1], x, needs[6], needs[7])
        grads = (*grads_1, *grads_2, *_linear_dparams(dy, h, needs[8], needs[9]))
        if ctx.dtypes is not None:  # back through the casts, as stock's grads come back through autocast's
            if ctx.one_x_cast and dx_up is not None and dx is not None:
                dx_up, dx = None, dx_up + dx
            dx_up, dx = (None if d is None else _to(d, ctx.dtypes[0]) for d in (dx_up, dx))
            grads = tuple(None if g is None else _to(g, dt) for g, dt in zip(grads, ctx.dtypes[1:]))
        return (dx_up, dx, None, None, *grads)


def _autocast_cast(t, low):
    """t as autocast casts a linear's argument: floating and not float64, to `low`; else unchanged."""
    if t is None or not t.is_floating_point() or t.dtype in (low, torch.float64):
        return t
    return t.to(low)


# any device's autocast on: then the node asks for its device's (a cheap check first: every call)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: any(torch.is_autocast_enabled(t) for t in ("cpu", "cuda")))


def _gated_mlp_second_order(ctx, dy):
    """GatedMLP's grads as a differentiable function of its inputs (create_graph=True): the unit recomputed
    from x and the parameters with eager's ops, then differentiated with create_graph."""
    x, w1, b1, w2, b2, wd, bd, *_ = ctx.saved_tensors
    if ctx.dtypes is not None:
        raise _no_second_order("that ran under autocast (it kept the casts, not the inputs)")
    if x is None:
        raise _no_second_order("whose projection weights do not require grad, so its input was not kept")
    x_up, x_gate = (x.view_as(x) if w2 is not None else None), x.view_as(x)  # one grad per input slot
    first = F.linear(x_gate, w1, b1)
    halves = gate_spec.split_packed(first, ctx.spec) if w2 is None else (first, F.linear(x_up, w2, b2))
    y = F.linear(gate_spec.apply(ctx.spec, *halves), wd, bd)
    inputs = (x_up, x_gate, None, None, w1, b1, w2, b2, wd, bd)
    wanted = [i for i, (t, need) in enumerate(zip(inputs, ctx.needs_input_grad)) if need and t is not None]
    found = torch.autograd.grad(y, [inputs[i] for i in wanted], dy, create_graph=True, allow_unused=True)
    grads = [None] * len(inputs)
    for i, g in zip(wanted, found):
        grads[i] = g
    return tuple(grads)


# GatedMLP.apply without Function.apply's Python wrapper (it unwraps functorch's dead wrappers and binds
# setup_context arguments: neither applies where the per-call plan calls it, after ops.eager_ok() held,
# and the wrapper is host time on every training call). The wrapper where torch lacks the C entry point.
_c_apply = getattr(torch._C._FunctionBase, "__dict__", {}).get("apply")
gated_mlp = _c_apply.__get__(None, GatedMLP) if _c_apply is not None else GatedMLP.apply


# ---- default mode, any down_proj: h dropped by a saved-tensor hook ----------------------

class _Recomputed:
    """What a saved-tensor hook keeps instead of a dropped tensor: which recomputed result, and the view."""

    __slots__ = ("index", "size", "stride", "offset")

    def __init__(self, index: int, t: torch.Tensor):
        self.index, self.size, self.stride, self.offset = index, t.size(), t.stride(), t.storage_offset()


def _storage_id(t: torch.Tensor) -> int:
    """The storage's identity (its StorageImpl): also for meta and fake tensors, whose data_ptr is 0."""
    return t.untyped_storage()._cdata


class _DropSaved:
    """`with _DropSaved(parts, recompute) as drop:` within the block, a tensor saved for backward that
    shares the storage of the i-th tensor given to drop() is replaced by a recipe: on unpack,
    recompute(parts) runs once and its i-th result is viewed as the saved tensor was. Other tensors,
    and the parts the recipe holds, go through the enclosing saved-tensor hooks (checkpointing, byte
    accounting) as they would. A class, not a generator context manager: it runs on every patched
    call in grad mode (host time)."""

    __slots__ = ("_hooks", "_pending")

    def __init__(self, parts, recompute):
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        outer_pack, outer_unpack = outer if outer is not None else (None, None)
        dropped: dict = {}  # storage -> (index, dtype)
        # Autograd keeps both hooks as long as a saved tensor: the pack hook must not keep the parts
        # alive itself (under checkpointing only the outer hooks' handles may), so it reads them from a
        # list emptied when the block ends (no pack runs after that).
        pending = self._pending = [parts]
        packed_parts: list = []
        cache: list = []

        def pack(t):
            found = dropped.get(t.untyped_storage()._cdata) if dropped else None
            if found is not None and found[1] == t.dtype:
                if not packed_parts:
                    packed_parts.extend(outer_pack(p) if outer_pack else p for p in pending[0])
                return _Recomputed(found[0], t)
            return outer_pack(t) if outer_pack else t

        def unpack(saved):
            if type(saved) is not _Recomputed:
                return outer_unpack(saved) if outer_unpack else saved
            if not cache:
                cache.extend(recompute([outer_unpack(p) if outer_unpack else p for p in packed_parts]))
            return cache[saved.index].as_strided(saved.size, saved.stride, saved.offset)

        def drop(*tensors):
            for t in tensors:
                dropped[_storage_id(t)] = (len(dropped), t.dtype)

        self._hooks = (pack, unpack, drop)

    def __enter__(self):
        pack, unpack, drop = self._hooks
        torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)
        return drop

    def __exit__(self, *exc):
        torch._C._autograd._pop_saved_tensors_default_hooks()
        self._pending.clear()
        return False


def stock_ops_down(down_proj: nn.Module, parts, spec: GateSpec, post: nn.Module | None = None):
    """down_proj(post(act(gate) * up)) with stock's own ops and autograd (a plain spec, PyTorch path, eager),
    act and h dropped from what autograd saves and recomputed from gate and up in backward: H + 2I, bitwise
    stock, and no backward of ours in Python (stock's C++ autograd nodes run it)."""
    forward = EAGER[spec.activation][0]

    def recompute(real):
        gate, up = real if len(real) == 2 else gate_spec.split_packed(real[0], spec)
        act = forward(gate)
        return act, act * up

    gate, up = parts if len(parts) == 2 else gate_spec.split_packed(parts[0], spec)
    with _DropSaved(parts, recompute) as drop:
        act = forward(gate)
        drop(act)  # before the multiply saves it
        h = act * up
        drop(h)  # before down_proj (or post) saves it
        return linear(down_proj, h if post is None else post(h))


def down_of_glu(down_proj: nn.Module, parts, activation, backend: str, post: nn.Module | None = None):
    """down_proj(post(glu(parts))) in default mode: saves the parts (H + 2I), never h. `post` is a module
    between the gate and down_proj (BitNet's ffn_sub_norm); what it saves other than h it keeps.
    `activation`: a GateSpec or its key."""
    spec = ops.as_spec(activation) if ops.eager_ok(*parts) else None  # None: traced, the ops take keys
    if spec is not None and backend != "triton" and spec.plain:
        return stock_ops_down(down_proj, parts, spec, post)
    if post is None and plain_linear(down_proj):
        gate = ops.key_of(activation) if spec is None else spec
        return GLUDown.apply(down_proj.weight, down_proj.bias, gate, backend, *parts)
    h = glu(parts, activation, backend)

    def recompute(real):
        return (ops.glu_recompute(real, activation, backend),)

    with _DropSaved(parts, recompute) as drop:
        drop(h)
        return down_proj(h if post is None else post(h))


def resolve_gate(backend: str, activation, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs this gate: "auto" keeps gates the kernels do not implement on the PyTorch path."""
    ran = resolve(backend, device, dtype)
    return "torch" if ran == "triton" and not ops.kernel_gate(activation) else ran
