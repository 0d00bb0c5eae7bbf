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
# A lowest-level component whose normalised peak reaches this is a region of its own: the
# mask update's binarisation threshold (Sec. 3.2), so a region is what mining would erase.
REGION_LEVEL = 0.5


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


def _regions(h_hat, level):
    """The 8-connected components of (h_hat >= level): labels (H, W) and each one's peak."""
    labels, n = ndimage.label(h_hat >= level, structure=EIGHT_CONNECTED)
    peaks = np.asarray(ndimage.maximum(h_hat, labels, np.arange(1, n + 1)), dtype=np.float64)
    return labels, peaks.reshape(n)


def _widen(box, min_w, min_h, width, height):
    """Grow a box (x, y, w, h) about its centre to at least min_w × min_h, kept in the frame."""
    x, y, w, h = (float(v) for v in box)
    w2, h2 = min(max(w, min_w), width), min(max(h, min_h), height)
    x2 = float(np.clip(x + (w - w2) / 2, 0, width - w2))
    y2 = float(np.clip(y + (h - h2) / 2, 0, height - h2))
    return x2, y2, w2, h2


def boxes_from_heatmap(h, thresholds=DEFAULT_BOX_THRESHOLDS, k=3, duplicate_iou=DUPLICATE_IOU,
                       region_level=REGION_LEVEL, min_size=(1, 1)):
    """Sec. 3.2, Bbox generation: up to k boxes from H_f by varying the intensity threshold,
    ranked by the mean H_f intensity inside each box, highest first.

    Candidates: min-max normalise H_f to ĥ in [0, 1]; at every level in `thresholds` box each
    8-connected component of (ĥ >= level); score each candidate by the mean of the
    UNNORMALISED H_f inside its box (within one map the order is the same either way, and raw
    CAM values keep scores comparable across images, which the B list of the metric sorts by).
    Candidates are walked by score (ties: smaller area, then top, then left); one with IoU >=
    duplicate_iou against a box already kept is a repeat and is skipped.
    Choice of the k (our reading of Sec. 3.2, where the paper only says the thresholds vary):
      1. the best-scoring candidate;
      2. then every other REGION, a component of ĥ at the lowest level whose peak reaches
         `region_level` (what the mask update would binarise as a blob) and that holds no kept
         box yet, in the order of its peak: its box at the lowest level, the whole region;
      3. then the remaining candidates by score.
    So two separated regions each get a box of their own (AM's later rounds light up second
    lesions, and by score alone the nested boxes of the first would take every slot), while a
    map with one region keeps its nested alternatives (large findings need the wide ones).
    The k' kept are returned by score. Fewer than k come back when the map has fewer distinct
    candidates (the paper's Fig. 2(a)); a constant map, all-zero included, has no peak to
    threshold and gives none. Last, a box narrower or lower than min_size = (min_w, min_h)
    pixels (a heatmap cell, when h was upsampled) is widened about its centre to it, within
    the map; its score stays that of the component's own box.
    h (H, W) -> float64 (k', 5) rows (x, y, w, h, score) in h's pixel frame, k' <= k.
    """
    h = checks.array("h", h, ndim=2)                                      # (H, W)
    if h.size == 0:
        raise ValueError(f"h: empty heatmap, shape {h.shape}")
    levels = np.asarray(thresholds, dtype=np.float64)
    if levels.ndim != 1 or levels.size == 0 or not np.all((levels >= 0) & (levels <= 1)):
        raise ValueError(f"thresholds: need a non-empty sequence of levels in [0, 1], "
                         f"got {thresholds!r}")
    checks.positive_int("k", k)
    min_w, min_h = (float(v) for v in min_size)
    if not (1 <= min_w and 1 <= min_h):
        raise ValueError(f"min_size: need (min_w, min_h) >= 1 pixel, got {min_size!r}")
    h_hat = minmax(h)
    if h_hat is None:
        return np.zeros((0, 5))
    low = levels.min()
    regions, peaks = _regions(h_hat, low)                                 # (H, W), (r,)
    cand, region, whole = [], [], None
    for t in levels:
        labels, n = ndimage.label(h_hat >= t, structure=EIGHT_CONNECTED)
        if t == low and whole is None:           # the same labelling as `regions`: region j + 1
            whole = len(region) + np.arange(n)
        cand.append(component_boxes(h_hat >= t))
        # A component at a higher level lies inside one lowest-level component: its region.
        region += [regions[p] for p in ndimage.maximum_position(h_hat, labels, np.arange(1, n + 1))]
    cand, region = np.concatenate(cand), np.array(region, dtype=int)      # (n, 4), (n,)
    score = np.array([h[y:y + bh, x:x + bw].mean() for x, y, bw, bh in cand])  # (n,)
    order = np.lexsort((cand[:, 0], cand[:, 1], cand[:, 2] * cand[:, 3], -score))
    kept = []

    def take(i):
        if len(kept) < k and not (kept and iou(cand[i], cand[kept]).max() >= duplicate_iou):
            kept.append(i)
    take(order[0])
    for r in np.argsort(-peaks, kind="stable") + 1:
        if peaks[r - 1] >= region_level and r not in region[kept]:
            take(whole[r - 1])
    for i in order:
        take(i)
    kept = sorted(kept, key=list(order).index)
    boxes = [_widen(cand[i], min_w, min_h, h.shape[1], h.shape[0]) for i in kept]
    return np.column_stack([np.array(boxes).reshape(-1, 4), score[kept]]).astype(np.float64)
