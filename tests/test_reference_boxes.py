"""Property tests of the box reference: IoU, IoBB and Sec. 3.2 bbox generation."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minimal_amkp import reference as R
from minimal_amkp.reference.boxes import DUPLICATE_IOU

SETTINGS = settings(max_examples=40, deadline=None)
SIDES = st.sampled_from([1, 2, 3, 5, 7, 8, 11, 13])        # N = 1 and primes among them


@st.composite
def box_arrays(draw, n=None):
    """(n, 4) boxes with corners in [-50, 50] and sides in [1e-3, 60]."""
    n = draw(st.integers(1, 6)) if n is None else n
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    xy = rng.uniform(-50, 50, size=(n, 2))
    wh = rng.uniform(1e-3, 60, size=(n, 2)) if draw(st.booleans()) else rng.integers(1, 9, (n, 2))
    return np.column_stack([xy, wh])                                      # (n, 4)


def assert_all(cond, what):
    cond = np.asarray(cond)
    if not cond.all():
        raise AssertionError(f"{what} fails first at index {tuple(np.argwhere(~cond)[0])}")


@SETTINGS
@given(box_arrays(), box_arrays())
def test_iou_is_symmetric_bounded_and_one_on_itself(a, b):
    m = R.iou(a[:, None], b[None])                                        # (K, G)
    assert m.shape == (len(a), len(b))
    np.testing.assert_array_equal(m, R.iou(b[:, None], a[None]).T)
    assert_all((m >= 0) & (m <= 1), "0 <= IoU <= 1")
    np.testing.assert_array_equal(R.iou(a, a), np.ones(len(a)))


@SETTINGS
@given(box_arrays(), box_arrays())
def test_iobb_is_at_least_iou(a, b):
    m, m_bb = R.iou(a[:, None], b[None]), R.iobb(a[:, None], b[None])
    assert_all((m_bb >= m) & (m_bb <= 1), "IoU <= IoBB <= 1")


@SETTINGS
@given(box_arrays(), st.integers(0, 2**32 - 1))
def test_iobb_is_one_when_the_prediction_lies_inside_the_gt_box(a, seed):
    rng = np.random.default_rng(seed)
    grow = rng.uniform(0, 5, size=(len(a), 4))
    b = np.column_stack([a[:, :2] - grow[:, :2], a[:, 2:] + grow[:, :2] + grow[:, 2:]])
    np.testing.assert_array_equal(R.iobb(a, b), np.ones(len(a)))


def test_overlaps_by_hand():
    a, b = [0, 0, 2, 2], [1, 1, 2, 2]                 # 1 px shared, union 7, prediction 4
    assert R.iou(a, b) == pytest.approx(1 / 7)
    assert R.iobb(a, b) == pytest.approx(1 / 4)
    assert R.iobb([0, 0, 4, 4], [1, 1, 1, 1]) == pytest.approx(1 / 16)   # big prediction
    assert R.iobb([1, 1, 1, 1], [0, 0, 4, 4]) == 1.0
    assert R.iou([0, 0, 1, 1], [1, 0, 1, 1]) == 0.0                      # edges touch only


@pytest.mark.parametrize("a, b, match", [
    ([0, 0, 1], [0, 0, 1, 1], r"a: boxes must be \(\.\.\., 4\).*shape \(3,\)"),
    ([0, 0, 1, 1], np.zeros((2, 5)), r"b: boxes must be \(\.\.\., 4\).*shape \(2, 5\)"),
    ([[0, 0, 1, 1], [0, 0, 0, 1]], [0, 0, 1, 1], r"a: width and height must be > 0.*index \(1,\)"),
    ([0, 0, 1, 1], [0, 0, 1, -2], r"b: width and height must be > 0"),
    ([0, np.nan, 1, 1], [0, 0, 1, 1], r"a: contains NaN"),
    (np.ones((2, 4)), np.ones((3, 4)), r"a and b: box arrays do not broadcast.*\(2, 4\).*\(3, 4\)"),
])
def test_overlap_rejects_bad_boxes(a, b, match):
    for f in (R.iou, R.iobb):
        with pytest.raises(ValueError, match=match):
            f(a, b)


@st.composite
def heatmaps(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (draw(SIDES), draw(SIDES))
    kind = draw(st.sampled_from(["normal", "levels", "sparse"]))
    if kind == "normal":
        return rng.normal(size=shape)
    if kind == "levels":                                  # ties and plateaus
        return rng.integers(0, 4, size=shape).astype(np.float64)
    return rng.random(shape) * (rng.random(shape) < 0.2)  # mostly zero, isolated blobs


@settings(max_examples=60, deadline=None)
@given(heatmaps(), st.integers(1, 4))
def test_boxes_are_in_the_map_ranked_and_distinct(h, k):
    out = R.boxes_from_heatmap(h, k=k)
    assert out.dtype == np.float64 and out.ndim == 2 and out.shape[1] == 5
    if h.max() == h.min():
        assert out.shape == (0, 5), f"constant map {h.shape} gave {len(out)} boxes"
        return
    assert 0 < len(out) <= k, f"{len(out)} boxes for k={k}, map {h.shape}"
    x, y, w, hh, score = out.T
    H, W = h.shape
    assert_all((x >= 0) & (y >= 0) & (w >= 1) & (hh >= 1) & (x + w <= W) & (y + hh <= H),
               f"box inside the {h.shape} map")
    assert_all(out[:, :4] == np.round(out[:, :4]), "whole-pixel box")
    assert_all(np.diff(score) <= 0, "scores non-increasing")
    means = [h[int(r[1]):int(r[1] + r[3]), int(r[0]):int(r[0] + r[2])].mean() for r in out]
    np.testing.assert_allclose(score, means, rtol=1e-12, atol=0, err_msg="score = mean of h in box")
    pair = R.iou(out[:, None, :4], out[None, :, :4])
    assert_all(pair[np.triu_indices(len(out), 1)] < DUPLICATE_IOU, "no duplicate pair")


@st.composite
def bumps(draw):
    """A single radial bump: every superlevel set is one component around the peak."""
    H, W = draw(SIDES), draw(SIDES)
    cy, cx = draw(st.integers(0, H - 1)), draw(st.integers(0, W - 1))
    r2 = (np.arange(H)[:, None] - cy) ** 2 + (np.arange(W)[None] - cx) ** 2
    sigma = draw(st.floats(0.3, 10))
    scale, offset = draw(st.floats(0.1, 100)), draw(st.floats(-10, 10))
    return offset + scale * np.exp(-r2 / (2 * sigma ** 2)), (cy, cx)


@SETTINGS
@given(bumps())
def test_the_peak_pixel_lies_in_the_rank_1_box_of_a_single_bump(bump):
    h, (cy, cx) = bump
    out = R.boxes_from_heatmap(h)
    if h.max() == h.min():                                # 1x1 map, or a bump too flat
        assert out.shape == (0, 5)
        return
    x, y, w, hh, _ = out[0]
    assert x <= cx < x + w and y <= cy < y + hh, f"peak {(cy, cx)} outside rank-1 box {out[0]}"


@SETTINGS
@given(heatmaps(), st.sampled_from([0.25, 0.5, 2.0, 64.0]), st.integers(-100, 100))
def test_boxes_ignore_the_heatmap_scale_and_offset(h, scale, offset):
    # Powers of two and integer offsets keep the arithmetic exact, so tied scores stay tied.
    a, b = R.boxes_from_heatmap(h), R.boxes_from_heatmap(scale * h + offset)
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    np.testing.assert_allclose(scale * a[:, 4] + offset, b[:, 4], rtol=1e-9, atol=1e-9)


def test_nested_levels_by_hand():
    # Rings 0, 0.3, 0.5 around a peak of 1: levels 0.6, 0.4, 0.2 box the 1x1, 3x3 and 5x5.
    h = np.zeros((7, 7))
    h[1:6, 1:6], h[2:5, 2:5], h[3, 3] = 0.3, 0.5, 1.0
    expected = [[3, 3, 1, 1, 1.0], [2, 2, 3, 3, 5 / 9], [1, 1, 5, 5, 9.8 / 25]]
    np.testing.assert_allclose(R.boxes_from_heatmap(h), expected, rtol=1e-12)
    np.testing.assert_allclose(R.boxes_from_heatmap(h, k=2), expected[:2], rtol=1e-12)
    np.testing.assert_allclose(R.boxes_from_heatmap(h, thresholds=(0.2,)), expected[2:], rtol=1e-12)


def test_two_sharp_blobs_give_two_boxes_not_three():
    # Each plateau is boxed the same at every level: duplicates drop, fewer than k remain.
    h = np.zeros((11, 13))
    h[1:4, 2:5], h[6:10, 8:10] = 1.0, 0.8
    expected = [[2, 1, 3, 3, 1.0], [8, 6, 2, 4, 0.8]]
    np.testing.assert_allclose(R.boxes_from_heatmap(h), expected, rtol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (13, 11)])
@pytest.mark.parametrize("value", [0.0, -3.5, 2.0])
def test_constant_maps_give_no_boxes(shape, value):
    out = R.boxes_from_heatmap(np.full(shape, value))
    assert out.shape == (0, 5) and out.dtype == np.float64


def test_diagonal_neighbours_are_one_component():
    np.testing.assert_allclose(R.boxes_from_heatmap(np.eye(3)), [[0, 0, 3, 3, 1 / 3]], rtol=1e-12)


def test_one_row_map():
    out = R.boxes_from_heatmap(np.array([[0.0, 1.0, 0.0, 0.5, 0.5]]))
    np.testing.assert_allclose(out, [[1, 0, 1, 1, 1.0], [3, 0, 2, 1, 0.5]])


@pytest.mark.parametrize("kwargs, match", [
    (dict(h=np.zeros(5)), r"h: expected 2 dimensions, got shape \(5,\)"),
    (dict(h=np.zeros((2, 3, 4))), r"h: expected 2 dimensions, got shape \(2, 3, 4\)"),
    (dict(h=np.zeros((0, 4))), r"h: empty heatmap, shape \(0, 4\)"),
    (dict(h=np.array([[0.0, np.inf]])), r"h: contains NaN or infinity"),
    (dict(h=np.eye(3), k=0), r"k must be a positive int, got 0"),
    (dict(h=np.eye(3), k=2.5), r"k must be a positive int, got 2.5"),
    (dict(h=np.eye(3), thresholds=()), r"thresholds: need a non-empty sequence of levels in \[0, 1\]"),
    (dict(h=np.eye(3), thresholds=(0.5, 1.5)), r"thresholds: .*got \(0.5, 1.5\)"),
    (dict(h=np.eye(3), min_size=(0.5, 2)), r"min_size: need \(min_w, min_h\) >= 1 pixel, got \(0.5, 2\)"),
])
def test_boxes_from_heatmap_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        R.boxes_from_heatmap(**kwargs)


def two_blobs():
    """The issue's map: blurred blobs of 1.0 (rows, cols 10-19) and 0.6 (rows 40-49, cols 30-44)."""
    from scipy import ndimage
    h = np.zeros((64, 64))
    h[10:20, 10:20], h[40:50, 30:45] = 1.0, 0.6
    return ndimage.gaussian_filter(h, 2.0), np.array([[10, 10, 10, 10], [30, 40, 15, 10]], float)


