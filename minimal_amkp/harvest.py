"""Harvest boxes from attention-mining heatmaps (Sec. 3.2, "Bbox Generation"), plus a box prior.

Mining hands over H_1..H_T (eq. 7) for the 8 box classes of every mining image. For each image
and each box class its LABEL says is present (mining never looks at the hand-drawn boxes) the
heatmap is upsampled to the image's frame and turned into up to 3 ranked boxes by the
reference. The AM boxes come from H_f (eq. 8), the baseline's from H_1 alone (t = 1, Sec. 3.2).

Frame: boxes live in the pixel frame of the image's PNG, as in BBox_List_2017.csv. That is
the PNG's own size, read from its header (data.images.frame); Data_Entry's
OriginalImage[Width,Height] is the scan before NIH resized it to 1024 px and is NOT the boxes'
frame (the phantom writes equal values).

Cell geometry (reference.geometry): a map cell is placed where the network looks, at its
receptive-field centre, not at the centre of the image tile it would cover under a plain resize.
mining["grid"] = (stride, offset, S) puts cell (r, c) of the h×w map at model-input pixel
(stride·c + offset, stride·r + offset), and the S×S input is the W×H PNG resized, so at PNG
(x · W/S, y · H/S). PNG pixel X spans [X, X+1), centre X + 0.5, and reads the map bilinearly at
that point (beyond the outermost cell centres, the edge cells' values). The reference boxes
pixel columns x0..x1 as (x0, ·, x1 − x0 + 1, ·), so a harvested box is in exactly the
coordinates of BBox_List_2017.csv, inside [0, W] × [0, H].
"""
import numpy as np

from minimal_amkp import reference as R
from minimal_amkp.reference.checks import positive_int
from minimal_amkp.classes import BOX_CLASSES, CLASSES, BBox


def check_mining(mining, ds=None):
    """Validate the mining dict; return (names, labels (n, 14), cams, masks (T, n, 8, h, w), S, grid)."""
    missing = [k for k in ("names", "labels", "cams", "masks", "image_size", "grid") if k not in mining]
    if missing:
        raise ValueError(f"mining: missing keys {missing}")
    names = list(mining["names"])
    labels = np.asarray(mining["labels"])
    cams, masks = np.asarray(mining["cams"]), np.asarray(mining["masks"])
    n, c = len(names), len(BOX_CLASSES)
    if cams.ndim != 5 or cams.shape[0] == 0 or cams.shape[1:3] != (n, c) or 0 in cams.shape:
        raise ValueError(f"mining['cams'] must be (T >= 1, n = {n} names, {c}, h, w), got {cams.shape}")
    if masks.shape != cams.shape:
        raise ValueError(f"mining['masks'] shape {masks.shape} must equal mining['cams'] shape {cams.shape}")
    if labels.shape != (n, len(CLASSES)):
        raise ValueError(f"mining['labels'] must be (n = {n} names, {len(CLASSES)}), got {labels.shape}")
    if len(set(names)) != n:
        raise ValueError(f"mining['names'] holds duplicates ({n} names, {len(set(names))} distinct)")
    size = mining["image_size"]
    if isinstance(size, np.ndarray) and size.ndim == 0:         # as np.load gives it back
        size = size[()]
    size = positive_int("mining['image_size']", size)
    try:
        grid = R.check_grid(mining["grid"])
    except ValueError as e:
        raise ValueError(f"mining['grid']: {e}") from None
    if grid.size != size:
        raise ValueError(f"mining['grid'] is for a {grid.size:g}-px input, mining['image_size'] is {size}")
    if ds is not None:
        unknown = [x for x in names if x not in ds.entries]
        if unknown:
            raise ValueError(f"mining['names']: {len(unknown)} not in the dataset, e.g. {unknown[0]!r}")
    return names, labels, cams, masks, size, grid


