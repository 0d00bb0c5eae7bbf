"""What attention mining adds, lesion by lesion: numbers the Acc-AFP tables cannot show.

Table 2's protocol ranks every image's boxes in one list B and stops at an AFP bound, so a
second lesion, or the rest of a large one, moves Acc only through the boxes that budget
reaches. Here every box of an image counts (no B list, no bound), per ground-truth box:
- recall: whether some box of its image overlaps it by T, split into lesions of images with
  one box of that class and lesions of images with several ("multi": what later rounds are
  meant to find), at IoU 0.1, IoU 0.3 and IoBB 0.5;
- extent IoU: the best IoU of its image's boxes with it, averaged over the classes whose
  findings spread (EXTENDED): how much of a large finding the best box covers;
- the gain of a map, mean over its ground-truth boxes of best IoU under H_f minus under H_1,
  which picks the report's figures;
- where H_1 peaks: the share of labelled maps whose peak cell lies in the chest cavity;
- whether later rounds find other lesions: on maps with two or more boxes, how often H_t's
  peak over the cells M_{t-1} left lies in a box, against a frozen network's H_1 ⊙ M_{t-1},
  whose peak there is simply H_1's next one (the issue "Rounds that learn" asks for this
  comparison before any "later rounds find new regions" is trusted);
- on the positive control (phantom/sibling.py), recall of its lesions A and B apart.
Every overlap comes from reference.best_overlap; this module only groups them.
"""
import numpy as np

from minimal_amkp import reference as R
from minimal_amkp.classes import BOX_CLASSES
from minimal_amkp.harvest import by_class

CUTS = (("iou", 0.1), ("iou", 0.3), ("iobb", 0.5))
# Findings that spread, so a box can cover part of one: all but the focal round opacities
# (a Nodule or a Mass is boxed whole by any box on its core).
EXTENDED = tuple(c for c in BOX_CLASSES if c not in ("Nodule", "Mass"))
KIND_IOUS = (0.3, 0.1)        # the positive control's gates read B's recall at IoU 0.3


def ground_truth(names, boxes):
    """Per box class, {image: (g, 4)} for every image in names (empty where it has no such box).
    boxes: {image: [BBox]}."""
    return [{name: np.array([(b.x, b.y, b.w, b.h) for b in boxes.get(name, ()) if b.label == c]
                            ).reshape(-1, 4) for name in names} for c in range(len(BOX_CLASSES))]


def best(boxes, names, gt, overlap):
    """Per box class, {image: (g,) best overlap of the image's boxes with each gt box}."""
    return [R.best_overlap(p, g, overlap) for p, g in zip(by_class(boxes, names), gt)]


def lesion_numbers(boxes, names, gt):
    """Recall by lesion count and extent IoU of one method's boxes (list of BBox).

    gt: per box class {image: (g, 4)} (ground_truth). -> dict(
        recall {"iou 0.1" ..: {"multi", "single": share, "n_multi", "n_single": counts}},
        extent_iou {class: mean best IoU or NaN}, extent_iou_mean over EXTENDED)."""
    out = dict(recall={})
    for overlap, t in CUTS:
        hits = {"multi": [], "single": []}
        for per_image in best(boxes, names, gt, overlap):
            for values in per_image.values():
                if len(values):
                    hits["multi" if len(values) > 1 else "single"] += list(values >= t)
        out["recall"][f"{overlap} {t:g}"] = {
            **{k: float(np.mean(v)) if v else float("nan") for k, v in hits.items()},
            **{f"n_{k}": len(v) for k, v in hits.items()}}
    ious = best(boxes, names, gt, "iou")
    out["extent_iou"] = {c: float(np.mean(np.concatenate(list(ious[k].values()) or [[]])))
                         if any(len(v) for v in ious[k].values()) else float("nan")
                         for k, c in enumerate(BOX_CLASSES)}
    extended = [out["extent_iou"][c] for c in EXTENDED]
    out["extent_iou_mean"] = float(np.nanmean(extended)) if not np.all(np.isnan(extended)) else float("nan")
    return out


def kind_recall(boxes, names, kinds):
    """Recall of the positive control's lesions A and B apart, for one method's boxes (list of
    BBox): per kind, the share of its ground-truth boxes in the images `names` that some box of
    the same image and class overlaps by IoU >= t, for t in KIND_IOUS.

    kinds: [(BBox, "A" or "B")] (lesion_kinds.csv, ChestXray14.kinds).
    -> {kind: {"iou 0.3": share (NaN without boxes), "iou 0.1": share, "n": count}}."""
    out = {}
    for kind in sorted({k for _, k in kinds}):
        of_kind = {}
        for b, k in kinds:
            if k == kind:
                of_kind.setdefault(b.image, []).append(b)
        per_class = best(boxes, names, ground_truth(names, of_kind), "iou")
        found = np.concatenate([np.zeros(0), *(v for per_image in per_class for v in per_image.values())])
        out[kind] = {**{f"iou {t:g}": float(np.mean(found >= t)) if len(found) else float("nan") for t in KIND_IOUS},
                     "n": len(found)}
    return out


