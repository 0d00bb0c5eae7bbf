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

from minimal_amkp.data import phantom
from minimal_amkp.data.phantom import sibling
from minimal_amkp.run.cli import main
from minimal_amkp.run.job import phantom_root
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
    assert T == 2 and o["mining.cams"].shape[2:] == (8, 8, 8) and o["mining.masks"].shape == o["mining.cams"].shape
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
    (["--mine.erase", "pixels"], r"--mine.erase: 'pixels' is not one of feature, image"),
    (["--mine.bn", "off"], r"--mine.bn: 'off' is not one of frozen, batch"),
    (["--data.phantom-scenario", "control"],
     r"--data.phantom_scenario: 'control' is not one of v2, hidden-sibling, sibling-alone$"),
    (["--model.blocks", "1,1"], r"--model.blocks needs 3 or 4 counts"),
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
    monkeypatch.delenv("AMKP_BACKEND")
    assert main(["--backend", "fast"]) == 2
    assert "--backend must be one of auto, torch, triton; got 'fast'" in error_line(capsys)


def test_the_backend_is_read_once_the_option_winning_over_the_variable(monkeypatch):
    from minimal_amkp.run.cli import parse
    monkeypatch.delenv("AMKP_BACKEND", raising=False)
    assert parse([])[0].run.backend == "auto"
    monkeypatch.setenv("AMKP_BACKEND", "torch")
    assert parse([])[0].run.backend == "torch"
    assert parse(["--backend", "auto"])[0].run.backend == "auto"


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
    (lambda r: open(r / "BBox_List_2017.csv", "a").write("q/../../../X.png,Mass,1,2,3,4\n"),
     r"BBox_List_2017\.csv line \d+: image name 'q/\.\./\.\./\.\./X\.png' is not a plain file name"),
    (lambda r: open(r / "test_list.txt", "a").write("\n/etc/passwd\n"),
     r"test_list\.txt line \d+: image name '/etc/passwd' is not a plain file name"),
])
def test_bad_data_exits_1_with_one_line(capsys, data, tmp_path, how, message):
    root = broken_copy(data, tmp_path, how)
    assert main(["--data", root, "--out", str(tmp_path / "out"), *MICRO]) == 1
    assert re.search(message, error_line(capsys))
    assert not (tmp_path / "out" / "config.json").exists()


def hostile_images(root):
    """Four images broken four ways: truncated, a 20000x20000 bomb, a 4 MB zTXt chunk, damage in the middle."""
    from hostile import big_chunk, bomb, damage_middle
    pngs = sorted((root / "images").iterdir())
    truncate_first_png(root)
    bomb(pngs[1])
    big_chunk(pngs[2], b"zTXt")
    damage_middle(pngs[3])
    return [p.name for p in pngs[:4]]


def test_hostile_images_end_in_one_line_before_any_training(capsys, data, tmp_path):
    root = broken_copy(data, tmp_path, hostile_images)
    assert main(["--data", root, "--out", str(tmp_path / "out"), *MICRO, "--data.preload", "false"]) == 1
    line = error_line(capsys)
    assert re.search(r"4 bad image\(s\): .*truncated PNG.*20000x20000 pixels, more than .*Decompressed data too "
                     r"large.*cannot read image \(OSError", line), line
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_skip_bad_images_drops_them_and_runs(capsys, data, tmp_path):
    """Damage in the middle of a PNG is found up front, even when images are read only as batches need them."""
    root = broken_copy(data, tmp_path, hostile_images)
    quick = MICRO + ["--train.base_epochs", "1", "--train.msa_epochs", "1", "--mine.epochs", "1",
                     "--data.preload", "false"]
    with pytest.warns(UserWarning) as caught:
        assert main(["--data", root, "--out", str(tmp_path / "out"), "--skip-bad-images", *quick]) == 0
    assert sum(str(w.message).startswith("skipped: ") for w in caught) == 4
    assert any("skipped 4 bad item" in str(w.message) for w in caught)
    assert (tmp_path / "out" / "report.json").exists()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("done in ") and "; 4 bad image(s) skipped (--skip-bad-images, warnings above);" in last


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
    assert "holds files this program did not write (notes.txt); pick an empty or a new folder" in error_line(capsys)
    assert main(["--data", data, "--out", str(tmp_path / "stuff"), "--overwrite", *MICRO]) == 1
    assert "holds files this program did not write (notes.txt)" in error_line(capsys)
    assert os.listdir(tmp_path / "stuff") == ["notes.txt"]
    # Another architecture's checkpoint under this run's settings.
    other = tmp_path / "other"
    shutil.copytree(out, other)
    state = torch.load(other / "checkpoint.pt", weights_only=True)
    state["model"] = ResNetMSA(ModelConfig(width=8, blocks=(1, 1, 1, 1))).state_dict()
    torch.save(state, other / "checkpoint.pt")
    assert main(["--data", data, "--out", str(other), "--resume", *MICRO]) == 1
    assert "checkpoint.pt: holds another architecture" in error_line(capsys)


