"""Evaluation: the Acc-AFP localization protocol of Sec. 3.2 / Table 2, MaxBoxAccV2, AUROC.

Boxes are (x, y, w, h) in image pixels (see boxes.py). Per class c the inputs are dicts keyed
by image id (the file name):
    pred[image] ranked boxes from boxes_from_heatmap, row r is rank r+1   (k, 5) x, y, w, h, score
    gt[image]   hand-drawn boxes of class c in that image                 (g, 4) x, y, w, h
"""
import numpy as np
from scipy import stats

from . import checks
from ..classes import SHORT_NAMES
from .boxes import check_boxes, component_boxes, iobb, iou, minmax

DEFAULT_IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
# AFP upper bounds, the "ref." rows of Table 2 (Wang et al. 2017), (thresholds, BOX_CLASSES).
# AT at 0.3 reads 1.40, out of line with its neighbours, but the paper's own "base." and
# "ours" rows reach AFP 1.38 there, so 1.40 is the bound that was used; it is kept as printed.
DEFAULT_AFP_BOUNDS = np.array([
    # AT   CM    Eff.  Inf.  Mass  Nod.  PNA   PTx
    [0.89, 0.59, 0.83, 0.62, 0.67, 0.61, 1.02, 0.49],   # T(IoU) 0.1
    [0.98, 0.72, 0.91, 0.68, 0.69, 0.62, 1.08, 0.52],   # 0.2
    [1.40, 0.78, 0.95, 0.72, 0.71, 0.62, 1.11, 0.53],   # 0.3
    [1.08, 0.81, 0.97, 0.75, 0.72, 0.62, 1.12, 0.54],   # 0.4
    [1.09, 0.84, 0.99, 0.76, 0.72, 0.62, 1.13, 0.55],   # 0.5
    [1.09, 0.85, 1.00, 0.76, 0.72, 0.62, 1.13, 0.55],   # 0.6
    [1.10, 0.86, 1.01, 0.77, 0.72, 0.62, 1.13, 0.55],   # 0.7
])                                                                      # (7, 8)
DEFAULT_AFP_BOUNDS.setflags(write=False)

_OVERLAPS = {"iou": iou, "iobb": iobb}


def _overlap_fn(overlap):
    if overlap not in _OVERLAPS:
        raise ValueError(f"overlap: expected 'iou' or 'iobb', got {overlap!r}")
    return _OVERLAPS[overlap]


def _check_gt(gt):
    if not isinstance(gt, dict):
        raise ValueError(f"gt: expected a dict image -> (g, 4) boxes, got {type(gt).__name__}")
    out = {}
    for image, g in gt.items():
        name = f"gt[{image!r}]"
        g = checks.array(name, g)
        g = check_boxes(name, g.reshape(0, 4) if g.size == 0 else g)
        if g.ndim != 2:
            raise ValueError(f"{name}: expected (g, 4) boxes, got shape {g.shape}")
        out[image] = g
    return out


def _check_pred(pred):
    if not isinstance(pred, dict):
        raise ValueError(f"pred: expected a dict image -> (k, 5) boxes, got {type(pred).__name__}")
    out = {}
    for image, p in pred.items():
        name = f"pred[{image!r}]"
        p = checks.array(name, p)
        p = p.reshape(0, 5) if p.size == 0 else p
        if p.ndim != 2 or p.shape[1] != 5:
            raise ValueError(f"{name}: expected (k, 5) rows (x, y, w, h, score), got shape {p.shape}")
        check_boxes(name, p[:, :4])
        out[image] = p
    return out