def gains(baseline, am, names, gt):
    """Per (box class, image) with ground truth: mean over its gt boxes of the best IoU of the
    AM boxes minus that of the baseline boxes. -> {(c, image index): gain}."""
    index = {name: i for i, name in enumerate(names)}
    before, after = best(baseline, names, gt, "iou"), best(am, names, gt, "iou")
    return {(c, index[image]): float(np.mean(after[c][image] - values))
            for c in range(len(BOX_CLASSES)) for image, values in before[c].items() if len(values)}


def gain_and_loss_picks(gain):
    """Per box class, the map where H_f gains most over H_1 and the one where it loses most
    (ties: the first image); one pick where a class has a single map, none where it has none.
    -> [(class index, image index, caption)]."""
    picks = []
    for c in range(len(BOX_CLASSES)):
        maps = sorted((i, g) for (k, i), g in gain.items() if k == c)
        if not maps:
            continue
        top = max(maps, key=lambda m: m[1])
        low = min(maps, key=lambda m: m[1])
        picks.append((c, top[0], f"most gained of {len(maps)} maps: best-box IoU H_f - H_1 {top[1]:+.2f}"))
        if low[0] != top[0]:
            picks.append((c, low[0], f"most lost of {len(maps)} maps: best-box IoU H_f - H_1 {low[1]:+.2f}"))
    return picks


def later_peaks(cams, masks, names, frames, gt, grid):
    """For every round t >= 2, over the maps of a class with >= 2 ground-truth boxes where
    M_{t-1} erased something: the share whose peak over the live cells lies inside one of the
    boxes, for the learnt H_t and for the frozen H_1 ⊙ M_{t-1}.

    cams, masks (T, n, 8, h, w) on `grid`; frames [(width, height)]; gt per class {image: (g, 4)}.
    -> [{"t", "maps", "learned", "frozen"}] (shares NaN without such maps)."""
    out = []
    for t in range(1, len(cams)):
        learned, frozen = [], []
        for c in range(len(BOX_CLASSES)):
            for i, name in enumerate(names):
                g, live = gt[c][name], masks[t, i, c] > 0
                if len(g) >= 2 and not live.all() and live.any():
                    learned.append(peak_in_box(np.where(live, cams[t, i, c], -np.inf), grid, g, *frames[i]))
                    frozen.append(peak_in_box(np.where(live, cams[0, i, c], -np.inf), grid, g, *frames[i]))
        out.append(dict(t=t + 1, maps=len(learned), learned=float(np.mean(learned)) if learned else float("nan"),
                        frozen=float(np.mean(frozen)) if frozen else float("nan")))
    return out


def peak_position(h, grid):
    """Centre of the map's peak cell (first argmax, row-major) as fractions (x, y) of the image,
    the cell placed on `grid` (reference.geometry) and clamped into the image."""
    r, c = np.unravel_index(np.argmax(h), h.shape)
    x, y = R.cell_centres([c, r], grid, 1.0)
    return float(np.clip(x, 0, 1)), float(np.clip(y, 0, 1))


def peak_in_box(h, grid, g, width, height):
    """Whether the centre of map h's peak cell (on `grid`), taken to a width × height frame, lies
    inside one of the boxes g (k, 4) of that frame (edges included)."""
    fx, fy = peak_position(h, grid)
    x, y = fx * width, fy * height
    return bool(np.any((g[:, 0] <= x) & (x <= g[:, 0] + g[:, 2]) & (g[:, 1] <= y) & (y <= g[:, 1] + g[:, 3])))


def peaks_in_chest(h, names, labels, chests, grid):
    """Share of the labelled maps (image × positive box class) whose peak cell's centre lies in
    the image's chest cavity; None without chest masks (real data). h (n, 8, h, w) on `grid`."""
    if chests is None:
        return None
    inside = []
    for i, name in enumerate(names):
        mask = chests[name]                                                   # (side, side)
        for c in np.flatnonzero(labels[i, :len(BOX_CLASSES)]):
            fx, fy = peak_position(h[i, c], grid)
            inside.append(bool(mask[min(int(fy * mask.shape[0]), mask.shape[0] - 1),
                                    min(int(fx * mask.shape[1]), mask.shape[1] - 1)]))
    return float(np.mean(inside)) if inside else None
