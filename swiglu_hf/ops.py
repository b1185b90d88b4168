"""The fused op h = act(gate) * up as torch.library custom ops, with autograd and fake kernels.

Two forms share one implementation:
  glu(gate, up)   gate and up are separate tensors of equal shape (.., I)
  glu_packed(x)   x is (.., 2I) with the gate in the first half (Phi-3, the seed's chunk form), or
                  in the even columns for an interleaved spec (GPT-OSS); gate and up are read in
                  place, and the gradient is written into one (.., 2I) buffer in the same layout,
                  so neither direction copies a half.

The gate is a GateSpec (swiglu_hf.gate_spec): a plain activation, or a spec with clamps, alpha, up + 1, a
multiplier or the interleaved layout; the Triton kernels run every spec. The eager path passes the
spec object down; the custom ops take its key() string (their schemas have no GateSpec) and parse it
back through a cache.

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

from . import gate_spec
from .activations import EAGER
from .errors import BackendUnavailableError
from .gate_spec import GateSpec


def as_spec(activation: GateSpec | str) -> GateSpec:
    """A GateSpec from a spec or its key (parsed once per key: gate.parse is cached)."""
    return activation if isinstance(activation, GateSpec) else gate_spec.parse(activation)


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


def key_of(activation: GateSpec | str) -> str:
    """The spec's key: what the custom ops take (under tracing the forms pass keys, never parsed)."""
    return activation if isinstance(activation, str) else activation.key()


def kernel_gate(activation: GateSpec | str) -> bool:
    """Whether the Triton kernels implement this gate: every spec (swiglu_hf.gate_spec), plain or not."""
    if isinstance(activation, str) and "|" not in activation:  # a plain name: no parse (traced code calls this)
        return activation in gate_spec.SPEC_ACTIVATIONS
    try:
        return as_spec(activation).activation in gate_spec.SPEC_ACTIVATIONS
    except (TypeError, ValueError):
        return False


def _kernel_spec(spec: GateSpec):
    """What kernels.glu_fwd / glu_bwd take: the name of a plain activation, else the GateSpec."""
    return spec.activation if spec.plain else spec


def _packed_rows(x: Tensor, spec: GateSpec) -> tuple[Tensor, Tensor]:
    """(gate, up) of a packed tensor as 2-D (rows, n) views: halves, or strided even/odd columns."""
    if spec.interleaved:
        x2 = _rows(x)
        return x2[:, 0::2], x2[:, 1::2]
    return tuple(_rows(t) for t in gate_spec.split_packed(x, spec))


def _on_device(t: Tensor):
    """Launch on t's GPU, not the current one (Triton launches on torch.cuda.current_device())."""
    return torch.cuda.device(t.device) if t.is_cuda and t.device.index != torch.cuda.current_device() \
        else contextlib.nullcontext()


def _check_kernel_gate(spec: GateSpec) -> None:
    if not kernel_gate(spec):
        raise BackendUnavailableError(f"the Triton kernels do not implement the gate {spec.key()!r}; use backend='torch' or 'auto'")


# ---- the bodies: parts = (gate, up) or (gate_up,), a GateSpec, a resolved backend ------------

