"""`python -m minimal_amkp.study.reproduce` on a micro phantom: every table and verdict, forks, resume, bad input."""
import os
import re

import numpy as np
import pytest

from minimal_amkp.study import reproduce
from minimal_amkp.study import tables
from minimal_amkp.run.cli import main as run_pipeline
from minimal_amkp.reference import DEFAULT_AFP_BOUNDS

# 40 images at 64 px and a width-4 network: each of the 18 cells takes a second or two.
MICRO = ["--model.width", "4", "--model.msa_channels", "16,8", "--train.batch_size", "8",
         "--mine.batch_size", "8", "--train.base_epochs", "2", "--train.msa_frozen_epochs", "1",
         "--train.msa_epochs", "2", "--mine.epochs", "2", "--mine.min-epochs", "1", "--data.workers", "1"]
VERDICTS = ("holds", "does not hold", "within noise")


def study_args(data, where, *extra):
    return ["--data", data, "--seeds", "0,1", "--sizes", "64,96", "--out", str(where / "study"),
            "--result", str(where / "reproduction.md"), "--notes", str(where / "notes.md"), *MICRO, *extra]


@pytest.fixture(scope="module")
def study(data, tmp_path_factory):
    where = tmp_path_factory.mktemp("reproduce")
    (where / "notes.md").write_text("A finding written by hand.\n")
    assert reproduce.main(study_args(data, where)) == 0
    return where


def reports(where):
    return {p: os.path.getmtime(os.path.join(where, "study", p, "report.json"))
            for p in sorted(os.listdir(where / "study"))}


def test_the_study_writes_three_tables_a_verdict_per_claim_and_the_notes(study):
    text = (study / "reproduction.md").read_text()
    verdicts = text.split("## Verdicts")[1].split("## ")[0]
    rows = [line for line in verdicts.splitlines() if line.startswith("| ") and not line.startswith("| claim")]
    assert len([r for r in rows if r.startswith("| Table")]) == 13 and len(rows) == 13 + 4, rows
    assert all(line.rstrip(" |").endswith(tuple(f"**{v}**" for v in VERDICTS)) for line in rows), rows
    # Every interval's half-width is printed; the claims the paper does not make say so.
    assert all(re.search(r"\| (\d\.\d{3}( \(> 0\.05\))?|n/a) \| (\d+|n/a) \|", line) for line in rows), rows
    assert sum("not in the paper" in line for line in rows) == 4
    assert any(line.startswith("| Eq. (8) read with each H_t normalised") for line in rows)
    for heading in ("## Table 1", "## Table 2", "## Table 3", "## Lesion by lesion", "## Diagnostic", "## Cost",
                    "## What we found"):
        assert heading in text, heading
    assert text.count("### T(IoU) =") == 7 + 2
    assert "| *paper 512-baseline* | 0.21 | 0.81 | 0.37 |" in text
    assert "A finding written by hand." in text
    assert "seeds 0, 1" in text and "64-bilinear" in text and "96-deconv." in text
    assert len(os.listdir(study / "study")) == 2 * 9


def test_a_second_run_reads_finished_cells_back(data, study):
    before = reports(study)
    assert reproduce.main(study_args(data, study)) == 0
    assert reports(study) == before


def test_one_size_leaves_out_the_second_resolution_and_its_claim(data, study):
    before = reports(study)
    args = study_args(data, study)
    args[args.index("--sizes") + 1] = "64"
    args[args.index("--result") + 1] = str(study / "one-size.md")
    assert reproduce.main(args) == 0
    assert reports(study) == before                    # every cell it needs was finished
    text = (study / "one-size.md").read_text()
    assert "512 beats 1024" not in text and "| 96-" not in text and "| 64-bilinear |" in text
    assert "study size 64 stands for the paper's 512; the second resolution was not run" in text
    assert "| 64-bilinear |" in text


def test_a_cell_cut_short_is_resumed_not_restarted(data, study):
    cell = study / "study" / "am-none-seed1"
    with np.load(cell / "mining.npz") as z:
        cams = z["cams"]
    others = {k: v for k, v in reports(study).items() if k != "am-none-seed1"}
    os.remove(cell / "report.json")
    assert reproduce.main(study_args(data, study)) == 0
    with np.load(cell / "mining.npz") as z:
        np.testing.assert_array_equal(z["cams"], cams)
    after = reports(study)
    assert after.pop("am-none-seed1") and after == others


