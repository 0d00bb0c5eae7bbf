"""Torch counterparts of the reference functions that training and mining use.

Same names, shapes and meanings as `minimal_amkp.reference` (tested against it in float64).
The class-erased features X̂_c (N, C, D, H, W) of eq. (1) are never built in training: the
logit of branch c uses the identity

    w_cᵀ g(X ⊙ M̂_c) + b_c = mean_hw(M_c ⊙ CAM_c) + b_c,   CAM_c = Σ_d w_cd X_d,

which needs only the (N, C, H, W) CAMs. `erase` and `masked_gap` are the literal forms of
eq. (1)-(2), for readers, tests and the bench. The mask update and the heatmap fusion (Sec. 3.2,
eq. 8) carry no gradient; mining calls the NumPy reference for them, and `update_masks` and
`fuse_heatmaps` here are their torch forms, equal to it in float64.

Dispatch. The backend is chosen once, at start-up: `choose_backend()` reads AMKP_BACKEND (the
default of the --backend option) and nothing else does. Its value is passed down, to
ResNetMSA(cfg, backend=...) and from there to every op that has a kernel, as the keyword
`backend`: "torch" (the torch code here), "triton" (force the kernels, e.g. on CPU under
TRITON_INTERPRET=1) or "auto" (the default: the kernels when every tensor is on CUDA and they
import, else torch).

One dtype contract on both backends: logits and losses are float32 for float32 and bfloat16
inputs (float64 stays float64, torch backend only), CAMs and pooled maps keep the features'
dtype. The kernels take NCHW or channels-last features as they are (no copy); gradients come
back in that layout.
"""
import functools
import os

import torch
import torch.nn.functional as F

from minimal_amkp.reference.geometry import nearest_cells

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def _load_kernels():
    """(the kernels package, "") or (None, why not): Triton missing, too old or broken."""
    try:
        import kernels
    except (ImportError, AttributeError) as e:  # a half-installed or foreign triton raises either
        return None, f"{type(e).__name__}: {e}"
    if kernels.launch.triton is None:
        return None, kernels.launch.UNAVAILABLE
    return kernels, ""


def _kernels():
    return _load_kernels()[0]


def _checked(name, source):
    # `source` is what the user set, so that the one-line error points at it.
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "triton" and _kernels() is None:
        why = _load_kernels()[1]
        raise RuntimeError(f"{source}=triton, but the kernels package or Triton cannot be imported"
                           + (f" ({why})" if why else ""))
    return name


def choose_backend(name=None):
    """The backend for the whole run, "auto", "torch" or "triton": `name` (the --backend
    option), or when it is None the environment variable AMKP_BACKEND (default "auto").
    ValueError for another name, RuntimeError for "triton" without usable kernels."""
    if name is None:
        return _checked(os.environ.get("AMKP_BACKEND", "auto"), "AMKP_BACKEND")
    return _checked(name, "--backend")


def _on_triton(backend, *tensors):
    """Whether an op on these tensors runs the kernels, on this backend."""
    if _checked(backend, "backend") == "auto":
        return all(t.is_cuda for t in tensors) and _kernels() is not None
    return backend == "triton"


def _kernel_args(*tensors):
    # The kernels take one dtype (float32 or bfloat16): the features' dtype wins. Feature maps
    # keep their layout; only one whose H, W no single stride walks (rare) is made contiguous.
    dtype = tensors[0].dtype if tensors[0].dtype in (torch.float32, torch.bfloat16) else torch.float32
    flat = _kernels().launch.hw_stride
    return [t.to(dtype) if t.dim() != 4 or flat(t) is not None else t.to(dtype).contiguous()
            for t in tensors]


def _wide(t):
    # Reductions of bfloat16 activations (GPU autocast) run in float32; float64 stays float64.
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _wide_gap(x):
    # The mean of bfloat16 maps accumulated and returned in float32, without a float32 copy.
    return x.mean(dim=(-2, -1), dtype=torch.float32) if x.dtype in (torch.bfloat16, torch.float16) else gap(x)


