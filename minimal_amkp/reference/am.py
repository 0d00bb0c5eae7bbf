"""Attention mining: equations (1)-(3), (7), the mask update and (8). Sec. 2.1 and 3.2.

Shapes are channels-first, unlike the paper's N×W×H×D:
    x  features of the last convolutional layer     (N, D, H, W)
    m  binary erasure masks M_c, one per class      (N, C, H, W)
    w  branch weights w_c, one row per class        (C, D)
    b  branch biases b_c                            (C,)
    y  image labels y_c in {0, 1}                   (N, C)
Everything here is the naive, materialised form: slow and obviously right. Faster code
elsewhere in the project is tested against it.
"""
import numpy as np
from scipy import ndimage

from . import checks
from .boxes import EIGHT_CONNECTED, minmax
from .geometry import nearest_cells


def _features_and_masks(x, m):
    x = checks.array("x", x, ndim=4)                                     # (N, D, H, W)
    m = checks.binary("m", checks.array("m", m, ndim=4))                 # (N, C, H, W)
    if x.shape[0] != m.shape[0] or x.shape[2:] != m.shape[2:]:
        raise ValueError(f"x (N, D, H, W) and m (N, C, H, W) disagree on N, H or W: "
                         f"x {x.shape}, m {m.shape}")
    return x, m


def _weights(w, x, m):
    w = checks.array("w", w, ndim=2)                                     # (C, D)
    if w.shape != (m.shape[1], x.shape[1]):
        raise ValueError(f"w must be (C, D) = ({m.shape[1]}, {x.shape[1]}) for x {x.shape} "
                         f"and m {m.shape}, got {w.shape}")
    return w


def erase(x, m):
    """Eq. (1): X̂_c = X ⊙ M̂_c.

    M̂_c is M_c replicated D times along the channel axis, so every channel of X is zeroed
    where the class-c mask is 0. x (N, D, H, W), m (N, C, H, W) -> x_hat (N, C, D, H, W).
    """
    x, m = _features_and_masks(x, m)
    return x[:, None] * m[:, :, None]                                     # (N, C, D, H, W)


def gap(x):
    """g(·): global average pooling over the two spatial axes (..., H, W) -> (...)."""
    x = checks.array("x", x, min_ndim=2)
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(f"x: empty spatial extent, shape {x.shape}")
    return x.mean(axis=(-2, -1))


def branch_logits(x, m, w, b):
    """Inside eq. (2): z_c = w_cᵀ g(X̂_c) + b_c.

    The logit of branch c sees only the erased map X̂_c = X ⊙ M̂_c.
    x (N, D, H, W), m (N, C, H, W), w (C, D), b (C,) -> z (N, C).
    """
    x, m = _features_and_masks(x, m)
    w = _weights(w, x, m)
    b = checks.array("b", b, ndim=1)
    if b.shape != (w.shape[0],):
        raise ValueError(f"b must be (C,) = ({w.shape[0]},), got {b.shape}")
    x_hat = erase(x, m)                                                   # (N, C, D, H, W)
    return np.einsum("ncd,cd->nc", gap(x_hat), w) + b                     # (N, C)


def branch_losses(logits, y):
    """Eq. (2): L_c = (1/N) Σ_n h(σ(z_nc), y_nc), h the binary cross-entropy.

    Written on the logits as max(z, 0) − z·y + log(1 + e^−|z|), which equals
    −y log σ(z) − (1 − y) log(1 − σ(z)) and never overflows for large |z|.
    logits z (N, C), y (N, C) in {0, 1} -> L (C,).
    """
    z = checks.array("logits", logits, ndim=2)                            # (N, C)
    y = checks.binary("y", checks.array("y", y, ndim=2))                  # (N, C)
    checks.same_shape("logits", z, "y", y)
    if z.shape[0] == 0:
        raise ValueError(f"logits: need at least one image, got shape {z.shape}")
    h = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))           # (N, C)
    return h.mean(axis=0)                                                 # (C,)


def classification_loss(logits, y):
    """Eq. (3): L_cls = (1/C) Σ_c L_c. logits (N, C), y (N, C) -> scalar."""
    return float(branch_losses(logits, y).mean())


