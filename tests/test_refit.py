"""study.refit: the head refit reaches the minimum of loss (2) with X fixed; a bad RUN gets one line."""
import numpy as np
import pytest
import torch

from minimal_amkp.study.refit import bce, main, refit_head


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refit_head_reaches_the_minimum_of_the_logistic_loss(seed):
    """From any start, the refitted head has a zero gradient (the loss is convex) and a loss no
    higher than the start's or the generating head's."""
    rng = np.random.default_rng(seed)
    n, d = 200, 5
    g = rng.normal(size=(n, d))
    w_true, b_true = rng.normal(size=d), 0.3
    y = (rng.random(n) < 1 / (1 + np.exp(-(g @ w_true + b_true)))).astype(float)
    w0, b0 = rng.normal(size=d), -1.0
    w, b = refit_head(g, y, w0, b0)
    assert bce(g, y, w, b) <= min(bce(g, y, w0, b0), bce(g, y, w_true, b_true)) + 1e-9
    wt = torch.tensor(w, requires_grad=True)
    bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(g) @ wt + bt, torch.tensor(y)).backward()
    grad = np.r_[wt.grad.numpy(), bt.grad.item()]
    assert np.abs(grad).max() < 1e-6, f"not at the minimum: largest gradient {np.abs(grad).max():.2e} at {np.argmax(np.abs(grad))}"


def test_bce_by_hand():
    g, y = np.array([[0.0], [2.0]]), np.array([1.0, 0.0])
    want = np.log(1 + np.e)                # z = −1 with y = 1 and z = 1 with y = 0 cost the same
    assert bce(g, y, [1.0], -1.0) == pytest.approx(want, abs=1e-12)


def test_refit_of_no_run_or_of_an_untrained_one_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "nowhere")])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == f"refit: {tmp_path / 'nowhere'}: no run there (no config.json)", err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "run")])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == f"refit: {tmp_path / 'run'}: holds no network trained up to mining", err
