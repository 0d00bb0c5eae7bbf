"""Masked global average pooling, g(X̂_c) of paper eq. (1)-(2), as one Triton pass over x.

    P[n, c, d] = (1 / HW) * sum_hw x[n, d, hw] * m[n, c, hw]        x (N, D, H, W), m (N, C, H, W)

Eq. (1) erases X with every class mask, X̂_c = X ⊙ M̂_c, which materialises (N, C, D, H, W); eq. (2)
only ever uses g(X̂_c), and the sum above is that GAP without the erased copies: per image it is
the (C, HW) @ (HW, D) product m_n x_nᵀ / HW, done with tl.dot on (C, HW-block) x (HW-block, D-block)
tiles loaded through strides, so NCHW and channels-last x run the same code without a copy.
Backward is the adjoint, dx[n, d, hw] = (1 / HW) sum_c dP[n, c, d] m[n, c, hw], written in x's
layout; masks are binary erasure masks, constants of the attention-mining step, so no gradient
flows to m. No training step uses this kernel (ops.branch_logits goes through masked_cam); it is
ops.masked_gap on the Triton backend, the literal g(X̂_c) for readers, the tests and the bench.

Bytes moved (the model the bench divides by): forward reads x and m and writes P; backward reads
dP and m and writes dx. Masks are re-read once per D-block; they are C/D of x's size and stay in
cache, so the model counts them once.
"""
from __future__ import annotations

import torch

from . import launch
from .launch import check, check_same, empty, empty_like, next_pow2, tl, triton

# (meta-parameters, warps, stages); the first is the only one the interpreter runs.
SPACE = [({"BLOCK_HW": hw, "BLOCK_D": d}, w, s) for d in (64, 32, 128) for hw in (64, 32)
         for w, s in ((4, 2), (8, 3))]


def bytes_moved(N, C, D, H, W, itemsize=4, backward=False):
    """Minimum HBM traffic of the forward (or forward + backward) pass, in bytes."""
    fwd = (N * D * H * W + N * C * H * W + N * C * D) * itemsize
    bwd = (N * C * D + N * C * H * W + N * D * H * W) * itemsize
    return fwd + bwd if backward else fwd


