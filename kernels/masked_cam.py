"""Masked CAM and branch logits, paper eq. (7) and the logit inside eq. (2), in one pass over x.

    cam[n, c, hw]  = m[n, c, hw] * sum_d w[c, d] x[n, d, hw]       = H_c of eq. (7)
    logits[n, c]   = (1 / HW) sum_hw cam[n, c, hw] + b[c]          = w_cᵀ g(X ⊙ M̂_c) + b_c
    x (N, D, H, W), m (N, C, H, W), w (C, D), b (C,)

Eq. (7) writes H_c = (X ⊙ M̂_c) w_c; the mask is constant along D, so it factors out of the sum:
H_c = M_c ⊙ (W X)_c. `cam` is therefore the *masked* CAM, equal to reference.cam(x, m, w), and
the logit is its spatial mean plus b_c (reference.branch_logits), so one product W X serves both.
Each program owns one image and one HW-block, walks D in blocks, and issues tl.dot(w-tile,
x-tile) for all C classes at once: x is read exactly once. When w needs a gradient, the same
x-tile also feeds tl.dot(m-tile, x-tileᵀ), the per-block share of the masked GAP
P[n, c, d] = g(X ⊙ M̂_c); it is kept for backward, where the logits path gives
dw = sum_n dlogits[n, c] P[n, c, d] without reading x again.

Backward, with g[n, c, hw] = m[n, c, hw] (dlogits[n, c] / HW + dcam[n, c, hw]):
    dx[n, d, hw] = sum_c w[c, d] g[n, c, hw]       db[c] = sum_n dlogits[n, c]
    dw[c, d]     = sum_n dlogits[n, c] P[n, c, d]            (no grad reaches cam)
                 = sum_n sum_hw g[n, c, hw] x[n, d, hw]      (cam has a grad: x is re-read)
Masks are binary erasure masks, constants of the attention-mining step: no gradient flows to m.

Partial sums over HW-blocks go to per-program buffers that torch sums afterwards, so results do
not depend on program order (no atomics). Bytes moved (the bench's model): forward reads x, m,
w, b and writes logits and, if asked, cam; the logits-only backward reads m, w, dlogits and
writes dx. The fp32 P partials (C / BLOCK_HW of x's size) are not counted.
"""
from __future__ import annotations

import torch

from .launch import check, check_same, empty, jit, next_pow2, tl, triton

BLOCK_D = 32  # channels per loop step
BLOCK_HW = 128  # pixels per program; P partials cost C / BLOCK_HW of x's bytes
NUM_WARPS = 4
MAX_C = 128  # every program holds a (C, BLOCK_HW) accumulator


def bytes_moved(N, C, D, H, W, itemsize=4, write_cam=True, backward=False):
    """Minimum HBM traffic of the forward (or forward + logits-only backward) pass, in bytes."""
    HW = H * W
    fwd = (N * D * HW + N * C * HW + C * D + C + N * C + (N * C * HW if write_cam else 0))
    bwd = N * C * HW + C * D + N * C + N * D * HW
    return (fwd + bwd if backward else fwd) * itemsize