def test_init_from_another_architecture_is_refused(capsys, data, tmp_path):
    torch.save(ResNetMSA(ModelConfig(width=8, blocks=(1, 1, 1), msa="none")).state_dict(), tmp_path / "r.pth")
    assert main(["--data", data, "--out", str(tmp_path / "out"), "--init", str(tmp_path / "r.pth"), *MICRO]) == 1
    assert "not a state dict of this architecture; shape (file vs model): conv1.weight" in error_line(capsys)


def test_the_phantom_is_generated_on_every_cpu(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    from minimal_amkp.config import preset
    from minimal_amkp.run import job
    monkeypatch.setattr(job, "cpus", lambda: 5)
    seen = []
    monkeypatch.setattr(job.phantom, "generate", lambda out, **kw: (seen.append(kw["workers"]), os.makedirs(out)))
    phantom_root(preset("tiny"))
    assert seen == [5]


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
    cfg.data.phantom_scenario = "hidden-sibling"                  # the positive control: its own folder
    control = phantom_root(cfg)
    assert control == os.path.join("data", f"phantom-v{phantom.VERSION}-hidden-sibling-b{sibling.VERSION}-n20-s32-seed0")
    assert os.path.isfile(os.path.join(control, "lesion_kinds.csv"))


# ---------------------------------------------------------------- hardening (issue 15)

def copy_run(finished, tmp_path, name="copy"):
    out = tmp_path / name
    shutil.copytree(finished[0], out)
    return out


def no_image_check(monkeypatch):
    """Make the image check fail the test if it runs: errors about --out must come before it."""
    import minimal_amkp.run.job as job
    monkeypatch.setattr(job, "check_images", lambda *a, **k: pytest.fail("the image check ran"))


def stop_after_prepare_out(monkeypatch):
    import minimal_amkp.run.job as job
    from minimal_amkp.config import RunError

    def stop(cfg):
        raise RunError("stopped after prepare_out")
    monkeypatch.setattr(job, "load_data", stop)


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], r"--seed must lie in \[0, 2\^32\), got -1"),
    (["--data.workers", "0"], r"--data.workers must be >= 1, got 0"),
    (["--train.lr", "-0.1"], r"--train.lr must be a positive number, got -0.1"),
    (["--train.lr", "nan"], r"--train.lr must be a positive number, got nan"),
    (["--mine.lr", "0"], r"--mine.lr must be a positive number, got 0.0"),
    (["--mine.threshold", "2"], r"--mine.threshold must lie in \[0, 1\], got 2.0"),
    (["--train.shift", "0.5"], r"--train.shift must lie in \[0, 0.5\) \(a fraction of S\), got 0.5"),
    (["--train.shift", "-0.1"], r"--train.shift must lie in \[0, 0.5\)"),
    (["--train.zoom", "0.7"], r"--train.zoom must lie in \[0, 0.5\), got 0.7"),
    (["--mine.min-epochs", "-1"], r"--mine.min-epochs must be >= 0, got -1"),
    (["--mine.level-off", "nan"], r"--mine.level-off must be >= 0, got nan"),
    (["--train.momentum", "1"], r"--train.momentum must lie in \[0, 1\)"),
    (["--mine.lam", "-1"], r"--mine.lam must be >= 0"),
    (["--mine.dilate", "-1"], r"--mine.dilate must be >= 0 cells, got -1"),
    (["--mine.warmup", "-2"], r"--mine.warmup must be >= 0 steps, got -2"),
    (["--mine.balance", "inf"], r"--mine.balance must be >= 0 \(0: λ = --mine.lam\), got inf"),
    (["--data.image-size", "20000"], r"--data.image_size must lie in \[32, 4096\]"),
])
def test_options_no_run_can_use_exit_2_before_any_work(capsys, tmp_path, args, message):
    assert main(["--out", str(tmp_path / "out"), *args]) == 2
    line = error_line(capsys)
    assert line.startswith("minimal_amkp: error: ") and re.search(message, line), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variable, value, message", [
    ("AMKP_COLLECTIVE_TIMEOUT", "soon", r"AMKP_COLLECTIVE_TIMEOUT must be a number of seconds in \[1, 7200\]; got 'soon'"),
    ("AMKP_COLLECTIVE_TIMEOUT", "0", r"AMKP_COLLECTIVE_TIMEOUT must be a number of seconds"),
    ("TORCHELASTIC_RESTART_COUNT", "-1", r"TORCHELASTIC_RESTART_COUNT='-1': expected a whole number"),
])
def test_bad_environment_variables_exit_2(capsys, monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    assert main([]) == 2
    assert re.search(message, error_line(capsys))


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("mining"), r"holds keys \[.*\], expected \[.*'mining'"),
    (lambda s: s.update(phase=99), r"phase 99 is not one of 0\.\.3"),
    (lambda s: s.update(phase="3"), r"phase '3' is not one of 0\.\.3"),
    (lambda s: s.update(epoch=7), r"epoch 7 of phase mining is not one of 0\.\.0"),
    (lambda s: s.update(model=[1, 2]), r"model is not a state dict"),
    (lambda s: s["mining"].update(masks=[torch.ones(3, 8, 4, 4, dtype=torch.uint8)] * 2),
     r"masks and CAMs are not lists of \(4, 8, 8, 8\) uint8 and float32 maps"),
    (lambda s: s["mining"].update(masks=s["mining"]["masks"][:1]), r"holds 1 masks and 2 CAMs in mining round 3"),
    (lambda s: s["mining"]["masks"][1].fill_(7), r"masks hold values other than 0 and 1"),
    (lambda s: s["mining"].update(model_a=None), r"model_a \(N_A\) is not a state dict"),
    (lambda s: s["mining"].update(round=9), r"mining round 9, epoch 0 do not fit T = 2 rounds of at most 2 epochs"),
    (lambda s: s["mining"].pop("records"), r"its mining state holds keys"),
    (lambda s: s.update(phase=0, epoch=1), r"holds a mining state in phase base, before mining"),
    (lambda s: s.update(rng=torch.zeros(3, dtype=torch.uint8)), r"rng is not a CPU generator state"),
    (lambda s: s.update(cuda_rng="x"), r"cuda_rng is not a CUDA generator state"),
    (lambda s: s["config"]["train"].update(lr=0.5), r"was written by a run with other settings \(train.lr: 0.5 there, 0.01 here\)"),
    (lambda s: s.update(config=[]), r"holds no config of this program"),
    (lambda s: s["data"].update(mining="0" * 64), r"was written for other data: the mining image list\(s\) differ"),
    (lambda s: s.update(version=1), r"not a checkpoint of this program \(version 2\)"),
    (lambda s: s.update(phase=0, epoch=1, mining=None, optimizer={"state": {}, "param_groups": [{"params": [0]}]}),
     r"its optimizer state does not fit this phase's parameters"),
])
def test_tampered_checkpoints_end_in_one_line(capsys, data, finished, tmp_path, change, message):
    out = copy_run(finished, tmp_path)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    change(state)
    torch.save(state, out / "checkpoint.pt")
    assert main(["--data", data, "--out", str(out), "--resume", *MICRO]) == 1
    line = error_line(capsys)
    assert re.search(r"checkpoint\.pt: " + message, line) and line.endswith("pass --overwrite to start over"), line


