"""Triton kernels for the gated-MLP elementwise step  h = act(gate) * up  and its backward.

Forward, per element, in the order eager PyTorch rounds (dtype = the input dtype):

    a  = round_dtype(act(float32(gate)))            # stock: act_fn(gate) returns a dtype tensor
    h  = round_dtype(a * float32(up))               # stock: dtype * dtype multiply

Backward, recomputing the activation from the saved gate and up (act(gate) is not saved):

    du    = round_dtype(dh * a)                     # grad of the `* up` input
    dact  = round_dtype(dh * float32(up))           # grad flowing into act_fn
    dgate = round_dtype(act'(dact, gate))           # aten::silu_backward & co., fp32 inside; except
                                                    # sigmoid_backward, whose CUDA kernel rounds each
                                                    # step in fp16/bf16 (see below)

The same kernels run every gate spec (swiglu_hf.gate_spec.GateSpec: multiplier, clamps, relu2,
silu_alpha, up + 1, interleaved), each step rounded where the eager op that computes it returns a
dtype tensor; the step-by-step forward and backward are tabled in docs/ARCHITECTURE.md "The gate spec
in the kernels" (and written out in swiglu_hf.gate_spec.apply / backward, the PyTorch path).

Absent fields are constexpr None (and UP_PLUS_ONE a constexpr bool), so a plain activation
compiles to the code it had before specs existed (sigmoid's backward now rounds its steps as
CUDA's sigmoid_backward does); present ones are fp32 runtime arguments,
one compiled kernel for every value of a limit or multiplier.

With ACCURATE (compiled on a GPU) the transcendentals are libdevice's expf/erff/tanhf and the
division is IEEE round-to-nearest, the same functions eager CUDA uses, and the `a + b*c` forms
that nvcc contracts into FMAs are written as `tl.fma`: that is what makes a bf16/fp16 forward
bitwise equal to the stock module. The Triton CPU interpreter cannot call libdevice, so there
ACCURATE is off and the plain `tl` functions run (ulp-level differences, tested by tolerance).
In fp32 the rounding steps are no-ops and LLVM may contract silu_alpha's `dact * s + ...` into one
FMA (eager adds two rounded tensors): fp32 is claimed to eager's accuracy, not bitwise.

Tensors are addressed as (rows, cols) with a row stride and unit column stride, so the two halves
of a packed [.., 2I] gate_up are read in place. An interleaved spec's gate and up are the even and
odd columns of the packed tensor (COL = 2): the kernels load a contiguous (BLOCK_M, 2 BLOCK_N)
tile of it and split it in registers (tl.split), and join dgate/dup into one contiguous store of
the packed gradient, so every access stays 128-bit wide, in place, with no copy. Row offsets are
int64.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .activations import KERNEL_IDS

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ACT_IDS = KERNEL_IDS  # the ACT constexpr of _act_fwd/_act_bwd/_gate_act (the table in swiglu_hf.activations)

# Compile options of every launch (the interpreter ignores them); tools/compile_check.py compiles with
# exactly these. enable_fp_fusion=True (eager's nvcc contracts too; the contractions stock depends on
# are explicit tl.fma) and enable_reflect_ftz=False (keep denormals, as eager): why, measured in SASS,
# in docs/ARCHITECTURE.md "Compile options".
LAUNCH_OPTIONS = {"num_warps": 4, "enable_fp_fusion": True}
if torch.version.hip is None:
    LAUNCH_OPTIONS["enable_reflect_ftz"] = False

# Globals read inside @triton.jit must be tl.constexpr: the GPU compiler rejects plain Python
# floats (NameError "Cannot access global variable"); the CPU interpreter accepts either. Each
# Python float is rounded to fp32 where it meets an fp32 operand, exactly as a literal would be.
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # M_SQRT1_2
_GELU_ERF_PDF = tl.constexpr(0.3989422804014327)  # M_2_SQRTPI * M_SQRT1_2 * 0.5 = 1/sqrt(2 pi)
_GELU_TANH_BETA = tl.constexpr(0.7978845608028654)  # M_SQRT2 * M_2_SQRTPI * 0.5 = sqrt(2/pi)
_GELU_TANH_KAPPA = tl.constexpr(0.044715)
_GELU_TANH_3KAPPA = tl.constexpr(0.13414499163627625)  # eager's opmath_t(3) * kKappa, rounded in fp32 (not 3 * 0.044715 in double)


@triton.jit
def _exp(x, ACCURATE: tl.constexpr):
    if ACCURATE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _erf(x, ACCURATE: tl.constexpr):
    if ACCURATE:
        return libdevice.erf(x)
    else:
        return tl.erf(x)


@triton.jit
def _tanh(x, ACCURATE: tl.constexpr):
    if ACCURATE:
        return libdevice.tanh(x)
    else:  # no tanh in the interpreter: exp form, plus a series near 0 where 1 - e cancels
        e = tl.exp(-2.0 * tl.abs(x))
        big = (1.0 - e) / (1.0 + e)
        x2 = x * x
        small = tl.abs(x) * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 - x2 * (17.0 / 315.0))))
        t = tl.where(tl.abs(x) < 0.125, small, big)
        return tl.where(x < 0.0, -t, t)


@triton.jit
def _act_fwd(g, ACT: tl.constexpr, ACCURATE: tl.constexpr):
    """Activation of fp32 `g`, as eager CUDA computes it in opmath (fp32)."""
    if ACT == 0:  # silu: x / (1 + exp(-x))
        return tl.div_rn(g, 1.0 + _exp(-g, ACCURATE))
    elif ACT == 1:  # gelu (erf): x * 0.5 * (1 + erf(x * M_SQRT1_2))
        return g * 0.5 * (1.0 + _erf(g * _SQRT1_2, ACCURATE))
    elif ACT == 2:  # gelu (tanh): 0.5 * x * (1 + tanh(beta * (x + kappa * x^3)))
        inner = _GELU_TANH_BETA * tl.fma(_GELU_TANH_KAPPA, g * g * g, g)
        return 0.5 * g * (1.0 + _tanh(inner, ACCURATE))
    elif ACT == 3:  # sigmoid: 1 / (1 + exp(-x))
        return tl.div_rn(1.0, 1.0 + _exp(-g, ACCURATE))
    else:  # relu; NaN passes through as in torch.relu
        return tl.where(g < 0.0, 0.0, g)


@triton.jit
def _act_bwd(d, g, a, ACT: tl.constexpr, ACCURATE: tl.constexpr):
    """d(act)/d(gate) * d, all fp32; `a` is the activation already rounded to the input dtype."""
    if ACT == 0:  # aten silu_backward: dy * s * (1 + x * (1 - s))
        s = tl.div_rn(1.0, 1.0 + _exp(-g, ACCURATE))
        return d * s * tl.fma(g, 1.0 - s, 1.0)
    elif ACT == 1:  # aten gelu_backward: dy * (cdf + x * pdf)
        cdf = 0.5 * (1.0 + _erf(g * _SQRT1_2, ACCURATE))
        pdf = _exp(-0.5 * g * g, ACCURATE) * _GELU_ERF_PDF
        return d * tl.fma(g, pdf, cdf)
    elif ACT == 2:  # aten gelu_backward(approximate="tanh")
        g_sq = g * g
        inner = _GELU_TANH_BETA * tl.fma(_GELU_TANH_KAPPA, g_sq * g, g)
        t = _tanh(inner, ACCURATE)
        left = 0.5 * g
        right = 1.0 + t
        left_derivative = 0.5 * right
        right_derivative = left * tl.fma(-t, t, 1.0)
        inner_derivative = _GELU_TANH_BETA * tl.fma(_GELU_TANH_3KAPPA, g_sq, 1.0)
        return d * tl.fma(right_derivative, inner_derivative, left_derivative)
    else:  # relu (sigmoid, ACT 3, is _sigmoid_bwd): aten threshold_backward(dy, relu(x), 0)
        return tl.where(a <= 0.0, 0.0, d)


# ---- gate spec steps: each an identity when its field is None (a constexpr), see the docstring --

@triton.jit
def _round(x, dtype: tl.constexpr):
    """x rounded to dtype, back in fp32 (a Python float in the interpreter: tl.cast makes it fp32 first)."""
    return tl.cast(x, dtype).to(tl.float32)


@triton.jit
def _scale(g, gate_mul, dtype: tl.constexpr):
    if gate_mul is not None:  # eager: dtype tensor * Python float, in fp32 with the scalar as fp32
        g = _round(g * gate_mul, dtype)
    return g


@triton.jit
def _clamp_max(g, gate_max, dtype: tl.constexpr):
    if gate_max is not None:  # aten clamp: bound rounded to dtype, NaN passes
        hi = _round(gate_max, dtype)
        g = tl.where(g > hi, hi, g)
    return g


@triton.jit
def _clamp_sym(u, up_limit, dtype: tl.constexpr):
    if up_limit is not None:
        lim = _round(up_limit, dtype)
        u = tl.where(u < -lim, -lim, tl.where(u > lim, lim, u))
    return u


@triton.jit
def _gate_act(g, alpha, dtype: tl.constexpr, ACT: tl.constexpr, ACCURATE: tl.constexpr):
    """act(g) rounded to dtype, as the dtype tensor eager's activation returns."""
    if ACT == 5:  # relu2: square(relu(g)), pow's base * base
        r = tl.where(g < 0.0, 0.0, g)
        return _round(r * r, dtype)
    elif ACT == 6:  # silu_alpha: g * sigmoid(g * alpha), three dtype tensors
        s = _round(_act_fwd(_round(g * alpha, dtype), 3, ACCURATE), dtype)
        return _round(g * s, dtype)
    else:
        return _act_fwd(g, ACT, ACCURATE).to(dtype).to(tl.float32)


