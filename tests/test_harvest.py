"""harvest.py: boxes from heatmaps in the PNG frame, the leave-one-out box prior."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mining_world import make_world

from minimal_amkp import harvest as H
from minimal_amkp import reference as R
from minimal_amkp.data.images import frame
from minimal_amkp.classes import BOX_CLASSES, CLASSES, BBox


def frames_of(ds, names):
    return [frame(ds, n) for n in names]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 40), st.integers(1, 40), st.integers(0, 99))
def test_upsample_matches_torch_align_corners_false(h, height, width, seed):
    """On the plain-resize grid the upsampling is torch's (and PIL's) bilinear, any sizes."""
    m = np.random.default_rng(seed).standard_normal((h, h))
    want = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(height, width),
                                           mode="bilinear", align_corners=False)[0, 0].numpy()
    got = H.upsample(m, width, height, R.naive_grid(h, 96))
    bad = np.argwhere(~np.isclose(got, want, rtol=0, atol=1e-12))
    assert got.shape == (height, width)
    assert bad.size == 0, f"first mismatch at {tuple(bad[0])}: {got[tuple(bad[0])]} vs {want[tuple(bad[0])]}"


def test_boxes_inside_frame_ranked_and_only_positive_classes(tmp_path):
    ds, mining = make_world(tmp_path)
    names, labels = mining["names"], mining["labels"]
    frames = frames_of(ds, names)
    boxes = H.harvest(H.fused(mining["cams"], mining["masks"]), names, labels, frames, mining["grid"])
    assert boxes
    seen = {}
    for b in boxes:
        i = names.index(b.image)
        width, height = frames[i]
        assert labels[i, b.label] == 1 and b.label < len(BOX_CLASSES)
        assert 0 <= b.x and 0 <= b.y and b.x + b.w <= width and b.y + b.h <= height, b
        seen.setdefault((b.image, b.label), []).append(b.rank)
    assert all(r == list(range(1, len(r) + 1)) and len(r) <= 3 for r in seen.values()), seen
    positive = {(names[i], c) for i, c in zip(*np.nonzero(labels[:, :len(BOX_CLASSES)]))}
    assert set(seen) == positive


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 7), st.integers(1, 7), st.integers(1, 60), st.integers(1, 60),
       st.sampled_from(["random", "constant", "zero", "spike"]), st.integers(0, 99),
       st.sampled_from([(8, 0.5), (8, 4.0), (16, 0.5), (3, -2.0)]))
def test_harvest_any_shape_inside_frame(h, w, width, height, kind, seed, cell):
    rng = np.random.default_rng(seed)
    m = {"random": rng.random((h, w)), "constant": np.full((h, w), 0.7), "zero": np.zeros((h, w)),
         "spike": np.eye(h, w)}[kind]
    labels = np.zeros((1, len(CLASSES)), np.uint8)
    labels[0, 7] = 1
    heat = np.zeros((1, len(BOX_CLASSES), h, w))
    heat[0, 7] = m
    grid = R.Grid(cell[0], cell[1], cell[0] * max(h, w))
    boxes = H.harvest(heat, ["a.png"], labels, [(width, height)], grid)
    if kind in ("constant", "zero") or (kind == "spike" and h == w == 1):
        assert boxes == []                             # no peak, no boxes
    assert [b.rank for b in boxes] == list(range(1, len(boxes) + 1)) and len(boxes) <= 3
    for b in boxes:
        assert b.label == 7 and 0 <= b.x and 0 <= b.y and b.x + b.w <= width and b.y + b.h <= height, b
        # No degenerate box: at least one heatmap cell of the frame (or the whole frame) each way.
        cell_w, cell_h = grid.stride * width / grid.size, grid.stride * height / grid.size
        assert b.w >= min(cell_w, width) - 1e-9 and b.h >= min(cell_h, height) - 1e-9, b


@pytest.mark.parametrize("r, c", [(5, 9), (0, 0), (15, 15), (0, 15), (7, 0)])
@pytest.mark.parametrize("width, height", [(128, 128), (1024, 1024), (300, 200)])
def test_one_hot_cell_boxes_around_its_centre(r, c, width, height):
    """One hot cell of a 16×16 map on the tiny preset's grid: the best box is centred on the cell's
    receptive-field centre (an edge cell's box is cut by the frame, so its centre moves inward)."""
    grid = R.Grid(8, 0.5, 128)
    heat = np.zeros((1, len(BOX_CLASSES), 16, 16))
    heat[0, 2, r, c] = 1.0
    labels = np.zeros((1, len(CLASSES)), np.uint8)
    labels[0, 2] = 1
    b = H.harvest(heat, ["a.png"], labels, [(width, height)], grid)[0]
    cx, cy = R.cell_centres([c, r], grid, 1.0) * (width, height)
    assert 0 <= b.x and 0 <= b.y and b.x + b.w <= width and b.y + b.h <= height, b
    # Pixels are whole, so a box's centre is on the pixel grid: within one pixel of the cell's centre.
    inner_x = 0 < c < 15 or (b.x > 0 and b.x + b.w < width)
    inner_y = 0 < r < 15 or (b.y > 0 and b.y + b.h < height)
    if inner_x:
        assert abs(b.x + b.w / 2 - cx) <= 1.0, (b, cx)
    if inner_y:
        assert abs(b.y + b.h / 2 - cy) <= 1.0, (b, cy)
    naive_cx = (c + 0.5) * width / 16
    if 0 < c < 15 and width >= 300:                  # the plain-resize centre is 3.5 px (input) away
        assert abs(b.x + b.w / 2 - naive_cx) > 1.0


def test_heatmap_on_gt_box_gives_acc_one_at_iou_03(tmp_path):
    ds, mining = make_world(tmp_path, no_box_positive=False)
    names = mining["names"]
    boxes = H.harvest(mining["cams"][0], names, mining["labels"], frames_of(ds, names), mining["grid"])
    pred = H.by_class(boxes, names)
    for c in range(len(BOX_CLASSES)):
        gt = {n: np.array([(b.x, b.y, b.w, b.h) for b in ds.boxes[n] if b.label == c]).reshape(-1, 4)
              for n in names}
        if any(len(g) for g in gt.values()):
            acc, afp = R.localization_accuracy(pred[c], gt, 0.3, np.inf)
            assert acc == 1.0, f"class {BOX_CLASSES[c]}: Acc {acc}"
    for b in boxes:                   # rank 1 is the tight box: exactly the ground truth
        if b.rank == 1:
            g = [x for x in ds.boxes[b.image] if x.label == b.label][0]
            assert R.iou((b.x, b.y, b.w, b.h), (g.x, g.y, g.w, g.h)) > 0.5, (b, g)


def test_prior_is_mean_of_other_images_boxes(tmp_path):
    ds, mining = make_world(tmp_path)
    names, labels = mining["names"], mining["labels"]
    frames = frames_of(ds, names)
    prior = {(b.image, b.label): b for b in H.box_prior(names, labels, frames, ds.boxes)}
    # Atelectasis: images 0 and 1 each have one box, so each one's prior is the other's box,
    # mapped by relative centre and size into its own frame.
    for me, other in ((0, 1), (1, 0)):
        g = [b for b in ds.boxes[names[other]] if b.label == 0][0]
        (ow, oh), (mw, mh) = frames[other], frames[me]
        p = prior[(names[me], 0)]
        np.testing.assert_allclose([p.x, p.y, p.w, p.h],
                                   [g.x / ow * mw, g.y / oh * mh, g.w / ow * mw, g.h / oh * mh])
        assert (p.score, p.rank) == (1.0, 1)
    assert (names[2], 4) not in prior          # Mass: nobody has a Mass box
    assert (names[4], 5) not in prior          # Nodule: the only box is the image's own


def test_prior_ignores_the_images_own_box(tmp_path):
    ds, mining = make_world(tmp_path)
    names, labels = mining["names"], mining["labels"]
    frames = frames_of(ds, names)
    before = {(b.image, b.label): b for b in H.box_prior(names, labels, frames, ds.boxes)}
    moved = dict(ds.boxes)
    moved[names[2]] = [BBox(names[2], 1, 0.0, 0.0, 5.0, 7.0)]      # image 2's own Cardiomegaly box
    after = {(b.image, b.label): b for b in H.box_prior(names, labels, frames, moved)}
    assert before[(names[2], 1)] == after[(names[2], 1)]
    assert before[(names[5], 1)] != after[(names[5], 1)]            # but it moves image 5's prior


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(masks=m["masks"][:, :, :, :-1]), "mining['masks'] shape"),
    (lambda m: m.update(cams=m["cams"][:0], masks=m["masks"][:0]), "T >= 1"),
    (lambda m: m.update(labels=m["labels"][:-1]), "mining['labels'] must be (n = 6"),
    (lambda m: m.update(names=m["names"][:-1]), "mining['cams'] must be"),
    (lambda m: m.update(names=m["names"][:-1] + m["names"][:1]), "duplicates"),
    (lambda m: m.update(image_size=0), "image_size"),
    (lambda m: m.pop("masks"), "missing keys ['masks']"),
    (lambda m: m.pop("grid"), "missing keys ['grid']"),
    (lambda m: m.update(grid=(8, 0.5, 64)), "for a 64-px input, mining['image_size'] is 48"),
    (lambda m: m.update(grid=(0, 0.5, 48)), "mining['grid']: grid: need finite stride > 0"),
    (lambda m: m.update(grid="8"), "mining['grid']: grid: expected (stride, offset, size)"),
    (lambda m: m.update(names=["nope.png"] + m["names"][1:]), "not in the dataset"),
])
def test_check_mining_bad_input(tmp_path, change, message):
    ds, mining = make_world(tmp_path)
    change(mining)
    with pytest.raises(ValueError) as e:
        H.check_mining(mining, ds)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