def localization_accuracy(pred, gt, t, afp_bound, overlap="iou"):
    """Sec. 3.2 / Table 2: Acc and AFP of one class at one threshold T(IoU) under an AFP cap.

    B = every image's rank-1 box, then every rank-2 box, then rank 3 (within a rank by score,
    highest first; equal scores by image id, ascending, so ids must be mutually orderable).
    A box hits when overlap(box, g) >= t for some gt box g of its image (`overlap` "iou" or
    "iobb"; the box is the prediction). Boxes are taken from B in order until taking the next
    false positive would lift AFP above `afp_bound`; there the scan STOPS. (Skipping that box
    and going on would later take every true positive in B whatever the bound, so the bound
    would no longer limit Acc; "selected until the AFP reaches its upper bound" is a stop.)
    afp_bound=inf takes all of B, as Tables 1 and 3 do.
        Acc = (gt boxes hit by at least one taken box) / (all gt boxes)
        AFP = (taken boxes hitting no gt box) / (images with >= 1 gt box)
    Images in pred but not in gt count as images with no gt box: their boxes are false
    positives. pred {image: (k, 5)}, gt {image: (g, 4)} -> (acc, afp) floats.
    """
    measure = _overlap_fn(overlap)
    gt, pred = _check_gt(gt), _check_pred(pred)
    n_images = sum(len(g) > 0 for g in gt.values())
    if n_images == 0:
        raise ValueError(f"gt: no ground-truth boxes in {len(gt)} images; Acc and AFP are undefined")
    if not 0 < t <= 1:
        raise ValueError(f"t: overlap threshold must lie in (0, 1], got {t}")
    if not afp_bound >= 0:
        raise ValueError(f"afp_bound: must be >= 0 (inf for no cap), got {afp_bound}")
    b_list = sorted((r, -p[r, 4], image) for image, p in pred.items() for r in range(len(p)))
    hit = {image: np.zeros(len(g), dtype=bool) for image, g in gt.items()}
    no_gt = np.zeros((0, 4))
    fp_cap = afp_bound * n_images + 1e-9      # slack so that e.g. 0.62 * 50 still admits 31
    fp = 0
    for r, _, image in b_list:
        g = gt.get(image, no_gt)
        hits = measure(pred[image][r, :4], g) >= t if len(g) else np.zeros(0, dtype=bool)  # (g,)
        if hits.any():
            hit[image] |= hits
        elif fp + 1 > fp_cap:
            break
        else:
            fp += 1
    n_gt = sum(len(g) for g in gt.values())
    return sum(int(h.sum()) for h in hit.values()) / n_gt, fp / n_images


def acc_afp_table(pred_by_class, gt_by_class, thresholds=DEFAULT_IOU_THRESHOLDS,
                  bounds=DEFAULT_AFP_BOUNDS, overlap="iou"):
    """Table 2: localization_accuracy for every (threshold, class) pair.

    pred_by_class, gt_by_class: sequences of the per-class dicts, in BOX_CLASSES order (C of
    them). bounds (T, C), or anything that broadcasts to it (np.inf: all of B, Tables 1, 3).
    A class with no gt boxes gets NaN. -> dict(thresholds (T,), acc (T, C), afp (T, C), overlap).
    """
    _overlap_fn(overlap)
    if len(pred_by_class) != len(gt_by_class):
        raise ValueError(f"pred_by_class and gt_by_class: need one dict per class each, got "
                         f"{len(pred_by_class)} and {len(gt_by_class)}")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.ndim != 1:
        raise ValueError(f"thresholds: expected a 1-D sequence, got shape {thresholds.shape}")
    T, C = len(thresholds), len(gt_by_class)
    try:
        bounds = np.broadcast_to(np.asarray(bounds, dtype=np.float64), (T, C))
    except ValueError:
        raise ValueError(f"bounds: shape {np.shape(bounds)} does not broadcast to (thresholds, "
                         f"classes) = ({T}, {C})") from None
    acc, afp = np.full((T, C), np.nan), np.full((T, C), np.nan)
    for c, (pred, gt) in enumerate(zip(pred_by_class, gt_by_class)):
        if not any(len(g) for g in _check_gt(gt).values()):
            continue
        for i, t in enumerate(thresholds):
            acc[i, c], afp[i, c] = localization_accuracy(pred, gt, t, bounds[i, c], overlap)
    return dict(thresholds=thresholds, acc=acc, afp=afp, overlap=overlap)


def format_acc_afp(table, names=SHORT_NAMES):
    """Markdown table of "Acc-AFP" cells like the paper's Table 2, one row per threshold."""
    acc, afp = np.asarray(table["acc"]), np.asarray(table["afp"])
    thresholds = np.asarray(table["thresholds"])
    if acc.shape != afp.shape or acc.shape != (len(thresholds), len(names)):
        raise ValueError(f"table: acc {acc.shape} and afp {afp.shape} must both be "
                         f"(thresholds, names) = ({len(thresholds)}, {len(names)})")
    head = "T(IoBB)" if table.get("overlap") == "iobb" else "T(IoU)"
    lines = ["| " + " | ".join((head, *names)) + " |", "|" + "---|" * (len(names) + 1)]
    for t, acc_row, afp_row in zip(thresholds, acc, afp):
        cells = ["n/a" if np.isnan(a) else f"{a:.2f}-{f:.2f}" for a, f in zip(acc_row, afp_row)]
        lines.append("| " + " | ".join((f"{t:g}", *cells)) + " |")
    return "\n".join(lines)


