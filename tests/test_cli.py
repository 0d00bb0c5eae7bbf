"""`python -m minimal_amkp` end to end on a micro phantom: outputs, resume after a kill, bad input."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from minimal_amkp import phantom
from minimal_amkp.cli import main, phantom_root
from minimal_amkp.config import ModelConfig
from minimal_amkp.model import ResNetMSA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 40 images at 64 px, a ResNet-MSA of width 4 and a few epochs: seconds on one core.
MICRO = ["--data.image_size", "64", "--model.width", "4", "--model.msa_channels", "16,8",
         "--train.batch_size", "8", "--mine.batch_size", "8", "--train.base_epochs", "2",
         "--train.msa_frozen_epochs", "1", "--train.msa_epochs", "2", "--mine.epochs", "2",
         "--mine.rounds", "2", "--data.workers", "1"]


def command(data, out, *extra):
    return [sys.executable, "-m", "minimal_amkp", "--data", data, "--out", str(out), *MICRO, *extra]


def run(args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, **kw)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "whole"
    r = run(command(data, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def outputs(out):
    mining, test = np.load(out / "mining.npz"), np.load(out / "test.npz")
    return {**{f"mining.{k}": mining[k] for k in mining.files}, **{f"test.{k}": test[k] for k in test.files}}


def test_a_run_writes_every_output(finished):
    out, r = finished
    for name in ("config.json", "checkpoint.pt", "mining.npz", "test.npz", "model.pt", "report.json",
                 "report.md", "boxes.csv"):
        assert (out / name).is_file(), name
    o = outputs(out)
    T, n = o["mining.cams"].shape[:2]
    assert T == 2 and o["mining.cams"].shape[2:] == (8, 4, 4) and o["mining.masks"].shape == o["mining.cams"].shape
    assert np.all(o["mining.masks"][0] == 1) and np.all(o["mining.masks"][1] <= 1)
    assert o["test.scores"].shape == (len(o["test.names"]), 14)
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["seed"] == 0 and config["train"]["msa_epochs"] == 2 and config["model"]["width"] == 4
    assert "base epoch 1/2" in r.stderr and "img/s" in r.stderr and "left" in r.stderr
    assert "Traceback" not in r.stderr


def test_resume_after_a_kill_ends_where_an_uninterrupted_run_ends(data, finished, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command(data, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)                                          # into the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists(), "the run finished before it could be killed"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["phase"], state["epoch"]) < (5, 2)         # 2 + 3 phases, 2 epochs in the last
    r = run(command(data, out, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr
    want, got = outputs(finished[0]), outputs(out)
    for k in want:
        assert np.array_equal(want[k], got[k]), f"{k} differs after resume"
    assert (out / "boxes.csv").read_text() == (finished[0] / "boxes.csv").read_text()


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], r"unknown preset 'huge'; choose one of tiny, paper"),
    (["--train.lrr", "0.1"], r"unrecognized arguments: --train.lrr"),
    (["--train.lr", "fast"], r"--train.lr: cannot read 'fast' as float"),
    (["--mine.kp", "maybe"], r"--mine.kp: 'maybe' is not one of full, vanilla, none"),
    (["--model.blocks", "1,1"], r"--model.blocks needs 4 counts"),
    (["--resume", "--overwrite"], r"--resume and --overwrite exclude each other"),
])
def test_bad_command_lines_exit_2_with_one_line(capsys, args, message):
    assert main(args) == 2
    line = error_line(capsys)
    assert line.startswith("minimal_amkp: error: ") and re.search(message, line), line
    assert capsys.readouterr().err == ""


def test_a_bad_backend_variable_is_a_command_line_error(capsys, monkeypatch):
    monkeypatch.setenv("AMKP_BACKEND", "fast")
    assert main([]) == 2
    assert "AMKP_BACKEND must be one of auto, torch, triton; got 'fast'" in error_line(capsys)


def test_the_real_entry_point_prints_one_line(tmp_path):
    r = run([sys.executable, "-m", "minimal_amkp", "--nonsense"], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unrecognized arguments: --nonsense" in r.stderr


def broken_copy(data, tmp_path, how):
    root = tmp_path / "broken"
    shutil.copytree(data, root)
    how(root)
    return str(root)


def truncate_first_png(root):
    png = sorted((root / "images").iterdir())[0]
    png.write_bytes(png.read_bytes()[:100])
    return png.name


@pytest.mark.parametrize("how, message", [
    (lambda r: shutil.rmtree(r / "images"), r"no images/ folder"),
    (lambda r: (r / "Data_Entry_2017.csv").write_text("Image,Labels\n"), r"Data_Entry_2017.csv line 1: unknown header"),
    (lambda r: (r / "test_list.txt").unlink(), r"none of test_list.txt\[.gz\] found"),
    (truncate_first_png, r"1 bad image\(s\): .*truncated PNG"),
])
def test_bad_data_exits_1_with_one_line(capsys, data, tmp_path, how, message):
    root = broken_copy(data, tmp_path, how)
    assert main(["--data", root, "--out", str(tmp_path / "out"), *MICRO]) == 1
    assert re.search(message, error_line(capsys))
    assert not (tmp_path / "out" / "config.json").exists()


def test_skip_bad_images_drops_them_and_runs(capsys, data, tmp_path):
    root = broken_copy(data, tmp_path, truncate_first_png)
    quick = MICRO + ["--train.base_epochs", "1", "--train.msa_epochs", "1", "--mine.epochs", "1"]
    with pytest.warns(UserWarning) as caught:
        assert main(["--data", root, "--out", str(tmp_path / "out"), "--skip-bad-images", *quick]) == 0
    assert any("skipped 1 bad item" in str(w.message) for w in caught)
    assert (tmp_path / "out" / "report.json").exists()


def test_folders_and_checkpoints_that_do_not_fit_are_refused(capsys, data, finished, tmp_path):
    out = str(finished[0])
    assert main(["--data", data, "--out", out, *MICRO]) == 1
    assert "already holds this run; pass --resume" in error_line(capsys)
    assert main(["--data", data, "--out", out, *MICRO, "--train.lr", "0.5", "--resume"]) == 1
    assert "holds a different run (train.lr: 0.01 -> 0.5)" in error_line(capsys)
    assert main(["--data", data, "--out", str(tmp_path / "none"), "--resume", *MICRO]) == 1
    assert "holds no run to resume" in error_line(capsys)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    assert main(["--data", data, "--out", str(tmp_path / "stuff"), *MICRO]) == 1
    assert "folder is not empty and holds no run" in error_line(capsys)
    # Another architecture's checkpoint under this run's settings.
    other = tmp_path / "other"
    shutil.copytree(out, other)
    state = torch.load(other / "checkpoint.pt", weights_only=True)
    state["model"] = ResNetMSA(ModelConfig(width=8, blocks=(1, 1, 1, 1))).state_dict()
    torch.save(state, other / "checkpoint.pt")
    assert main(["--data", data, "--out", str(other), "--resume", *MICRO]) == 1
    assert "checkpoint.pt: holds another architecture" in error_line(capsys)


def test_init_from_another_architecture_is_refused(capsys, data, tmp_path):
    torch.save(ResNetMSA(ModelConfig(width=8, blocks=(1, 1, 1, 1), msa="none")).state_dict(), tmp_path / "r.pth")
    assert main(["--data", data, "--out", str(tmp_path / "out"), "--init", str(tmp_path / "r.pth"), *MICRO]) == 1
    assert "not a state dict of this architecture; shape (file vs model): conv1.weight" in error_line(capsys)


def test_the_default_phantom_is_generated_once_into_data(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    from minimal_amkp.config import preset
    cfg = preset("tiny")
    cfg.data.phantom_images, cfg.data.phantom_size = 20, 32
    root = phantom_root(cfg)
    assert root == os.path.join("data", f"phantom-v{phantom.VERSION}-n20-s32-seed0")
    assert os.path.isfile(os.path.join(root, "Data_Entry_2017.csv"))
    stamp = os.path.getmtime(os.path.join(root, "Data_Entry_2017.csv"))
    assert phantom_root(cfg) == root and os.path.getmtime(os.path.join(root, "Data_Entry_2017.csv")) == stamp
    assert os.listdir("data") == [f"phantom-v{phantom.VERSION}-n20-s32-seed0"]