@triton.jit
def _sigmoid_bwd(q, s, dtype: tl.constexpr):
    """aten sigmoid_backward(q, s) = q * (1 - s) * s, to be rounded to dtype. CUDA computes it in
    scalar_t arithmetic (each op rounded to fp16/bf16, unlike the opmath kernels), and so does CPU
    for fp16; for fp32 the roundings are identities."""
    return _round(q * _round(1.0 - s, dtype), dtype) * s


@triton.jit
def _gate_act_bwd(d, g, a, alpha, dtype: tl.constexpr, ACT: tl.constexpr, ACCURATE: tl.constexpr):
    """Gradient into the activation's input, in fp32, to be rounded to dtype (gate.backward's ops)."""
    if ACT == 5:  # pow_backward then threshold_backward(d * round(2 r), r, 0)
        r = tl.where(g < 0.0, 0.0, g)
        return tl.where(r <= 0.0, 0.0, _round(d * _round(2.0 * r, dtype), dtype))
    elif ACT == 6:  # d * s + sigmoid_backward(d * g, s) * alpha: the two paths into g, each rounded
        s = _round(_act_fwd(_round(g * alpha, dtype), 3, ACCURATE), dtype)
        sb = _sigmoid_bwd(_round(d * g, dtype), s, dtype)
        return _round(d * s, dtype) + _round(_round(sb, dtype) * alpha, dtype)
    elif ACT == 3:
        return _sigmoid_bwd(d, a, dtype)
    else:
        return _act_bwd(d, g, a, ACT, ACCURATE)