def forward(parts, spec: GateSpec, backend: str) -> Tensor:
    """h = the spec's gate of the parts. PyTorch path: eager's ops (gate.apply); Triton: one kernel,
    gate and up read in place (split: copied to unit column stride if need be)."""
    if backend != "triton":
        gate, up = parts if len(parts) == 2 else gate_spec.split_packed(parts[0], spec)
        if spec.plain:  # eager's act_fn(gate) * up; h written into act's buffer (ours, temporary: host time)
            act = EAGER[spec.activation][0](gate)
            same = act.dtype == up.dtype and act.shape == up.shape  # else promotion or broadcasting: a new tensor
            return act.mul_(up) if same else act * up
        return gate_spec.apply(spec, gate, up)
    from . import kernels

    _check_kernel_gate(spec)
    if len(parts) == 2:
        gate2d, up2d, shape = _rows(parts[0]), _rows(parts[1]), parts[0].shape
    else:
        x = parts[0]
        (gate2d, up2d), shape = _packed_rows(x, spec), (*x.shape[:-1], x.shape[-1] // 2)
    h = torch.empty(shape, dtype=gate2d.dtype, device=gate2d.device)
    with _on_device(gate2d):
        kernels.glu_fwd(gate2d, up2d, _rows(h), _kernel_spec(spec))
    return h


def grads(dh: Tensor, parts, spec: GateSpec, backend: str, with_h: bool = False):
    """(h or None, grads of the parts) exactly as eager autograd forms them (gate.backward); with_h also
    returns h from the same pass over gate and up. Every call allocates fresh outputs."""
    packed = len(parts) == 1
    if backend != "triton":
        halves = gate_spec.split_packed(parts[0], spec) if packed else parts
        out = gate_spec.backward(spec, dh, *halves, with_h=with_h)
        h, d = (out[0], out[1:]) if with_h else (None, out)
        return h, ((gate_spec.interleave(*d, spec),) if packed else d)
    from . import kernels

    _check_kernel_gate(spec)
    first = parts[0]
    if packed:
        dx = torch.empty(first.shape, dtype=first.dtype, device=first.device)
        (gate, up), (dgate, dup) = _packed_rows(first, spec), _packed_rows(dx, spec)
        col, d = (2 if spec.interleaved else 1), (dx,)
        h_shape = (*first.shape[:-1], first.shape[-1] // 2)
    else:
        (gate, up), col = parts, 1
        dgate, dup = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in parts)
        d, h_shape = (dgate, dup), first.shape
    h = torch.empty(h_shape, dtype=first.dtype, device=first.device) if with_h else None
    with _on_device(first):
        kernels.glu_bwd(_rows(dh), _rows(gate, col), _rows(up, col), _rows(dgate, col), _rows(dup, col),
                        _kernel_spec(spec), None if h is None else _rows(h))
    return h, d


# ---- split form -------------------------------------------------------------------------

def _glu_fwd_impl(gate: Tensor, up: Tensor, activation: str, backend: str) -> Tensor:
    return forward((gate, up), as_spec(activation), backend)


def _glu_fake(gate, up, activation, backend):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


glu_fwd = torch.library.custom_op("swiglu_hf::glu_fwd", mutates_args=())(_glu_fwd_impl)

glu_fwd.register_fake(_glu_fake)


def _glu_bwd_impl(dh: Tensor, gate: Tensor, up: Tensor, activation: str, backend: str) -> tuple[Tensor, Tensor]:
    return grads(dh, (gate, up), as_spec(activation), backend)[1]


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
    return forward((x,), as_spec(activation), backend)


def _glu_packed_fake(x, activation, backend):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


glu_packed_fwd = torch.library.custom_op("swiglu_hf::glu_packed_fwd", mutates_args=())(_glu_packed_fwd_impl)

glu_packed_fwd.register_fake(_glu_packed_fake)


def _glu_packed_bwd_impl(dh: Tensor, x: Tensor, activation: str, backend: str) -> Tensor:
    return grads(dh, (x,), as_spec(activation), backend)[1][0]


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
    return forward((gate, up), as_spec(activation), backend)


glu_fwd_recompute = torch.library.custom_op("swiglu_hf::glu_fwd_recompute", mutates_args=())(_glu_fwd_recompute_impl)

glu_fwd_recompute.register_fake(_glu_fake)


def _glu_packed_fwd_recompute_impl(x: Tensor, activation: str, backend: str) -> Tensor:
    return forward((x,), as_spec(activation), backend)


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
    h, (dgate, dup) = grads(dh, (gate, up), as_spec(activation), backend, with_h=True)
    return h, dgate, dup


glu_bwd_with_h = torch.library.custom_op("swiglu_hf::glu_bwd_with_h", mutates_args=())(_glu_bwd_with_h_impl)

@glu_bwd_with_h.register_fake
def _(dh, gate, up, activation, backend):
    return tuple(torch.empty_like(gate, memory_format=torch.contiguous_format) for _ in range(3))


def _glu_packed_bwd_with_h_impl(dh: Tensor, x: Tensor, activation: str, backend: str) -> tuple[Tensor, Tensor]:
    h, (dx,) = grads(dh, (x,), as_spec(activation), backend, with_h=True)
    return h, dx


glu_packed_bwd_with_h = torch.library.custom_op("swiglu_hf::glu_packed_bwd_with_h", mutates_args=())(_glu_packed_bwd_with_h_impl)

@glu_packed_bwd_with_h.register_fake
def _(dh, x, activation, backend):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2)), torch.empty_like(x, memory_format=torch.contiguous_format)