def test_a_checkpoint_holding_objects_is_refused_by_the_weights_only_loader(capsys, data, finished, tmp_path):
    import argparse
    out = copy_run(finished, tmp_path)
    torch.save({"version": 2, "payload": argparse.Namespace(x=1)}, out / "checkpoint.pt")
    assert main(["--data", data, "--out", str(out), "--resume", *MICRO]) == 1
    assert "checkpoint.pt: unreadable checkpoint (UnpicklingError)" in error_line(capsys)


def point_run_at(out, data):
    """Make a copied run's config.json and checkpoint name another --data folder, as a run started there would."""
    config = json.loads((out / "config.json").read_text())
    config["run"]["data"] = data
    (out / "config.json").write_text(json.dumps(config))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["config"]["run"]["data"] = data
    torch.save(state, out / "checkpoint.pt")


def change_a_pixel(root, name):
    from PIL import Image
    path = root / "images" / name
    a = np.asarray(Image.open(path)).copy()
    a[0, 0] ^= 1
    Image.fromarray(a).save(path)


def relabel(root, name):
    path = root / "Data_Entry_2017.csv"
    lines = path.read_text().splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(name + ","))
    fields = lines[i].split(",")
    fields[1] = "Hernia" if fields[1] != "Hernia" else "Edema"
    lines[i] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("how, message", [
    (lambda root, mining, train: change_a_pixel(root, mining[0]), r"the mining image list\(s\) differ"),
    (lambda root, mining, train: relabel(root, train[3]), r"the train image list\(s\) differ"),
    (lambda root, mining, train: None, None),
])
def test_resume_refuses_data_that_changed_under_the_same_names(capsys, data, finished, tmp_path, how, message):
    names = np.load(finished[0] / "mining.npz")["names"].tolist()
    root = tmp_path / "data"
    shutil.copytree(data, root)
    train = [n for n in (root / "train_val_list.txt").read_text().split() if n not in names]
    how(root, names, train)
    out = copy_run(finished, tmp_path)
    point_run_at(out, str(root))
    code = main(["--data", str(root), "--out", str(out), "--resume", *MICRO])
    if message is None:                      # the same files elsewhere: the fingerprint holds, the run ends
        assert code == 0 and (out / "boxes.csv").read_text() == (finished[0] / "boxes.csv").read_text()
        return
    assert code == 1
    assert re.search(r"checkpoint\.pt: was written for other data: " + message, error_line(capsys))


