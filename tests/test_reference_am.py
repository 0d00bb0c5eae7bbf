"""Property tests of the attention-mining reference: equations (1)-(3), (7), (8), mask update."""
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minimal_amkp import reference as R

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def problems(draw, mask="random"):
    """x (N, D, H, W), m (N, C, H, W), w (C, D), b (C,) with awkward sizes: N = 1, C = 1, primes."""
    n, d, c = draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 4))
    h, w_ = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["random", "zeros", "ones"])) if mask == "random" else mask
    m = {"random": (rng.random((n, c, h, w_)) < 0.6), "zeros": np.zeros((n, c, h, w_)),
         "ones": np.ones((n, c, h, w_))}[kind].astype(np.float64)
    return (rng.normal(size=(n, d, h, w_)), m, rng.normal(size=(c, d)), rng.normal(size=c))


def assert_close(actual, expected, rtol=1e-12, atol=1e-12):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


@SETTINGS
@given(problems())
def test_erase_zeroes_every_channel_where_the_mask_is_zero(p):
    x, m, _, _ = p
    x_hat = R.erase(x, m)
    assert x_hat.shape == (x.shape[0], m.shape[1]) + x.shape[1:]
    for c in range(m.shape[1]):
        assert_close(x_hat[:, c], x * m[:, c, None])


@SETTINGS
@given(problems())
def test_branch_logits_equal_masked_mean_of_cam_plus_bias(p):
    # The identity the fused kernels rely on: w_cᵀ g(X ⊙ M_c) = mean_hw(M_c ⊙ (W·X)_c).
    x, m, w, b = p
    cam_unmasked = np.einsum("ndhw,cd->nchw", x, w)
    assert_close(R.branch_logits(x, m, w, b), (m * cam_unmasked).mean(axis=(-2, -1)) + b)
    assert_close(R.branch_logits(x, m, w, b), R.cam(x, m, w).mean(axis=(-2, -1)) + b)


@SETTINGS
@given(problems(mask="ones"))
def test_all_ones_masks_give_the_plain_gap_classifier(p):
    x, m, w, b = p
    assert_close(R.branch_logits(x, m, w, b), R.gap(x) @ w.T + b)


@SETTINGS
@given(problems(mask="zeros"))
def test_all_zero_masks_leave_only_the_bias(p):
    x, m, w, b = p
    assert_close(R.branch_logits(x, m, w, b), np.broadcast_to(b, (x.shape[0], b.size)))
    assert np.all(R.cam(x, m, w) == 0)


@SETTINGS
@given(problems())
def test_cam_is_zero_outside_the_mask_and_linear_in_w(p):
    x, m, w, _ = p
    h = R.cam(x, m, w)
    assert np.all(h[m == 0] == 0)
    assert_close(R.cam(x, m, 2 * w), 2 * h)


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_branch_losses_match_the_textbook_cross_entropy(n, c, seed):
    rng = np.random.default_rng(seed)
    z, y = rng.normal(scale=3, size=(n, c)), (rng.random((n, c)) < 0.5).astype(float)
    p = 1 / (1 + np.exp(-z))
    expected = (-(y * np.log(p) + (1 - y) * np.log(1 - p))).mean(axis=0)
    assert_close(R.branch_losses(z, y), expected, rtol=1e-10)
    assert R.classification_loss(z, y) == pytest.approx(expected.mean(), rel=1e-10)


def test_branch_losses_are_stable_for_huge_logits():
    z = np.array([[1000.0, -1000.0, 1000.0, -1000.0]])
    y = np.array([[1.0, 0.0, 0.0, 1.0]])
    assert_close(R.branch_losses(z, y), [0.0, 0.0, 1000.0, 1000.0])


def flood_fill(on, seed):
    """An independent 8-connected flood fill: the oracle for scipy's labelling."""
    comp, todo = {seed}, deque([seed])
    while todo:
        i, j = todo.popleft()
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                q = (i + di, j + dj)
                if 0 <= q[0] < on.shape[0] and 0 <= q[1] < on.shape[1] and on[q] and q not in comp:
                    comp.add(q)
                    todo.append(q)
    return comp


@st.composite
def maps_and_masks(draw):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    h = rng.normal(size=shape)
    if draw(st.booleans()):
        h[0] = draw(st.floats(-3, 3))                 # a constant map
    m = (rng.random(shape) < 0.8).astype(float) if draw(st.booleans()) else np.ones(shape)
    return h, m, draw(st.sampled_from([0.3, 0.5, 0.9]))


@settings(max_examples=60, deadline=None)
@given(maps_and_masks())
def test_update_masks_zeroes_exactly_the_peak_component(case):
    h, m, thr = case
    new = R.update_masks(h, m, threshold=thr)
    assert np.all(new <= m), "a 0 turned into a 1"
    for i in range(h.shape[0]):
        live = m[i] == 1
        if not live.any() or h[i][live].max() == h[i][live].min():
            assert np.array_equal(new[i], m[i]), f"map {i} without a peak changed its mask"
            continue
        lo, hi = h[i][live].min(), h[i][live].max()
        peak = max(zip(*np.nonzero(live)), key=lambda q: (h[i][q], -q[0], -q[1]))
        on = live & ((h[i] - lo) / (hi - lo) >= thr)
        expected = m[i].copy()
        for q in flood_fill(on, peak):
            expected[q] = 0
        mismatch = np.argwhere(new[i] != expected)
        assert mismatch.size == 0, f"map {i}: first mismatch at {tuple(mismatch[0])}"
        assert new[i][peak] == 0


