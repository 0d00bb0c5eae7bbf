"""Tests of the evaluation reference: the Acc-AFP protocol, MaxBoxAccV2 and AUROC."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minimal_amkp import reference as R
from minimal_amkp.classes import BOX_CLASSES, SHORT_NAMES

SETTINGS = settings(max_examples=40, deadline=None)

# Three images, four gt boxes. B in scan order (rank, then score):
#   c.png r1 FP, a.png r1 hit, b.png r1 FP, b.png r2 hit, a.png r2 FP, b.png r3 hit.
GT = {"a.png": [[0, 0, 10, 10]],
      "b.png": [[0, 0, 10, 10], [20, 20, 10, 10]],
      "c.png": [[50, 50, 10, 10]]}
PRED = {"a.png": [[0, 0, 10, 10, 0.9], [30, 30, 5, 5, 0.5]],
        "b.png": [[40, 40, 5, 5, 0.8], [20, 20, 10, 10, 0.7], [0, 0, 10, 10, 0.1]],
        "c.png": [[0, 0, 10, 10, 0.95]]}


@pytest.mark.parametrize("bound, acc, afp", [
    (np.inf, 3 / 4, 3 / 3),     # all of B
    (2 / 3, 2 / 4, 2 / 3),      # a.png r2 would be FP 3: the scan stops, b.png r3 never taken
    (0.5, 1 / 4, 1 / 3),        # b.png r1 would be FP 2 > 1.5
    (0.0, 0.0, 0.0),            # the very first box is a FP
])
def test_afp_bound_stops_the_scan(bound, acc, afp):
    got = R.localization_accuracy(PRED, GT, 0.5, bound)
    np.testing.assert_allclose(got, (acc, afp), rtol=1e-12, err_msg=f"bound {bound}")


def test_a_bound_met_exactly_admits_the_last_false_positive():
    gt = {f"{i}.png": [[0, 0, 2, 2]] for i in range(50)}
    pred = {f"{i}.png": [[5, 5, 1, 1, 1.0]] for i in range(50)}
    assert R.localization_accuracy(pred, gt, 0.1, 0.62) == (0.0, 31 / 50)   # 0.62 * 50 = 31


def test_equal_scores_are_scanned_by_image_id():
    gt = {"a.png": [[0, 0, 4, 4]], "b.png": [[0, 0, 4, 4]]}
    hit, miss = [[0, 0, 4, 4, 0.5]], [[8, 8, 4, 4, 0.5]]
    assert R.localization_accuracy({"b.png": hit, "a.png": miss}, gt, 0.5, 0.0) == (0.0, 0.0)
    assert R.localization_accuracy({"a.png": hit, "b.png": miss}, gt, 0.5, 0.0) == (0.5, 0.0)


def test_boxes_of_images_without_gt_are_false_positives():
    gt = {"a.png": [[0, 0, 4, 4]], "n.png": np.zeros((0, 4))}
    pred = {"a.png": [[0, 0, 4, 4, 0.1]], "n.png": [[0, 0, 4, 4, 0.9]], "x.png": [[0, 0, 4, 4, 0.8]]}
    assert R.localization_accuracy(pred, gt, 0.5, np.inf) == (1.0, 2.0)
    assert R.localization_accuracy(pred, gt, 0.5, 1.0) == (0.0, 1.0)


def test_iobb_counts_a_small_box_inside_the_gt():
    gt, pred = {"a.png": [[0, 0, 10, 10]]}, {"a.png": [[2, 2, 3, 3, 1.0]]}   # IoU 0.09, IoBB 1
    assert R.localization_accuracy(pred, gt, 0.3, np.inf, "iou") == (0.0, 1.0)
    assert R.localization_accuracy(pred, gt, 0.3, np.inf, "iobb") == (1.0, 0.0)


@st.composite
def problems(draw):
    """A few images on a 24-px grid: 0-2 gt boxes (>= 1 in all), 0-3 ranked boxes, tied scores."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(1, 5))

    def boxes(k):
        return np.column_stack([rng.integers(0, 16, (k, 2)), rng.integers(1, 9, (k, 2))])

    gt = {f"{i}.png": boxes(rng.integers(0, 3)) for i in range(n)}
    gt["0.png"] = boxes(1) if len(gt["0.png"]) == 0 else gt["0.png"]
    pred = {}
    for i in range(n):
        k = rng.integers(0, 4)
        pred[f"{i}.png"] = np.column_stack([boxes(k), np.sort(rng.integers(0, 3, k))[::-1]])
    return pred, gt


