"""distributed.py and the job on several processes: 2 gloo processes against 1, on CPU.

The 2-process checks of the helpers and of training and mining run in one torch.multiprocessing
spawn (a process start costs seconds on a small machine); each rank writes what it saw to a
file and the tests compare. The end-to-end test runs the real command under torchrun.
"""
import contextlib
import csv
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from minimal_amkp.run import distributed as D
from minimal_amkp.classify import plan
from minimal_amkp.run.cli import parse
from minimal_amkp.config import ModelConfig, RunError, preset
from minimal_amkp.mine import attention_mining, next_masks
from minimal_amkp.model import ResNetMSA
from minimal_amkp.runner import Runner, Silent, bounds
from minimal_amkp.classify import classification_epoch, set_phase
from minimal_amkp.loop import optimizer, predict

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
ROOT = Path(D.__file__).resolve().parents[1]
# A whole job in seconds: 40 phantom images of 64 px (5 to mine, 30 train_val, 5 test), one
# epoch per phase, T = 2. SGD rather than the tiny preset's AdamW: AdamW's step m/(√v + ε)
# turns rounding-level differences in near-zero gradients into steps of size lr, so two float32
# runs that merely sum in another order (even 1 process with 1 vs 2 threads) drift apart by
# ~1% in the CAMs and move box edges; with SGD, 1 and 2 processes agree to 1e-6.
# --mine.lr 0.001: at 0.01 the AM loss climbs on this micro set
# and that divergence, too, amplifies rounding ~10x per step.
MICRO = ["--data.phantom-images", "40", "--data.phantom-size", "64", "--data.image-size", "64",
         "--model.width", "4", "--model.msa-channels", "16,8", "--train.batch-size", "8",
         "--train.optimizer", "sgd", "--train.lr", "0.05",
         "--train.base-epochs", "1", "--train.msa-frozen-epochs", "1", "--train.msa-epochs", "1",
         "--mine.epochs", "1", "--mine.rounds", "2", "--mine.batch-size", "8", "--mine.lr", "0.001"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@given(st.integers(0, 300), st.integers(1, 17))
@settings(max_examples=200, deadline=None)
def test_parts_tile_every_index_exactly_once_in_rank_order(n, world):
    parts = [np.arange(n)[slice(*bounds(n, r, world))] for r in range(world)]
    whole = np.concatenate(parts)
    np.testing.assert_array_equal(whole, np.arange(n), err_msg=f"n={n} world={world}")
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True), sizes


