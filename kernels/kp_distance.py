"""Knowledge-preservation distance, paper eq. (4), in one pass over both feature maps.

    L = (1 / N) sum_n sum_k (g(fa)[n, k] - g(fb)[n, k])^2,   g = mean over H, W
    fa = X_A(k) from the frozen network N_A, fb = X_B(k) from N_B, both (N, K, H, W)

The squared norm matches reference.kp_layer_loss (the project's documented choice). Since g is
linear, g(fa) - g(fb) = g(fa - fb): each program streams BLOCK_R rows (n, k) of both maps in
BLOCK_HW-pixel steps, through strides, so NCHW and channels-last run without a copy; it keeps
the row means of fa - fb, writes them (for backward) and the sum of their squares to its own
slot of a partials buffer, and launch.reduce_partials adds the slots in a fixed order and
divides by N (no atomics, no eager ops). The loss is float32 whatever the maps' dtype.
For the AM step (kernels.am_step) fb's row sums come precomputed from the masked-CAM pass
(FB_SUMS), so X_B is not read a second time. Backward broadcasts
    dL/dfa[n, k, hw] = 2 dL (g(fa) - g(fb))[n, k] / (N HW) = -dL/dfb[n, k, hw]
into outputs laid out like the inputs. fa is usually detached (N_A is frozen).

Bytes moved (the bench's model): forward reads fa and fb; backward writes the grads asked for
(in training only dfb: N_A is frozen).
"""
from __future__ import annotations

import torch

from . import launch
from .launch import check, check_same, empty, empty_like, next_pow2, tl, triton

MAX_BLOCK_HW = 256  # pixels per loop step, at most
TILE = 4096  # BLOCK_R * BLOCK_HW elements per load


def bytes_moved(N, K, H, W, itemsize=4, backward=False, grads=2):
    """Minimum HBM traffic of the forward (or forward + backward writing `grads` maps) pass, in bytes."""
    size = N * K * H * W * itemsize
    return (2 + grads) * size if backward else 2 * size


