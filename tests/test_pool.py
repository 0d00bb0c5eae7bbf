"""run/pool.py: how many processes, and a pool whose results come back in order."""
import os

import pytest

from minimal_amkp.run import pool


def test_cpus_counts_this_process_cpus_up_to_the_cap(monkeypatch):
    assert 1 <= pool.cpus() <= min(os.cpu_count(), pool.MAX_WORKERS)
    monkeypatch.setattr(pool.os, "sched_getaffinity", lambda _: set(range(100)), raising=False)
    assert pool.cpus() == pool.MAX_WORKERS
    monkeypatch.setattr(pool.os, "sched_getaffinity", lambda _: {3}, raising=False)
    assert pool.cpus() == 1


def test_processes_map_in_order_and_an_error_in_the_block_leaves_it():
    with pool.processes(2) as workers:
        assert list(workers.map(abs, range(-5, 5), chunksize=3)) == [abs(k) for k in range(-5, 5)]
    with pytest.raises(KeyError), pool.processes(2) as workers:
        workers.submit(abs, -1)
        raise KeyError("stop")