@SETTINGS
@given(problems())
def test_acc_never_drops_as_t_falls_the_bound_grows_or_iou_becomes_iobb(p):
    pred, gt = p
    ts, bounds = (0.1, 0.3, 0.5, 0.7), (0.0, 0.3, 0.62, 1.0, np.inf)
    acc = {}
    for t, b, o in itertools.product(ts, bounds, ("iou", "iobb")):
        acc[t, b, o], afp = R.localization_accuracy(pred, gt, t, b, o)
        assert 0 <= acc[t, b, o] <= 1 and afp <= b + 1e-9, (t, b, o, acc[t, b, o], afp)
    for (t, b, o), a in acc.items():
        for t2, b2 in itertools.product(ts, bounds):
            if t2 <= t and b2 >= b:
                assert acc[t2, b2, o] >= a, f"{o}: Acc {acc[t2, b2, o]} at t={t2}, bound={b2} < {a} at t={t}, bound={b}"
        assert acc[t, b, "iobb"] >= acc[t, b, "iou"], f"IoBB Acc < IoU Acc at t={t}, bound={b}"


def test_default_bounds_are_table_2_ref_rows():
    assert R.DEFAULT_IOU_THRESHOLDS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    b = R.DEFAULT_AFP_BOUNDS
    assert b.shape == (7, 8) == (len(R.DEFAULT_IOU_THRESHOLDS), len(BOX_CLASSES))
    assert (b[0, 0], b[2, 0], b[0, 6], b[6, 1], b[3, 7]) == (0.89, 1.40, 1.02, 0.86, 0.54)
    with pytest.raises(ValueError):
        b[0, 0] = 2.0


def test_table_matches_per_class_calls_and_gives_nan_without_gt():
    table = R.acc_afp_table([PRED, {}], [GT, {"z.png": np.zeros((0, 4))}], thresholds=(0.1, 0.5),
                            bounds=np.array([[np.inf, 1.0], [2 / 3, 1.0]]))
    assert table["acc"].shape == table["afp"].shape == (2, 2)
    np.testing.assert_allclose(table["acc"][:, 0], [3 / 4, 2 / 4], rtol=1e-12)
    np.testing.assert_allclose(table["afp"][:, 0], [1.0, 2 / 3], rtol=1e-12)
    assert np.isnan(table["acc"][:, 1]).all() and np.isnan(table["afp"][:, 1]).all()
    assert R.format_acc_afp(table, names=("AT", "CM")) == (
        "| T(IoU) | AT | CM |\n|---|---|---|\n| 0.1 | 0.75-1.00 | n/a |\n| 0.5 | 0.50-0.67 | n/a |")


def test_default_table_has_the_paper_layout():
    table = R.acc_afp_table([PRED] * 8, [GT] * 8, overlap="iobb")
    assert table["acc"].shape == (7, 8)
    text = R.format_acc_afp(table)
    assert text.splitlines()[0] == "| T(IoBB) | " + " | ".join(SHORT_NAMES) + " |"
    assert len(text.splitlines()) == 2 + 7