def gap(x):
    """g(·): mean over the last two axes, (..., H, W) -> (...)."""
    return x.mean(dim=(-2, -1))


def erase(x, m):
    """Eq. (1): X̂_c = X ⊙ M̂_c. x (N, D, H, W), m (N, C, H, W) -> (N, C, D, H, W), differentiable in x.

    Materialises C copies of X: training never calls it (see branch_logits)."""
    return x[:, None] * m[:, :, None].to(x.dtype)


def masked_gap(x, m, backend="auto"):
    """Eq. (1)-(2) literally: P_c = g(X ⊙ M̂_c). x (N, D, H, W), m (N, C, H, W) -> P (N, C, D) in x's dtype.

    Training does not call it. branch_logits needs only w_cᵀ P_c, and the CAM identity,
    mean_hw(M_c ⊙ CAM_c), gives that from the product X w that the CAMs of eq. (7) need anyway:
    cheaper. This is the literal form, there for readers, the tests and the bench. It pools
    without building X̂_c, and on the Triton backend runs kernels.masked_gap; differentiable in
    x (masks are constants).
    """
    if _on_triton(backend, x, m):
        return _kernels().masked_gap.masked_gap(*_kernel_args(x, m))
    return torch.einsum("ndhw,nchw->ncd", x, m.to(x.dtype)) / (x.shape[-2] * x.shape[-1])


def cam(x, m, w, backend="auto"):
    """Eq. (7): H_c = (X ⊙ M̂_c) w_c. x (N, D, H, W), m (N, C, H, W), w (C, D) -> (N, C, H, W)."""
    if _on_triton(backend, x, m, w):
        x, m, w = _kernel_args(x, m, w)
        return _kernels().masked_cam.masked_cam_logits(x, m, w, torch.zeros_like(w[:, 0]), write_cam=True)[0]
    return (torch.einsum("ndhw,cd->nchw", x, w.to(x.dtype)) * m.to(x.dtype)).to(x.dtype)


def branch_logits(x, m, w, b, backend="auto"):
    """Inside eq. (2): z_c = w_cᵀ g(X ⊙ M̂_c) + b_c. x (N, D, H, W), m (N, C, H, W) or None, w (C, D), b (C,) -> (N, C).

    m=None means all-ones masks, where the identity reduces to w_cᵀ g(X) + b_c.
    """
    if m is None:
        return _wide(F.linear(gap(x), w.to(x.dtype), b.to(x.dtype)))
    if _on_triton(backend, x, m, w, b):
        x, m, w, b = _kernel_args(x, m, w, b)
        return _kernels().masked_cam.masked_cam_logits(x, m, w, b, write_cam=False)[1]
    return gap(_wide(cam(x, m, w, backend="torch"))) + _wide(b)


def branch_losses(logits, y):
    """Eq. (2): L_c = (1/N) Σ_n BCE(σ(z_nc), y_nc). logits (N, C), y (N, C) -> (C,)."""
    z = _wide(logits)
    return F.binary_cross_entropy_with_logits(z, y.to(z.dtype), reduction="none").mean(dim=0)


def am_step(x, m, w, b, xa, n0, backend="auto"):
    """X's two consumers in an AM step, eq. (2) and (4) at X: (branch_logits(x, m, w, b),
    kp_layer_loss(xa, x[n0:])). x (N, D, H, W) is N_B's X, xa (N − n0, D, H, W) N_A's X for the
    whole images n >= n0 (no gradient), m (N, C, H, W), w (C, D), b (C,) -> ((N, C), scalar).

    The Triton backend reads X once for both and its backward writes dX once, the KP gradient
    added inside the dX tile; the torch backend is the two ops, and autograd sums two dX.
    """
    if _on_triton(backend, x, m, w, b, xa):
        x, m, w, b, xa = _kernel_args(x, m, w, b, xa)
        return _kernels().am_step.am_step(x, m, w, b, xa, n0)
    return branch_logits(x, m, w, b, backend="torch"), kp_layer_loss(xa, x[n0:], backend="torch")