def max_box_acc_v2(heatmaps, gt, iou_thresholds=(0.3, 0.5, 0.7), cam_thresholds=None):
    """MaxBoxAccV2 (Choe et al., CVPR 2020, "Evaluating WSOL Methods Right").

        BoxAcc(δ) = max_τ (1/N) Σ_i [ max over boxes b of (ĥ_i >= τ), gt boxes g: IoU(b, g) >= δ ]
        MaxBoxAccV2 = mean over δ of BoxAcc(δ)
    ĥ_i is heatmap i min-max normalised; its boxes surround every 8-connected component of
    (ĥ_i >= τ), not only the largest. Differences from their code: connected components
    stand in for OpenCV's contours (hole contours are not boxed), boxes and IoU are
    continuous (pixel i covers [i, i+1), no +1), and a constant map has no boxes at any τ.
    cam_thresholds default np.arange(0, 1, 0.01), their 0.01 step; τ = 0 boxes the whole map.
    heatmaps: N maps (H_i, W_i) in image pixels, gt: N arrays (g_i >= 1, 4).
    -> dict(value, per_iou {δ: BoxAcc(δ)}, best_threshold {δ: first τ reaching it}).
    """
    if len(heatmaps) != len(gt) or len(gt) == 0:
        raise ValueError(f"heatmaps and gt: need equal, non-zero lengths, got {len(heatmaps)} "
                         f"and {len(gt)}")
    taus = np.arange(0, 1, 0.01) if cam_thresholds is None else checks.array(
        "cam_thresholds", cam_thresholds, ndim=1)                         # (T,)
    deltas = checks.array("iou_thresholds", iou_thresholds, ndim=1)      # (D,)
    if taus.size == 0 or deltas.size == 0:
        raise ValueError(f"cam_thresholds and iou_thresholds: need at least one value each, got "
                         f"{taus.size} and {deltas.size}")
    best_iou = np.zeros((len(gt), taus.size))                             # (N, T)
    for i, (h, g) in enumerate(zip(heatmaps, gt)):
        h = checks.array(f"heatmaps[{i}]", h, ndim=2)
        g = check_boxes(f"gt[{i}]", g)
        if g.ndim != 2 or len(g) == 0 or h.size == 0:
            raise ValueError(f"heatmaps[{i}] and gt[{i}]: need a non-empty map and (g >= 1, 4) "
                             f"boxes, got shapes {h.shape} and {g.shape}")
        h_hat = minmax(h)
        if h_hat is None:
            continue
        for j, tau in enumerate(taus):
            boxes = component_boxes(h_hat >= tau)                         # (n, 4)
            if len(boxes):
                best_iou[i, j] = iou(boxes[:, None], g[None]).max()
    box_acc = (best_iou[:, :, None] >= deltas).mean(axis=0)               # (T, D)
    best = box_acc.argmax(axis=0)                                         # (D,)
    per_iou = {float(d): float(box_acc[best[k], k]) for k, d in enumerate(deltas)}
    return dict(value=float(np.mean(list(per_iou.values()))), per_iou=per_iou,
                best_threshold={float(d): float(taus[best[k]]) for k, d in enumerate(deltas)})


def auroc(scores, labels):
    """Area under the ROC curve as the Mann-Whitney statistic U / (n₁ n₀).

    P(score of a random positive > score of a random negative), ties counting 1/2 (average
    ranks). scores (N,), labels (N,) in {0, 1} -> float; NaN when only one class is present.
    """
    s = checks.array("scores", scores, ndim=1)                            # (N,)
    y = checks.array("labels", labels, ndim=1)                            # (N,)
    checks.same_shape("scores", s, "labels", y)
    if s.size == 0:
        raise ValueError("scores: need at least one score, got an empty array")
    if not np.all((y == 0) | (y == 1)):
        i = int(np.argmax((y != 0) & (y != 1)))
        raise ValueError(f"labels: must hold only 0 and 1, got {y[i]} at index {i}")
    pos = y == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = stats.rankdata(s)                                             # ties: average rank
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def best_overlap(pred, gt, overlap="iou"):
    """Per ground-truth box, the largest overlap with any box predicted for its image.

    The lesion-level view that the Acc-AFP protocol cannot give: every box of every image
    counts (no B list, no AFP bound), so a second lesion, or the rest of a large one, shows
    as soon as some box reaches it. Recall at t is the share of these values >= t; their mean
    is how much of each finding the best box covers. An image without predicted boxes scores 0.
    pred {image: (k, 5)}, gt {image: (g, 4)} -> {image: (g,) floats in [0, 1]}.
    """
    measure = _overlap_fn(overlap)
    gt, pred = _check_gt(gt), _check_pred(pred)
    out = {}
    for image, g in gt.items():
        p = pred.get(image, np.zeros((0, 5)))[:, :4]                     # (k, 4)
        out[image] = measure(p[:, None], g[None]).max(axis=0) if len(p) and len(g) else np.zeros(len(g))
    return out
