"""Tests of the knowledge-preservation reference: equations (4)-(6)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minimal_amkp import reference as R


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_kp_layer_loss_pools_then_takes_the_squared_distance_per_image(n, k, h, w, seed):
    rng = np.random.default_rng(seed)
    fa, fb = rng.normal(size=(n, k, h, w)), rng.normal(size=(n, k, h, w))
    per_image = [np.sum((fa[i].mean(axis=(1, 2)) - fb[i].mean(axis=(1, 2))) ** 2) for i in range(n)]
    assert R.kp_layer_loss(fa, fb) == pytest.approx(np.mean(per_image), rel=1e-12)
    assert R.kp_layer_loss(fa, fb) == pytest.approx(R.kp_layer_loss(R.gap(fa), R.gap(fb)), rel=1e-12)
    assert R.kp_layer_loss(fa, fa) == 0.0


def test_kp_layer_loss_by_hand():
    # Two images, one channel: pooled values 1 vs 0 and 2 vs 2 -> (1² + 0²) / 2.
    fa = np.array([[[[1.0, 1.0]]], [[[2.0, 2.0]]]])
    fb = np.array([[[[0.0, 0.0]]], [[[3.0, 1.0]]]])
    assert R.kp_layer_loss(fa, fb) == 0.5


def test_kp_loss_averages_layers_of_any_width_and_total_loss_weighs_it():
    rng = np.random.default_rng(0)
    pairs = [(rng.normal(size=(3, k, 2, 2)), rng.normal(size=(3, k, 2, 2))) for k in (4, 7)]
    pairs.append((rng.normal(size=(3, 14)), rng.normal(size=(3, 14))))          # logits
    assert R.kp_loss(pairs) == pytest.approx(np.mean([R.kp_layer_loss(a, b) for a, b in pairs]))
    assert R.total_loss(1.0, 0.5) == 1.25
    assert R.total_loss(1.0, 0.5, lam=2.0) == 2.0


@pytest.mark.parametrize("call, message", [
    (lambda: R.kp_layer_loss(np.zeros((0, 3)), np.zeros((0, 3))), r"N − n must be at least 1"),
    (lambda: R.kp_layer_loss(np.zeros((2, 3)), np.zeros((2, 4))), r"fa and fb must have the same shape"),
    (lambda: R.kp_layer_loss(np.zeros((2, 3, 4)), np.zeros((2, 3, 4))), r"fa: expected \(2, 4\) dimensions"),
    (lambda: R.kp_loss([]), r"empty list"),
])
def test_bad_input_gets_a_one_line_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
