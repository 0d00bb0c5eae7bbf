"""Knowledge-preservation distance, paper eq. (4), in one pass over both feature maps.

    L = (1 / N) sum_n sum_k (g(fa)[n, k] - g(fb)[n, k])^2,   g = mean over H, W
    fa = X_A(k) from the frozen network N_A, fb = X_B(k) from N_B, both (N, K, H, W)

The squared norm matches reference.kp_layer_loss (the project's documented choice). Since g is
linear, g(fa) - g(fb) = g(fa - fb): each program streams BLOCK_R rows of (N*K, HW) from both
inputs, keeps the row means of fa - fb, writes them (for backward) and the sum of their squares
to its own slot of a partials buffer; torch sums the partials afterwards, so the result does
not depend on program order (no atomics). Backward broadcasts
    dL/dfa[n, k, hw] = 2 dL (g(fa) - g(fb))[n, k] / (N HW) = -dL/dfb[n, k, hw].
fa is usually detached (N_A is frozen); both gradients are supported.

Bytes moved (the bench's model): forward reads fa and fb; backward writes the grads asked for
(in training only dfb: N_A is frozen).
"""
from __future__ import annotations

import torch

from .launch import check, check_same, empty, jit, next_pow2, tl, triton

MAX_BLOCK_HW = 256  # pixels per loop step, at most
TILE = 4096  # BLOCK_R * BLOCK_HW elements per load
NUM_WARPS = 4


def bytes_moved(N, K, H, W, itemsize=4, backward=False, grads=2):
    """Minimum HBM traffic of the forward (or forward + backward writing `grads` maps) pass, in bytes."""
    size = N * K * H * W * itemsize
    return (2 + grads) * size if backward else 2 * size


@jit
def _kp_fwd_kernel(
    fa_ptr,  # (R, HW) layer output of N_A, R = N * K rows, contiguous
    fb_ptr,  # (R, HW) layer output of N_B
    diff_ptr,  # (R,) fp32 out: g(fa) - g(fb) per row, kept for backward
    part_ptr,  # (n_programs,) fp32 out: this program's sum of squared row differences
    R, HW,  # sizes; blocks past them are masked off
    BLOCK_R: tl.constexpr,  # rows this program owns
    BLOCK_HW: tl.constexpr,  # pixels per loop step
):
    pid = tl.program_id(0)
    r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64 so r * HW cannot overflow
    r_ok = r < R
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for hw0 in range(0, HW, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        ok = r_ok[:, None] & (hw[None, :] < HW)
        a = tl.load(fa_ptr + r[:, None] * HW + hw[None, :], mask=ok, other=0.0).to(tl.float32)
        b = tl.load(fb_ptr + r[:, None] * HW + hw[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(a - b, axis=1)
    diff = acc / HW  # padded rows are 0, so they add nothing below
    tl.store(diff_ptr + r, diff, mask=r_ok)
    tl.store(part_ptr + pid, tl.sum(diff * diff, axis=0))


@jit
def _kp_bwd_kernel(
    diff_ptr,  # (R,) fp32 g(fa) - g(fb) from forward
    dl_ptr,  # (1,) fp32 upstream gradient dL, read on device to avoid a host sync
    dfa_ptr,  # (R, HW) out: dL/dfa; untouched unless NEED_A
    dfb_ptr,  # (R, HW) out: dL/dfb; untouched unless NEED_B
    R, HW, N,  # sizes; N images for the 1/N of eq. (4)
    BLOCK_R: tl.constexpr,  # rows this program owns
    BLOCK_HW: tl.constexpr,  # pixels this program owns
    NEED_A: tl.constexpr,  # write dfa
    NEED_B: tl.constexpr,  # write dfb
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    r_ok = r < R
    ok = r_ok[:, None] & (hw[None, :] < HW)
    coef = tl.load(dl_ptr) * 2.0 / (N * HW)
    v = coef * tl.load(diff_ptr + r, mask=r_ok, other=0.0)  # (BLOCK_R,)
    tile = tl.zeros((BLOCK_R, BLOCK_HW), dtype=tl.float32) + v[:, None]
    if NEED_A:
        tl.store(dfa_ptr + r[:, None] * HW + hw[None, :], tile.to(dfa_ptr.dtype.element_ty), mask=ok)
    if NEED_B:
        tl.store(dfb_ptr + r[:, None] * HW + hw[None, :], (-tile).to(dfb_ptr.dtype.element_ty),
                 mask=ok)


def _blocks(HW):
    block_hw = min(MAX_BLOCK_HW, next_pow2(HW))
    return max(1, TILE // block_hw), block_hw


def forward(fa, fb):
    """Check inputs and launch: -> (loss 0-d tensor in fa's dtype, diff (N*K,) fp32)."""
    check("fa", fa, 4, "(N, K, H, W)")
    check("fb", fb, 4, "(N, K, H, W)")
    check_same(("fa", "fb"), (fa, fb))
    if fa.shape != fb.shape:
        raise ValueError(f"fa and fb must have the same shape (N, K, H, W), "
                         f"got {tuple(fa.shape)} and {tuple(fb.shape)}")
    N, K, H, W = fa.shape
    R, HW = N * K, H * W
    block_r, block_hw = _blocks(HW)
    n_prog = triton.cdiv(R, block_r)
    diff = empty((R,), fa.device)
    part = empty((n_prog,), fa.device)
    _kp_fwd_kernel[(n_prog,)](fa, fb, diff, part, R, HW, BLOCK_R=block_r, BLOCK_HW=block_hw,
                              num_warps=NUM_WARPS)
    return (part.sum() / N).to(fa.dtype), diff


def backward(diff, dl, shape, dtype, need_a, need_b):
    """(dfa or None, dfb or None) of `shape` from the saved row differences and dL."""
    N, K, H, W = shape
    R, HW = N * K, H * W
    block_r, block_hw = _blocks(HW)
    dfa = empty(shape, diff.device, dtype) if need_a else None
    dfb = empty(shape, diff.device, dtype) if need_b else None
    # A pointer a constexpr flag switches off is never dereferenced; the other output stands in.
    _kp_bwd_kernel[(triton.cdiv(R, block_r), triton.cdiv(HW, block_hw))](
        diff, dl.float().reshape(1), dfb if dfa is None else dfa, dfa if dfb is None else dfb,
        R, HW, N, BLOCK_R=block_r, BLOCK_HW=block_hw, NEED_A=need_a, NEED_B=need_b,
        num_warps=NUM_WARPS)
    return dfa, dfb


class KpDistance(torch.autograd.Function):
    """Eq. (4) on (N, K, H, W) maps; differentiable in both inputs."""

    @staticmethod
    def forward(ctx, fa, fb):
        loss, diff = forward(fa, fb)
        ctx.save_for_backward(diff)
        ctx.shape, ctx.dtype = fa.shape, fa.dtype
        return loss

    @staticmethod
    def backward(ctx, dl):
        (diff,) = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad
        if not (need_a or need_b):
            return None, None
        return backward(diff, dl, ctx.shape, ctx.dtype, need_a, need_b)


def kp_distance(fa, fb):
    """fa, fb (N, K, H, W), one dtype (float32 or bfloat16) -> 0-d tensor = reference.kp_layer_loss."""
    return KpDistance.apply(fa, fb)