def cam(x, m, w):
    """Eq. (7): H_c = (X ⊙ M̂_c) w_c, the inner product taken over the channel axis D.

    The class activation map of the erased features: zero wherever M_c is 0.
    x (N, D, H, W), m (N, C, H, W), w (C, D) -> h (N, C, H, W).
    """
    x, m = _features_and_masks(x, m)
    w = _weights(w, x, m)
    return np.einsum("ncdhw,cd->nchw", erase(x, m), w)                    # (N, C, H, W)



def _live_minmax(h_i, live):
    """One map (H, W) min–max normalised over its live cells -> (live cells,), or None when it
    has none or is constant over them (no peak). The rule of update_masks and normalise_live."""
    return minmax(h_i[live]) if live.any() else None


def normalise_live(h, m):
    """Sec. 3.2's "These CAMs are then normalized to [0, 1]", read per round: each map of H_t
    min–max normalised to [0, 1] over the cells alive under M_{t-1} (the rule update_masks
    binarises), erased cells 0, and 0 everywhere for a map constant over its live cells.
    Feeding these to fuse_heatmaps is the other reading of eq. (8), which adds raw CAMs.
    h (..., H, W) CAMs, m (..., H, W) masks M_{t-1} -> (..., H, W) in [0, 1].
    """
    h = checks.array("h", h, min_ndim=2)
    m = checks.binary("m", checks.array("m", m, min_ndim=2))
    checks.same_shape("h", h, "m", m)
    out = np.zeros_like(h)
    for h_i, m_i, o_i in zip(h.reshape(-1, *h.shape[-2:]), m.reshape(-1, *h.shape[-2:]),
                             out.reshape(-1, *h.shape[-2:])):
        live = m_i == 1                                                   # (H, W)
        scaled = _live_minmax(h_i, live)                                  # (live cells,)
        if scaled is not None:
            o_i[live] = scaled
    return out


def update_masks(h, m, threshold=0.5):
    """Sec. 3.2, mask update: M_t = M_{t-1} with the peak component of binarised H_t set to 0.

    For each map, over the cells still in the mask (M_{t-1} = 1): min–max normalise H_t to
    [0, 1], binarise with `>= threshold`, find the 8-connected component of those cells that
    holds the maximum (the first argmax in row-major order) and zero it in the new mask.
    Erased cells are left out because eq. (7) makes them exactly 0 there: a 0 is no evidence,
    and counted in, it becomes the "global maximum" as soon as the rest of the CAM is
    negative, so mining would erase nothing new. With M_0 all ones this is the paper's
    whole-map rule. A map that is constant over its remaining cells (or has none) has no peak
    and keeps its mask. The update never turns a 0 into a 1, so masks only shrink.
    h (..., H, W) CAMs H_t, m (..., H, W) masks M_{t-1} -> M_t (..., H, W).
    """
    h = checks.array("h", h, min_ndim=2)
    m = checks.binary("m", checks.array("m", m, min_ndim=2))
    checks.same_shape("h", h, "m", m)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    new = m.copy()
    flat_h = h.reshape(-1, *h.shape[-2:])                                 # (B, H, W)
    flat_new = new.reshape(-1, *h.shape[-2:])                             # (B, H, W), a view
    for h_i, m_i in zip(flat_h, flat_new):
        live = m_i == 1                                                   # (H, W)
        h_hat = _live_minmax(h_i, live)                                   # (live cells,)
        if h_hat is None:
            continue
        on = np.zeros_like(live)
        on[live] = h_hat >= threshold
        labels, _ = ndimage.label(on, structure=EIGHT_CONNECTED)
        peak = np.unravel_index(np.argmax(np.where(live, h_i, -np.inf)), h_i.shape)
        m_i[labels == labels[peak]] = 0
    return new


def dilate_erasure(m_new, m_prev, r):
    """The erasure ladder's `--mine.dilate R` (ours; the paper erases the component alone):
    M_t' = M_t with every cell within r cells (8-neighbourhood, Chebyshev distance <= r) of a
    cell the update just erased (M_{t-1} = 1, M_t = 0) also set to 0, so that evidence the
    receptive field carries just outside a region goes with it. Earlier rounds' regions were
    grown in their own round and are not grown again. r = 0 gives M_t back.
    m_new M_t, m_prev M_{t-1} (..., H, W) binary -> (..., H, W) in m_new's dtype.
    """
    m_new = checks.binary("m_new", checks.array("m_new", m_new, min_ndim=2))
    m_prev = checks.binary("m_prev", checks.array("m_prev", m_prev, min_ndim=2))
    checks.same_shape("m_new", m_new, "m_prev", m_prev)
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
        raise ValueError(f"r must be a whole number >= 0, got {r!r}")
    erased = (m_prev == 1) & (m_new == 0)                                 # (..., H, W)
    size = (1,) * (erased.ndim - 2) + (2 * r + 1, 2 * r + 1)
    grown = ndimage.maximum_filter(erased, size=size, mode="constant", cval=False)
    return np.where(grown, 0.0, m_new)