@jit
def _cam_fwd_kernel(
    x_ptr,  # (N, D, HW) features X, contiguous
    m_ptr,  # (N, C, HW) masks M
    w_ptr,  # (C, D) branch weights
    cam_ptr,  # (N, C, HW) out: masked CAM; untouched unless WRITE_CAM
    logit_part_ptr,  # (N, n_hw, C) fp32 out: this program's sum_hw of cam
    p_part_ptr,  # (N, n_hw, C, D) fp32 out: this program's sum_hw m x; untouched unless SAVE_P
    C, D, HW,  # sizes; blocks past them are masked off
    BLOCK_C: tl.constexpr,  # >= C, power of two >= 16 (tl.dot minimum)
    BLOCK_D: tl.constexpr,  # channels per loop step
    BLOCK_HW: tl.constexpr,  # pixels this program owns
    WRITE_CAM: tl.constexpr,  # store cam
    SAVE_P: tl.constexpr,  # store the masked-GAP partials for dw
):
    n = tl.program_id(0).to(tl.int64)  # int64 so n * D * HW cannot overflow
    j = tl.program_id(1)
    n_hw = tl.num_programs(1)
    c = tl.arange(0, BLOCK_C)
    hw = j * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_ok = c < C
    hw_ok = hw < HW
    mt = tl.load(m_ptr + n * C * HW + c[:, None] * HW + hw[None, :],
                 mask=c_ok[:, None] & hw_ok[None, :], other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        # fp32 tiles: bf16 values are exact in tf32, and the interpreter has no bf16 dot.
        xt = tl.load(x_ptr + n * D * HW + d[:, None] * HW + hw[None, :],
                     mask=d_ok[:, None] & hw_ok[None, :], other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + c[:, None] * D + d[None, :],
                     mask=c_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(wt, xt)
        if SAVE_P:
            pt = tl.dot(mt, tl.trans(xt))  # (BLOCK_C, BLOCK_D)
            tl.store(p_part_ptr + ((n * n_hw + j) * C + c[:, None]) * D + d[None, :], pt,
                     mask=c_ok[:, None] & d_ok[None, :])
    h = mt * acc  # masked CAM tile; padded rows and pixels are 0 because mt is
    if WRITE_CAM:
        tl.store(cam_ptr + n * C * HW + c[:, None] * HW + hw[None, :],
                 h.to(cam_ptr.dtype.element_ty), mask=c_ok[:, None] & hw_ok[None, :])
    tl.store(logit_part_ptr + (n * n_hw + j) * C + c, tl.sum(h, axis=1), mask=c_ok)


@jit
def _cam_bwd_kernel(
    x_ptr,  # (N, D, HW) features X; read only if NEED_DW
    m_ptr,  # (N, C, HW) masks M
    w_ptr,  # (C, D) branch weights; read only if NEED_DX
    s_ptr,  # (N, C) fp32: dlogits / HW
    dcam_ptr,  # (N, C, HW) upstream grad of cam; read only if HAS_DCAM
    dx_ptr,  # (N, D, HW) out: dL/dx; untouched unless NEED_DX
    dw_part_ptr,  # (N, n_hw, C, D) fp32 out: this program's sum_hw g xᵀ; untouched unless NEED_DW
    C, D, HW,  # sizes; blocks past them are masked off
    BLOCK_C: tl.constexpr,  # >= C, power of two >= 16
    BLOCK_D: tl.constexpr,  # channels per loop step
    BLOCK_HW: tl.constexpr,  # pixels this program owns
    HAS_DCAM: tl.constexpr,  # cam received a gradient
    NEED_DX: tl.constexpr,  # write dx
    NEED_DW: tl.constexpr,  # write dw partials (only when HAS_DCAM; otherwise dw comes from P)
):
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    n_hw = tl.num_programs(1)
    c = tl.arange(0, BLOCK_C)
    hw = j * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_ok = c < C
    hw_ok = hw < HW
    tile = n * C * HW + c[:, None] * HW + hw[None, :]
    mt = tl.load(m_ptr + tile, mask=c_ok[:, None] & hw_ok[None, :], other=0.0).to(tl.float32)
    s = tl.load(s_ptr + n * C + c, mask=c_ok, other=0.0)
    g = mt * s[:, None]  # (BLOCK_C, BLOCK_HW)
    if HAS_DCAM:
        g += mt * tl.load(dcam_ptr + tile, mask=c_ok[:, None] & hw_ok[None, :],
                          other=0.0).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        if NEED_DX:
            wt = tl.load(w_ptr + c[:, None] * D + d[None, :],
                         mask=c_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            dxt = tl.dot(tl.trans(wt), g)  # (BLOCK_D, BLOCK_HW)
            tl.store(dx_ptr + n * D * HW + d[:, None] * HW + hw[None, :],
                     dxt.to(dx_ptr.dtype.element_ty), mask=d_ok[:, None] & hw_ok[None, :])
        if NEED_DW:
            xt = tl.load(x_ptr + n * D * HW + d[:, None] * HW + hw[None, :],
                         mask=d_ok[:, None] & hw_ok[None, :], other=0.0).to(tl.float32)
            tl.store(dw_part_ptr + ((n * n_hw + j) * C + c[:, None]) * D + d[None, :],
                     tl.dot(g, tl.trans(xt)), mask=c_ok[:, None] & d_ok[None, :])


def forward(x, m, w, b, write_cam=True, save_p=False):
    """Check inputs and launch: -> (cam (N, C, H, W) or None, logits (N, C), P (N, C, D) fp32 or None)."""
    check("x", x, 4, "(N, D, H, W)")
    check("m", m, 4, "(N, C, H, W)")
    check("w", w, 2, "(C, D)")
    check("b", b, 1, "(C,)")
    check_same(("x", "m", "w", "b"), (x, m, w, b))
    N, D, H, W = x.shape
    C = m.shape[1]
    if m.shape != (N, C, H, W):
        raise ValueError(f"m has shape {tuple(m.shape)} but x is {tuple(x.shape)}; "
                         f"expected m (N, C, H, W) = ({N}, C, {H}, {W})")
    if w.shape != (C, D):
        raise ValueError(f"w has shape {tuple(w.shape)}; expected (C, D) = ({C}, {D}) "
                         f"for x {tuple(x.shape)} and m {tuple(m.shape)}")
    if b.shape != (C,):
        raise ValueError(f"b has shape {tuple(b.shape)}; expected (C,) = ({C},)")
    if C > MAX_C:
        raise ValueError(f"m has C = {C} classes; the kernel supports at most {MAX_C}")
    HW = H * W
    n_hw = triton.cdiv(HW, BLOCK_HW)
    cam = empty((N, C, H, W), x.device, x.dtype) if write_cam else None
    logit_part = empty((N, n_hw, C), x.device)
    p_part = empty((N, n_hw, C, D), x.device) if save_p else None
    # Pointers a constexpr flag switches off are never dereferenced; logit_part stands in.
    _cam_fwd_kernel[(N, n_hw)](
        x, m, w, cam if write_cam else logit_part, logit_part, p_part if save_p else logit_part,
        C, D, HW, BLOCK_C=next_pow2(C), BLOCK_D=BLOCK_D, BLOCK_HW=BLOCK_HW,
        WRITE_CAM=write_cam, SAVE_P=save_p, num_warps=NUM_WARPS)
    logits = (logit_part.sum(1) / HW + b.float()).to(x.dtype)
    return cam, logits, (p_part.sum(1) / HW if save_p else None)


def backward(x, m, w, dlogits, dcam, need_dx, need_dw, p):
    """(dx or None, dw fp32 or None) from the upstream grads; either grad may be None (unused)."""
    N, D, H, W = x.shape
    C, HW = m.shape[1], H * W
    dl = torch.zeros((N, C), device=x.device) if dlogits is None else dlogits.float()
    s = dl / HW
    kernel_dw = need_dw and dcam is not None
    n_hw = triton.cdiv(HW, BLOCK_HW)
    dx = empty((N, D, H, W), x.device, x.dtype) if need_dx else None
    dw_part = empty((N, n_hw, C, D), x.device) if kernel_dw else None
    if need_dx or kernel_dw:
        dcam = dcam.contiguous() if dcam is not None else None
        # Pointers a constexpr flag switches off are never dereferenced; `s` stands in for them.
        _cam_bwd_kernel[(N, n_hw)](
            x, m, w, s, s if dcam is None else dcam, s if dx is None else dx,
            s if dw_part is None else dw_part, C, D, HW, BLOCK_C=next_pow2(C),
            BLOCK_D=BLOCK_D, BLOCK_HW=BLOCK_HW, HAS_DCAM=dcam is not None, NEED_DX=need_dx,
            NEED_DW=kernel_dw, num_warps=NUM_WARPS)
    if not need_dw:
        return dx, None
    if kernel_dw:
        return dx, dw_part.sum((0, 1))
    return dx, torch.einsum("nc,ncd->cd", dl, p)


class MaskedCamLogits(torch.autograd.Function):
    """(cam, logits) or logits alone; differentiable in x, w, b (masks are constants)."""

    @staticmethod
    def forward(ctx, x, m, w, b, write_cam, save_p):
        ctx.set_materialize_grads(False)  # an unused output's grad arrives as None: skip its work
        cam, logits, p = forward(x, m, w, b, write_cam, save_p)
        ctx.save_for_backward(x, m, w, p)
        ctx.write_cam = write_cam
        return (cam, logits) if write_cam else logits

    @staticmethod
    def backward(ctx, *grads):
        x, m, w, p = ctx.saved_tensors
        dcam, dlogits = grads if ctx.write_cam else (None, grads[0])
        need_dx, _, need_dw, need_db = ctx.needs_input_grad[:4]
        if dcam is None and dlogits is None:
            return None, None, None, None, None, None
        dx, dw = backward(x, m, w, dlogits, dcam, need_dx, need_dw, p)
        db = dlogits.sum(0) if need_db and dlogits is not None else None
        return dx, None, (dw.to(w.dtype) if dw is not None else None), db, None, None


def masked_cam_logits(x, m, w, b, write_cam=True):
    """x (N, D, H, W), m (N, C, H, W), w (C, D), b (C,), one dtype (float32 or bfloat16) ->
    (cam (N, C, H, W) = reference.cam, or None unless write_cam; logits (N, C) = reference.branch_logits)."""
    # needs_input_grad ignores no_grad mode, so decide here whether dw's P is worth saving.
    save_p = torch.is_grad_enabled() and isinstance(w, torch.Tensor) and w.requires_grad
    if write_cam:
        return MaskedCamLogits.apply(x, m, w, b, True, save_p)
    return None, MaskedCamLogits.apply(x, m, w, b, False, save_p)