def test_two_separated_regions_each_get_a_box_of_their_own():
    h, blobs = two_blobs()
    out = R.boxes_from_heatmap(h)
    overlap = R.iou(out[:, None, :4], blobs[None])                       # (k, 2)
    assert overlap.max(axis=0).min() >= 0.3, f"a blob without a box of IoU >= 0.3: {overlap.round(2)}"
    assert overlap[0, 0] == overlap[:, 0].max(), "rank 1 is not the best box of the strong blob"
    # By score alone (one region allowed) the weaker blob is left only a sliver, if anything.
    alone = R.boxes_from_heatmap(h, region_level=1.01)
    assert R.iou(alone[:, None, :4], blobs[None])[:, 1].max() < 0.3


@SETTINGS
@given(bumps())
def test_a_single_region_keeps_its_nested_alternatives(bump):
    h, _ = bump
    out = R.boxes_from_heatmap(h)
    if len(out) < 2:
        return
    x, y, w, hh = out[:, :4].T
    widest = np.argmax(w * hh)
    inside = (x >= x[widest]) & (y >= y[widest]) & (x + w <= x[widest] + w[widest]) & \
        (y + hh <= y[widest] + hh[widest])
    assert_all(inside, f"boxes nested in the widest of a single bump {out[:, :4].tolist()}")


@pytest.mark.parametrize("h, min_size, expected", [
    (np.eye(1, 9, 4).repeat(5, 0), (3, 1), [[3, 0, 3, 5]]),      # a 1-px column widened to 3
    (np.eye(1, 9, 0).repeat(5, 0), (3, 2), [[0, 0, 3, 5]]),      # ... kept inside at the edge
    (np.eye(1, 9, 4).repeat(5, 0), (12, 9), [[0, 0, 9, 5]]),     # ... never beyond the map
])
def test_boxes_are_widened_to_min_size_about_their_centre(h, min_size, expected):
    out = R.boxes_from_heatmap(h, min_size=min_size)
    np.testing.assert_allclose(out[:, :4], expected)
    assert out[0, 4] == 1.0                                      # the component's own mean