# One config each: the partials buffer's size depends on BLOCK_R, which _blocks fixes per HW.
@launch.kernel([({}, 4, 2)])
def _kp_fwd_kernel(
    fa_ptr,  # (N, K, HW) layer output of N_A, any layout whose pixels hw_stride walks
    fb_ptr,  # (N, K, HW) layer output of N_B; read unless FB_SUMS
    gsum_ptr,  # (N, J, K) fp32 per-pixel-block channel sums of N_B's map; read if FB_SUMS
    diff_ptr,  # (N * K,) fp32 out: g(fa) - g(fb) per row, kept for backward
    part_ptr,  # (n_programs,) fp32 out: this program's sum of squared row differences
    R, K, HW, J,  # rows N * K, channels, pixels, blocks of gsum
    san, sak, sahw,  # fa strides
    sbn, sbk, sbhw,  # fb strides
    BLOCK_R: tl.constexpr,  # rows this program owns
    BLOCK_HW: tl.constexpr,  # pixels per loop step
    FB_SUMS: tl.constexpr,  # fb given as gsum
):
    pid = tl.program_id(0)
    r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64 so n * san cannot overflow
    r_ok = r < R
    n, k = r // K, r % K
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for hw0 in range(0, HW, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        ok = r_ok[:, None] & (hw[None, :] < HW)
        a = tl.load(fa_ptr + (n * san + k * sak)[:, None] + hw[None, :] * sahw, mask=ok,
                    other=0.0).to(tl.float32)
        if FB_SUMS:
            acc += tl.sum(a, axis=1)
        else:
            b = tl.load(fb_ptr + (n * sbn + k * sbk)[:, None] + hw[None, :] * sbhw, mask=ok,
                        other=0.0).to(tl.float32)
            acc += tl.sum(a - b, axis=1)
    if FB_SUMS:
        for j in range(J):
            acc -= tl.load(gsum_ptr + (n * J + j) * K + k, mask=r_ok, other=0.0)
    diff = acc / HW  # padded rows are 0, so they add nothing below
    tl.store(diff_ptr + r, diff, mask=r_ok)
    tl.store(part_ptr + pid, tl.sum(diff * diff, axis=0))


@launch.kernel([({}, 4, 2)])
def _kp_bwd_kernel(
    diff_ptr,  # (N * K,) fp32 g(fa) - g(fb) from forward
    dl_ptr,  # (1,) fp32 upstream gradient dL, read on device to avoid a host sync
    dfa_ptr,  # (N, K, HW) out, fa's layout: dL/dfa; written if NEED_A
    dfb_ptr,  # (N, K, HW) out, fb's layout: dL/dfb; written if NEED_B
    R, K, HW, N,  # sizes; N images for the 1/N of eq. (4)
    san, sak, sahw,  # dfa strides
    sbn, sbk, sbhw,  # dfb strides
    BLOCK_R: tl.constexpr,  # rows this program owns
    BLOCK_HW: tl.constexpr,  # pixels this program owns
    NEED_A: tl.constexpr,  # write dfa
    NEED_B: tl.constexpr,  # write dfb
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    r_ok = r < R
    n, k = r // K, r % K
    ok = r_ok[:, None] & (hw[None, :] < HW)
    coef = tl.load(dl_ptr) * 2.0 / (N * HW)
    v = coef * tl.load(diff_ptr + r, mask=r_ok, other=0.0)  # (BLOCK_R,)
    tile = tl.zeros((BLOCK_R, BLOCK_HW), dtype=tl.float32) + v[:, None]
    if NEED_A:
        tl.store(dfa_ptr + (n * san + k * sak)[:, None] + hw[None, :] * sahw,
                 tile.to(dfa_ptr.dtype.element_ty), mask=ok)
    if NEED_B:
        tl.store(dfb_ptr + (n * sbn + k * sbk)[:, None] + hw[None, :] * sbhw,
                 (-tile).to(dfb_ptr.dtype.element_ty), mask=ok)


def _blocks(HW):
    block_hw = min(MAX_BLOCK_HW, next_pow2(HW))
    return max(1, TILE // block_hw), block_hw


def _forward(fa, fb, gsum, poison):
    N, K, H, W = fa.shape
    R, HW = N * K, H * W
    block_r, block_hw = _blocks(HW)
    n_prog = triton.cdiv(R, block_r)
    diff = empty((R,), fa.device, poison=poison)
    part = empty((1, n_prog, 1), fa.device, poison=poison)
    # With FB_SUMS fb is never read: fa stands in for it (and gsum for fb's sums otherwise).
    _kp_fwd_kernel((n_prog,), fa, fa if fb is None else fb, diff if gsum is None else gsum, diff, part,
        R, K, HW, 0 if gsum is None else gsum.shape[1], *launch.strides(fa),
        *launch.strides(fa if fb is None else fb), BLOCK_R=block_r, BLOCK_HW=block_hw,
        FB_SUMS=gsum is not None)
    return launch.reduce_partials(part, 1.0 / N, poison=poison).reshape(()), diff


def forward(fa, fb, poison=False):
    """Check inputs and launch: -> (loss 0-d float32 tensor, diff (N*K,) fp32)."""
    check("fa", fa, 4, "(N, K, H, W)")
    check("fb", fb, 4, "(N, K, H, W)")
    check_same(("fa", "fb"), (fa, fb))
    if fa.shape != fb.shape:
        raise ValueError(f"fa and fb must have the same shape (N, K, H, W), "
                         f"got {tuple(fa.shape)} and {tuple(fb.shape)}")
    return _forward(fa, fb, None, poison)


def forward_sums(fa, gsum, poison=False):
    """Eq. (4) with fb given by its channel sums per pixel block, gsum (N, J, K) fp32, so that
    g(fb)[n, k] = gsum[n, :, k].sum() / HW (fa's HW): -> (loss 0-d float32, diff (N*K,) fp32).
    The caller (kernels.am_step) has checked fa and gsum."""
    return _forward(fa, None, gsum, poison)


def backward(diff, dl, fa, fb, need_a, need_b, poison=False):
    """(dfa or None, dfb or None) from the saved row differences and dL; fa and fb (real or
    launch.like tensors) give the shapes and layouts."""
    N, K, H, W = fa.shape
    R, HW = N * K, H * W
    block_r, block_hw = _blocks(HW)
    dfa = empty_like(fa, diff.device, poison) if need_a else None
    dfb = empty_like(fb, diff.device, poison) if need_b else None
    out_a, out_b = dfb if dfa is None else dfa, dfa if dfb is None else dfb
    # A pointer a constexpr flag switches off is never dereferenced; the other output stands in.
    _kp_bwd_kernel((triton.cdiv(R, block_r), triton.cdiv(HW, block_hw)), diff, dl.float().reshape(1),
        out_a, out_b, R, K, HW, N, *launch.strides(out_a), *launch.strides(out_b),
        BLOCK_R=block_r, BLOCK_HW=block_hw, NEED_A=need_a, NEED_B=need_b)
    return dfa, dfb


class KpDistance(torch.autograd.Function):
    """Eq. (4) on (N, K, H, W) maps; differentiable in both inputs."""

    @staticmethod
    def forward(ctx, fa, fb, poison):
        loss, diff = forward(fa, fb, poison)
        ctx.save_for_backward(diff)
        ctx.fa, ctx.fb = launch.like(fa), launch.like(fb)  # backward needs only their layouts
        ctx.poison = poison
        return loss

    @staticmethod
    def backward(ctx, dl):
        (diff,) = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[:2]
        if not (need_a or need_b):
            return None, None, None
        return *backward(diff, dl, ctx.fa, ctx.fb, need_a, need_b, ctx.poison), None


def kp_distance(fa, fb, poison=False):
    """fa, fb (N, K, H, W), one dtype (float32 or bfloat16), NCHW or channels-last ->
    0-d float32 tensor = reference.kp_layer_loss. poison=True (the tests) starts every output
    and gradient as NaN, so an element the kernels did not write shows up."""
    return KpDistance.apply(fa, fb, poison)