@settings(max_examples=60, deadline=None)
@given(maps_and_masks())
def test_normalise_live_scales_each_map_over_its_live_cells(case):
    h, m, thr = case
    out = R.normalise_live(h, m)
    assert out.shape == h.shape and np.all(out[m == 0] == 0), "an erased cell is not 0"
    new = R.update_masks(h, m, threshold=thr)
    for i in range(h.shape[0]):
        live = m[i] == 1
        if not live.any() or h[i][live].max() == h[i][live].min():
            assert np.all(out[i] == 0), f"map {i} without a peak is not all 0"
            continue
        lo, hi = h[i][live].min(), h[i][live].max()
        assert_close(out[i][live], (h[i][live] - lo) / (hi - lo))
        # update_masks binarises the same normalised map: it erases only cells at or above thr.
        erased = (m[i] == 1) & (new[i] == 0)
        assert erased.any() and np.all(out[i][erased] >= thr), f"map {i}: erased below the threshold"


def test_erased_cells_never_count_as_the_peak():
    # Round 2 of a CAM that is negative outside the erased cell: the erased 0 must not win.
    h = np.array([[0.0, -1.0, -3.0, -0.5]])
    m = np.array([[0.0, 1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(R.update_masks(h, m), [[0.0, 1.0, 1.0, 0.0]])


def test_update_masks_splits_two_blobs_and_erases_the_brighter():
    h = np.zeros((7, 7))
    h[1:3, 1:3] = 1.0           # peak blob
    h[4:6, 4:6] = 0.8           # second blob, separated by a zero row and column
    new = R.update_masks(h[None], np.ones((1, 7, 7)))[0]
    assert new[1:3, 1:3].sum() == 0 and new.sum() == 49 - 4


def test_update_masks_joins_diagonal_neighbours():
    h = np.zeros((4, 4))
    h[0, 0], h[1, 1], h[2, 2] = 1.0, 0.9, 0.8
    new = R.update_masks(h, np.ones((4, 4)))
    assert new[0, 0] == new[1, 1] == new[2, 2] == 0 and new.sum() == 13


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(2, 8), st.integers(2, 8), st.integers(0, 2**32 - 1))
def test_frozen_network_fuses_to_the_first_heatmap(T, hh, ww, seed):
    # With a frozen network H_t = H_1 ⊙ M_{t-1}: eq. (8) telescopes to H_1 for every T.
    h1 = np.random.default_rng(seed).normal(size=(2, 3, hh, ww))
    cams, masks = [], [np.ones_like(h1)]
    for t in range(T):
        cams.append(h1 * masks[-1])
        if t + 1 < T:
            masks.append(R.update_masks(cams[-1], masks[-1]))
    assert_close(R.fuse_heatmaps(cams, masks), h1)


def test_fuse_heatmaps_by_hand():
    # 1×2 maps, T = 2: round 1 erases the left pixel, round 2 sees only the right one.
    h1, h2 = np.array([[4.0, 1.0]]), np.array([[0.0, 3.0]])
    m0, m1 = np.ones((1, 2)), np.array([[0.0, 1.0]])
    # H_f = ½[H_1 + (H_2 + H_1 ⊙ (1 − M_1))] = ½[[4, 1] + [4, 3]] = [4, 2]
    assert_close(R.fuse_heatmaps([h1, h2], [m0, m1]), [[4.0, 2.0]])


@pytest.mark.parametrize("call, message", [
    (lambda: R.erase(np.zeros((2, 3, 4, 4)), np.ones((3, 1, 4, 4))), r"disagree on N, H or W"),
    (lambda: R.erase(np.zeros((2, 3, 4)), np.ones((2, 1, 4, 4))), r"x: expected 4 dimensions"),
    (lambda: R.erase(np.zeros((1, 3, 4, 4)), np.full((1, 1, 4, 4), 0.5)), r"m: masks must hold only 0 and 1"),
    (lambda: R.branch_logits(np.zeros((1, 3, 2, 2)), np.ones((1, 2, 2, 2)), np.zeros((2, 4)), np.zeros(2)),
     r"w must be \(C, D\) = \(2, 3\)"),
    (lambda: R.branch_logits(np.zeros((1, 3, 2, 2)), np.ones((1, 2, 2, 2)), np.zeros((2, 3)), np.zeros(3)),
     r"b must be \(C,\)"),
    (lambda: R.branch_losses(np.zeros((2, 3)), np.zeros((2, 4))), r"logits and y must have the same shape"),
    (lambda: R.branch_losses(np.zeros((2, 3)), np.full((2, 3), 0.5)), r"y: masks must hold only 0 and 1"),
    (lambda: R.update_masks(np.zeros((3, 3)), np.ones((3, 4))), r"h and m must have the same shape"),
    (lambda: R.update_masks(np.zeros((3, 3)), np.ones((3, 3)), threshold=1.5), r"threshold must lie in"),
    (lambda: R.normalise_live(np.zeros((3, 3)), np.ones((2, 3))), r"h and m must have the same shape"),
    (lambda: R.normalise_live(np.zeros((3, 3)), np.full((3, 3), 2.0)), r"m: masks must hold only 0 and 1"),
    (lambda: R.fuse_heatmaps([], []), r"non-empty lists of equal length"),
    (lambda: R.fuse_heatmaps([np.zeros((2, 2))], [np.zeros((2, 2))]), r"masks\[0\] must be all ones"),
    (lambda: R.gap(np.array([[np.nan]])), r"x: contains NaN"),
])
def test_bad_input_gets_a_one_line_value_error(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_dilate_erasure_grows_only_the_new_region(h, w, r, seed):
    """Cells within r (Chebyshev) of a newly erased cell are erased, no other live cell is,
    nothing comes back, and r = 0 changes nothing."""
    rng = np.random.default_rng(seed)
    prev = (rng.random((h, w)) < 0.8).astype(float)
    new = prev * (rng.random((h, w)) < 0.8)
    got = R.dilate_erasure(new, prev, r)
    fresh = np.argwhere((prev == 1) & (new == 0))                         # (k, 2)
    near = np.zeros((h, w), bool)
    for i, j in fresh:
        near[max(i - r, 0):i + r + 1, max(j - r, 0):j + r + 1] = True
    want = np.where(near, 0.0, new)
    bad = np.argwhere(got != want)
    assert bad.size == 0, f"first wrong cell {tuple(bad[0])}: got {got[tuple(bad[0])]}, want {want[tuple(bad[0])]}"
    assert np.all(got <= new)
    np.testing.assert_array_equal(R.dilate_erasure(new, prev, 0), new)


def test_dilate_erasure_bad_input():
    with pytest.raises(ValueError, match=r"^r must be a whole number >= 0, got 1.5$"):
        R.dilate_erasure(np.ones((2, 2)), np.ones((2, 2)), 1.5)
    with pytest.raises(ValueError, match=r"^m_new and m_prev must have the same shape"):
        R.dilate_erasure(np.ones((2, 2)), np.ones((2, 3)), 1)
    with pytest.raises(ValueError, match=r"^m_new: masks must hold only 0 and 1"):
        R.dilate_erasure(np.full((2, 2), 0.5), np.ones((2, 2)), 1)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 6), st.sampled_from([(8, 0.5), (4, 2.5), (5.0, 1.0)]),
       st.sampled_from(["random", "zeros", "ones"]), st.integers(0, 2**32 - 1))
def test_erase_image_fills_the_pixels_of_erased_cells_with_the_kept_mean(n, c, h, grid, mask, seed):
    """Every pixel whose nearest cell centre is erased in some class takes the mean of the
    pixels kept; the others stay; a mask of ones gives the image back."""
    stride, offset = grid
    size = int(round(stride * h))
    rng = np.random.default_rng(seed)
    image = rng.random((n, 1, size, size))
    m = {"random": (rng.random((n, c, h, h)) < 0.6), "zeros": np.zeros((n, c, h, h)),
         "ones": np.ones((n, c, h, h))}[mask].astype(float)
    got = R.erase_image(image, m, (stride, offset, size))
    def nearest(u):                                 # a tie goes to the later cell, as floor(x + ½)
        d = np.abs(stride * np.arange(h) + offset - (u + 0.5))
        return np.flatnonzero(d == d.min())[-1]
    for i in range(n):
        gone = np.zeros((size, size), bool)
        for u in range(size):
            for v in range(size):
                gone[u, v] = m[i, :, nearest(u), nearest(v)].min() == 0
        fill = image[i, 0][~gone].mean() if (~gone).any() else 0.0
        want = np.where(gone, fill, image[i, 0])
        bad = np.argwhere(~np.isclose(got[i, 0], want, rtol=0, atol=1e-12))
        assert bad.size == 0, f"image {i}: first wrong pixel {tuple(bad[0])}: got {got[i, 0][tuple(bad[0])]}, want {want[tuple(bad[0])]}"
    np.testing.assert_array_equal(R.erase_image(image, np.ones_like(m), (stride, offset, size)), image)


def test_erase_image_bad_input():
    with pytest.raises(ValueError, match=r"^image must be \(N, 1, S, S\) with m's N"):
        R.erase_image(np.ones((2, 3, 8, 8)), np.ones((2, 1, 2, 2)), (4, 2, 8))
    with pytest.raises(ValueError, match=r"^m: masks must hold only 0 and 1"):
        R.erase_image(np.ones((1, 1, 8, 8)), np.full((1, 1, 2, 2), 0.5), (4, 2, 8))