@pytest.mark.parametrize("kwargs, match", [
    (dict(gt={}), r"gt: no ground-truth boxes in 0 images"),
    (dict(gt={"a.png": np.zeros((0, 4))}), r"gt: no ground-truth boxes in 1 images"),
    (dict(gt=[[0, 0, 1, 1]]), r"gt: expected a dict image -> \(g, 4\) boxes, got list"),
    (dict(gt={"a.png": [[0, 0, 1]]}), r"gt\['a.png'\]: boxes must be \(\.\.\., 4\).*shape \(1, 3\)"),
    (dict(gt={"a.png": [0, 0, 1, 1]}), r"gt\['a.png'\]: expected \(g, 4\) boxes, got shape \(4,\)"),
    (dict(gt={"a.png": [[0, 0, 0, 1]]}), r"gt\['a.png'\]: width and height must be > 0"),
    (dict(pred={"a.png": [[0, 0, 1, 1]]}), r"pred\['a.png'\]: expected \(k, 5\) rows.*\(1, 4\)"),
    (dict(pred={"a.png": [[0, 0, -1, 1, 0.5]]}), r"pred\['a.png'\]: width and height must be > 0"),
    (dict(pred={"a.png": [[0, 0, 1, 1, np.nan]]}), r"pred\['a.png'\]: contains NaN"),
    (dict(pred=[[0, 0, 1, 1, 0.5]]), r"pred: expected a dict image -> \(k, 5\) boxes, got list"),
    (dict(overlap="giou"), r"overlap: expected 'iou' or 'iobb', got 'giou'"),
    (dict(t=0.0), r"t: overlap threshold must lie in \(0, 1\], got 0.0"),
    (dict(t=1.5), r"t: overlap threshold must lie in \(0, 1\], got 1.5"),
    (dict(afp_bound=-0.1), r"afp_bound: must be >= 0 \(inf for no cap\), got -0.1"),
    (dict(afp_bound=np.nan), r"afp_bound: must be >= 0"),
])
def test_localization_accuracy_rejects_bad_input(kwargs, match):
    args = dict(pred={"a.png": [[0, 0, 1, 1, 0.5]]}, gt={"a.png": [[0, 0, 1, 1]]}, t=0.5,
                afp_bound=1.0)
    with pytest.raises(ValueError, match=match):
        R.localization_accuracy(**{**args, **kwargs})


def test_table_functions_reject_bad_input():
    with pytest.raises(ValueError, match=r"pred_by_class and gt_by_class: .* got 1 and 2"):
        R.acc_afp_table([PRED], [GT, GT])
    with pytest.raises(ValueError, match=r"bounds: shape \(7, 8\) does not broadcast to .* = \(7, 2\)"):
        R.acc_afp_table([PRED, PRED], [GT, GT])
    with pytest.raises(ValueError, match=r"overlap: expected 'iou' or 'iobb'"):
        R.acc_afp_table([PRED], [GT], thresholds=(0.5,), bounds=1.0, overlap="IoU")
    table = R.acc_afp_table([PRED], [GT], thresholds=(0.5,), bounds=1.0)
    with pytest.raises(ValueError, match=r"table: acc \(1, 1\) and afp \(1, 1\) must both be .* = \(1, 8\)"):
        R.format_acc_afp(table)


def _indicator(shape, box):
    h = np.zeros(shape)
    x, y, w, hh = box
    h[y:y + hh, x:x + w] = 1.0
    return h


def test_max_box_acc_v2_by_hand():
    gt = [[[5, 7, 4, 6]]]                                 # small: the full 32x32 map has IoU < 0.3
    perfect = R.max_box_acc_v2([_indicator((32, 32), (5, 7, 4, 6))], gt)
    assert perfect == dict(value=1.0, per_iou={0.3: 1.0, 0.5: 1.0, 0.7: 1.0},
                           best_threshold={0.3: 0.01, 0.5: 0.01, 0.7: 0.01})
    elsewhere = _indicator((32, 32), (20, 20, 8, 8))
    assert R.max_box_acc_v2([elsewhere], gt)["value"] == 0.0
    assert R.max_box_acc_v2([np.full((32, 32), 3.0)], gt)["value"] == 0.0
    half = R.max_box_acc_v2([_indicator((32, 32), (5, 7, 4, 6)), elsewhere], gt * 2)
    assert half["per_iou"] == {0.3: 0.5, 0.5: 0.5, 0.7: 0.5}


def test_max_box_acc_v2_boxes_every_component_and_picks_tau():
    h = _indicator((24, 30), (0, 0, 4, 4)) + 0.5 * _indicator((24, 30), (20, 14, 6, 5))
    out = R.max_box_acc_v2([h], [[[20, 14, 6, 5]]], iou_thresholds=(0.5,),
                           cam_thresholds=(0.25, 0.75))
    assert out == dict(value=1.0, per_iou={0.5: 1.0}, best_threshold={0.5: 0.25})