def test_uneven_and_empty_parts():
    assert [bounds(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [bounds(2, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert bounds(0, 0, 3) == (0, 0)


@pytest.mark.parametrize("n, rank, world", [(-1, 0, 1), (4, 2, 2), (4, -1, 2), (4, 0, 0)])
def test_bounds_rejects_bad_arguments(n, rank, world):
    with pytest.raises(ValueError, match=r"^bounds needs n >= 0 and 0 <= rank < world, got n="):
        bounds(n, rank, world)


@pytest.mark.parametrize("given_env, message", [
    ({"RANK": "0"}, r"^WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set: start several processes with torchrun"),
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     r"^RANK='x', WORLD_SIZE='2', LOCAL_RANK='0': expected whole numbers$"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     r"^RANK=2, WORLD_SIZE=2, LOCAL_RANK=0: need 0 <= RANK < WORLD_SIZE$")])
def test_broken_torchrun_environment_is_one_line(monkeypatch, given_env, message):
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in given_env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RunError, match=message):
        D.env()


def test_one_process_is_the_identity(monkeypatch):
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    assert D.env() == (0, 1, 0) and D.is_main() and D.world() == 1
    with D.session(torch.device("cpu"), Silent) as runner:
        assert type(runner) is Runner and not torch.distributed.is_initialized()
    assert runner.device == torch.device("cpu") and runner.is_main and (runner.rank, runner.world) == (0, 1)
    rows = np.arange(6.0).reshape(3, 2)
    assert runner.gather(rows) is rows and runner.share(3, 3) == 1.0 and runner.average(torch.tensor(2.5)) == 2.5
    assert runner.on_main(lambda a, b=0: a + b, 1, b=2) == 3 and runner.shard(rows) is not None
    np.testing.assert_array_equal(runner.shard(rows), rows)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    assert D.sync_batch_norm(model, torch.device("cpu")) is model and type(model[1]) is nn.BatchNorm2d
    assert runner.replicate(model, "forward") == model.forward and runner.broadcast_module(model) is model
    runner.check_split([1, 5], "--x")


def _bn_pair(seed):
    torch.manual_seed(seed)
    one = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        one.weight.uniform_(0.5, 1.5)
        one.bias.uniform_(-1, 1)
    many = D.GlobalBatchNorm(3).double()
    many.load_state_dict(one.state_dict())
    return one, many


class Memory:
    """In-memory stand-in for data.images.Images, float64: batch(positions) -> (images, labels)."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 1, 64, 64, generator=g, dtype=torch.float64)
        self.labels = (torch.rand(n, 14, generator=g) < 0.5).double()

    def __len__(self):
        return len(self.images)

    def batch(self, idx):
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return self.images[idx], self.labels[idx]


def _job(runner):
    """The three classification phases, then attention mining (two rounds with KP full, then one
    without) of a micro ResNet-MSA in float64, the CAMs, masks and test scores sharded by image
    and gathered.

    Minibatches split unevenly over 2 ranks: training 7 = 4 + 3; mining N = 10 holds n = 1
    erased image (1 + 0) and 9 whole ones (5 + 4).
    """
    cfg = preset("tiny")
    cfg.model = ModelConfig(width=4, blocks=(1, 1, 1, 1), msa_channels=(16, 8))
    cfg.data.image_size = 64
    # SGD: the ranks agree on the averaged gradient, which every optimizer then uses alike; AdamW's
    # step m/(√v + ε) would lift rounding in near-zero gradients to lr-sized steps (MICRO below).
    cfg.train.optimizer, cfg.train.batch_size, cfg.train.lr, cfg.train.shift = "sgd", 7, 0.05, 0.1
    cfg.train.base_epochs = cfg.train.msa_frozen_epochs = cfg.train.msa_epochs = 1
    cfg.mine.batch_size, cfg.mine.epochs, cfg.mine.lr, cfg.mine.fraction = 10, 1, 0.02, 0.1
    torch.manual_seed(0)
    model = D.sync_batch_norm(ResNetMSA(cfg.model).double(), runner.device)
    train, mining = Memory(17, 1), Memory(5, 2)
    out = {"losses": []}
    for phase, _ in plan(cfg):
        opt = optimizer(set_phase(model, phase), cfg.train.lr, cfg.train)
        out["losses"].append(classification_epoch(model, opt, phase, train, cfg, 0, runner))
    saved = []
    cfg.mine.kp, cfg.mine.rounds, cfg.mine.min_epochs = "full", 2, 1
    mined = attention_mining(model, mining, train, train, cfg, runner, None, saved.append)
    out["losses"] += [d[k] for d in mined["records"] for k in ("loss_before", "loss_after", "kp_ratio", "auroc_b")]
    out["cams1"], out["cams2"] = mined["cams"]
    out["masks1"], out["masks2"] = mined["masks"][1], next_masks(mined["cams"][1], mined["masks"][1],
                                                                 mining.labels, 0.5)
    model_a = saved[-1]["model_a"]
    cfg.mine.kp, cfg.mine.rounds = "none", 1             # the other split: N mining images, no KP
    again = attention_mining(model, mining, train, train, cfg, runner)
    out["losses"].append(again["records"][0]["loss_after"])
    out["scores"] = predict(model, train, 4, runner)
    out["model"] = {k: v.clone() for k, v in model.state_dict().items()}
    out["model_a"] = {k: v.clone() for k, v in model_a.items()}
    return out


def _worker(rank, world, port, folder):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)                         # as torchrun does: K processes share the cores
    seen = {}
    with D.session(torch.device("cpu"), Silent) as runner:
        seen["rank"], seen["world"], seen["main"] = runner.rank, runner.world, runner.is_main
        seen["module_rank"] = (D.rank(), D.world(), D.is_main())
        # Uneven and empty shares: 7 rows as 4 + 3, and 1 row as 1 + 0.
        seen["gather7"] = runner.gather(runner.shard(np.arange(7 * 6, dtype=np.float32).reshape(7, 2, 3)))
        seen["gather1"] = runner.gather(torch.from_numpy(runner.shard(np.arange(4, dtype=np.uint8).reshape(1, 4))))
        try:
            runner.gather(np.zeros((1, 2 + rank)))
        except ValueError as e:
            seen["shape_error"] = str(e)
        seen["on_main"] = runner.on_main(lambda: f"computed by rank {D.rank()}")
        try:
            runner.on_main(lambda: (_ for _ in ()).throw(RunError("--out x: bad")))
        except RunError as e:
            seen["run_error"] = (str(e), getattr(e, "shared", None))
        try:
            runner.check_split([5, 1], "--train.batch-size")
        except RunError as e:
            seen["split_error"] = str(e)
        seen["average"] = runner.average(torch.tensor(float(rank + 1)))
        # Global batch norm on this rank's part of a 5-image batch (3 + 2), three steps.
        one, many = _bn_pair(0)
        for step in range(3):
            x = torch.randn(5, 3, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
            x = runner.shard(x).requires_grad_(True)
            w = torch.arange(5 * 3 * 4 * 3, dtype=torch.float64).reshape(5, 3, 4, 3).sin()
            y = many(x)
            (y * runner.shard(w)).sum().backward()
            seen[f"bn_y{step}"], seen[f"bn_dx{step}"] = y.detach(), x.grad
        seen["bn_dgamma"], seen["bn_dbeta"] = many.weight.grad, many.bias.grad
        seen["bn_state"] = {k: v.clone() for k, v in many.state_dict().items()}
        many.eval()
        seen["bn_eval"] = many(torch.ones(2, 3, 2, 2, dtype=torch.float64)).detach()
        # N_A must be the same on every rank: broadcast_module copies rank 0's.
        net = nn.Linear(2, 2)
        with torch.no_grad():
            net.weight.fill_(rank)
        seen["broadcast"] = runner.broadcast_module(net).weight.detach().clone()
        seen["job"] = _job(runner)
    with open(os.path.join(folder, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(seen, f)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ranks")
    ctx = mp.start_processes(_worker, args=(2, free_port(), str(folder)), nprocs=2, join=False, start_method="spawn")
    try:
        while not ctx.join(timeout=60):
            pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = []
    for r in range(2):
        with open(folder / f"rank{r}.pkl", "rb") as f:
            ranks.append(pickle.load(f))
    return ranks


def test_two_ranks_know_their_place(two_ranks):
    assert [(s["rank"], s["world"], s["main"]) for s in two_ranks] == [(0, 2, True), (1, 2, False)]
    assert [s["module_rank"] for s in two_ranks] == [(0, 2, True), (1, 2, False)]


def test_gather_puts_uneven_and_empty_parts_back_in_global_order(two_ranks):
    for s in two_ranks:
        np.testing.assert_array_equal(s["gather7"], np.arange(7 * 6, dtype=np.float32).reshape(7, 2, 3))
        assert isinstance(s["gather1"], torch.Tensor) and s["gather1"].dtype == torch.uint8
        np.testing.assert_array_equal(s["gather1"].numpy(), np.arange(4).reshape(1, 4))
        assert s["shape_error"] == ("gather: ranks hold rows of different shapes [(1, 2), (1, 3)]; "
                                    "only the first dimension may differ")


def test_rank_zero_work_and_its_errors_reach_every_rank(two_ranks):
    assert [s["on_main"] for s in two_ranks] == ["computed by rank 0"] * 2
    assert [s["run_error"] for s in two_ranks] == [("--out x: bad", True)] * 2
    assert two_ranks[1]["split_error"] == ("--train.batch-size: a minibatch of 1 images cannot be split over "
                                           "2 processes (each needs at least one image); raise it or start fewer processes")
    assert [s["average"] for s in two_ranks] == [1.5, 1.5]
    assert [s["broadcast"].tolist() for s in two_ranks] == [[[0.0, 0.0], [0.0, 0.0]]] * 2


def test_global_batch_norm_equals_one_process_over_the_whole_batch(two_ranks):
    """Outputs, input gradients, γ/β gradients (DDP sums them over ranks; here summed by hand)
    and running statistics of 2 ranks × (3 + 2 images) against BatchNorm2d on all 5, float64."""
    one, _ = _bn_pair(0)
    for step in range(3):
        x = torch.randn(5, 3, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        x.requires_grad_(True)
        w = torch.arange(5 * 3 * 4 * 3, dtype=torch.float64).reshape(5, 3, 4, 3).sin()
        y = one(x)
        (y * w).sum().backward()
        for name, want in (("y", y.detach()), ("dx", x.grad)):
            got = torch.cat([s[f"bn_{name}{step}"] for s in two_ranks])
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"step {step} {name}: {m}")
    torch.testing.assert_close(two_ranks[0]["bn_dgamma"] + two_ranks[1]["bn_dgamma"], one.weight.grad)
    torch.testing.assert_close(two_ranks[0]["bn_dbeta"] + two_ranks[1]["bn_dbeta"], one.bias.grad)
    for s in two_ranks:
        for k, v in one.state_dict().items():
            torch.testing.assert_close(s["bn_state"][k], v, rtol=1e-12, atol=1e-12, msg=lambda m: f"{k}: {m}")
    one.eval()
    torch.testing.assert_close(two_ranks[0]["bn_eval"], one(torch.ones(2, 3, 2, 2, dtype=torch.float64)))


def test_two_processes_train_and_mine_as_one_in_float64(two_ranks):
    """Same global minibatches -> the same losses, weights, N_A, CAMs, masks and scores, up to
    the rounding of sums taken in another order (float64, so 1e-9 is far above it, while a
    bug such as a missing share or a per-rank statistic shows at 1e-3 or more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                         # 2 threads on 2 busy cores run 7x slower
    try:
        one = _job(Runner())
    finally:
        torch.set_num_threads(threads)
    for r, seen in enumerate(two_ranks):
        got = seen["job"]
        np.testing.assert_allclose(got["losses"], one["losses"], rtol=1e-9, err_msg=f"rank {r}: losses")
        for part in ("model", "model_a"):
            for k, v in one[part].items():
                torch.testing.assert_close(got[part][k], v, rtol=1e-9, atol=1e-12,
                                           msg=lambda m: f"rank {r} {part} {k}: {m}")
        for t in (1, 2):
            torch.testing.assert_close(got[f"cams{t}"], one[f"cams{t}"], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {r} H_{t} (float32 CAMs): {m}")
            bad = (got[f"masks{t}"] != one[f"masks{t}"]).nonzero().tolist()
            assert not bad, f"rank {r} M_{t}: first mismatching (image, class, y, x) {bad[:3]}"
        np.testing.assert_allclose(got["scores"], one["scores"], rtol=1e-5, err_msg=f"rank {r}: test scores")
    assert (one["masks2"] == 0).any(), "nothing was erased: the masks compare trivially"


def _command(nproc, out, *extra):
    job = ["-m", "minimal_amkp", "--out", str(out), *MICRO, *extra]
    if nproc == 1:
        return [sys.executable, *job]
    # --standalone: a rendezvous on localhost with a free port that torchrun picks itself.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *job]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    return env


def _run(cmd, cwd, log, timeout=240):
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=cwd, env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    text = Path(log).read_text()
    assert done.returncode == 0, f"{' '.join(cmd[:6])} ... exited {done.returncode}:\n{text[-3000:]}"
    return text


def _interrupt_after_first_checkpoint(cmd, cwd, out, log, timeout=240):
    """Start `cmd`, SIGTERM torchrun (which ends its workers) once a checkpoint exists; the
    checkpoint's (phase, epoch)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not (out / "checkpoint.pt").exists():
                assert proc.poll() is None, f"exited {proc.returncode} before its first checkpoint:\n" \
                                            f"{Path(log).read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no checkpoint within the time limit"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    return state["phase"], state["epoch"]


def _boxes(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [r[:6] + r[7:] for r in rows], np.array([float(r[6]) for r in rows])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The 1-process run of MICRO (the phantom generated into its own ./data) that 2-process runs must match."""
    where = tmp_path_factory.mktemp("one")
    _run(_command(1, where / "one"), where, where / "one.log")
    return where / "one"


def test_torchrun_job_interrupted_and_resumed_matches_one_process(tmp_path, one_process):
    """`torchrun --nproc-per-node=2` of the real command, stopped after its first checkpoint and
    continued with --resume, against an uninterrupted 1-process run of the same settings.

    Equal: every erasure mask M_t, the harvested boxes (image, class, x, y, w, h, rank) and the
    set of files. Within 1e-4 (1e-6 seen): box scores, CAMs (relative to their largest value),
    test scores and weights; they differ by float rounding only, because sums (batch-norm
    statistics, gradients over the minibatch) are taken in another order on 2 processes.
    """
    two, one = tmp_path / "two", one_process
    phase, epoch = _interrupt_after_first_checkpoint(_command(2, two), tmp_path, two, tmp_path / "two.log")
    last = len(plan(parse(MICRO)[0])) - 1
    assert phase < last, f"the run reached its last phase (phase {phase}, epoch {epoch}) before it was interrupted"
    first = (tmp_path / "two.log").read_text()
    assert first.count("generating the phantom") == 1, first[-2000:]
    resumed = _run(_command(2, two, "--resume"), tmp_path, tmp_path / "resume.log")
    assert "resuming" in resumed and resumed.count("done in") == 1, resumed[-2000:]
    _same_job(two, one)


def _same_job(two, one):
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))
    assert files(two) == files(one)
    a, b = np.load(two / "mining.npz"), np.load(one / "mining.npz")
    bad = np.argwhere(a["masks"] != b["masks"])
    assert not len(bad), f"masks differ, first (t, image, class, y, x): {bad[:3].tolist()}"
    assert (b["masks"] == 0).any(), "nothing was erased: the masks compare trivially"
    np.testing.assert_allclose(a["cams"], b["cams"], rtol=0, atol=1e-4 * np.abs(b["cams"]).max())
    (rows2, scores2), (rows1, scores1) = _boxes(two / "boxes.csv"), _boxes(one / "boxes.csv")
    assert rows1, "no boxes were harvested"
    first_bad = next((i for i, (p, q) in enumerate(zip(rows2, rows1)) if p != q), None)
    assert len(rows2) == len(rows1) and first_bad is None, \
        f"boxes.csv differs first at row {first_bad}: {rows2[first_bad:first_bad + 1]} vs {rows1[first_bad:first_bad + 1]}"
    np.testing.assert_allclose(scores2, scores1, rtol=1e-4)
    np.testing.assert_allclose(np.load(two / "test.npz")["scores"], np.load(one / "test.npz")["scores"], atol=1e-4)
    w2, w1 = (torch.load(d / "model.pt", weights_only=True) for d in (two, one))
    for k, v in w1.items():
        torch.testing.assert_close(w2[k].double(), v.double(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{k}: {m}")


def _workers(parent):
    """{RANK: pid} of the processes torchrun (pid `parent`) started."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            rank = next((v[5:] for v in environ if v.startswith(b"RANK=")), None)
            if rank is not None:
                found[int(rank)] = int(entry)
    return found


def _start_until_checkpoint(cmd, cwd, out, log, env=None, timeout=240):
    """Popen `cmd` (logging to `log`) and return it, with its workers' pids, once it has written a checkpoint."""
    f = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or _env(), stdout=f, stderr=subprocess.STDOUT)
    f.close()
    deadline = time.monotonic() + timeout
    while not (out / "checkpoint.pt").exists():
        assert proc.poll() is None, f"exited {proc.returncode} before its first checkpoint:\n{Path(log).read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.02)
    workers = _workers(proc.pid)
    assert sorted(workers) == [0, 1], workers
    return proc, workers


def test_torchrun_restarts_a_killed_rank_and_the_job_resumes_its_own_run(tmp_path, one_process):
    """--max-restarts=1: rank 1 SIGKILLed after the first checkpoint; torchrun restarts both ranks
    with TORCHELASTIC_RESTART_COUNT=1 and the same command line, which resumes the run in --out."""
    out, log = tmp_path / "elastic", tmp_path / "elastic.log"
    cmd = _command(2, out)
    cmd.insert(cmd.index("--standalone"), "--max-restarts=1")
    proc, workers = _start_until_checkpoint(cmd, tmp_path, out, log)
    try:
        os.kill(workers[1], signal.SIGKILL)
        assert proc.wait(timeout=240) == 0, Path(log).read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "resuming" in text and text.count("done in") == 1, text[-3000:]
    _same_job(out, one_process)


def _hang(rank, world, port, folder):
    """Rank 0 does slow work alone (on_main), then rank 1 stops answering while rank 0 trains on."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), AMKP_COLLECTIVE_TIMEOUT="2")
    torch.set_num_threads(1)
    seen = {}
    with D.session(torch.device("cpu"), Silent) as runner:
        seen["slow"] = runner.on_main(lambda: time.sleep(4) or "rank 0 took 4 s")   # beyond 2 s: the long group
        seen["average"] = runner.average(torch.tensor(1.0))
        if rank == 1:
            time.sleep(20)                                # hung: never joins the next collective
        else:
            start = time.monotonic()
            try:
                runner.average(torch.tensor(2.0))
            except RuntimeError as e:                    # gloo reports its timeout as a RuntimeError
                seen["error"] = (D.lost_peer(e), time.monotonic() - start, str(e))
        path = os.path.join(folder, f"rank{rank}.pkl")
        with open(path + ".part", "wb") as f:              # renamed when whole: the test polls for it
            pickle.dump(seen, f)
        os.replace(path + ".part", path)
        if rank == 0:
            os._exit(0)                                    # as the command does: it ends, torchrun stops the rest


def test_a_hung_rank_fails_training_collectives_after_the_short_timeout_only(tmp_path):
    ctx = mp.start_processes(_hang, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "rank0.pkl").exists():
            assert time.monotonic() < deadline and ctx.processes[0].is_alive() or (tmp_path / "rank0.pkl").exists()
            time.sleep(0.05)
    finally:
        for p in ctx.processes:
            p.kill()
            p.join()
    with open(tmp_path / "rank0.pkl", "rb") as f:
        seen = pickle.load(f)
    assert seen["slow"] == "rank 0 took 4 s" and seen["average"] == 1.0
    lost, waited, message = seen["error"]
    assert lost and "Timed out" in message and waited < 15, seen


@pytest.mark.slow
def test_a_stopped_rank_ends_the_torchrun_job_within_minutes(tmp_path):
    """kill -STOP on rank 1 mid-training: rank 0's next collective gives up after AMKP_COLLECTIVE_TIMEOUT
    (10 s here), prints one line and exits; torchrun then stops the job (it SIGKILLs the stopped rank
    after its own grace period). Slow: torchrun's grace period is 30 s."""
    out, log = tmp_path / "hung", tmp_path / "hung.log"
    env = dict(_env(), AMKP_COLLECTIVE_TIMEOUT="10")
    proc, workers = _start_until_checkpoint(_command(2, out), tmp_path, out, log, env=env)
    try:
        os.kill(workers[1], signal.SIGSTOP)
        stopped = time.monotonic()
        code = proc.wait(timeout=300)
        took = time.monotonic() - stopped
    finally:
        for pid in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code != 0 and took < 120, (code, took, text[-3000:])
    lines = [line for line in text.splitlines() if line.startswith("minimal_amkp: error: process 0: ")]
    assert len(lines) == 1 and "one of them died or hung (AMKP_COLLECTIVE_TIMEOUT" in lines[0], text[-3000:]
    print(f"the job ended {took:.0f} s after rank 1 was stopped")