def erase_image(image, m, grid):
    """The erasure ladder's `--mine.erase image` (ours): eq. (1) brought to the input.

        x̂ = x ⊙ P + f (1 − P),    P[u, v] = min_c M_c[r(u), r(v)],
        f = mean of x over the pixels P keeps (0 where it keeps none)

    r(u) is the cell whose centre (geometry.py: stride·j + offset) is nearest pixel u, so
    a pixel goes with the cell it is centred under. One image serves all its classes, so P
    erases the union of every class's erased cells (the regions of the classes an image is
    negative for are all ones, or the holes erasure.hole_masks gives it). The fill f is the
    image's own mean level: no edge of its own darker or brighter than the film around it,
    and the same rule for the holes of negatives, so no fill is a cue to a class.
    image (N, 1, S, S), m (N, C, H, W) binary, grid (stride, offset, size) of the maps on
    an S-pixel input -> x̂ (N, 1, S, S).
    """
    image = checks.array("image", image, ndim=4)                          # (N, 1, S, S)
    m = checks.binary("m", checks.array("m", m, ndim=4))                  # (N, C, H, W)
    if image.shape[1] != 1 or image.shape[2] != image.shape[3] or image.shape[0] != m.shape[0]:
        raise ValueError(f"image must be (N, 1, S, S) with m's N, got image {image.shape}, m {m.shape}")
    r_y = nearest_cells(image.shape[2], m.shape[2], grid)                 # (S,)
    r_x = nearest_cells(image.shape[3], m.shape[3], grid)                 # (S,)
    p = m.min(axis=1)[:, r_y[:, None], r_x[None, :]][:, None]           # (N, 1, S, S)
    kept = p.sum(axis=(1, 2, 3))                                          # (N,)
    f = np.where(kept > 0, (image * p).sum(axis=(1, 2, 3)) / np.maximum(kept, 1), 0.0)
    return image * p + f[:, None, None, None] * (1 - p)


def fuse_heatmaps(cams, masks):
    """Eq. (8): H_f = (1/T) Σ_{t=1..T} [ H_t + Σ_{t'=1..t-1} H_{t'} ⊙ M̄_{t'} ],  M̄ = 1 − M̂.

    Round t erased every region removed in rounds 1..t-1, so H_t is 0 there; the inner sum
    fills each such region back in from the heatmap of the round that removed it.
    cams[t] is H_{t+1} and masks[t] the mask M_t that was applied to compute it, so masks[0]
    (= M_0) is all ones and M_1..M_{T-1} = masks[1:] enter the sum. Each entry (..., H, W).

    With a frozen network, H_t = H_1 ⊙ M_{t-1} and the masks are nested, so each bracket
    telescopes to H_1 ⊙ M_0 = H_1 and H_f = H_1 for every T: attention mining only adds
    information because the network is fine-tuned between rounds.
    """
    if len(cams) == 0 or len(cams) != len(masks):
        raise ValueError(f"cams and masks must be non-empty lists of equal length, "
                         f"got {len(cams)} and {len(masks)}")
    h = [checks.array(f"cams[{t}]", c, min_ndim=2) for t, c in enumerate(cams)]
    mk = [checks.binary(f"masks[{t}]", checks.array(f"masks[{t}]", k, min_ndim=2))
          for t, k in enumerate(masks)]
    for t in range(len(h)):
        checks.same_shape("cams[0]", h[0], f"cams[{t}]", h[t])
        checks.same_shape("cams[0]", h[0], f"masks[{t}]", mk[t])
    if not np.all(mk[0] == 1):
        raise ValueError("masks[0] must be all ones: it is M_0, the mask of the first round")
    T = len(h)
    h_f = np.zeros_like(h[0])
    filled = np.zeros_like(h[0])                  # Σ_{t'<t} H_{t'} ⊙ M̄_{t'}, grown each round
    for t in range(T):
        h_f += h[t] + filled
        if t + 1 < T:
            filled += h[t] * (1.0 - mk[t + 1])
    return h_f / T