def test_max_box_acc_v2_rejects_bad_input():
    h, g = np.eye(8), [[0, 0, 2, 2]]
    with pytest.raises(ValueError, match=r"heatmaps and gt: need equal, non-zero lengths, got 2 and 1"):
        R.max_box_acc_v2([h, h], [g])
    with pytest.raises(ValueError, match=r"heatmaps\[0\]: expected 2 dimensions, got shape \(8,\)"):
        R.max_box_acc_v2([np.ones(8)], [g])
    with pytest.raises(ValueError, match=r"heatmaps\[1\] and gt\[1\]: need .* got shapes \(8, 8\) and \(0, 4\)"):
        R.max_box_acc_v2([h, h], [g, np.zeros((0, 4))])
    with pytest.raises(ValueError, match=r"gt\[0\]: width and height must be > 0"):
        R.max_box_acc_v2([h], [[[0, 0, 0, 2]]])
    with pytest.raises(ValueError, match=r"cam_thresholds and iou_thresholds: need at least one"):
        R.max_box_acc_v2([h], [g], cam_thresholds=())


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1)), min_size=1, max_size=30))
def test_auroc_equals_the_pairwise_count(pairs):
    s, y = np.array(pairs, dtype=np.float64).T
    pos, neg = s[y == 1], s[y == 0]
    got = R.auroc(s, y)
    if len(pos) == 0 or len(neg) == 0:
        assert np.isnan(got)
        return
    d = pos[:, None] - neg[None]
    assert got == pytest.approx(((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size, abs=1e-12)


def test_auroc_by_hand_and_bad_input():
    assert R.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert R.auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert R.auroc([0.5] * 4, [True, False, True, False]) == 0.5
    with pytest.raises(ValueError, match=r"scores and labels must have the same shape, got \(3,\) and \(2,\)"):
        R.auroc([1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match=r"labels: must hold only 0 and 1, got 2.0 at index 1"):
        R.auroc([1, 2], [0, 2])
    with pytest.raises(ValueError, match=r"scores: expected 1 dimensions, got shape \(2, 2\)"):
        R.auroc(np.eye(2), np.eye(2))
    with pytest.raises(ValueError, match=r"scores: need at least one score"):
        R.auroc([], [])


def test_best_overlap_takes_every_box_of_the_image():
    got = R.best_overlap(PRED, GT)
    np.testing.assert_allclose(got["a.png"], [1.0])
    np.testing.assert_allclose(got["b.png"], [1.0, 1.0])           # ranks 3 and 2 count too
    np.testing.assert_allclose(got["c.png"], [0.0])
    assert R.best_overlap({}, GT)["b.png"].tolist() == [0.0, 0.0]   # no boxes, nothing covered
    iobb = R.best_overlap({"a.png": [[2, 2, 4, 4, 1.0]]}, {"a.png": [[0, 0, 10, 10]]}, "iobb")
    np.testing.assert_allclose(iobb["a.png"], [1.0])


@SETTINGS
@given(st.integers(0, 2**32 - 1))
def test_best_overlap_is_the_max_of_the_pairwise_overlaps(seed):
    rng = np.random.default_rng(seed)
    g = np.column_stack([rng.uniform(0, 50, (3, 2)), rng.uniform(1, 30, (3, 2))])
    p = np.column_stack([rng.uniform(0, 50, (4, 2)), rng.uniform(1, 30, (4, 2)), rng.random(4)])
    got = R.best_overlap({"x": p}, {"x": g})["x"]
    want = [max(float(R.iou(p[k, :4], g[j])) for k in range(4)) for j in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_best_overlap_rejects_bad_input():
    with pytest.raises(ValueError, match="overlap: expected 'iou' or 'iobb'"):
        R.best_overlap(PRED, GT, "dice")
    with pytest.raises(ValueError, match=r"pred\['a.png'\]: expected \(k, 5\)"):
        R.best_overlap({"a.png": [[0, 0, 1, 1]]}, GT)
