"""The fused op h = act(gate) * up as torch.library custom ops, with autograd and fake kernels.

Two forms share one implementation:
  glu(gate, up)   gate and up are separate tensors of equal shape (.., I)
  glu_packed(x)   x is (.., 2I) with the gate in the first half (Phi-3, the seed's chunk form), or
                  in the even columns for an interleaved spec (GPT-OSS); gate and up are read in
                  place, and the gradient is written into one (.., 2I) buffer in the same layout,
                  so neither direction copies a half.

`activation` is a gate-spec key (swiglu_hf.gate): a plain activation's name, or a spec with
clamps, alpha, up + 1, a multiplier or the interleaved layout. The Triton kernels run every spec.

`backend` ("triton" or "torch", already resolved by swiglu_hf.backend.resolve) picks the Triton
kernels (CUDA, or CPU under TRITON_INTERPRET=1) or the PyTorch path, which runs the same aten ops
eager autograd would, so it is bitwise equal to stock. Kernels launch under the tensors' own CUDA
device, so a model split across GPUs (device_map="auto") runs each layer on its GPU.
Autograd saves only the op's inputs and recomputes the activation in backward. Every backward
allocates fresh outputs: a second backward through a retained graph gives identical gradients.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from . import gate as gate_spec
from .activations import act_backward, act_forward
from .errors import BackendUnavailableError


def _rows(t: Tensor, col: int = 1) -> Tensor:
    """(.., n) -> (rows, n) with column stride 1 (or `col`, for interleaved views); a view whenever
    the layout allows it."""
    shape = (math.prod(t.shape[:-1]), t.shape[-1])  # explicit: view(-1, 0) is ambiguous
    if t.stride(-1) not in (1, col) and t.numel() > 1:
        t = t.contiguous()
    try:
        return t.view(shape)
    except RuntimeError:  # leading dims not mergeable (e.g. a transposed batch): copy once
        return t.reshape(shape)


def _halves(x: Tensor, activation: str = "") -> tuple[Tensor, Tensor]:
    """(gate, up) of a packed tensor: halves, or the even/odd columns of an interleaved spec."""
    if "|" in activation:
        return gate_spec.split_packed(x, gate_spec.parse(activation))
    n = x.shape[-1] // 2
    return x[..., :n], x[..., n:]


def kernel_gate(activation: str) -> bool:
    """Whether the Triton kernels implement this gate: every spec key (swiglu_hf.gate), plain or not."""
    if "|" not in activation:
        return activation in gate_spec.SPEC_ACTIVATIONS
    try:
        return gate_spec.parse(activation).activation in gate_spec.SPEC_ACTIVATIONS
    except (TypeError, ValueError):
        return False


def _plain(activation: str) -> bool:
    """A plain activation over halves: the PyTorch path runs it through activations.py."""
    return "|" not in activation and activation in gate_spec.ACTIVATIONS


def _kernel_spec(activation: str):
    """What kernels.glu_fwd / glu_bwd take: the name of a plain activation, else the GateSpec."""
    return activation if _plain(activation) else gate_spec.parse(activation)


def _interleaved(activation: str) -> bool:
    return "|" in activation and gate_spec.parse(activation).interleaved


def _col(activation: str) -> int:
    return 2 if _interleaved(activation) else 1


def _packed_rows(x: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """(gate, up) of a packed tensor as 2-D (rows, n) views: halves, or strided even/odd columns."""
    if _interleaved(activation):
        x2 = _rows(x)
        return x2[:, 0::2], x2[:, 1::2]
    return tuple(_rows(t) for t in _halves(x, activation))


def _on_device(t: Tensor):
    """Launch on t's GPU, not the current one (Triton launches on torch.cuda.current_device())."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_kernel_gate(activation: str) -> None:
    if not kernel_gate(activation):
        raise BackendUnavailableError(f"the Triton kernels do not implement the gate {activation!r}; use backend='torch' or 'auto'")


def _fwd_impl(gate: Tensor, up: Tensor, activation: str, backend: str) -> Tensor:
    """The split form: gate and up separate (any layout: copied to unit column stride if need be)."""
    if backend != "triton":
        return _torch_fwd(gate, up, activation)
    _check_kernel_gate(activation)
    return _triton_fwd(_rows(gate), _rows(up), gate.shape, activation)


