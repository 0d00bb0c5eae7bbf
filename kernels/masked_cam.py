"""Masked CAM and branch logits, paper eq. (7) and the logit inside eq. (2), in one pass over x.

    cam[n, c, hw]  = m[n, c, hw] * sum_d w[c, d] x[n, d, hw]       = H_c of eq. (7)
    logits[n, c]   = (1 / HW) sum_hw cam[n, c, hw] + b[c]          = w_cᵀ g(X ⊙ M̂_c) + b_c
    x (N, D, H, W), m (N, C, H, W), w (C, D), b (C,)

Eq. (7) writes H_c = (X ⊙ M̂_c) w_c; the mask is constant along D, so it factors out of the sum:
H_c = M_c ⊙ (X w)_c. `cam` is therefore the *masked* CAM, equal to reference.cam(x, m, w), and
the logit is its spatial mean plus b_c (reference.branch_logits), so one product X w serves both.

Tiles. Program (n, j, k) owns image n, pixel block j (BLOCK_HW pixels) and the k-th of SPLIT
chunks of D, which it walks in BLOCK_D steps: acc (HW, C) += x-tile (HW × D) @ w-tileᵀ (D × C).
In channels-last D is x's contiguous axis, in NCHW HW is; the strides say which, and Triton
specialises a stride of 1, so the loads coalesce in both layouts without a copy. x is read once.
SPLIT > 1 (small maps: D is split so that every SM still gets several programs) leaves each
program a partial CAM in fp32, which _combine_kernel adds up in chunk order.
Epilogue: every program writes its CAM rows' sums to (N, n_hw, C) partials, and
launch.reduce_partials adds them in a fixed order, divides by HW and adds b: fp32 logits from
kernels alone, deterministic, no atomics.

Training (w needs a gradient, SAVE_P): the same x-tile also feeds tl.dot(m-tileᵀ, x-tile), the
block's share P_j[n, c, d] = sum_hw m x of the masked GAP, so backward gets dw without reading
x again. The P partials are N n_hw C D fp32 (2C / BLOCK_HW of x's bytes in bf16, C / BLOCK_HW
in fp32), written only when w requires grad and counted in bytes_moved. The AM step
(kernels.am_step) also asks for SAVE_G, the block's channel sums of x, for the KP distance at X.

Backward, with g[n, c, hw] = m[n, c, hw] (dlogits[n, c] / HW + dcam[n, c, hw]):
    dx[n, d, hw] = sum_c g[n, c, hw] w[c, d]  (+ kp[n, d]: the AM step's KP gradient, rank 1)
    dw[c, d]     = sum_n dlogits[n, c] / HW sum_j P_j[n, c, d]     (no grad reaches cam)
                 = sum_n sum_hw g[n, c, hw] x[n, d, hw]              (cam has a grad: x is re-read)
    db[c]        = sum_n dlogits[n, c]
dw and db come from one fixed-order reduction kernel. Masks are binary erasure masks,
constants of the attention-mining step: no gradient flows to m.
"""
from __future__ import annotations

import math
from collections import namedtuple

import torch

from . import launch
from .launch import check, check_same, empty, empty_like, next_pow2, tl, triton

MAX_C = 128  # every program holds a (BLOCK_HW, C) accumulator
SPLIT = None  # D-chunks per (image, pixel block); None: _split decides (1 in the interpreter)
# Smallest pixel block the autotuner may pick when the P partials are kept (training): each
# block's partials cost 2C / BLOCK_HW of x's bf16 bytes, written once and read once, and the
# tuner, which times the forward alone, would otherwise pick small blocks for their occupancy.
TRAIN_BLOCK_HW = 128
# (meta-parameters, warps, stages); the first is the only one the interpreter runs.
SPACE = [({"BLOCK_HW": hw, "BLOCK_D": d}, w, s) for hw in (64, 128, 256, 32) for d in (32, 64)
         for w, s in ((4, 2), (8, 3))]

