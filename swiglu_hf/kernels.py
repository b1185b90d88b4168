"""Triton kernels for the gated-MLP elementwise step  h = act(gate) * up  and its backward.

Forward, per element, in the order eager PyTorch rounds (dtype = the input dtype):

    a  = round_dtype(act(float32(gate)))            # stock: act_fn(gate) returns a dtype tensor
    h  = round_dtype(a * float32(up))               # stock: dtype * dtype multiply

Backward, recomputing the activation from the saved gate and up (act(gate) is not saved):

    du    = round_dtype(dh * a)                     # grad of the `* up` input
    dact  = round_dtype(dh * float32(up))           # grad flowing into act_fn
    dgate = round_dtype(act'(dact, gate))           # aten::silu_backward & co., fp32 inside

With ACCURATE (compiled on a GPU) the transcendentals are libdevice's expf/erff/tanhf and the
division is IEEE round-to-nearest, the same functions eager CUDA uses, and the `a + b*c` forms
that nvcc contracts into FMAs are written as `tl.fma`: that is what makes a bf16/fp16 forward
bitwise equal to the stock module. The Triton CPU interpreter cannot call libdevice, so there
ACCURATE is off and the plain `tl` functions run (ulp-level differences, tested by tolerance).

Tensors are addressed as (rows, cols) with a row stride and unit column stride, so the two
halves of a packed [.., 2I] gate_up output are read in place. Row offsets are int64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ACT_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "sigmoid": 3, "relu": 4}

# Compile options of every launch (the interpreter ignores them); tools/compile_check.py compiles
# with exactly these, so its table and Triton cache entries are the launchers' own.
#
# enable_fp_fusion=True, explicitly. Fusion lets LLVM/ptxas contract a*b + c into one FMA (one
# rounding instead of two), i.e. it can change bits. The eager reference is PyTorch's CUDA kernels,
# built by nvcc with its default --fmad=true, which contracts too; the contractions the stock
# results depend on are written as tl.fma in the kernels below, so they do not hang on this flag.
# Compared in SASS (Triton 3.9, ptxas 12.9 for sm_80 and 13.4 for sm_90/sm_100, all three dtypes),
# the flag changes exactly one thing: in silu and sigmoid, libdevice expf's last step (p * 2**k, a
# multiply by a power of two, exact unless the result is subnormal) is fused with the `1.0 +` that
# follows, one FFMA per element; 1 + exp(-x) is the same float either way (a subnormal exp(-x) is
# far below half an ulp of 1, and overflow gives inf both ways). gelu, gelu_tanh and relu compile
# to identical SASS with and without it. Pinned because Triton 3.9 warns when it is unset and
# 3.10 flips the default to False.
#
# enable_reflect_ftz=False: keep denormals. Triton's default (True) answers libdevice's
# __nvvm_reflect("__CUDA_FTZ") with 1, which selects the flush-to-zero variants (fma.rn.ftz,
# abs.ftz, cvt.ftz ...) inside expf/erff/tanhf; nvcc without -ftz=true/--use_fast_math (how PyTorch
# is built) answers 0. With False the only .ftz left in the PTX are ex2.approx.ftz / rcp.approx.ftz
# that libdevice's non-FTZ code itself uses on range-reduced arguments, as in eager. Triton's own
# arithmetic (mul/add/fma/div.rn, conversions) never flushes. Same instruction count; CUDA only
# (the ROCm backend has no such option and would reject the keyword).
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
    elif ACT == 3:  # aten sigmoid_backward(dy, y): dy * (1 - y) * y, y the saved (rounded) output
        return d * (1.0 - a) * a
    else:  # aten threshold_backward(dy, relu(x), 0)
        return tl.where(a <= 0.0, 0.0, d)


@triton.jit
def _glu_fwd_kernel(
    gate_ptr,  # (M, N) with row stride stride_g, unit column stride
    up_ptr,  # (M, N) with row stride stride_u
    h_ptr,  # (M, N) output, row stride stride_h
    M, N, stride_g, stride_u, stride_h,
    ACT: tl.constexpr, ACCURATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    g = tl.load(gate_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dtype = h_ptr.dtype.element_ty
    a = _act_fwd(g, ACT, ACCURATE).to(dtype).to(tl.float32)
    tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], (a * u).to(dtype), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    dh_ptr,  # (M, N) upstream gradient, row stride stride_dh
    gate_ptr,  # (M, N) saved gate, row stride stride_g
    up_ptr,  # (M, N) saved up, row stride stride_u
    dgate_ptr,  # (M, N) output, row stride stride_dg (may be the first half of a packed grad)
    dup_ptr,  # (M, N) output, row stride stride_du (may be the second half of a packed grad)
    h_ptr,  # (M, N) output h = act(gate) * up, row stride stride_h; written only if STORE_H
    M, N, stride_dh, stride_g, stride_u, stride_dg, stride_du, stride_h,
    ACT: tl.constexpr, ACCURATE: tl.constexpr, STORE_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    r = rows[:, None]
    c = cols[None, :]
    dh = tl.load(dh_ptr + r * stride_dh + c, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + r * stride_g + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + r * stride_u + c, mask=mask, other=0.0).to(tl.float32)
    dtype = dgate_ptr.dtype.element_ty
    a = _act_fwd(g, ACT, ACCURATE).to(dtype).to(tl.float32)
    dact = (dh * u).to(dtype).to(tl.float32)
    if STORE_H:  # the recomputed forward output, for down_proj's weight gradient
        tl.store(h_ptr + r * stride_h + c, (a * u).to(dtype), mask=mask)
    tl.store(dup_ptr + r * stride_du + c, (dh * a).to(dtype), mask=mask)
    tl.store(dgate_ptr + r * stride_dg + c, _act_bwd(dact, g, a, ACT, ACCURATE).to(dtype), mask=mask)


def _blocks(n_cols: int) -> tuple[int, int]:
    # A tile of ~2K elements keeps a memory-bound elementwise kernel at full bandwidth on
    # current GPUs; the interpreter pays per program, so there it gets 16K-element tiles.
    tile = 16384 if INTERPRET else 2048
    block_n = min(triton.next_power_of_2(max(n_cols, 1)), tile)
    return max(1, tile // block_n), block_n


def glu_fwd(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor, activation: str) -> None:
    """out = act(gate) * up for 2-D (rows, cols) tensors with unit column stride."""
    M, N = gate.shape
    if M == 0 or N == 0:
        return
    block_m, block_n = _blocks(N)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _glu_fwd_kernel[grid](
        gate, up, out, M, N, gate.stride(0), up.stride(0), out.stride(0),
        ACT=ACT_IDS[activation], ACCURATE=not INTERPRET, BLOCK_M=block_m, BLOCK_N=block_n,
        **LAUNCH_OPTIONS,
    )


def glu_bwd(dh, gate, up, dgate, dup, activation: str, h=None) -> None:
    """dgate, dup = grads of act(gate) * up, written into the given 2-D outputs.

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
        ACT=ACT_IDS[activation], ACCURATE=not INTERPRET, STORE_H=h is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, **LAUNCH_OPTIONS,
    )