@launch.kernel(SPACE, ["C", "D", "HW", "sxd"])
def _gap_fwd_kernel(
    x_ptr,  # (N, D, HW) features X, any layout whose pixels hw_stride walks
    m_ptr,  # (N, C, HW) masks M, x's dtype
    p_ptr,  # (N, C, D) out, contiguous, x's dtype: P = g(X ⊙ M_c)
    C, D, HW,  # sizes; blocks past them are masked off
    sxn, sxd, sxhw,  # x strides (channels-last: sxd == 1)
    smn, smc, smhw,  # m strides
    BLOCK_C: tl.constexpr,  # >= C, power of two >= 16 (tl.dot minimum)
    BLOCK_D: tl.constexpr,  # channels this program owns
    BLOCK_HW: tl.constexpr,  # pixels per loop step
    UPCAST: tl.constexpr,  # interpreter: fp32 dot operands (it has no bf16 dot)
    PRECISION: tl.constexpr,  # input precision of an fp32 tl.dot
):
    n = tl.program_id(0).to(tl.int64)  # int64 so n * sxn cannot overflow
    c = tl.arange(0, BLOCK_C)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    for hw0 in range(0, HW, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        mt = tl.load(m_ptr + n * smn + c[:, None] * smc + hw[None, :] * smhw,
                     mask=(c[:, None] < C) & (hw[None, :] < HW), other=0.0)  # (BLOCK_C, BLOCK_HW)
        xt = tl.load(x_ptr + n * sxn + hw[:, None] * sxhw + d[None, :] * sxd,
                     mask=(hw[:, None] < HW) & (d[None, :] < D), other=0.0)  # (BLOCK_HW, BLOCK_D)
        if UPCAST:
            mt, xt = mt.to(tl.float32), xt.to(tl.float32)
        acc = tl.dot(mt, xt, acc, input_precision=PRECISION)
    tl.store(p_ptr + n * C * D + c[:, None] * D + d[None, :],
             (acc / HW).to(p_ptr.dtype.element_ty), mask=(c[:, None] < C) & (d[None, :] < D))


@launch.kernel(SPACE, ["C", "D", "HW", "sed"])
def _gap_bwd_kernel(
    dp_ptr,  # (N, C, D) upstream gradient dL/dP, any strides
    m_ptr,  # (N, C, HW) masks M
    dx_ptr,  # (N, D, HW) out, x's dtype and layout: dL/dx
    C, D, HW,  # sizes; blocks past them are masked off
    spn, spc, spd,  # dp strides
    smn, smc, smhw,  # m strides
    sen, sed, sehw,  # dx strides
    BLOCK_C: tl.constexpr,  # >= C, power of two >= 16
    BLOCK_D: tl.constexpr,  # channels per loop step
    BLOCK_HW: tl.constexpr,  # pixels this program owns
    UPCAST: tl.constexpr,  # interpreter: fp32 dot operands
    PRECISION: tl.constexpr,  # input precision of an fp32 tl.dot
):
    n = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mt = tl.load(m_ptr + n * smn + hw[:, None] * smhw + c[None, :] * smc,
                 mask=(hw[:, None] < HW) & (c[None, :] < C), other=0.0)  # (BLOCK_HW, BLOCK_C)
    mt = mt.to(tl.float32 if UPCAST else dx_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dpt = tl.load(dp_ptr + n * spn + c[:, None] * spc + d[None, :] * spd,
                      mask=(c[:, None] < C) & (d[None, :] < D), other=0.0).to(mt.dtype)
        # Masks are 0/1, exact in any dtype: the 1/HW scale comes after the dot, in fp32.
        dxt = tl.dot(mt, dpt, input_precision=PRECISION) / HW  # (BLOCK_HW, BLOCK_D)
        tl.store(dx_ptr + n * sen + hw[:, None] * sehw + d[None, :] * sed,
                 dxt.to(dx_ptr.dtype.element_ty), mask=(hw[:, None] < HW) & (d[None, :] < D))


def forward(x, m, poison=False):
    """Check inputs and launch the forward kernel: x (N, D, H, W), m (N, C, H, W) -> P (N, C, D)."""
    check("x", x, 4, "(N, D, H, W)")
    check("m", m, 4, "(N, C, H, W)")
    check_same(("x", "m"), (x, m))
    N, D, H, W = x.shape
    C = m.shape[1]
    if m.shape != (N, C, H, W):
        raise ValueError(f"m has shape {tuple(m.shape)} but x is {tuple(x.shape)}; "
                         f"expected m (N, C, H, W) = ({N}, C, {H}, {W})")
    p = empty((N, C, D), x.device, x.dtype, poison)
    _gap_fwd_kernel(lambda meta: (N, triton.cdiv(D, meta["BLOCK_D"])), x, m, p, C, D, H * W,
        *launch.strides(x), *launch.strides(m), BLOCK_C=next_pow2(C), UPCAST=launch.INTERPRET,
        PRECISION=launch.FP32_PRECISION)
    return p


def backward(dp, m, x, poison=False):
    """dx from dp (N, C, D) and the forward's masks; x (real or launch.like) gives its shape and layout."""
    N, C, H, W = m.shape
    dx = empty_like(x, m.device, poison)
    _gap_bwd_kernel(lambda meta: (N, triton.cdiv(H * W, meta["BLOCK_HW"])), dp, m, dx, C, x.shape[1], H * W,
        *dp.stride(), *launch.strides(m), *launch.strides(dx), BLOCK_C=next_pow2(C),
        UPCAST=launch.INTERPRET, PRECISION=launch.FP32_PRECISION)
    return dx


class MaskedGap(torch.autograd.Function):
    """P = g(x ⊙ m_c); differentiable in x only (masks are constants of the AM step)."""

    @staticmethod
    def forward(ctx, x, m, poison):
        ctx.save_for_backward(m)
        ctx.x, ctx.poison = launch.like(x), poison
        return forward(x, m, poison)

    @staticmethod
    def backward(ctx, dp):
        (m,) = ctx.saved_tensors
        return (backward(dp, m, ctx.x, ctx.poison) if ctx.needs_input_grad[0] else None), None, None


def masked_gap(x, m, poison=False):
    """x (N, D, H, W) in NCHW or channels-last, m (N, C, H, W), float32 or bfloat16 ->
    P (N, C, D) in x's dtype = mean_hw(x[n, d] m[n, c]). poison=True (the tests) starts P and dx
    as NaN, so an element the kernels did not write shows up."""
    return MaskedGap.apply(x, m, poison)
