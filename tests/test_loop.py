"""loop.py: run_epoch reads its losses a window at a time and still stops at a non-finite one;
infer returns every row of every batch, in order."""
import math

import numpy as np
import pytest
import torch

from minimal_amkp import loop
from minimal_amkp.config import RunError
from minimal_amkp.runner import Runner


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def constrain(self):
        pass


class Recording(Runner):
    """A runner that notes every loss it reads and every progress update it draws."""

    def __init__(self):
        super().__init__(progress=lambda label, total: self)
        self.reads, self.updates = [], []

    def average(self, loss):
        self.reads.append(len(self.steps))
        return super().average(loss)

    def update(self, step, images, loss=None):
        self.updates.append((step, images, loss))

    def close(self):
        pass


def epoch(values, runner):
    """run_epoch over one step per value, each step's loss that value; -> (its result, steps taken)."""
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    runner.steps = []

    def loss_fn(v):
        runner.steps.append(v)
        return (model.w * 0).sum() + torch.tensor(v, dtype=torch.float32)
    return loop.run_epoch(model, opt, [(4, v) for v in values], loss_fn, lambda i: 0.1, "test epoch", runner)


def test_losses_are_read_a_window_at_a_time_and_every_step_counts():
    values = [0.5 + 0.25 * k for k in range(2 * loop.LOSS_READS + 3)]
    runner = Recording()
    assert epoch(values, runner) == float(np.mean(values))
    # Each loss is read once, after the step that closes its window (or the last step).
    windows = [min(len(values), loop.LOSS_READS * (k // loop.LOSS_READS + 1)) for k in range(len(values))]
    assert runner.reads == windows
    assert runner.updates == [(k + 1, 4, v) for k, v in enumerate(values)]
    assert math.isnan(epoch([], Recording()))


@pytest.mark.parametrize("bad", [0, 5, loop.LOSS_READS, 2 * loop.LOSS_READS + 1])
def test_a_non_finite_loss_ends_the_epoch_within_a_window(bad):
    values = [1.0] * (4 * loop.LOSS_READS)
    values[bad] = float("nan")
    runner = Recording()
    with pytest.raises(RunError, match=r"^test epoch: the loss became nan; lower the learning rate$"):
        epoch(values, runner)
    assert bad < len(runner.steps) <= bad + loop.LOSS_READS
    assert [u[0] for u in runner.updates] == list(range(1, bad + 1))          # drawn up to the step before


class Rows:
    """Stand-in for data.images.Images: image k is filled with the value k."""

    def __init__(self, n):
        self.images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 4, 4).clone()

    def batch(self, idx):
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return self.images[idx], torch.zeros(len(idx), 14)


def test_infer_returns_each_row_of_every_batch_in_order_on_the_cpu():
    rows = np.array([9, 2, 7, 0, 4, 4, 1])
    got = loop.infer(Toy(), Rows(10), 3, "test", rows, lambda x, idx: x.mean((1, 2, 3))[:, None] * 2, Runner())
    assert got.device.type == "cpu" and got.dtype == torch.float32
    assert got[:, 0].tolist() == (2 * rows).tolist()
    assert loop.infer(Toy(), Rows(10), 3, "test", [], lambda x, idx: x, Runner()) is None