@triton.jit
def _load_gate_up(gate_ptr, up_ptr, r, c, M, N, stride_g, stride_u, mask,
                  COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The gate and up tiles in fp32. COL == 2 (interleaved): gate_ptr is the packed row's start
    (up_ptr = gate_ptr + 1, unused); one contiguous (BLOCK_M, 2 BLOCK_N) load, split into the even
    (gate) and odd (up) columns, so the accesses stay 128-bit wide."""
    if COL == 1:
        g = tl.load(gate_ptr + r * stride_g + c, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + r * stride_u + c, mask=mask, other=0.0).to(tl.float32)
    else:
        c2 = (tl.program_id(1) * (2 * BLOCK_N) + tl.arange(0, 2 * BLOCK_N))[None, :]
        x = tl.load(gate_ptr + r * stride_g + c2, mask=(r < M) & (c2 < 2 * N), other=0.0)
        g, u = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_N, 2)))
        g = g.to(tl.float32)
        u = u.to(tl.float32)
    return g, u


@triton.jit
def _store_interleaved(ptr, r, M, N, stride, even, odd, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 even/odd (BLOCK_M, BLOCK_N) tiles, rounded to ptr's dtype, into the even/odd columns of a
    packed (M, 2N) tensor, one contiguous store."""
    c2 = (tl.program_id(1) * (2 * BLOCK_N) + tl.arange(0, 2 * BLOCK_N))[None, :]
    x = tl.reshape(tl.join(even, odd), (BLOCK_M, 2 * BLOCK_N)).to(ptr.dtype.element_ty)  # joined in fp32: no 16-bit shuffles
    tl.store(ptr + r * stride + c2, x, mask=(r < M) & (c2 < 2 * N))


@triton.jit
def _glu_fwd_kernel(
    gate_ptr,  # (M, N), row stride stride_g, unit column stride; COL == 2: the packed (M, 2N) rows
    up_ptr,  # (M, N), row stride stride_u, unit column stride; COL == 2: unused (gate_ptr + 1)
    h_ptr,  # (M, N) output, row stride stride_h, unit column stride
    M, N, stride_g, stride_u, stride_h,
    alpha, gate_mul, gate_max, up_limit,  # fp32, or None (constexpr) when the spec has no such field
    ACT: tl.constexpr, ACCURATE: tl.constexpr, UP_PLUS_ONE: tl.constexpr, COL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    r = rows[:, None]
    c = cols[None, :]
    g, u = _load_gate_up(gate_ptr, up_ptr, r, c, M, N, stride_g, stride_u, mask, COL, BLOCK_M, BLOCK_N)
    dtype = h_ptr.dtype.element_ty
    g = _clamp_max(_scale(g, gate_mul, dtype), gate_max, dtype)
    u = _clamp_sym(u, up_limit, dtype)
    a = _gate_act(g, alpha, dtype, ACT, ACCURATE)
    if UP_PLUS_ONE:
        u = _round(u + 1.0, dtype)
    tl.store(h_ptr + r * stride_h + c, (a * u).to(dtype), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    dh_ptr,  # (M, N) upstream gradient, row stride stride_dh, unit column stride
    gate_ptr,  # (M, N) saved gate, row stride stride_g; COL == 2: the packed (M, 2N) rows, as forward
    up_ptr,  # (M, N) saved up, row stride stride_u; COL == 2: unused (gate_ptr + 1)
    dgate_ptr,  # (M, N) output, row stride stride_dg (may be the first half of a packed grad);
    #             COL == 2: the packed (M, 2N) gradient, dgate and dup interleaved
    dup_ptr,  # (M, N) output, row stride stride_du (may be the second half); COL == 2: unused
    h_ptr,  # (M, N) output h = act(gate) * up, row stride stride_h; written only if STORE_H
    M, N, stride_dh, stride_g, stride_u, stride_dg, stride_du, stride_h,
    alpha, gate_mul, gate_max, up_limit,  # fp32, or None (constexpr) when the spec has no such field
    ACT: tl.constexpr, ACCURATE: tl.constexpr, UP_PLUS_ONE: tl.constexpr, COL: tl.constexpr,
    STORE_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    r = rows[:, None]
    c = cols[None, :]
    dh = tl.load(dh_ptr + r * stride_dh + c, mask=mask, other=0.0).to(tl.float32)
    g, u = _load_gate_up(gate_ptr, up_ptr, r, c, M, N, stride_g, stride_u, mask, COL, BLOCK_M, BLOCK_N)
    dtype = dgate_ptr.dtype.element_ty
    g1 = _scale(g, gate_mul, dtype)
    gc = _clamp_max(g1, gate_max, dtype)
    u1 = _clamp_sym(u, up_limit, dtype)
    a = _gate_act(gc, alpha, dtype, ACT, ACCURATE)
    if UP_PLUS_ONE:
        u1 = _round(u1 + 1.0, dtype)
    dact = (dh * u1).to(dtype).to(tl.float32)
    if STORE_H and COL == 1:  # the recomputed forward output, for down_proj's weight gradient
        tl.store(h_ptr + r * stride_h + c, (a * u1).to(dtype), mask=mask)
    # (each store's address before its value, the order of the plain kernels before specs: the
    # same PTX for them, instruction for instruction)
    if COL == 1:
        dup_offsets = dup_ptr + r * stride_du + c
    du = dh * a
    if up_limit is not None:  # clamp's backward: zero outside [-lim, lim] and where up is NaN
        lim = _round(up_limit, dtype)
        du = tl.where((u >= -lim) & (u <= lim), du, 0.0)
    if COL == 1:
        tl.store(dup_offsets, du.to(dtype), mask=mask)
        dgate_offsets = dgate_ptr + r * stride_dg + c
    dg = _gate_act_bwd(dact, gc, a, alpha, dtype, ACT, ACCURATE)
    if gate_max is not None:
        dg = tl.where(g1 <= _round(gate_max, dtype), dg, 0.0)
    if gate_mul is not None:
        dg = _round(dg, dtype) * gate_mul
    if COL == 1:
        tl.store(dgate_offsets, dg.to(dtype), mask=mask)
    else:  # dgate_ptr is the packed gradient's row start (dup_ptr = dgate_ptr + 1, unused)
        _store_interleaved(dgate_ptr, r, M, N, stride_dg, dg, du, BLOCK_M, BLOCK_N)
        if STORE_H:  # last here: stored before the joined gradient, ptxas spilled (fp16/bf16 relu)
            tl.store(h_ptr + r * stride_h + c, (a * u1).to(dtype), mask=mask)


@functools.lru_cache(maxsize=None)
def _blocks(n_cols: int) -> tuple[int, int]:
    # A tile of ~2K elements keeps a memory-bound elementwise kernel at full bandwidth on
    # current GPUs; the interpreter pays per program, so there it gets 16K-element tiles.
    tile = 16384 if INTERPRET else 2048
    block_n = min(triton.next_power_of_2(max(n_cols, 1)), tile)
    return max(1, tile // block_n), block_n


@functools.lru_cache(maxsize=None)
def spec_args(spec) -> dict:
    """The kernels' spec arguments: `spec` is a plain activation name or a GateSpec (read by its
    fields). Absent fields are None. Cached per spec (launch-path host time); callers must not mutate."""
    if isinstance(spec, str):
        return {"alpha": None, "gate_mul": None, "gate_max": None, "up_limit": None,
                "ACT": ACT_IDS[spec], "UP_PLUS_ONE": False}

    def number(v):
        return None if v is None else float(v)

    if spec.activation == "silu_alpha" and spec.alpha is None:
        raise ValueError("silu_alpha needs alpha")
    return {"alpha": number(spec.alpha) if spec.activation == "silu_alpha" else None,
            "gate_mul": number(spec.gate_mul), "gate_max": number(spec.gate_max),
            "up_limit": number(spec.up_limit), "ACT": ACT_IDS[spec.activation],
            "UP_PLUS_ONE": bool(spec.up_plus_one)}


def _col(n: int, *pairs: tuple[torch.Tensor, torch.Tensor]) -> int:
    """COL for (gate, up)-like pairs of n columns: 1 (unit column stride), or 2 when each pair is
    the even/odd columns of one packed tensor (up one element after gate, same row stride)."""
    strides = [t.stride(1) for pair in pairs for t in pair]
    if n == 1 or all(s == 1 for s in strides):
        return 1
    for a, b in pairs:
        if not (a.stride(1) == b.stride(1) == 2 and a.stride(0) == b.stride(0)
                and b.data_ptr() == a.data_ptr() + a.element_size()):
            raise ValueError(f"column strides {strides}: the kernels take unit strides, or interleaved pairs")
    return 2


def glu_fwd(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor, spec) -> None:
    """out = the gate of `spec` (a plain activation name or a GateSpec) for 2-D (rows, cols)
    tensors; gate and up have column stride 1, or both 2 (interleaved views), out stride 1."""
    M, N = gate.shape
    if M == 0 or N == 0:
        return
    block_m, block_n = _blocks(N)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _glu_fwd_kernel[grid](
        gate, up, out, M, N, gate.stride(0), up.stride(0), out.stride(0),
        **spec_args(spec), ACCURATE=not INTERPRET, COL=_col(N, (gate, up)),
        BLOCK_M=block_m, BLOCK_N=block_n, **LAUNCH_OPTIONS,
    )


def glu_bwd(dh, gate, up, dgate, dup, spec, h=None) -> None:
    """dgate, dup = grads of the gate of `spec` (a name or a GateSpec), written into the given 2-D
    outputs; gate, up, dgate and dup share a column stride of 1, or 2 (interleaved views).

    With `h`, the same pass also writes h = act(gate) * up (bitwise the forward's value): a
    backward that recomputes h for down_proj's weight gradient then reads gate and up once.
    """
    M, N = gate.shape
    if M == 0 or N == 0:
        return
    block_m, block_n = _blocks(N)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _glu_bwd_kernel[grid](
        dh, gate, up, dgate, dup, dgate if h is None else h, M, N,
        dh.stride(0), gate.stride(0), up.stride(0), dgate.stride(0), dup.stride(0),
        0 if h is None else h.stride(0),
        **spec_args(spec), ACCURATE=not INTERPRET, COL=_col(N, (gate, up), (dgate, dup)),
        STORE_H=h is not None, BLOCK_M=block_m, BLOCK_N=block_n, **LAUNCH_OPTIONS,
    )
