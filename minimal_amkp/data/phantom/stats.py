"""Is the phantom as hard as the real data? Its boxes against the real BBox_List_2017.csv.

    python -m minimal_amkp.data.phantom --stats DIR

Two numbers per box class, for any ChestX-ray14-format folder (a phantom, or the release):
- the median box side, √(w·h) over the image side, against the release's (REAL_MEDIAN_SIDE);
- the leave-one-out mean-box prior's Acc at IoU 0.1, 0.3, 0.5: each box scored against the
  mean (x, y, w, h) of the OTHER boxes of its class, all in image-side fractions, and the
  share of boxes it hits (REAL_PRIOR_ACC). A phantom whose prior hits far more often than the
  real one is easier for a localiser than the real data, one whose prior hits less is harder.
The phantom's realism bounds (issue "A testbed where attention mining can work"): per class,
the prior's Acc at IoU 0.3 within PRIOR_TOLERANCE of the real one, and the median side within
a factor SIDE_TOLERANCE of the real one.
"""
import numpy as np

from minimal_amkp.classes import BOX_CLASSES
from minimal_amkp.reference import iou

# Source: docs/chestxray14.md, "Box sizes in the release" and "Where the boxes sit",
# computed from the 984 boxes of the published BBox_List_2017.csv (1024-px frame).
REAL_MEDIAN_SIDE = {"Atelectasis": 141, "Cardiomegaly": 424, "Effusion": 242, "Infiltration": 244,
                    "Mass": 124, "Nodule": 69, "Pneumonia": 246, "Pneumothorax": 195}   # of 1024
PRIOR_IOUS = (0.1, 0.3, 0.5)
REAL_PRIOR_ACC = {"Atelectasis": (0.16, 0.01, 0.00), "Cardiomegaly": (1.00, 0.99, 0.85),
                  "Effusion": (0.05, 0.01, 0.01), "Infiltration": (0.52, 0.13, 0.01),
                  "Mass": (0.12, 0.00, 0.00), "Nodule": (0.00, 0.00, 0.00),
                  "Pneumonia": (0.39, 0.03, 0.00), "Pneumothorax": (0.14, 0.00, 0.00)}
PRIOR_TOLERANCE = 0.15          # |Acc at IoU 0.3 − real|
SIDE_TOLERANCE = 1.25           # median side within this factor of the real one


def relative_boxes(ds, frames):
    """Per box class, (n, 4) boxes (x, y, w, h) as fractions of their image's width and height.

    ds: a ChestXray14; frames: {name: (width, height)} of every boxed image."""
    rel = [[] for _ in BOX_CLASSES]
    for name, boxes in ds.boxes.items():
        width, height = frames[name]
        for b in boxes:
            rel[b.label].append((b.x / width, b.y / height, b.w / width, b.h / height))
    return [np.array(r, dtype=np.float64).reshape(-1, 4) for r in rel]


def leave_one_out_prior_acc(rel, thresholds=PRIOR_IOUS):
    """Share of boxes (n, 4) whose IoU with the mean of the other n − 1 boxes is >= each
    threshold; NaN with fewer than 2 boxes. -> (len(thresholds),)"""
    n = len(rel)
    if n < 2:
        return np.full(len(thresholds), np.nan)
    others = (rel.sum(0)[None] - rel) / (n - 1)                                  # (n, 4)
    overlap = iou(rel, others)                                                   # (n,)
    return np.array([(overlap >= t).mean() for t in thresholds])


def box_stats(ds, frames):
    """{class: dict(n, median_side (of 1024), side_ratio, prior_acc (3,), prior_gap_0.3, ok)}."""
    out = {}
    for c, rel in zip(BOX_CLASSES, relative_boxes(ds, frames)):
        side = float(np.median(np.sqrt(rel[:, 2] * rel[:, 3])) * 1024) if len(rel) else np.nan
        acc = leave_one_out_prior_acc(rel)
        ratio = side / REAL_MEDIAN_SIDE[c]
        gap = float(acc[1] - REAL_PRIOR_ACC[c][1])
        ok = bool(abs(gap) <= PRIOR_TOLERANCE and 1 / SIDE_TOLERANCE <= ratio <= SIDE_TOLERANCE)
        out[c] = dict(n=len(rel), median_side=side, side_ratio=ratio, prior_acc=acc.tolist(),
                      prior_gap=gap, ok=ok)
    return out


def format_stats(stats):
    """A plain-text table of box_stats against the release, one row per class, and a verdict."""
    head = (f"{'class':<13}{'boxes':>6}  {'median side':>11} {'real':>5} {'ratio':>6}   "
            f"prior Acc @IoU 0.1/0.3/0.5   real            Δ@0.3")
    lines = [head, "-" * len(head)]
    for c, s in stats.items():
        acc = "/".join(f"{a:.2f}" for a in s["prior_acc"])
        real = "/".join(f"{a:.2f}" for a in REAL_PRIOR_ACC[c])
        lines.append(f"{c:<13}{s['n']:>6}  {s['median_side']:>11.0f} {REAL_MEDIAN_SIDE[c]:>5} "
                     f"{s['side_ratio']:>6.2f}   {acc:<27} {real:<15} {s['prior_gap']:+.2f}"
                     f"{'' if s['ok'] else '  OUT OF BOUNDS'}")
    bad = [c for c, s in stats.items() if not s["ok"]]
    lines.append(f"realism bounds (median side within ×{SIDE_TOLERANCE}, prior Acc at IoU 0.3 "
                 f"within ±{PRIOR_TOLERANCE} of the release): "
                 + ("met by every class" if not bad else "NOT met by " + ", ".join(bad)))
    return "\n".join(lines)
