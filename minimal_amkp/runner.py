"""Where the method runs: the one object it asks, so it never needs to know how many processes there are.

The method (classify.py, mine.py, loop.py) is written for one process and stays correct on K:

    runner.shard(items)          this process's contiguous slice of a list (a minibatch, a set)
    runner.share(n_local, n)     scale of a local mean loss, so the average over ranks is the global mean
    runner.average(loss)         that average, as a float
    runner.gather(rows)          every rank's rows of its shard, concatenated in the list's order
    runner.replicate(model, m)   model.m as a callable whose gradients are averaged over ranks
    runner.on_main(fn, ...)      fn on rank 0 alone, its result (or error) on every rank
    runner.progress(label, n)    a progress line (drawn by rank 0 only)

`Runner` is one process: every call is the identity and nothing is exchanged. The shell's
`run.distributed.TorchRun` is the same interface over torch.distributed (torchrun). A runner
also carries the torch device this process computes on.
"""
import numpy as np
import torch

from minimal_amkp.config import RunError


def bounds(n, rank, world):
    """[start, stop) of `rank`'s contiguous block of n items: the first n % world ranks take one more.

    Blocks in rank order tile range(n) exactly once, so concatenating the ranks' results is the
    global order; a rank gets an empty block when n < world.
    """
    if n < 0 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"bounds needs n >= 0 and 0 <= rank < world, got n={n}, rank={rank}, world={world}")
    q, r = divmod(n, world)
    start = rank * q + min(rank, r)
    return start, start + q + (rank < r)


class Silent:
    """A progress line that draws nothing (tests, and every rank but 0)."""

    def __init__(self, label="", total=0):
        pass

    def update(self, step, images, loss=None):
        pass

    def close(self):
        pass


class Runner:
    """One process on `device`; `progress(label, total)` makes the progress lines (default: none)."""

    rank, world = 0, 1

    def __init__(self, device=torch.device("cpu"), progress=Silent):
        self.device, self.make_progress = device, progress

    @property
    def is_main(self):
        """True in the one process that prints progress and writes files."""
        return self.rank == 0

    def shard(self, items):
        start, stop = bounds(len(items), self.rank, self.world)
        return items[start:stop]

    def share(self, n_local, n_global):
        return self.world * n_local / n_global

    def check_split(self, sizes, option):
        """RunError unless every global minibatch (their sizes) gives each process at least one image.

        Every rank sees the same sizes and raises alike, so the error is marked `shared`.
        """
        small = [s for s in sizes if s < self.world]
        if small:
            raise RunError(f"{option}: a minibatch of {min(small)} images cannot be split over {self.world} "
                           "processes (each needs at least one image); raise it or start fewer processes", shared=True)

    def average(self, loss):
        return loss.detach().double().item()

    def gather(self, rows):
        return rows

    def on_main(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    def replicate(self, model, name="__call__"):
        return getattr(model, name)

    def broadcast_module(self, module):
        return module

    def progress(self, label, total):
        return self.make_progress(label, total) if self.is_main else Silent()

    def rows(self, n):
        """This process's positions of a set of n images."""
        return self.shard(np.arange(n))