def _packed_fwd(x: Tensor, activation: str, backend: str) -> Tensor:
    """The packed form: gate and up read in place from x, halves or interleaved."""
    if backend != "triton":
        return _torch_fwd(*_halves(x, activation), activation)
    _check_kernel_gate(activation)
    return _triton_fwd(*_packed_rows(x, activation), (*x.shape[:-1], x.shape[-1] // 2), activation)


def _torch_fwd(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    if not _plain(activation):
        return gate_spec.apply(gate_spec.parse(activation), gate, up)
    return act_forward(activation, gate) * up


def _triton_fwd(gate2d: Tensor, up2d: Tensor, shape, activation: str) -> Tensor:
    from . import kernels

    h = torch.empty(shape, dtype=gate2d.dtype, device=gate2d.device)
    with _on_device(gate2d):
        kernels.glu_fwd(gate2d, up2d, _rows(h), _kernel_spec(activation))
    return h


def _torch_bwd(dh, gate, up, activation: str, with_h: bool = False):
    """(dgate, dup) exactly as eager autograd forms them for act(gate) * up; with_h adds h."""
    if not _plain(activation):
        return gate_spec.backward(gate_spec.parse(activation), dh, gate, up, with_h=with_h)
    act = act_forward(activation, gate)
    grads = (act_backward(activation, dh * up, gate, act), dh * act)
    return (act * up, *grads) if with_h else grads


def _triton_bwd(dh, gate, up, dgate, dup, activation: str, h=None, col: int = 1) -> None:
    """Writes the grads of the gate into dgate and dup (fresh buffers or views of one). Split form:
    tensors of any layout (copied to unit column stride if need be); packed forms: 2-D views, of
    column stride `col` = 2 for an interleaved spec."""
    from . import kernels

    _check_kernel_gate(activation)
    with _on_device(gate):
        kernels.glu_bwd(_rows(dh), _rows(gate, col), _rows(up, col), _rows(dgate, col), _rows(dup, col),
                        _kernel_spec(activation), None if h is None else _rows(h))


def _packed_grad(x: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """A fresh (.., 2I) gradient buffer and its (dgate, dup) 2-D views in the spec's layout."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return (dx, *_packed_rows(dx, activation))


# ---- split form -------------------------------------------------------------------------

def _glu_fwd_impl(gate: Tensor, up: Tensor, activation: str, backend: str) -> Tensor:
    return _fwd_impl(gate, up, activation, backend)


def _glu_fake(gate, up, activation, backend):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


glu_fwd = torch.library.custom_op("swiglu_hf::glu_fwd", mutates_args=())(_glu_fwd_impl)

glu_fwd.register_fake(_glu_fake)


def _glu_bwd_impl(dh: Tensor, gate: Tensor, up: Tensor, activation: str, backend: str) -> tuple[Tensor, Tensor]:
    if backend != "triton":
        return _torch_bwd(dh, gate, up, activation)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    _triton_bwd(dh, gate, up, dgate, dup, activation)
    return dgate, dup


glu_bwd = torch.library.custom_op("swiglu_hf::glu_bwd", mutates_args=())(_glu_bwd_impl)

@glu_bwd.register_fake
def _(dh, gate, up, activation, backend):
    fmt = torch.contiguous_format
    return torch.empty_like(gate, memory_format=fmt), torch.empty_like(up, memory_format=fmt)


def _glu_setup(ctx, inputs, output):
    gate, up, ctx.activation, ctx.backend = inputs
    ctx.save_for_backward(gate, up)


def _glu_backward(ctx, dh):
    gate, up = ctx.saved_tensors
    dgate, dup = glu_bwd(dh, gate, up, ctx.activation, ctx.backend)
    return dgate, dup, None, None


glu_fwd.register_autograd(_glu_backward, setup_context=_glu_setup)


# ---- packed form ------------------------------------------------------------------------

def _glu_packed_fwd_impl(x: Tensor, activation: str, backend: str) -> Tensor:
    return _packed_fwd(x, activation, backend)


def _glu_packed_fake(x, activation, backend):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


glu_packed_fwd = torch.library.custom_op("swiglu_hf::glu_packed_fwd", mutates_args=())(_glu_packed_fwd_impl)

glu_packed_fwd.register_fake(_glu_packed_fake)


def _glu_packed_bwd_impl(dh: Tensor, x: Tensor, activation: str, backend: str) -> Tensor:
    if backend != "triton":
        if not _plain(activation):
            spec = gate_spec.parse(activation)
            return gate_spec.interleave(*gate_spec.backward(spec, dh, *_halves(x, activation)), spec)
        return torch.cat(_torch_bwd(dh, *_halves(x), activation), dim=-1)  # as stock's chunk backward
    dx, dgate, dup = _packed_grad(x, activation)
    _triton_bwd(dh, *_packed_rows(x, activation), dgate, dup, activation, col=_col(activation))
    return dx


glu_packed_bwd = torch.library.custom_op("swiglu_hf::glu_packed_bwd", mutates_args=())(_glu_packed_bwd_impl)

@glu_packed_bwd.register_fake
def _(dh, x, activation, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _packed_setup(ctx, inputs, output):
    x, ctx.activation, ctx.backend = inputs
    ctx.save_for_backward(x)


def _packed_backward(ctx, dh):
    (x,) = ctx.saved_tensors
    return glu_packed_bwd(dh, x, ctx.activation, ctx.backend), None, None


glu_packed_fwd.register_autograd(_packed_backward, setup_context=_packed_setup)


# ---- recompute twins (activation memory, swiglu_hf.gated) ---------------------------------
# The same forwards under other names, called only from the backward of swiglu_hf.gated's
# recomputing autograd Functions. Under torch.compile, AOTAutograd traces forward and backward
# into one joint graph and merges identical calls (CSE): a backward recompute of glu_fwd(gate, up)
# or of gate_proj's F.linear would become the forward's value again and the partitioner would
# save it, undoing the memory saving. Distinct, opaque ops keep the recompute in the backward.

def _glu_fwd_recompute_impl(gate: Tensor, up: Tensor, activation: str, backend: str) -> Tensor:
    return _fwd_impl(gate, up, activation, backend)


glu_fwd_recompute = torch.library.custom_op("swiglu_hf::glu_fwd_recompute", mutates_args=())(_glu_fwd_recompute_impl)

glu_fwd_recompute.register_fake(_glu_fake)


def _glu_packed_fwd_recompute_impl(x: Tensor, activation: str, backend: str) -> Tensor:
    return _packed_fwd(x, activation, backend)


glu_packed_fwd_recompute = torch.library.custom_op("swiglu_hf::glu_packed_fwd_recompute", mutates_args=())(_glu_packed_fwd_recompute_impl)

glu_packed_fwd_recompute.register_fake(_glu_packed_fake)


def _linear_recompute_impl(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(x, weight, bias)


linear_recompute = torch.library.custom_op("swiglu_hf::linear_recompute", mutates_args=())(_linear_recompute_impl)

@linear_recompute.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# Backward with h recomputed in the same pass: (h, dgate, dup) from (dh, gate, up) reads gate and
# up once, where a separate recompute forward and backward would read them twice. For the
# default memory mode, whose backward needs h only for down_proj's weight gradient.

def _glu_bwd_with_h_impl(dh: Tensor, gate: Tensor, up: Tensor, activation: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend != "triton":
        return _torch_bwd(dh, gate, up, activation, with_h=True)
    h, dgate, dup = (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) for _ in range(3))
    _triton_bwd(dh, gate, up, dgate, dup, activation, h=h)
    return h, dgate, dup


glu_bwd_with_h = torch.library.custom_op("swiglu_hf::glu_bwd_with_h", mutates_args=())(_glu_bwd_with_h_impl)

@glu_bwd_with_h.register_fake
def _(dh, gate, up, activation, backend):
    return tuple(torch.empty_like(gate, memory_format=torch.contiguous_format) for _ in range(3))


def _glu_packed_bwd_with_h_impl(dh: Tensor, x: Tensor, activation: str, backend: str) -> tuple[Tensor, Tensor]:
    if backend != "triton":
        if not _plain(activation):
            spec = gate_spec.parse(activation)
            h, d_gate, d_up = gate_spec.backward(spec, dh, *_halves(x, activation), with_h=True)
            return h, gate_spec.interleave(d_gate, d_up, spec)
        h, dgate, dup = _torch_bwd(dh, *_halves(x), activation, with_h=True)
        return h, torch.cat((dgate, dup), dim=-1)
    h = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)
    dx, dgate, dup = _packed_grad(x, activation)
    _triton_bwd(dh, *_packed_rows(x, activation), dgate, dup, activation, h=h, col=_col(activation))
    return h, dx


glu_packed_bwd_with_h = torch.library.custom_op("swiglu_hf::glu_packed_bwd_with_h", mutates_args=())(_glu_packed_bwd_with_h_impl)

@glu_packed_bwd_with_h.register_fake
def _(dh, x, activation, backend):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2)), torch.empty_like(x, memory_format=torch.contiguous_format)


# ---- eager fast path --------------------------------------------------------------------
# A torch.library custom op costs tens of microseconds of host time per call (schema parsing,
# dispatch, autograd registration), measured on CPU at 50-250 us for one tiny MLP call
# (docs/BENCHMARKS.md, "Host overhead"). The op is what torch.compile, FakeTensor modes and functorch
# need; plain eager execution does not. So when nothing traces or intercepts (no compile, no
# dispatch mode, no functorch transform, plain tensors), the same bodies run directly under a small
# autograd.Function; otherwise the custom ops run. Both give identical results.

def eager_ok(*tensors: Tensor) -> bool:
    return (
        not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._functorch.peek_interpreter_stack() is None
        and all(type(t) is Tensor for t in tensors)
    )


class _EagerGlu(torch.autograd.Function):
    """h = gate(parts) with the custom ops' bodies: saves the parts, recomputes in backward."""

    @staticmethod
    def forward(ctx, activation, backend, *parts):
        ctx.save_for_backward(*parts)
        ctx.activation, ctx.backend = activation, backend
        if len(parts) == 2:
            return _glu_fwd_impl(*parts, activation, backend)
        return _glu_packed_fwd_impl(parts[0], activation, backend)

    @staticmethod
    def backward(ctx, dh):
        parts = ctx.saved_tensors
        if len(parts) == 2:
            return (None, None, *_glu_bwd_impl(dh, *parts, ctx.activation, ctx.backend))
        return None, None, _glu_packed_bwd_impl(dh, parts[0], ctx.activation, ctx.backend)


def glu(parts, activation: str, backend: str) -> Tensor:
    """act(gate) * up of (gate, up) or of (gate_up,) (backend already resolved)."""
    if eager_ok(*parts):
        if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
            return _EagerGlu.apply(activation, backend, *parts)
        if len(parts) == 2:
            return _glu_fwd_impl(*parts, activation, backend)
        return _glu_packed_fwd_impl(parts[0], activation, backend)
    if len(parts) == 2:
        return glu_fwd(*parts, activation, backend)
    return glu_packed_fwd(parts[0], activation, backend)


def glu_recompute(parts, activation: str, backend: str) -> Tensor:
    """glu in a backward (no grad): the recompute twins under tracing, the bodies otherwise."""
    if len(parts) == 2:
        fn = _glu_fwd_recompute_impl if eager_ok(*parts) else glu_fwd_recompute
        return fn(*parts, activation, backend)
    fn = _glu_packed_fwd_recompute_impl if eager_ok(*parts) else glu_packed_fwd_recompute
    return fn(parts[0], activation, backend)


def glu_grads_and_h(dh: Tensor, parts, activation: str, backend: str):
    """(h, grads of parts) in one pass over gate and up."""
    eager = eager_ok(dh, *parts)
    if len(parts) == 2:
        fn = _glu_bwd_with_h_impl if eager else glu_bwd_with_h
        h, dgate, dup = fn(dh, *parts, activation, backend)
        return h, (dgate, dup)
    fn = _glu_packed_bwd_with_h_impl if eager else glu_packed_bwd_with_h
    h, dgate_up = fn(dh, parts[0], activation, backend)
    return h, (dgate_up,)