KEY = ["C", "D", "HW", "sxd", "SPLIT"]  # autotuning key; sxd: x's layout (1 in channels-last)
Partials = namedtuple("Partials", "p g")  # what forward keeps: P and channel-sum partials


def bytes_moved(N, C, D, H, W, itemsize=4, backward=False, block_hw=TRAIN_BLOCK_HW):
    """HBM traffic in bytes of the CAM pass (forward: x, m, w, b in; cam, fp32 logits out), or
    with backward=True of a training step on the logits alone: forward without cam but with the
    fp32 P partials (at pixel block `block_hw`, the smallest training may pick: an upper
    bound), backward reading them with m, w, dlogits and writing dx, dw, db."""
    HW, n_hw = H * W, -(-H * W // block_hw)
    params = (C * D + C) * itemsize
    if not backward:
        return (N * D * HW + 2 * N * C * HW) * itemsize + params + 4 * N * C
    p_part = 4 * N * n_hw * C * D
    fwd = (N * D * HW + N * C * HW) * itemsize + params + 4 * N * C + p_part
    bwd = (N * C * HW + N * D * HW) * itemsize + 2 * params + 4 * N * C + p_part
    return fwd + bwd


def _prune(configs, named_args, **kwargs):
    # Tiles larger than the map or than D only add masked-off lanes; keep at least the first.
    hw, d = next_pow2(named_args["HW"]), next_pow2(named_args["D"])
    least = min(TRAIN_BLOCK_HW, hw) if kwargs.get("SAVE_P") else 0
    fit = [c for c in configs if least <= c.kwargs["BLOCK_HW"] <= hw and c.kwargs["BLOCK_D"] <= d]
    return fit or configs[:1]


@launch.kernel(SPACE, KEY + ["WRITE_CAM", "SAVE_P", "SAVE_G"], _prune)
def _cam_fwd_kernel(
    x_ptr,  # (N, D, HW) features X, any layout whose pixels hw_stride walks
    m_ptr,  # (N, C, HW) masks M, x's dtype
    w_ptr,  # (C, D) branch weights, x's dtype
    cam_ptr,  # (N, C, HW) contiguous out, x's dtype: masked CAM; written if WRITE_CAM and SPLIT == 1
    hpart_ptr,  # (N, SPLIT, C, HW) fp32 out: this D-chunk's masked CAM; written if SPLIT > 1
    lpart_ptr,  # (N, n_hw, C) fp32 out: sum_hw of this program's masked CAM; written if SPLIT == 1
    ppart_ptr,  # (N, n_hw, C, D) fp32 out: sum_hw m x over this program's pixels; written if SAVE_P
    gpart_ptr,  # (N - G0, n_hw, D) fp32 out: sum_hw x of images n >= G0; written if SAVE_G
    C, D, HW, G0,  # sizes; G0: first image whose channel sums SAVE_G keeps
    sxn, sxd, sxhw,  # x strides (channels-last: sxd == 1)
    smn, smc, smhw,  # m strides
    swc, swd,  # w strides
    SPLIT: tl.constexpr,  # D-chunks: programs along grid axis 2
    BLOCK_C: tl.constexpr,  # >= C, power of two >= 16 (tl.dot minimum)
    BLOCK_HW: tl.constexpr,  # pixels this program owns
    BLOCK_D: tl.constexpr,  # channels per loop step
    WRITE_CAM: tl.constexpr,  # the CAM itself is wanted (else only logits)
    SAVE_P: tl.constexpr,  # store the masked-GAP partials for dw
    SAVE_G: tl.constexpr,  # store the channel sums for the KP distance at X
    UPCAST: tl.constexpr,  # interpreter: fp32 dot operands (it has no bf16 dot)
    PRECISION: tl.constexpr,  # input precision of an fp32 tl.dot
):
    n = tl.program_id(0).to(tl.int64)  # int64 so n * sxn cannot overflow
    j = tl.program_id(1)
    k = tl.program_id(2)
    n_hw = tl.num_programs(1)
    c = tl.arange(0, BLOCK_C)
    hw = j * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_ok = c < C
    hw_ok = hw < HW
    chunk = tl.cdiv(tl.cdiv(D, SPLIT), BLOCK_D) * BLOCK_D
    d_end = tl.minimum(D, (k + 1) * chunk)
    mt = tl.load(m_ptr + n * smn + hw[:, None] * smhw + c[None, :] * smc,
                 mask=hw_ok[:, None] & c_ok[None, :], other=0.0)  # (BLOCK_HW, BLOCK_C)
    if UPCAST:
        mt = mt.to(tl.float32)
    acc = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    for d0 in range(k * chunk, d_end, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < d_end
        xt = tl.load(x_ptr + n * sxn + hw[:, None] * sxhw + d[None, :] * sxd,
                     mask=hw_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_HW, BLOCK_D)
        wt = tl.load(w_ptr + d[:, None] * swd + c[None, :] * swc,
                     mask=d_ok[:, None] & c_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_C)
        if UPCAST:
            xt, wt = xt.to(tl.float32), wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        if SAVE_P:
            pt = tl.dot(tl.trans(mt), xt, input_precision=PRECISION)  # (BLOCK_C, BLOCK_D)
            tl.store(ppart_ptr + ((n * n_hw + j) * C + c[:, None]) * D + d[None, :], pt,
                     mask=c_ok[:, None] & d_ok[None, :])
        if SAVE_G:
            if n >= G0:
                tl.store(gpart_ptr + ((n - G0) * n_hw + j) * D + d,
                         tl.sum(xt.to(tl.float32), axis=0), mask=d_ok)
    h = mt.to(tl.float32) * acc  # masked CAM tile; padded rows and pixels are 0 because mt is
    tile = c[None, :] * HW + hw[:, None]
    ok = hw_ok[:, None] & c_ok[None, :]
    if SPLIT == 1:
        if WRITE_CAM:
            tl.store(cam_ptr + n * C * HW + tile, h.to(cam_ptr.dtype.element_ty), mask=ok)
        tl.store(lpart_ptr + (n * n_hw + j) * C + c, tl.sum(h, axis=0), mask=c_ok)
    else:
        tl.store(hpart_ptr + (n * SPLIT + k) * C * HW + tile, h, mask=ok)


@launch.kernel([({"BLOCK_HW": 64}, 4, 2)])
def _combine_kernel(
    hpart_ptr,  # (N, SPLIT, C, HW) fp32 partial CAMs of the D-chunks
    cam_ptr,  # (N, C, HW) contiguous out, the CAM's dtype; written if WRITE_CAM
    lpart_ptr,  # (N, n_hw, C) fp32 out: sum_hw of the CAM over this program's pixels
    C, HW,  # sizes
    SPLIT: tl.constexpr,  # D-chunks to add, in order
    BLOCK_C: tl.constexpr,  # >= C, power of two
    BLOCK_HW: tl.constexpr,  # pixels this program owns
    WRITE_CAM: tl.constexpr,  # store the CAM
):
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    hw = j * BLOCK_HW + tl.arange(0, BLOCK_HW)
    ok = (c[:, None] < C) & (hw[None, :] < HW)
    tile = c[:, None] * HW + hw[None, :]
    h = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for k in range(SPLIT):
        h += tl.load(hpart_ptr + (n * SPLIT + k) * C * HW + tile, mask=ok, other=0.0)
    if WRITE_CAM:
        tl.store(cam_ptr + n * C * HW + tile, h.to(cam_ptr.dtype.element_ty), mask=ok)
    tl.store(lpart_ptr + (n * tl.num_programs(1) + j) * C + c, tl.sum(h, axis=1), mask=c < C)


@launch.kernel(SPACE, KEY + ["HAS_DCAM", "HAS_KP", "NEED_DW"], _prune)
def _cam_bwd_kernel(
    x_ptr,  # (N, D, HW) features X; read only if NEED_DW
    m_ptr,  # (N, C, HW) masks M
    w_ptr,  # (C, D) branch weights; read only if NEED_DX
    dl_ptr,  # (N, C) fp32 dlogits, contiguous; read only if HAS_DL
    dcam_ptr,  # (N, C, HW) upstream grad of cam, any strides; read only if HAS_DCAM
    kp_ptr,  # (N - KP0, D) fp32 KP row differences g(X_A) - g(X) of images n >= KP0; if HAS_KP
    dk_ptr,  # (1,) fp32 upstream grad of the KP loss, read on device (no host sync); if HAS_KP
    dx_ptr,  # (N, D, HW) out, x's dtype and layout: dL/dx; written if NEED_DX
    dwpart_ptr,  # (N, n_hw, C, D) fp32 out: sum_hw g x over this program's pixels; if NEED_DW
    C, D, HW, KP0,  # sizes; KP0: first image the KP term reaches
    sxn, sxd, sxhw,  # x strides
    smn, smc, smhw,  # m strides
    swc, swd,  # w strides
    sgn, sgc, sghw,  # dcam strides
    sen, sed, sehw,  # dx strides
    SPLIT: tl.constexpr,  # D-chunks: programs along grid axis 2
    BLOCK_C: tl.constexpr,  # >= C, power of two >= 16
    BLOCK_HW: tl.constexpr,  # pixels this program owns
    BLOCK_D: tl.constexpr,  # channels per loop step
    HAS_DL: tl.constexpr,  # logits received a gradient
    HAS_DCAM: tl.constexpr,  # cam received a gradient
    HAS_KP: tl.constexpr,  # add the KP gradient at X (the AM step)
    NEED_DX: tl.constexpr,  # write dx
    NEED_DW: tl.constexpr,  # write dw partials (only when HAS_DCAM; otherwise dw comes from P)
    UPCAST: tl.constexpr,  # interpreter: fp32 dot operands
    PRECISION: tl.constexpr,  # input precision of an fp32 tl.dot
):
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    k = tl.program_id(2)
    n_hw = tl.num_programs(1)
    c = tl.arange(0, BLOCK_C)
    hw = j * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_ok = c < C
    hw_ok = hw < HW
    ok = hw_ok[:, None] & c_ok[None, :]
    mt = tl.load(m_ptr + n * smn + hw[:, None] * smhw + c[None, :] * smc, mask=ok,
                 other=0.0).to(tl.float32)  # (BLOCK_HW, BLOCK_C)
    g = tl.zeros((BLOCK_HW, BLOCK_C), dtype=tl.float32)
    if HAS_DL:
        g += tl.load(dl_ptr + n * C + c, mask=c_ok, other=0.0)[None, :] / HW
    if HAS_DCAM:
        g += tl.load(dcam_ptr + n * sgn + hw[:, None] * sghw + c[None, :] * sgc, mask=ok,
                     other=0.0).to(tl.float32)
    g = mt * g
    # Compiled, the dot runs in the weights' dtype: g is rounded to bf16 like dx will be.
    gd = g if UPCAST else g.to(w_ptr.dtype.element_ty)
    if HAS_KP:
        coef = -2.0 * tl.load(dk_ptr) / ((tl.num_programs(0) - KP0) * HW)
    chunk = tl.cdiv(tl.cdiv(D, SPLIT), BLOCK_D) * BLOCK_D
    d_end = tl.minimum(D, (k + 1) * chunk)
    for d0 in range(k * chunk, d_end, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < d_end
        if NEED_DX:
            wt = tl.load(w_ptr + c[:, None] * swc + d[None, :] * swd,
                         mask=c_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_C, BLOCK_D)
            if UPCAST:
                wt = wt.to(tl.float32)
            dxt = tl.dot(gd, wt, input_precision=PRECISION)  # (BLOCK_HW, BLOCK_D)
            if HAS_KP:
                if n >= KP0:
                    dxt += coef * tl.load(kp_ptr + (n - KP0) * D + d, mask=d_ok, other=0.0)[None, :]
            tl.store(dx_ptr + n * sen + hw[:, None] * sehw + d[None, :] * sed,
                     dxt.to(dx_ptr.dtype.element_ty), mask=hw_ok[:, None] & d_ok[None, :])
        if NEED_DW:
            xt = tl.load(x_ptr + n * sxn + hw[:, None] * sxhw + d[None, :] * sxd,
                         mask=hw_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            tl.store(dwpart_ptr + ((n * n_hw + j) * C + c[:, None]) * D + d[None, :],
                     tl.dot(tl.trans(g), xt, input_precision=PRECISION),
                     mask=c_ok[:, None] & d_ok[None, :])


@launch.kernel([({"BLOCK_R": 32, "BLOCK_D": 64}, 4, 2)])
def _dw_kernel(
    part_ptr,  # (N, J, C, D) fp32 partials: P_j (WEIGHTED) or sum_hw g x; rows r = n * J + j
    dl_ptr,  # (N, C) fp32 dlogits, contiguous; read if WEIGHTED or NEED_DB
    dw_ptr,  # (C, D) out, contiguous, the weights' dtype; written if NEED_DW
    db_ptr,  # (C,) out, the bias's dtype; written by the programs of axis-1 index 0 if NEED_DB
    N, J, C, D,  # sizes
    inv_hw,  # 1 / HW: P's weights are dlogits / HW
    WEIGHTED: tl.constexpr,  # partials are P: weigh image n by dlogits[n, c] / HW
    NEED_DW: tl.constexpr,  # write dw
    NEED_DB: tl.constexpr,  # write db
    BLOCK_R: tl.constexpr,  # partial rows per loop step
    BLOCK_D: tl.constexpr,  # channels per program
):
    c = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    if NEED_DW:
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for r0 in range(0, N * J, BLOCK_R):  # fixed order and tree: deterministic
            r = r0 + tl.arange(0, BLOCK_R)
            r_ok = r < N * J
            t = tl.load(part_ptr + (r[:, None] * C + c) * D + d[None, :],
                        mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            if WEIGHTED:
                t *= tl.load(dl_ptr + (r // J) * C + c, mask=r_ok, other=0.0)[:, None] * inv_hw
            acc += t
        tl.store(dw_ptr + c * D + d, tl.sum(acc, axis=0).to(dw_ptr.dtype.element_ty), mask=d_ok)
    if NEED_DB:
        if tl.program_id(1) == 0:
            s = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_R):
                i = n0 + tl.arange(0, BLOCK_R)
                s += tl.load(dl_ptr + i * C + c, mask=i < N, other=0.0)
            tl.store(db_ptr + c, tl.sum(s, axis=0).to(db_ptr.dtype.element_ty))


def _split(N, D, HW, device):
    """D-chunks per (image, pixel block): at least 2 programs per SM at 128-pixel blocks, chunks
    of at least 128 channels. A guess, not tuned on a GPU: more chunks buy occupancy on small
    maps (N = 32 at 16×16: 5) at 2C/D of x's bytes in fp32 CAM partials each, and the paper's
    64×768×32×32 gets none."""
    if SPLIT is not None:
        return SPLIT
    if launch.INTERPRET:
        return 1
    programs = N * triton.cdiv(HW, TRAIN_BLOCK_HW)
    return max(1, min(triton.cdiv(2 * launch.sm_count(device), programs), D // 128))


def _slots(kernel, HW, D, save_p=False):
    """Pixel blocks per image for per-program buffers, sized for the smallest block a launch may pick."""
    kept = _prune(kernel.candidates, {"HW": HW, "D": D}, SAVE_P=save_p)
    return triton.cdiv(HW, min(c.kwargs["BLOCK_HW"] for c in kept))


def _packed(buf, *shape):
    # A launch that picked a larger pixel block wrote fewer slots, packed at the buffer's front.
    return buf[:math.prod(shape)].view(shape)


def _grid(N, HW, split):
    return lambda meta: (N, triton.cdiv(HW, meta["BLOCK_HW"]), split)


def forward(x, m, w, b, write_cam=True, save_p=False, save_g_from=None, poison=False):
    """Check inputs and launch -> (cam (N, C, H, W) in x's dtype or None, logits (N, C) fp32,
    Partials: P (N, n_hw, C, D) fp32 if save_p, the channel sums of x (N - save_g_from, n_hw, D)
    fp32 unless save_g_from is None); poison: every buffer starts as NaN."""
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
    HW, dev = H * W, x.device
    split, slots = _split(N, D, HW, dev), _slots(_cam_fwd_kernel, HW, D, save_p)
    g0 = N if save_g_from is None else save_g_from
    cam = empty((N, C, H, W), dev, x.dtype, poison) if write_cam else None
    l_slots = max(slots, triton.cdiv(HW, _combine_kernel.configs[0].kwargs["BLOCK_HW"]))
    lpart = empty((N * l_slots * C,), dev, poison=poison)
    hpart = empty((N, split, C, HW), dev, poison=poison) if split > 1 else None
    ppart = empty((N * slots * C * D,), dev, poison=poison) if save_p else None
    gpart = empty(((N - g0) * slots * D,), dev, poison=poison) if g0 < N else None
    # Pointers a constexpr flag switches off are never dereferenced; lpart stands in for them.
    meta = _cam_fwd_kernel(
        _grid(N, HW, split), x, m, w, *(lpart if t is None else t for t in (cam, hpart)), lpart,
        *(lpart if t is None else t for t in (ppart, gpart)), C, D, HW, g0,
        *launch.strides(x), *launch.strides(m), *w.stride(), SPLIT=split, BLOCK_C=next_pow2(C),
        WRITE_CAM=write_cam, SAVE_P=save_p, SAVE_G=g0 < N, UPCAST=launch.INTERPRET,
        PRECISION=launch.FP32_PRECISION)
    n_hw = l_hw = triton.cdiv(HW, meta["BLOCK_HW"])
    if split > 1:
        meta = _combine_kernel(lambda meta: (N, triton.cdiv(HW, meta["BLOCK_HW"])), hpart,
                               lpart if cam is None else cam, lpart, C, HW, SPLIT=split,
                               BLOCK_C=next_pow2(C, 1), WRITE_CAM=write_cam)
        l_hw = triton.cdiv(HW, meta["BLOCK_HW"])
    logits = launch.reduce_partials(_packed(lpart, N, l_hw, C), 1.0 / HW, b, poison)
    return cam, logits, Partials(None if ppart is None else _packed(ppart, N, n_hw, C, D),
                                 None if gpart is None else _packed(gpart, N - g0, n_hw, D))


def backward(x, m, w, b, dlogits, dcam, needs, p, kp=None, poison=False):
    """(dx, dw, db), each None unless `needs` (three bools) asks for it. x is the forward's input,
    or its launch.like when dcam is None (then only its shape and layout are used); dlogits
    (N, C) and dcam (N, C, H, W) are upstream grads, not both None; p: forward's P partials
    (needed when w needs a grad and dcam is None); kp: the AM step's (diff (N - n0, D) fp32,
    dk 0-d tensor, n0) or None; poison: every buffer starts as NaN."""
    need_dx, need_dw, need_db = needs
    N, D, H, W = x.shape
    C, HW, dev = m.shape[1], H * W, m.device
    dl = None if dlogits is None else dlogits.float().contiguous()
    kernel_dw = need_dw and dcam is not None  # cam had a grad: dw from x, not from P
    need_db = need_db and dl is not None
    split, slots = _split(N, D, HW, dev), _slots(_cam_bwd_kernel, HW, D)
    dx = empty_like(x, dev, poison) if need_dx else None
    part = empty((N * slots * C * D,), dev, poison=poison) if kernel_dw else p
    if need_dx or kernel_dw:
        g = m if dcam is None else dcam
        kp0, diff, dk = (N, m, m) if kp is None else (kp[2], kp[0], kp[1].float().reshape(1))
        # Pointers a constexpr flag switches off are never dereferenced; m stands in for them.
        meta = _cam_bwd_kernel(
            _grid(N, HW, split), x if kernel_dw else m, m, w, m if dl is None else dl, g, diff, dk,
            m if dx is None else dx, part if kernel_dw else m, C, D, HW, kp0, *launch.strides(x),
            *launch.strides(m), *w.stride(), *launch.strides(g), *launch.strides(x if dx is None else dx),
            SPLIT=split, BLOCK_C=next_pow2(C), HAS_DL=dl is not None, HAS_DCAM=dcam is not None,
            HAS_KP=kp is not None, NEED_DX=need_dx, NEED_DW=kernel_dw, UPCAST=launch.INTERPRET,
            PRECISION=launch.FP32_PRECISION)
        if kernel_dw:
            part = _packed(part, N, triton.cdiv(HW, meta["BLOCK_HW"]), C, D)
    if not (need_dw or need_db):
        return dx, None, None
    dw = empty((C, D), dev, w.dtype, poison) if need_dw else None
    db = empty((C,), dev, b.dtype, poison) if need_db else None
    _dw_kernel(lambda meta: (C, triton.cdiv(D, meta["BLOCK_D"])),
               *(m if t is None else t for t in (part if need_dw else None, dl, dw, db)),
               N, part.shape[1] if need_dw else 0, C, D, 1.0 / HW, WEIGHTED=not kernel_dw,
               NEED_DW=need_dw, NEED_DB=need_db)
    return dx, dw, db


class MaskedCamLogits(torch.autograd.Function):
    """(cam, logits) or logits alone; differentiable in x, w, b (masks are constants)."""

    @staticmethod
    def forward(ctx, x, m, w, b, write_cam, save_p, poison):
        ctx.set_materialize_grads(False)  # an unused output's grad arrives as None: skip its work
        cam, logits, parts = forward(x, m, w, b, write_cam, save_p, poison=poison)
        # x itself is re-read only for dw when cam gets a grad; otherwise keep only its layout.
        ctx.save_for_backward(x if write_cam else None, m, w, b, parts.p)
        ctx.x, ctx.write_cam, ctx.poison = launch.like(x), write_cam, poison
        return (cam, logits) if write_cam else logits

    @staticmethod
    def backward(ctx, *grads):
        x, m, w, b, p = ctx.saved_tensors
        x = ctx.x if x is None else x
        dcam, dlogits = grads if ctx.write_cam else (None, grads[0])
        if dcam is None and dlogits is None:
            return (None,) * 7
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        dx, dw, db = backward(x, m, w, b, dlogits, dcam, needs, p, poison=ctx.poison)
        return dx, None, dw, db, None, None, None


def save_p_for(w):
    """Whether the forward must keep P: w will get a gradient (needs_input_grad ignores no_grad)."""
    return torch.is_grad_enabled() and isinstance(w, torch.Tensor) and w.requires_grad


def masked_cam_logits(x, m, w, b, write_cam=True, poison=False):
    """x (N, D, H, W), m (N, C, H, W), w (C, D), b (C,), one dtype (float32 or bfloat16), x in
    NCHW or channels-last -> (cam (N, C, H, W) in x's dtype = reference.cam, or None unless
    write_cam; logits (N, C) float32 = reference.branch_logits). poison=True (the tests) starts
    every output, buffer and gradient as NaN, so an element the kernels did not write shows up."""
    if write_cam:
        return MaskedCamLogits.apply(x, m, w, b, True, save_p_for(w), poison)
    return None, MaskedCamLogits.apply(x, m, w, b, False, save_p_for(w), poison)
