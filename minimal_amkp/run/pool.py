"""Host work spread over processes: how many to start, and a pool of them that Ctrl-C can stop.

The phantom's images and the report's MaxBoxAccV2 are pure NumPy and Pillow work that holds
the GIL, so they go to processes; their results come back in order, so the output does not
depend on how many there are.
"""
import contextlib
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor

MAX_WORKERS = 16          # a worker holds ~190 MB once it has imported torch; more gain little


def cpus():
    """The CPUs this process may run on (its affinity where the system says), at most MAX_WORKERS."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(n, MAX_WORKERS))


@contextlib.contextmanager
def processes(workers):
    """A ProcessPoolExecutor of `workers` processes that ignore SIGINT: Ctrl-C reaches the caller,
    which leaves the block; leaving it by any exception cancels the work not yet started
    rather than waiting for it."""
    # spawn, not fork: the caller may hold torch's threads, which a fork would copy mid-lock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        try:
            yield pool
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
