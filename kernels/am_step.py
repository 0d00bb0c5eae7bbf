"""The two consumers of X in an attention-mining step, branch logits (eq. 2) and the KP
distance at X (eq. 4), as one op whose backward writes dX once.

    logits[n, c] = (1 / HW) sum_hw m[n, c, hw] sum_d x[n, d, hw] w[c, d] + b[c]     (N, C) fp32
    l_kp         = (1 / (N - n0)) sum_{n >= n0} sum_d (g(xa)[n - n0, d] - g(x)[n, d])^2    fp32
    x (N, D, H, W): N_B's X; xa (N - n0, D, H, W): N_A's X for the whole images n >= n0
    (frozen: no gradient); m (N, C, H, W), w (C, D), b (C,); g = mean over H, W

= (reference.branch_logits(x, m, w, b), reference.kp_layer_loss(xa, x[n0:])). Unfused, X is
read by both forwards, and backward writes two full dX tensors (one per consumer) that
autograd then adds: three more passes over X's size. Here the forward is masked_cam's pass
with SAVE_G, which also keeps the per-pixel-block channel sums of x, so g(x) costs no second
read of X, then kp_distance's pass over xa alone (FB_SUMS). The backward is masked_cam's dx
pass with the KP gradient, rank 1 along the pixels,
    dx[n, d, hw] += -2 dl_kp (g(xa) - g(x))[n - n0, d] / ((N - n0) HW)      for n >= n0,
added inside the dx tile before the one store.

Bytes moved (the bench's model): forward reads x, xa, m, w, b and writes the fp32 logits, the
P partials and the channel sums; backward reads m, w, both partials and writes dx, dw, db.
"""
from __future__ import annotations

import torch

from . import kp_distance, masked_cam
from .launch import check, check_same, like


def bytes_moved(N, C, D, H, W, itemsize=4, backward=False, n0=None, block_hw=masked_cam.TRAIN_BLOCK_HW):
    """HBM traffic of the forward (or forward + backward) pass, in bytes; n0 defaults to N / 8
    (the paper's n/N = 0.125 erased images per minibatch)."""
    n0 = N // 8 if n0 is None else n0
    HW, n_hw = H * W, -(-H * W // block_hw)
    params = (C * D + C) * itemsize
    parts = 4 * (N * n_hw * C * D + (N - n0) * n_hw * D)
    fwd = (N * D * HW + (N - n0) * D * HW + N * C * HW) * itemsize + params + 4 * N * C + parts
    if not backward:
        return fwd
    return fwd + (N * C * HW + N * D * HW) * itemsize + 2 * params + 4 * N * C + parts


class AmStep(torch.autograd.Function):
    """(logits, l_kp); differentiable in x, w, b (masks and N_A's xa are constants)."""

    @staticmethod
    def forward(ctx, x, m, w, b, xa, n0, save_p, poison):
        ctx.set_materialize_grads(False)
        _, logits, parts = masked_cam.forward(x, m, w, b, write_cam=False, save_p=save_p, save_g_from=n0,
                                              poison=poison)
        l_kp, diff = kp_distance.forward_sums(xa, parts.g, poison)
        ctx.save_for_backward(m, w, b, parts.p, diff)
        ctx.x, ctx.n0, ctx.poison = like(x), n0, poison
        return logits, l_kp

    @staticmethod
    def backward(ctx, dlogits, dk):
        m, w, b, p, diff = ctx.saved_tensors
        if dlogits is None and dk is None:
            return (None,) * 8
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        kp = None if dk is None else (diff, dk, ctx.n0)
        if dlogits is None:  # only the KP term reached x: the logits path contributes zeros
            dlogits = torch.zeros(m.shape[:2], device=m.device)
        dx, dw, db = masked_cam.backward(ctx.x, m, w, b, dlogits, None, needs, p, kp, ctx.poison)
        return dx, None, dw, db, None, None, None, None


def am_step(x, m, w, b, xa, n0, poison=False):
    """x (N, D, H, W), m (N, C, H, W), w (C, D), b (C,), xa (N - n0, D, H, W), one dtype
    (float32 or bfloat16), maps in NCHW or channels-last, 0 <= n0 < N ->
    (logits (N, C) float32 = reference.branch_logits(x, m, w, b),
     l_kp 0-d float32 = reference.kp_layer_loss(xa, x[n0:])).
    poison=True (the tests) starts every output, buffer and gradient as NaN, so an element the
    kernels did not write shows up."""
    check("x", x, 4, "(N, D, H, W)")
    check("xa", xa, 4, "(N - n0, D, H, W)")
    N = x.shape[0]
    if not isinstance(n0, int) or isinstance(n0, bool) or not 0 <= n0 < N:
        raise ValueError(f"n0 must be an int with 0 <= n0 < N = {N} (at least one whole image), got {n0!r}")
    if xa.shape != (N - n0, *x.shape[1:]):
        raise ValueError(f"xa has shape {tuple(xa.shape)}; expected (N - n0, D, H, W) = "
                         f"({N - n0}, {', '.join(map(str, x.shape[1:]))}) for x {tuple(x.shape)} and n0 = {n0}")
    check_same(("x", "xa"), (x, xa))
    return AmStep.apply(x, m, w, b, xa, n0, masked_cam.save_p_for(w), poison)