def classification_loss(logits, y):
    """Eq. (3): L_cls = (1/C) Σ_c L_c. -> scalar."""
    return branch_losses(logits, y).mean()


def kp_layer_loss(fa, fb, backend="auto"):
    """Eq. (4), squared as in the reference: Σ (g(X_A) − g(X_B))² / (N − n). fa, fb (N−n, K, H, W) or (N−n, K)."""
    if fa.shape != fb.shape or fa.dim() not in (2, 4):
        raise ValueError(f"fa and fb must share one shape (N-n, K, H, W) or (N-n, K), "
                         f"got {tuple(fa.shape)} and {tuple(fb.shape)}")
    if fa.dim() == 4 and _on_triton(backend, fa, fb):
        return _kernels().kp_distance.kp_distance(*_kernel_args(fa, fb))
    ga = _wide(_wide_gap(fa) if fa.dim() == 4 else fa)             # (N−n, K)
    gb = _wide(_wide_gap(fb) if fb.dim() == 4 else fb)             # (N−n, K)
    return ((ga - gb) ** 2).sum() / fa.shape[0]


def kp_loss(pairs, losses=(), backend="auto"):
    """Eq. (5): L_KP = (1/|K|) Σ_k L_k over (fa, fb) layer pairs and already computed L_k
    (`losses`, e.g. the KP distance at X from am_step)."""
    terms = [kp_layer_loss(fa, fb, backend=backend) for fa, fb in pairs] + list(losses)
    if not terms:
        raise ValueError("pairs: need at least one (fa, fb) layer pair, got an empty list")
    return torch.stack(terms).mean()


def total_loss(l_cls, l_kp, lam=0.5):
    """Eq. (6): L = L_cls + λ L_KP."""
    return l_cls + lam * l_kp