def test_a_forked_cell_equals_the_run_it_stands_for(data, study, tmp_path):
    """am-vanilla starts from am-full's N_A instead of training again: same heatmaps as a fresh run."""
    s = reproduce.StudyConfig(seeds=(0,), sizes=(64, 96), out=str(study / "study"))
    name, options, source = next(c for c in reproduce.cells(s) if c[0] == "am-vanilla-seed0")
    given = ["--data", data, *MICRO]
    argv = given + reproduce.with_epochs(given, options)
    argv[argv.index("--out", len(given)) + 1] = str(tmp_path / "fresh")
    assert run_pipeline(argv) == 0
    with np.load(tmp_path / "fresh" / "mining.npz") as fresh, \
            np.load(study / "study" / name / "mining.npz") as forked:
        np.testing.assert_allclose(forked["cams"], fresh["cams"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(forked["masks"], fresh["masks"])


def test_the_paper_preset_studies_512_and_1024_on_the_given_folder(data):
    study, given = reproduce.parse(["--preset", "paper", "--data", data])
    assert study.sizes == (512, 1024) and study.seeds == (0, 1, 2, 3, 4, 5)
    assert given[-4:] == ["--preset", "paper", "--data", data]
    study, _ = reproduce.parse(["--data", data])                 # tiny: the measured study, one size
    assert study.sizes == (128,) and study.seeds == (0, 1, 2, 3, 4, 5)


def test_the_no_msa_baseline_trains_as_many_epochs_as_resnet_msa():
    given = ["--train.base-epochs", "2", "--train.msa-frozen-epochs", "1", "--train.msa-epochs", "3"]
    assert reproduce.with_epochs(given, ["--model.msa", "none"])[-2:] == ["--train.base-epochs", "6"]
    assert reproduce.with_epochs(given, ["--model.msa", "deconv"]) == ["--model.msa", "deconv"]


@pytest.mark.parametrize("args, code, message", [
    (["--seeds", "a"], 2, "--seeds: cannot read 'a' as comma-separated integers"),
    (["--seeds", "0,0"], 2, "--seeds: values must differ"),
    (["--sizes", "64,96,128"], 2, "--sizes: needs 1 or 2 values"),
    (["--sizes", "16,64"], 2, "--sizes: each size must be >= 32"),
    (["--seed", "3"], 2, "--seed: set by the study for each cell"),
    (["--mine.kp=none"], 2, "--mine.kp: set by the study for each cell"),
    (["--train.lr", "fast"], 2, "--train.lr: cannot read 'fast' as float"),
    (["--data", "/no/such/folder"], 1, "--data /no/such/folder: no such folder"),
])
def test_bad_input_ends_with_one_line(capsys, tmp_path, args, code, message):
    assert reproduce.main(["--out", str(tmp_path / "s"), *args]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minimal_amkp.study.reproduce: error: ") and message in err[0], err
    assert not (tmp_path / "s").exists()


def test_verdicts_follow_the_paired_interval():
    assert tables.verdict([0.5, 0.6, 0.7], [0.1, 0.2, 0.3])[0] == "holds"
    assert tables.verdict([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])[0] == "does not hold"
    assert tables.verdict([0.5, 0.1, 0.6], [0.3, 0.4, 0.2])[0] == "within noise"
    assert tables.verdict([0.5], [0.1])[0] == "within noise"
    v, mean, half = tables.verdict([0.3, 0.5, np.nan], [0.1, 0.2, 0.4])
    assert mean == pytest.approx(0.25) and half == pytest.approx(12.706 * 0.05, rel=1e-3)     # t(0.975, 1) · sd / √2


def test_seeds_needed_is_the_least_count_whose_interval_fits():
    a, b = [0.5, 0.6, 0.7, 0.4], [0.4, 0.4, 0.4, 0.4]               # d: sd 0.129
    n = tables.seeds_needed(a, b, width=0.05)
    t = lambda k: tables.stats.t.ppf(0.975, k - 1) * np.std(np.subtract(a, b), ddof=1) / np.sqrt(k)
    assert t(n) <= 0.05 < t(n - 1) and n == 29
    assert tables.seeds_needed([0.5, 0.5], [0.1, 0.1]) == 2               # no spread: two seeds do
    assert tables.seeds_needed([0.5], [0.1]) is None


def test_the_transcribed_ref_rows_are_the_metric_afp_bounds():
    """Two transcriptions of Table 2 (the metric's AFP bounds and the study's paper rows) agree."""
    ref_afp = np.array([tables.PAPER_T2[t, "ref"][1] for t in tables.T2_IOU])
    np.testing.assert_array_equal(ref_afp, DEFAULT_AFP_BOUNDS)
    assert {m for _, m in tables.PAPER_T2} == {"ref", "base", "ours"} and len(tables.PAPER_T2) == 21


def test_mining_only_reruns_the_am_cells_from_the_trained_classifiers(data, study, tmp_path):
    args = ["--data", data, "--seeds", "0,1", "--sizes", "64,96", "--out", str(tmp_path / "again"),
            "--result", str(tmp_path / "again.md"), "--notes", "", "--mining-only", str(study / "study"), *MICRO]
    assert reproduce.main(args + ["--mine.lr", "0.05"]) == 0
    assert sorted(os.listdir(tmp_path / "again")) == sorted(f"am-{k}-seed{s}" for k in ("full", "vanilla", "none")
                                                              for s in (0, 1))
    text = (tmp_path / "again.md").read_text()
    assert "## Table 2" in text and "## Table 3" in text and "## Table 1" not in text
    assert sum(line.startswith("| Table 1") for line in text.splitlines()) == 0


def test_a_fork_from_a_classifier_trained_otherwise_is_refused(capsys, data, study, tmp_path):
    args = ["--data", data, "--seeds", "0", "--sizes", "64,96", "--out", str(tmp_path / "again"),
            "--mining-only", str(study / "study"), *MICRO, "--train.lr", "0.5"]
    assert reproduce.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "its network was trained with other settings (train.lr: " in err and "cannot fork" in err, err


@pytest.mark.parametrize("change, message", [
    (lambda r: r["config"]["train"].update(lr=0.5), r"came from other settings \(train.lr: 0.5 -> 0.01\)"),
    (lambda r: r.update(config={"name": "x"}), r"came from other settings \(its sections are \['name'\]\)"),
])
def test_a_finished_cell_from_other_settings_is_not_reused(capsys, data, study, tmp_path, change, message):
    import json
    import shutil
    shutil.copytree(study / "study", tmp_path / "study")
    path = tmp_path / "study" / "am-full-seed0" / "report.json"
    report = json.loads(path.read_text())
    change(report)
    path.write_text(json.dumps(report))
    assert reproduce.main(study_args(data, tmp_path)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("minimal_amkp.study.reproduce: error: cell am-full-seed0: ") and re.search(message, err), err
    assert not (tmp_path / "reproduction.md").exists()
