"""Boxes: Sec. 3.2 bbox generation from the fused heatmap H_f, and the overlaps IoU and IoBB.

A box is (x, y, w, h) as in BBox_List_2017.csv: top-left corner, width, height, in pixels of
some frame. In a heatmap's own frame pixel (row i, column j) covers [j, j+1) × [i, i+1), so a
box around columns j0..j1 and rows i0..i1 is (j0, i0, j1 − j0 + 1, i1 − i0 + 1). The caller
upsamples H_f to the image size first, or scales the boxes.
"""
import numpy as np
from scipy import ndimage

from . import checks

# Diagonal neighbours touch: one blob on a heatmap is one component (mask update and boxes).
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

# Levels on the min-max normalised map. 0.2 is the CAM paper's box threshold (Zhou et al.
# 2016); 0.4 and 0.6 add two tighter boxes, giving the paper's 3 boxes per map.
DEFAULT_BOX_THRESHOLDS = (0.2, 0.4, 0.6)
# Two candidates at least this similar are one detection (typically a sharp blob boxed the
# same at two levels); keeping both would spend a slot of B, and AFP budget, on a repeat.
DUPLICATE_IOU = 0.9


def check_boxes(name, a):
    """`a` as float64 boxes (..., 4) of finite (x, y, w, h) with w, h > 0."""
    a = checks.array(name, a, min_ndim=1)
    if a.shape[-1] != 4:
        raise ValueError(f"{name}: boxes must be (..., 4) as (x, y, w, h), got shape {a.shape}")
    bad = a[..., 2:] <= 0
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad.any(axis=-1))[0])
        raise ValueError(f"{name}: width and height must be > 0, got box {a[idx].tolist()} "
                         f"at index {idx} (shape {a.shape})")
    return a


def _intersection_and_areas(a, b):
    a, b = check_boxes("a", a), check_boxes("b", b)
    try:
        np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    except ValueError:
        raise ValueError(f"a and b: box arrays do not broadcast, got shapes {a.shape} "
                         f"and {b.shape}") from None
    # Widths from the corners, not a[..., 2], so that inter == area exactly when one box
    # holds the other: identical boxes give IoU 1.0 and a box inside b gives IoBB 1.0.
    ax0, ay0, ax1, ay1 = a[..., 0], a[..., 1], a[..., 0] + a[..., 2], a[..., 1] + a[..., 3]
    bx0, by0, bx1, by1 = b[..., 0], b[..., 1], b[..., 0] + b[..., 2], b[..., 1] + b[..., 3]
    iw = np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0, None)
    ih = np.clip(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0, None)
    return iw * ih, (ax1 - ax0) * (ay1 - ay0), (bx1 - bx0) * (by1 - by0)


def iou(a, b):
    """Intersection over union |a ∩ b| / |a ∪ b| of boxes (..., 4) and (..., 4), broadcast.

    Symmetric. For a pairwise (K, G) matrix pass a[:, None] and b[None]. -> (...) in [0, 1].
    """
    inter, area_a, area_b = _intersection_and_areas(a, b)
    # Larger area plus the rest of the smaller one: symmetric bit for bit, and never below
    # inter, so the ratio stays within [0, 1] under rounding.
    union = np.maximum(area_a, area_b) + (np.minimum(area_a, area_b) - inter)
    return inter / union


def iobb(a, b):
    """Intersection over the detected box's area |a ∩ b| / |a| (Wang et al. 2017), broadcast.

    `a` is the PREDICTED box, `b` the ground truth. Not symmetric: a small detection inside a
    large ground-truth box scores 1. Always >= iou(a, b). -> (...) in [0, 1].
    """
    inter, area_a, _ = _intersection_and_areas(a, b)
    return inter / area_a


def minmax(h):
    """h rescaled to [0, 1] by (h − min) / (max − min); None for a constant map (no peak)."""
    lo, hi = h.min(), h.max()
    return None if hi == lo else (h - lo) / (hi - lo)


def component_boxes(on):
    """Boxes (n, 4) int64 around the 8-connected components of a boolean map (H, W)."""
    labels, _ = ndimage.label(on, structure=EIGHT_CONNECTED)
    rows_cols = ndimage.find_objects(labels)
    return np.array([(c.start, r.start, c.stop - c.start, r.stop - r.start)
                     for r, c in rows_cols], dtype=np.int64).reshape(-1, 4)  # (n, 4)


def boxes_from_heatmap(h, thresholds=DEFAULT_BOX_THRESHOLDS, k=3, duplicate_iou=DUPLICATE_IOU):
    """Sec. 3.2, Bbox generation: up to k boxes from H_f by varying the intensity threshold,
    ranked by the mean H_f intensity inside each box, highest first.

    Rule: min-max normalise H_f to [0, 1]; at every level in `thresholds` box each
    8-connected component of (normalised H_f >= level); score each candidate box by the mean
    of the UNNORMALISED H_f inside it (within one map the order is the same either way, and
    raw CAM values keep scores comparable across images, which the B list of the metric
    sorts by); walk the candidates by score (ties: smaller area, then top, then left) and
    drop any with IoU >= duplicate_iou against one already kept; stop at k.
    Fewer than k boxes come back when the map has fewer distinct candidates (the paper's
    Fig. 2(a)); a constant map, all-zero included, has no peak to threshold and gives none.
    h (H, W) -> float64 (k', 5) rows (x, y, w, h, score) in h's pixel frame, k' <= k.
    """
    h = checks.array("h", h, ndim=2)                                      # (H, W)
    if h.size == 0:
        raise ValueError(f"h: empty heatmap, shape {h.shape}")
    levels = np.asarray(thresholds, dtype=np.float64)
    if levels.ndim != 1 or levels.size == 0 or not np.all((levels >= 0) & (levels <= 1)):
        raise ValueError(f"thresholds: need a non-empty sequence of levels in [0, 1], "
                         f"got {thresholds!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k: need an integer >= 1, got {k!r}")
    h_hat = minmax(h)
    if h_hat is None:
        return np.zeros((0, 5))
    cand = np.concatenate([component_boxes(h_hat >= t) for t in levels])  # (n, 4)
    score = np.array([h[y:y + bh, x:x + bw].mean() for x, y, bw, bh in cand])  # (n,)
    order = np.lexsort((cand[:, 0], cand[:, 1], cand[:, 2] * cand[:, 3], -score))
    kept = []
    for i in order:
        if kept and iou(cand[i], cand[kept]).max() >= duplicate_iou:
            continue
        kept.append(i)
        if len(kept) == k:
            break
    return np.column_stack([cand[kept], score[kept]]).astype(np.float64)  # (k', 5)