@torch.no_grad()
def update_masks(h, m, threshold=0.5):
    """Sec. 3.2, the mask update, = reference.update_masks: for each map, over the cells still in
    the mask, min-max normalise H_t, binarise with >= threshold and zero the 8-connected
    component that holds the peak (the first maximum in row-major order); a map constant over
    its remaining cells, or with none, keeps its mask. h (..., H, W) CAMs, m (..., H, W) binary
    masks M_{t-1} -> M_t in m's dtype and device. No gradient.

    Normalised in float64, so it equals the reference exactly. Torch has no component
    labelling (the reference's scipy.ndimage.label), and only the peak's component is needed:
    it is grown from the peak by 3×3 max-pools cut to the binarised cells, one ring a step,
    until it stops growing.
    """
    if h.shape != m.shape or h.dim() < 2:
        raise ValueError(f"h and m must have one shape (..., H, W), got {tuple(h.shape)} and {tuple(m.shape)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    H, W = h.shape[-2:]
    live = m.reshape(-1, H * W) == 1                                      # (B, HW)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=h.device)
    hf = h.reshape(-1, H * W).to(torch.float64)                           # (B, HW)
    lo = torch.where(live, hf, inf).amin(1, keepdim=True)                 # no live cell: lo > hi
    hi = torch.where(live, hf, -inf).amax(1, keepdim=True)
    on = live & (hi > lo) & ((hf - lo) / (hi - lo) >= threshold)
    peak = torch.where(live, hf, -inf).argmax(1)                          # the first maximum
    grown = F.one_hot(peak, H * W).bool() & on                            # empty where no peak
    while True:
        ring = F.max_pool2d(grown.view(-1, 1, H, W).float(), 3, 1, 1).view(-1, H * W) > 0
        wider = ring & on
        if torch.equal(wider, grown):
            break
        grown = wider
    new = m.reshape(-1, H * W).clone()
    new[grown] = 0
    return new.view(m.shape)


@torch.no_grad()
def dilate_erasure(m_new, m_prev, r):
    """= reference.dilate_erasure: M_t with every cell within r cells (Chebyshev) of a cell the
    update just erased set to 0, by one (2r + 1)² max-pool. m_new, m_prev (..., H, W) binary ->
    (..., H, W) in m_new's dtype and device. No gradient."""
    if m_new.shape != m_prev.shape or m_new.dim() < 2:
        raise ValueError(f"m_new and m_prev must have one shape (..., H, W), got {tuple(m_new.shape)} "
                         f"and {tuple(m_prev.shape)}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be a whole number >= 0, got {r!r}")
    H, W = m_new.shape[-2:]
    erased = ((m_prev == 1) & (m_new == 0)).reshape(-1, 1, H, W).float()
    grown = F.max_pool2d(erased, 2 * r + 1, 1, r).reshape(m_new.shape) > 0
    return torch.where(grown, torch.zeros_like(m_new), m_new)


@torch.no_grad()
def erase_image(image, m, grid):
    """= reference.erase_image: the pixels under each image's erased cells (any class) filled
    with the mean of the pixels kept. image (N, 1, S, S), m (N, C, H, W) binary on the same
    device, grid (stride, offset, size) -> (N, 1, S, S) in image's dtype. No gradient."""
    if image.dim() != 4 or image.shape[1] != 1 or image.shape[2] != image.shape[3] or m.dim() != 4 \
            or m.shape[0] != image.shape[0]:
        raise ValueError(f"image must be (N, 1, S, S) and m (N, C, H, W) with one N, got {tuple(image.shape)} "
                         f"and {tuple(m.shape)}")
    S, H = image.shape[2], m.shape[2]
    r = torch.as_tensor(nearest_cells(S, H, grid), device=image.device)         # (S,)
    p = m.amin(dim=1)[:, r[:, None], r[None, :]][:, None].to(image.dtype)        # (N, 1, S, S)
    kept = p.sum(dim=(1, 2, 3))
    f = (image * p).sum(dim=(1, 2, 3)) / kept.clamp(min=1)                        # 0 where none kept
    return image * p + f[:, None, None, None] * (1 - p)


@torch.no_grad()
def fuse_heatmaps(cams, masks):
    """Eq. (8), = reference.fuse_heatmaps: H_f = (1/T) Σ_t [H_t + Σ_{t'<t} H_{t'} ⊙ M̄_{t'}].

    cams[t] is H_{t+1} and masks[t] the mask M_t applied to compute it (masks[0] = M_0, all
    ones), each (..., H, W) -> H_f (..., H, W) in the CAMs' dtype. No gradient. Summed in the
    reference's order, so float64 CAMs give its result exactly.
    """
    if len(cams) == 0 or len(cams) != len(masks):
        raise ValueError(f"cams and masks must be non-empty lists of equal length, "
                         f"got {len(cams)} and {len(masks)}")
    for t in range(len(cams)):
        for name, a in ((f"cams[{t}]", cams[t]), (f"masks[{t}]", masks[t])):
            if a.shape != cams[0].shape:
                raise ValueError(f"cams[0] and {name} must have the same shape, "
                                 f"got {tuple(cams[0].shape)} and {tuple(a.shape)}")
    if not bool((masks[0] == 1).all()):
        raise ValueError("masks[0] must be all ones: it is M_0, the mask of the first round")
    T = len(cams)
    h_f = torch.zeros_like(cams[0])
    filled = torch.zeros_like(cams[0])            # Σ_{t'<t} H_{t'} ⊙ M̄_{t'}, grown each round
    for t in range(T):
        h_f += cams[t] + filled
        if t + 1 < T:
            filled += cams[t] * (1 - masks[t + 1].to(cams[t].dtype))
    return h_f / T