@pytest.mark.parametrize("text", ['{"name":"x"}', "[]", "{}", '{"run": 1}', "not json"])
@pytest.mark.parametrize("flag", [[], ["--resume"], ["--overwrite"]])
def test_a_foreign_config_json_is_refused_and_survives(capsys, data, finished, tmp_path, text, flag):
    for out in (tmp_path / "alone", copy_run(finished, tmp_path)):
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text(text)
        assert main(["--data", data, "--out", str(out), *MICRO, *flag]) == 1
        line = error_line(capsys)
        assert re.search(r"config\.json: (not a config\.json of this program|unreadable) .*it is left as it is", line), line
        assert (out / "config.json").read_text() == text


def test_the_manifest_names_every_output_and_overwrite_deletes_exactly_those(monkeypatch, capsys, data, finished,
                                                                            tmp_path):
    from minimal_amkp.run import outdir
    out = copy_run(finished, tmp_path)
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert set(outdir.read_manifest(str(out))) == files - {outdir.MANIFEST, outdir.LOCK}
    assert any(f.startswith("figures/") for f in files)
    (out / "notes.txt").write_text("mine")
    (out / "figures" / "mine.png").write_bytes(b"x")
    stop_after_prepare_out(monkeypatch)
    assert main(["--data", data, "--out", str(out), "--overwrite", *MICRO]) == 1
    assert "stopped after prepare_out" in error_line(capsys)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == sorted([outdir.LOCK, outdir.MANIFEST, "figures", "figures/mine.png", "notes.txt"])
    assert outdir.read_manifest(str(out)) == []


