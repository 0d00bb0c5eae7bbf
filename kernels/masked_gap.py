"""Masked global average pooling, g(X̂_c) of paper eq. (1)-(2), as one Triton pass over x.

    P[n, c, d] = (1 / HW) * sum_hw x[n, d, hw] * m[n, c, hw]        x (N, D, H, W), m (N, C, H, W)

Eq. (1) erases X with every class mask, X̂_c = X ⊙ M̂_c, which materialises (N, C, D, H, W); eq. (2)
only ever uses g(X̂_c), and the sum above is that GAP without the erased copies: per image it is
the (C, HW) @ (HW, D) product m_n x_nᵀ / HW, done with tl.dot on (C, HW-block) x (HW-block, D-block)
tiles. Backward is the adjoint, dx[n, d, hw] = (1 / HW) sum_c dP[n, c, d] m[n, c, hw]; masks are
binary erasure masks, constants of the attention-mining step, so no gradient flows to m.

Bytes moved (the model the bench divides by): forward reads x and m and writes P; backward reads
dP and m and writes dx. Masks are re-read once per D-block; they are C/D of x's size and stay in
cache, so the model counts them once.
"""
from __future__ import annotations

import torch

from .launch import check, check_same, empty, jit, next_pow2, tl, triton

BLOCK_D = 64  # channels per program (forward) and per loop step (backward)
BLOCK_HW = 64  # pixels per loop step (forward) and per program (backward)
NUM_WARPS = 4


def bytes_moved(N, C, D, H, W, itemsize=4, backward=False):
    """Minimum HBM traffic of the forward (or forward + backward) pass, in bytes."""
    fwd = (N * D * H * W + N * C * H * W + N * C * D) * itemsize
    bwd = (N * C * D + N * C * H * W + N * D * H * W) * itemsize
    return fwd + bwd if backward else fwd


@jit
def _gap_fwd_kernel(
    x_ptr,  # (N, D, HW) features X, contiguous
    m_ptr,  # (N, C, HW) masks M, contiguous
    p_ptr,  # (N, C, D) out: P = g(X ⊙ M_c)
    C, D, HW,  # sizes; blocks past them are masked off
    BLOCK_C: tl.constexpr,  # >= C, power of two >= 16 (tl.dot minimum)
    BLOCK_D: tl.constexpr,  # channels this program owns
    BLOCK_HW: tl.constexpr,  # pixels per loop step
):
    n = tl.program_id(0).to(tl.int64)  # int64 so n * D * HW cannot overflow
    c = tl.arange(0, BLOCK_C)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    for hw0 in range(0, HW, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        mt = tl.load(m_ptr + n * C * HW + c[:, None] * HW + hw[None, :],
                     mask=(c[:, None] < C) & (hw[None, :] < HW), other=0.0)
        xt = tl.load(x_ptr + n * D * HW + d[:, None] * HW + hw[None, :],
                     mask=(d[:, None] < D) & (hw[None, :] < HW), other=0.0)
        # fp32 tiles: bf16 values are exact in tf32, and the interpreter has no bf16 dot.
        acc += tl.dot(mt.to(tl.float32), tl.trans(xt.to(tl.float32)))
    tl.store(p_ptr + n * C * D + c[:, None] * D + d[None, :],
             (acc / HW).to(p_ptr.dtype.element_ty), mask=(c[:, None] < C) & (d[None, :] < D))


@jit
def _gap_bwd_kernel(
    dp_ptr,  # (N, C, D) upstream gradient dL/dP, contiguous
    m_ptr,  # (N, C, HW) masks M
    dx_ptr,  # (N, D, HW) out: dL/dx
    C, D, HW,  # sizes; blocks past them are masked off
    BLOCK_C: tl.constexpr,  # >= C, power of two >= 16
    BLOCK_D: tl.constexpr,  # channels per loop step
    BLOCK_HW: tl.constexpr,  # pixels this program owns
):
    n = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mt = tl.load(m_ptr + n * C * HW + c[:, None] * HW + hw[None, :],
                 mask=(c[:, None] < C) & (hw[None, :] < HW), other=0.0).to(tl.float32) / HW
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dpt = tl.load(dp_ptr + n * C * D + c[:, None] * D + d[None, :],
                      mask=(c[:, None] < C) & (d[None, :] < D), other=0.0).to(tl.float32)
        dxt = tl.dot(tl.trans(dpt), mt)  # (BLOCK_D, BLOCK_HW)
        tl.store(dx_ptr + n * D * HW + d[:, None] * HW + hw[None, :],
                 dxt.to(dx_ptr.dtype.element_ty), mask=(d[:, None] < D) & (hw[None, :] < HW))


def forward(x, m):
    """Check inputs and launch the forward kernel: x (N, D, H, W), m (N, C, H, W) -> P (N, C, D)."""
    check("x", x, 4, "(N, D, H, W)")
    check("m", m, 4, "(N, C, H, W)")
    check_same(("x", "m"), (x, m))
    N, D, H, W = x.shape
    C = m.shape[1]
    if m.shape != (N, C, H, W):
        raise ValueError(f"m has shape {tuple(m.shape)} but x is {tuple(x.shape)}; "
                         f"expected m (N, C, H, W) = ({N}, C, {H}, {W})")
    p = empty((N, C, D), x.device, x.dtype)
    _gap_fwd_kernel[(N, triton.cdiv(D, BLOCK_D))](
        x, m, p, C, D, H * W, BLOCK_C=next_pow2(C), BLOCK_D=BLOCK_D, BLOCK_HW=BLOCK_HW,
        num_warps=NUM_WARPS)
    return p


def backward(dp, m, D):
    """dx (N, D, H, W) from dp (N, C, D) and the forward's masks."""
    N, C, H, W = m.shape
    dp = dp.contiguous()
    dx = empty((N, D, H, W), m.device, m.dtype)
    _gap_bwd_kernel[(N, triton.cdiv(H * W, BLOCK_HW))](
        dp, m, dx, C, D, H * W, BLOCK_C=next_pow2(C), BLOCK_D=BLOCK_D, BLOCK_HW=BLOCK_HW,
        num_warps=NUM_WARPS)
    return dx


class MaskedGap(torch.autograd.Function):
    """P = g(x ⊙ m_c); differentiable in x only (masks are constants of the AM step)."""

    @staticmethod
    def forward(ctx, x, m):
        ctx.save_for_backward(m)
        ctx.D = x.shape[1]
        return forward(x, m)

    @staticmethod
    def backward(ctx, dp):
        (m,) = ctx.saved_tensors
        return (backward(dp, m, ctx.D) if ctx.needs_input_grad[0] else None), None


def masked_gap(x, m):
    """x (N, D, H, W), m (N, C, H, W), float32 or bfloat16 -> P (N, C, D) = mean_hw(x[n, d] m[n, c])."""
    return MaskedGap.apply(x, m)
