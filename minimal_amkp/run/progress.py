"""One self-overwriting status line per long step: step, loss, images/s and time left."""
import sys
import time

from minimal_amkp.run import distributed


def say(message):
    if distributed.is_main():                         # one voice for a run of several processes
        print(message, file=sys.stderr, flush=True)


def clock(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """`\\r`-updated line on stderr, redrawn at most every `every` seconds; close() ends it.

    Runs of several processes make it on rank 0 only (runner.Runner.progress).
    """

    def __init__(self, label, total, every=0.25):
        self.label, self.total, self.every = label, max(total, 1), every
        self.start = self.last = time.perf_counter()
        self.images, self.step, self.loss, self.width = 0, 0, None, 0

    def update(self, step, images, loss=None):
        self.step, self.images = step, self.images + images
        self.loss = loss if loss is not None else self.loss
        now = time.perf_counter()
        if now - self.last >= self.every or step >= self.total:
            self.last = now
            self._draw(now)

    def _draw(self, now):
        spent = max(now - self.start, 1e-9)
        left = spent / max(self.step, 1) * (self.total - self.step)
        loss = f"  loss {self.loss:.4f}" if self.loss is not None else ""
        line = (f"{self.label}  {self.step}/{self.total}{loss}  {self.images / spent:.0f} img/s"
                f"  {clock(left)} left")
        sys.stderr.write("\r" + line.ljust(self.width))
        sys.stderr.flush()
        self.width = len(line)

    def close(self):
        now = time.perf_counter()
        self._draw(now)
        sys.stderr.write(f"  ({clock(now - self.start)})\n")
        sys.stderr.flush()