def test_a_killed_runs_temporary_files_are_removed_and_no_others(monkeypatch, capsys, data, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    figure = next((out / "figures").iterdir()).name
    ours = [out / ".checkpoint.pt.0a1b2c3d.tmp", out / ".report.json.k2js8_q1.tmp",
            out / "figures" / f".{figure}.00ff00ff.tmp", out / "..amkp-manifest.json.12345678.tmp"]
    theirs = [out / ".notes.txt.0a1b2c3d.tmp", out / "keep.tmp", out / ".checkpoint.pt.tmp"]
    for p in ours + theirs:
        p.write_bytes(b"half")
    stop_after_prepare_out(monkeypatch)
    assert main(["--data", data, "--out", str(out), "--resume", *MICRO]) == 1
    assert "stopped after prepare_out" in error_line(capsys)
    assert [p.exists() for p in ours + theirs] == [False] * len(ours) + [True] * len(theirs)


def test_an_unwritable_out_is_one_line_before_the_image_check(monkeypatch, capsys, data, tmp_path):
    no_image_check(monkeypatch)
    (tmp_path / "file").write_text("x")
    assert main(["--data", data, "--out", str(tmp_path / "file" / "out"), *MICRO]) == 1
    assert re.search(r"--out .*file/out: cannot write there \(Not a directory\)", error_line(capsys))
    if os.geteuid() != 0:                    # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o555)
        assert main(["--data", data, "--out", str(tmp_path / "ro" / "out"), *MICRO]) == 1
        assert "cannot write there (Permission denied)" in error_line(capsys)


def test_a_full_disk_is_one_line_before_the_image_check(monkeypatch, capsys, data, tmp_path):
    import errno
    import minimal_amkp.run.atomic as atomic
    import minimal_amkp.run.job as job
    no_image_check(monkeypatch)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(job.shutil, "disk_usage", lambda p: usage._replace(free=1 << 10))
    assert main(["--data", data, "--out", str(tmp_path / "a"), *MICRO]) == 1
    assert re.search(r"--out .*a: 0 MiB free on its disk, and this run needs about \d+ MiB more", error_line(capsys))
    monkeypatch.undo()
    no_image_check(monkeypatch)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(atomic.os, "fsync", full)
    assert main(["--data", data, "--out", str(tmp_path / "b"), *MICRO]) == 1
    assert re.search(r"b/\.amkp-manifest\.json: cannot write \(No space left on device\)", error_line(capsys))
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.endswith(".tmp")]


def test_space_needed_counts_two_checkpoints_the_model_and_the_maps():
    from minimal_amkp.run.job import space_needed
    from minimal_amkp.config import preset
    cfg = preset("paper")
    need = space_needed(cfg, 880)
    weights = 4 * sum(t.numel() for t in ResNetMSA(cfg.model).state_dict().values())
    maps = 880 * 8 * 32 * 32 * 3 * 5
    assert need == 2 * (3 * weights + maps) + weights + maps and 700 << 20 < need < 2 << 30


def test_two_runs_on_one_out_do_not_both_proceed(capsys, data, tmp_path):
    from minimal_amkp.run import outdir
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    first = subprocess.Popen(command(data, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "config.json").exists():
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.02)
        assert main(["--data", data, "--out", str(out), "--resume", *MICRO]) == 1
        assert re.search(rf"another run is using this folder \(pid {first.pid} on .*\); wait for it",
                         error_line(capsys))
    finally:
        first.kill()
        first.wait()
    folder = outdir.Folder(str(out))         # the kernel dropped the killed run's lock
    folder.lock()
    folder.release()


def test_the_folder_files_follow_the_umask(monkeypatch, capsys, data, tmp_path):
    """Every output goes through atomic_open (test_atomic.py checks its modes); here the folder's own files."""
    stop_after_prepare_out(monkeypatch)
    old = os.umask(0o027)
    try:
        assert main(["--data", data, "--out", str(tmp_path / "out"), *MICRO]) == 1
    finally:
        os.umask(old)
    assert "stopped after prepare_out" in error_line(capsys)
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {
        ".amkp-lock": 0o640, ".amkp-manifest.json": 0o640}


