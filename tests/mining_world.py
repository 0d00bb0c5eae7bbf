"""make_world(): the small synthetic data set and mining result that the harvest, report and
figure tests share: PNGs of awkward, non-square sizes on disk, each class's heatmap peaked
exactly on that image's ground-truth box, masks from the reference mask update.
"""
import numpy as np
from PIL import Image

from minimal_amkp import reference as R
from minimal_amkp.data.chestxray import ChestXray14, Entry
from minimal_amkp.classes import BOX_CLASSES, CLASSES, BBox

CELL = 8          # PNG pixels per heatmap cell along each axis in make_world
# (width, height) in heatmap cells, and per image the (class, cell box (col, row, w, h)) it shows.
WORLD = [((8, 6), [(0, (1, 1, 2, 2)), (3, (5, 2, 2, 3))]),
         ((5, 7), [(0, (2, 3, 2, 3))]),
         ((6, 6), [(1, (1, 2, 4, 3))]),
         ((7, 5), [(3, (0, 0, 3, 2))]),
         ((6, 8), [(5, (3, 5, 1, 1)), (2, (0, 6, 3, 2))]),
         ((8, 8), [(1, (2, 2, 3, 3))])]
MAP = 8           # heatmap side h = w; the S×S model input is the PNG resized, so cells are not square


def make_world(tmp_path, T=3, no_box_positive=True):
    """-> (ds, mining). Cells are CELL px of the PNG; maps are MAP×MAP over the resized image."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries, boxes, names = {}, {}, []
    base = np.zeros((len(WORLD), len(BOX_CLASSES), MAP, MAP))
    for i, ((wc, hc), finds) in enumerate(WORLD):
        name = f"{i:08d}_000.png"
        width, height = wc * CELL, hc * CELL
        img = rng.integers(40, 90, (height, width)).astype(np.uint8)
        labels = np.zeros(len(CLASSES), np.uint8)
        for c, (x, y, w, h) in finds:
            labels[c] = 1
            img[y * CELL:(y + h) * CELL, x * CELL:(x + w) * CELL] += 120
            boxes.setdefault(name, []).append(BBox(name, c, x * CELL, y * CELL, w * CELL, h * CELL))
            # The plain-resize grid (reference.naive_grid) covers the image; cell (r, q) of a MAP×MAP map spans wc/MAP PNG
            # cells across, so the box is drawn where the map's cell centres fall inside it.
            cx = (np.arange(MAP) + 0.5) * wc / MAP
            cy = (np.arange(MAP) + 0.5) * hc / MAP
            inside = ((cy[:, None] >= y) & (cy[:, None] < y + h)) & ((cx >= x) & (cx < x + w))
            base[i, c] = inside + 0.05 * rng.random((MAP, MAP))
        if no_box_positive and i == 2:
            labels[4] = 1           # labelled Mass but no Mass box: its boxes are false positives
        labels[10] = i % 2          # an unboxed class, ignored by harvesting
        base[i, 4] += rng.random((MAP, MAP))
        Image.fromarray(img).save(root / "images" / name)
        entries[name] = Entry(name, labels, 0, i, 50, "M", "PA", width, height, (0.14, 0.14))
        names.append(name)
    ds = ChestXray14(str(root), entries, boxes, [], [])
    cams, masks = [], [np.ones(base.shape, np.uint8)]
    for t in range(T):
        cams.append((base * masks[t]).astype(np.float32))
        masks.append(R.update_masks(cams[t], masks[t]).astype(np.uint8))
    mining = dict(names=names, labels=np.stack([entries[n].labels for n in names]),
                  cams=np.stack(cams), masks=np.stack(masks[:T]), image_size=48,
                  grid=np.array(R.naive_grid(MAP, 48)))
    return ds, mining
