"""study/kill_resume.py: its plan of moments, its comparison, and (slow) a short run of it."""
import random

import numpy as np
import pytest

from minimal_amkp.study import kill_resume as K


def test_the_plan_kills_early_inside_saves_and_last_inside_output_writing():
    plan = K.plan(20, random.Random(0), reference_s=60)
    kinds = [kind for kind, _ in plan]
    assert len(plan) == 20 and kinds[-4:] == ["output writing"] * 4
    assert kinds.count("checkpoint save") == 8 and kinds.count("early") == 8
    assert all(0.2 <= p <= 8 for k, p in plan if k == "early")
    assert all(p in K.OUTPUTS for k, p in plan if k == "output writing")


def test_compare_sees_a_changed_box_a_changed_mask_and_a_leftover(tmp_path):
    for name in ("whole", "killed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "boxes.csv").write_text("a,b\n")
        np.savez(tmp_path / name / "mining.npz", masks=np.ones(3), names=np.array(["x"]))
    assert K.compare(tmp_path / "whole", tmp_path / "killed") == []
    (tmp_path / "killed" / "boxes.csv").write_text("a,c\n")
    np.savez(tmp_path / "killed" / "mining.npz", masks=np.zeros(3), names=np.array(["x"]))
    (tmp_path / "killed" / ".model.pt.0123abcd.tmp").write_bytes(b"")
    assert K.compare(tmp_path / "whole", tmp_path / "killed") == [
        "boxes.csv differs", "mining.npz[masks] differs", "temporary files left: ['.model.pt.0123abcd.tmp']"]


@pytest.mark.slow
def test_a_short_measurement_passes(tmp_path):
    micro = ["--model.width", "4", "--model.msa_channels", "16,8", "--train.batch_size", "8", "--mine.batch_size", "8",
             "--train.msa_epochs", "6", "--mine.epochs", "2", "--mine.rounds", "2", "--data.workers", "1"]
    assert K.main(["--kills", "5", "--images", "40", "--size", "64", "--work", str(tmp_path / "w"),
                   "--result", str(tmp_path / "r.md"), *micro]) == 0
    assert "**Result: PASS**" in (tmp_path / "r.md").read_text()