# ---- eager fast path --------------------------------------------------------------------
# A torch.library custom op costs tens of microseconds of host time per call (schema parsing,
# dispatch, autograd registration). The op is what torch.compile, FakeTensor modes and functorch
# need; plain eager execution does not. So when nothing traces or intercepts (no compile, no
# dispatch mode, no functorch transform, plain tensors), the bodies above run directly, with the
# GateSpec object (never a key to parse), under a small autograd.Function; otherwise the custom
# ops run with the spec's key. Both give identical results.

_is_compiling = torch.compiler.is_compiling  # bound once: eager_mode runs on every patched call (host time)
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_level = torch._C._functorch.peek_interpreter_stack


def eager_mode() -> bool:
    """Not tracing: no torch.compile, no dispatch mode, no functorch transform."""
    return not _is_compiling() and _dispatch_modes() == 0 and _functorch_level() is None


def eager_ok(*tensors: Tensor) -> bool:
    """eager_mode() and every tensor a plain Tensor: the bodies can run directly."""
    return eager_mode() and all(type(t) is Tensor for t in tensors)


class _EagerGlu(torch.autograd.Function):
    """h = gate(parts) with the bodies above: saves the parts, recomputes in backward."""

    @staticmethod
    def forward(ctx, spec, backend, *parts):
        ctx.save_for_backward(*parts)
        ctx.spec, ctx.backend = spec, backend
        return forward(parts, spec, backend)

    @staticmethod
    def backward(ctx, dh):
        return (None, None, *grads(dh, ctx.saved_tensors, ctx.spec, ctx.backend)[1])


def glu(parts, activation: GateSpec | str, backend: str) -> Tensor:
    """act(gate) * up of (gate, up) or of (gate_up,) (backend already resolved)."""
    if eager_ok(*parts):
        spec = as_spec(activation)
        if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
            return _EagerGlu.apply(spec, backend, *parts)
        return forward(parts, spec, backend)
    if len(parts) == 2:
        return glu_fwd(*parts, key_of(activation), backend)
    return glu_packed_fwd(parts[0], key_of(activation), backend)


def glu_recompute(parts, activation: GateSpec | str, backend: str) -> Tensor:
    """glu in a backward (no grad): the recompute twins under tracing, the bodies otherwise."""
    if eager_ok(*parts):
        return forward(parts, as_spec(activation), backend)
    if len(parts) == 2:
        return glu_fwd_recompute(*parts, key_of(activation), backend)
    return glu_packed_fwd_recompute(parts[0], key_of(activation), backend)


def glu_grads_and_h(dh: Tensor, parts, activation: GateSpec | str, backend: str):
    """(h, grads of parts) in one pass over gate and up."""
    if eager_ok(dh, *parts):
        return grads(dh, parts, as_spec(activation), backend, with_h=True)
    if len(parts) == 2:
        h, dgate, dup = glu_bwd_with_h(dh, *parts, key_of(activation), backend)
        return h, (dgate, dup)
    h, dgate_up = glu_packed_bwd_with_h(dh, parts[0], key_of(activation), backend)
    return h, (dgate_up,)