def test_an_elastic_restart_resumes_its_own_run(monkeypatch, capsys, data, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert main(["--data", data, "--out", str(out), "--overwrite", *MICRO]) == 0
    assert "resuming" in capsys.readouterr().err
    assert (out / "boxes.csv").read_text() == (finished[0] / "boxes.csv").read_text()
    stop_after_prepare_out(monkeypatch)      # a restart before the first start wrote config.json: start it
    assert main(["--data", data, "--out", str(tmp_path / "new"), "--resume", *MICRO]) == 1
    assert "stopped after prepare_out" in error_line(capsys)


def test_an_image_that_breaks_after_the_check_ends_the_run_in_one_line(monkeypatch, capsys, data, tmp_path):
    """The up-front decode is what --skip-bad-images relies on; a file damaged later, mid-run, stops the run."""
    import minimal_amkp.run.job as job
    from hostile import damage_middle
    root = tmp_path / "data"
    shutil.copytree(data, root)
    real = job.check_images

    def check_then_damage(ds, names, **kw):
        good = real(ds, names, **kw)
        damage_middle(root / "images" / good[-1])
        return good
    monkeypatch.setattr(job, "check_images", check_then_damage)
    assert main(["--data", str(root), "--out", str(tmp_path / "out"), *MICRO, "--data.preload", "false",
                 "--skip-bad-images"]) == 1
    assert re.search(r"images/\d+_\d+\.png: cannot read image \(OSError: ", error_line(capsys))


def test_regrid_rereports_a_finished_run_on_either_grid(finished, tmp_path, capsys):
    from minimal_amkp.study import regrid
    out, _ = finished
    original = json.loads((out / "report.json").read_text())
    regrid.main([str(out), str(tmp_path / "network"), "--grid", "network"])
    again = json.loads((tmp_path / "network" / "report.json").read_text())
    assert again["grid"] == original["grid"] == {"stride": 8, "offset": 0.5}     # 64 px, X at 1/8
    assert again["summary"] == original["summary"] and again["lesions"] == original["lesions"]
    regrid.main([str(out), str(tmp_path / "naive")])
    naive = json.loads((tmp_path / "naive" / "report.json").read_text())
    assert naive["grid"] == {"stride": 8, "offset": 4} and naive["rounds"] == original["rounds"]
    assert "on the naive grid (stride 8, offset 4)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^regrid: .*nowhere: not a finished run \(.*mining.npz'\)$"):
        regrid.main([str(tmp_path / "nowhere"), str(tmp_path / "x")])


def test_fork_mines_again_from_a_finished_runs_classifier(finished, tmp_path, capsys):
    from minimal_amkp.study import fork
    out, _ = finished
    fork.main([str(out), str(tmp_path / "fork"), "--mine.rounds", "1"])
    printed = capsys.readouterr().out
    assert "from" in printed and "round 1: " in printed and "round 2" not in printed
    original, again = (json.loads((d / "report.json").read_text()) for d in (out, tmp_path / "fork"))
    assert again["rounds"][0]["auroc_a"] == original["rounds"][0]["auroc_a"]      # the same N_A
    # The source's model and training, the preset's mining settings (not the source's MICRO ones).
    assert again["config"]["model"] == original["config"]["model"] and again["config"]["mine"]["batch_size"] == 32
    with pytest.raises(SystemExit, match=r"^usage: python -m minimal_amkp.study.fork SOURCE OUT"):
        fork.main([str(out)])
    with pytest.raises(SystemExit, match=r"^fork: .*nowhere.*config.json"):
        fork.main([str(tmp_path / "nowhere"), str(tmp_path / "x")])


def test_the_oracle_needs_the_positive_control_and_says_so_before_training(data, tmp_path, capsys):
    assert main(["--data", data, "--out", str(tmp_path / "out"), *MICRO, "--mine.oracle", "true"]) == 1
    line = error_line(capsys)
    assert re.search(r"--mine.oracle: the data has no lesion_kinds.csv", line), line
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
