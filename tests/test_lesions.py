"""lesions.py: recall by lesion count, extent IoU, gains and the figure picks, peaks in the chest."""
import numpy as np
import pytest

from minimal_amkp import reference as R
from minimal_amkp.classes import BOX_CLASSES, BBox
from minimal_amkp.run.lesions import (EXTENDED, gain_and_loss_picks, gains, kind_recall, later_peaks,
                                  lesion_numbers, peak_position, peaks_in_chest)

NAMES = ["a.png", "b.png", "c.png"]
# a: two Atelectasis lesions, b: one, c: one Effusion.
GT = [{"a.png": np.array([[0, 0, 10, 10], [50, 50, 10, 10]], float), "b.png": np.array([[0, 0, 10, 10]], float),
       "c.png": np.zeros((0, 4))},
      *[{n: np.zeros((0, 4)) for n in NAMES}],
      {"a.png": np.zeros((0, 4)), "b.png": np.zeros((0, 4)), "c.png": np.array([[20, 20, 20, 20]], float)},
      *[{n: np.zeros((0, 4)) for n in NAMES} for _ in range(5)]]


def box(image, c, x, y, w, h, rank=1):
    return BBox(image, c, x, y, w, h, 1.0 / rank, rank)


def test_recall_splits_lesions_by_how_many_their_image_has_of_their_class():
    found = [box("a.png", 0, 0, 0, 10, 10), box("b.png", 0, 0, 0, 10, 10), box("c.png", 2, 20, 20, 10, 20)]
    r = lesion_numbers(found, NAMES, GT)
    assert r["recall"]["iou 0.3"] == {"multi": 0.5, "single": 1.0, "n_multi": 2, "n_single": 2}
    assert r["recall"]["iobb 0.5"]["single"] == 1.0                    # the half-size Effusion box lies inside
    np.testing.assert_allclose(r["extent_iou"]["Atelectasis"], (1 + 0 + 1) / 3)
    np.testing.assert_allclose(r["extent_iou"]["Effusion"], 0.5)
    assert np.isnan(r["extent_iou"]["Mass"]) and "Mass" not in EXTENDED
    np.testing.assert_allclose(r["extent_iou_mean"], np.mean([2 / 3, 0.5]))
    second = found + [box("a.png", 0, 50, 50, 10, 10, rank=3)]          # a rank-3 box counts too
    assert lesion_numbers(second, NAMES, GT)["recall"]["iou 0.3"]["multi"] == 1.0


def test_kind_recall_counts_lesions_a_and_b_apart():
    a0, b0 = BBox("a.png", 0, 0, 0, 10, 10), BBox("a.png", 0, 50, 50, 10, 10)
    a1, b1 = BBox("b.png", 2, 0, 0, 20, 20), BBox("b.png", 2, 40, 40, 10, 10)
    outside = BBox("z.png", 0, 0, 0, 10, 10)                            # not a mining image: not counted
    kinds = [(a0, "A"), (b0, "B"), (a1, "A"), (b1, "B"), (outside, "B")]
    found = [box("a.png", 0, 0, 0, 10, 10),                             # A of a.png, IoU 1
             box("a.png", 0, 53, 53, 10, 10, rank=2),                   # B of a.png, IoU 49/151 ≈ 0.32
             box("b.png", 2, 0, 0, 10, 10),                             # A of b.png, IoU 0.25
             box("b.png", 0, 40, 40, 10, 10)]                           # B's place, another class: missed
    r = kind_recall(found, ["a.png", "b.png"], kinds)
    assert r == {"A": {"iou 0.3": 0.5, "iou 0.1": 1.0, "n": 2}, "B": {"iou 0.3": 0.5, "iou 0.1": 0.5, "n": 2}}
    assert kind_recall([], ["a.png", "b.png"], kinds)["B"] == {"iou 0.3": 0.0, "iou 0.1": 0.0, "n": 2}
    none = kind_recall(found, ["c.png"], kinds)["A"]
    assert none["n"] == 0 and np.isnan(none["iou 0.3"])


def test_gains_and_the_maps_picked_for_the_figures():
    h1 = [box("a.png", 0, 0, 0, 10, 10), box("b.png", 0, 0, 0, 10, 10), box("c.png", 2, 20, 20, 20, 20)]
    hf = [box("a.png", 0, 0, 0, 10, 10), box("a.png", 0, 50, 50, 10, 10, 2), box("b.png", 0, 0, 0, 10, 5),
          box("c.png", 2, 20, 20, 20, 20)]
    g = gains(h1, hf, NAMES, GT)
    assert g == pytest.approx({(0, 0): 0.5, (0, 1): -0.5, (2, 2): 0.0})
    picks = gain_and_loss_picks(g)
    assert [(c, i) for c, i, _ in picks] == [(0, 0), (0, 1), (2, 2)]     # one map: one pick
    assert picks[0][2] == "most gained of 2 maps: best-box IoU H_f - H_1 +0.50"
    assert picks[1][2].startswith("most lost of 2 maps") and picks[1][2].endswith("-0.50")


def test_peaks_in_chest_reads_the_peak_cells_centre():
    h = np.zeros((2, len(BOX_CLASSES), 4, 4))
    h[0, 0, 1, 2] = 1.0                                 # centre (0.625, 0.375): inside
    h[1, 1, 3, 0] = 1.0                                 # centre (0.125, 0.875): outside
    assert peak_position(h[0, 0], R.naive_grid(4, 64)) == (0.625, 0.375)
    assert peak_position(h[0, 0], R.Grid(16, 0.5, 64)) == ((32 + 0.5) / 64, (16 + 0.5) / 64)
    chest = np.zeros((8, 8), bool)
    chest[1:6, 2:7] = True
    labels = np.zeros((2, 14), np.uint8)
    labels[0, 0] = labels[1, 1] = 1
    naive = R.naive_grid(4, 64)
    assert peaks_in_chest(h, ["p", "q"], labels, {"p": chest, "q": chest}, naive) == 0.5
    assert peaks_in_chest(h, ["p", "q"], labels, None, naive) is None


def test_later_peaks_compare_the_learnt_round_with_a_frozen_network():
    h1 = np.zeros((2, len(BOX_CLASSES), 4, 4))
    h1[0, 0, 0, 0], h1[0, 0, 3, 3], h1[0, 0, 0, 3] = 1.0, 0.2, 0.5    # H_1: A, faint B, a blob between
    m1 = np.ones_like(h1)
    m1[0, 0, 0, 0] = 0                                                    # A erased
    h2 = h1 * m1
    h2[0, 0, 3, 3] = 0.9                                                  # the learnt round finds B
    cams, masks = np.stack([h1, h2]), np.stack([np.ones_like(h1), m1])
    gt = [{"a": np.array([[0, 0, 10, 10], [30, 30, 10, 10]], float), "b": np.zeros((0, 4))}] + \
        [{"a": np.zeros((0, 4)), "b": np.zeros((0, 4))} for _ in range(7)]
    got = later_peaks(cams, masks, ["a", "b"], [(40, 40), (40, 40)], gt, R.naive_grid(cams.shape[-1], 40))
    assert got == [dict(t=2, maps=1, learned=1.0, frozen=0.0)]