def read_mining(path):
    """A run's mining.npz as the dict check_mining takes: 0-d arrays unwrapped, names as str."""
    with np.load(path) as z:
        mining = {k: z[k][()] if z[k].ndim == 0 else z[k] for k in z.files}
    if "names" in mining:
        mining["names"] = [str(n) for n in mining["names"]]
    return mining


def fused(cams, masks):
    """Eq. (8) over the whole batch: cams, masks (T, n, 8, h, w) -> H_f (n, 8, h, w)."""
    return R.fuse_heatmaps(list(cams), list(masks))


def upsample(h, width, height, grid):
    """Bilinear resize of a map (h, w) laid on `grid` to a (height, width) frame spanning the
    model input; separable: rows, then columns."""
    return R.resize(R.resize(h, height, grid, axis=0), width, grid, axis=1)


def harvest(heatmaps, names, labels, frames, grid, k=3):
    """Up to k ranked boxes per image and positive box class, in each image's frame, none
    narrower or lower than one heatmap cell there.

    heatmaps (n, 8, h, w) on `grid`; labels (n, 14); frames: n (width, height).
    -> list[BBox] with score, rank.
    """
    grid = R.check_grid(grid)
    out = []
    for i, name in enumerate(names):
        width, height = frames[i]
        for c in np.flatnonzero(labels[i, :len(BOX_CLASSES)]):
            up = upsample(heatmaps[i, c], width, height, grid)               # (H, W)
            # No box thinner than one heatmap cell: the map cannot place an edge more finely.
            cell = (max(1.0, grid.stride * width / grid.size), max(1.0, grid.stride * height / grid.size))
            for r, (x, y, w, h, s) in enumerate(R.boxes_from_heatmap(up, k=k, min_size=cell), start=1):
                out.append(BBox(name, int(c), float(x), float(y), float(w), float(h), float(s), r))
    return out


def box_prior(names, labels, frames, boxes):
    """Each class's mean ground-truth box, one per positive image and class, leave-one-image-out.

    ChestX-ray14's training split has no boxes, so the only boxes to average are the mining
    set's own: image i gets the mean over the OTHER mining images' boxes of that class. It is a
    generous baseline (it has seen the other images' true boxes) that needs no image at all.
    Boxes are averaged as centre and size relative to their image's frame, then mapped into
    image i's frame (so the mean box lies inside it). Score 1, rank 1; no box where no other
    image has a box of that class. boxes: dict name -> list[BBox], as ChestXray14.boxes.
    """
    owner, rel = [[] for _ in BOX_CLASSES], [[] for _ in BOX_CLASSES]   # per class: image index,
    for i, name in enumerate(names):                                     # (cx/W, cy/H, w/W, h/H)
        width, height = frames[i]
        for b in boxes.get(name, ()):
            owner[b.label].append(i)
            rel[b.label].append(((b.x + b.w / 2) / width, (b.y + b.h / 2) / height,
                                 b.w / width, b.h / height))
    owner = [np.array(o, dtype=int) for o in owner]
    rel = [np.array(r).reshape(-1, 4) for r in rel]
    out = []
    for i, name in enumerate(names):
        width, height = frames[i]
        for c in np.flatnonzero(labels[i, :len(BOX_CLASSES)]):
            # The mean of the others' boxes themselves, not (total - own) / k: no rounding
            # residue of the image's own box can leak into its prior.
            others = rel[c][owner[c] != i]
            if len(others) == 0:
                continue
            cx, cy, w, h = (float(v) for v in others.mean(axis=0))
            w, h = w * width, h * height
            out.append(BBox(name, int(c), cx * width - w / 2, cy * height - h / 2, w, h, 1.0, 1))
    return out


def by_class(boxes, names):
    """Per box class, {image: (k, 5) rows (x, y, w, h, score) in rank order}, the metric's pred."""
    pred = [{} for _ in BOX_CLASSES]
    for b in sorted(boxes, key=lambda b: b.rank):
        pred[b.label].setdefault(b.image, []).append((b.x, b.y, b.w, b.h, b.score))
    return [{name: np.array(p[name]).reshape(-1, 5) for name in names if name in p} for p in pred]
