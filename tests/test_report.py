"""report.py: write_report's files, and its numbers equal to calling the reference directly."""
import json
import math
import os

import numpy as np
import pytest
from mining_world import make_world

from minimal_amkp import reference as R
from minimal_amkp.data.chestxray import read_bbox_list
from minimal_amkp.classes import BOX_CLASSES, CLASSES
from minimal_amkp.data.images import frame
from minimal_amkp.harvest import by_class, fused, upsample
from minimal_amkp.run.report import write_report


def make_test(m=40, seed=1):
    rng = np.random.default_rng(seed)
    labels = (rng.random((m, len(CLASSES))) < 0.3).astype(np.uint8)
    labels[:, -1] = 0                                   # Hernia: no positives, AUROC undefined
    scores = np.clip(labels * 0.3 + rng.random(labels.shape) * 0.7, 0, 1)
    return dict(names=[f"t{i}.png" for i in range(m)], scores=scores, labels=labels)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    ds, mining = make_world(tmp)
    test = make_test()
    out = tmp / "out"
    r = write_report(out, mining, ds, test, {"preset": "tiny", "T": 3, "lr": 0.01})
    return ds, mining, test, out, r


def none_to_nan(a):
    return np.array([[math.nan if v is None else v for v in row] for row in a])


def gt_by_class(ds, names):
    return [{n: np.array([(b.x, b.y, b.w, b.h) for b in ds.boxes.get(n, ()) if b.label == c]
                         ).reshape(-1, 4) for n in names} for c in range(len(BOX_CLASSES))]


def test_files_and_keys(run):
    ds, mining, test, out, r = run
    assert {p.name for p in out.iterdir()} == {"boxes.csv", "report.md", "report.json", "figures"}
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == r
    for key in ("n_mining_images", "T", "image_size", "heatmap_size", "n_gt_boxes", "n_boxes",
                "summary", "acc_afp", "afp_bounds", "max_box_acc_v2", "max_box_acc_v2_size", "auroc",
                "mean_auroc", "test_positives", "config", "figures"):
        assert key in r, key
    assert set(r["acc_afp"]) == {"iou", "iobb"}
    assert all(set(v) == {"prior", "baseline", "am"} for v in r["acc_afp"].values())
    assert r["config"] == {"preset": "tiny", "T": 3, "lr": 0.01}
    assert (r["n_mining_images"], r["T"], r["image_size"]) == (6, 3, 48)
    assert r["auroc"]["Hernia"] is None                 # NaN written as null
    md = (out / "report.md").read_text()
    for p in r["figures"]:
        assert f"]({p})" in md and (out / p).is_file()
    assert "| T(IoU) | AT |" in md and "| T(IoBB) | AT |" in md


def test_numbers_equal_reference(run):
    ds, mining, test, out, r = run
    names = mining["names"]
    gt = gt_by_class(ds, names)
    am = read_bbox_list(out / "boxes.csv")
    for overlap in ("iou", "iobb"):
        want = R.acc_afp_table(by_class(am, names), gt, overlap=overlap)
        got = r["acc_afp"][overlap]["am"]
        np.testing.assert_array_equal(none_to_nan(got["acc"]), want["acc"])
        np.testing.assert_array_equal(none_to_nan(got["afp"]), want["afp"])
        assert got["thresholds"] == list(R.DEFAULT_IOU_THRESHOLDS)
    for c, name in enumerate(CLASSES):
        want = R.auroc(test["scores"][:, c], test["labels"][:, c])
        assert (r["auroc"][name] is None and math.isnan(want)) or r["auroc"][name] == want, name
    c, size = 1, r["max_box_acc_v2_size"]               # Cardiomegaly: images 2 and 5
    assert size == 48                                   # the model input, below the cap
    maps, boxes = [], []
    for i, n in enumerate(names):
        if len(gt[c][n]):
            w, h = frame(ds, n)
            maps.append(upsample(mining["cams"][0, i, c], size, size, mining["grid"]))
            boxes.append(gt[c][n] * np.array([size / w, size / h] * 2))
    want = json.loads(json.dumps(R.max_box_acc_v2(maps, boxes)))
    assert r["max_box_acc_v2"]["baseline"]["Cardiomegaly"] == want


def test_heatmap_on_gt_gives_acc_one_and_summary(run):
    ds, mining, test, out, r = run
    at = list(R.DEFAULT_IOU_THRESHOLDS).index(0.3)
    for m in ("baseline", "am"):
        acc = r["acc_afp"]["iou"][m]["acc"][at]
        has_gt = [r["n_gt_boxes"][c] > 0 for c in BOX_CLASSES]
        assert all(a == 1.0 for a, g in zip(acc, has_gt) if g), (m, acc)
        assert all(a is None for a, g in zip(acc, has_gt) if not g), (m, acc)
        assert r["summary"][m] == 1.0
    assert 0 <= r["summary"]["prior"] <= 1


def test_one_image_one_step(tmp_path):
    """N = 1 and T = 1: the prior has no other image to learn from, H_f is H_1."""
    ds, mining = make_world(tmp_path, T=1)
    one = dict(names=mining["names"][:1], labels=mining["labels"][:1], cams=mining["cams"][:, :1],
               masks=mining["masks"][:, :1], image_size=48, grid=mining["grid"])
    r = write_report(tmp_path / "out", one, ds, make_test(m=5), {})
    assert r["T"] == 1 and r["n_mining_images"] == 1
    assert sum(r["n_boxes"]["prior"].values()) == 0 and r["summary"]["prior"] == 0.0  # GT, no boxes
    assert r["acc_afp"]["iou"]["baseline"] == r["acc_afp"]["iou"]["am"]
    assert len(read_bbox_list(tmp_path / "out" / "boxes.csv")) == sum(r["n_boxes"]["am"].values())


def test_without_extras_the_tables_are_the_same_and_nothing_is_drawn(run, tmp_path):
    ds, mining, test, _, full = run
    r = write_report(tmp_path / "out", mining, ds, test, {"run": {"report_extras": False}})
    assert r["acc_afp"] == full["acc_afp"] and r["max_box_acc_v2"] is None and r["figures"] == []
    assert not (tmp_path / "out" / "figures").exists()
    assert (tmp_path / "out" / "report.md").read_text().count("--report-extras false") == 2


@pytest.mark.parametrize("which, change, message", [
    ("mining", lambda m: m.update(masks=m["masks"][:, :, :, 1:]), "mining['masks'] shape"),
    ("mining", lambda m: m.update(cams=m["cams"][:0], masks=m["masks"][:0]), "T >= 1"),
    ("mining", lambda m: m.update(labels=m["labels"][:3]), "mining['labels'] must be"),
    ("test", lambda t: t.update(labels=t["labels"][:-1]), "test['labels']"),
    ("test", lambda t: t.update(scores=t["scores"][:, :8]), "test['scores']"),
    ("test", lambda t: t.pop("scores"), "test: missing keys ['scores']"),
    ("config", lambda c: c.update(bad=object()), "config: not JSON-able"),
])
def test_bad_input(tmp_path, which, change, message):
    ds, mining = make_world(tmp_path)
    args = dict(mining=mining, test=make_test(), config={})
    change(args[which])
    with pytest.raises(ValueError) as e:
        write_report(tmp_path / "out", args["mining"], ds, args["test"], args["config"])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


def test_names_and_settings_cannot_break_report_md(run, tmp_path, monkeypatch):
    """A plain file name may still hold ] ( ) < >, and a path in the config a run of backquotes."""
    from minimal_amkp.run import report
    ds, mining, test, _, _ = run
    seen = []
    monkeypatch.setattr(report, "markdown", lambda r, figures: seen.append(r) or "")
    write_report(tmp_path / "out", mining, ds, test, {"run": {"data": "/d/```\n# injected", "report_extras": False}})
    monkeypatch.undo()
    md = report.markdown(seen[0], [os.path.join("figures", "Mass_a](javascript:x)<img src=y>.png")])
    line = next(ln for ln in md.splitlines() if ln.startswith("!["))
    assert line == r"![Mass\_a\]\(javascript:x\)\<img src=y\>.png](figures/Mass_a%5D%28javascript%3Ax%29%3Cimg%20src%3Dy%3E.png)"
    fence = md.split("```json\n")[1].split("\n```")[0]
    assert "`" not in fence and json.loads(fence) == seen[0]["config"]


def test_the_positive_control_gets_recall_of_lesions_a_and_b(run, tmp_path):
    import dataclasses
    from minimal_amkp.harvest import harvest
    from minimal_amkp.run.lesions import kind_recall
    ds, mining, test, out, full = run
    assert full["kinds"] is None and "Lesions A and B" not in (out / "report.md").read_text()
    # The first box of each image is its A, any other its B.
    kinds = [(b, "B" if k else "A") for boxes in ds.boxes.values() for k, b in enumerate(boxes)]
    r = write_report(tmp_path / "out", mining, dataclasses.replace(ds, kinds=kinds), test,
                     {"run": {"report_extras": False}})
    names = mining["names"]
    frames = [frame(ds, n) for n in names]
    h_1 = np.asarray(mining["cams"][0], dtype=np.float64)
    want = kind_recall(harvest(h_1, names, mining["labels"], frames, R.check_grid(mining["grid"])), names, kinds)
    assert r["kinds"]["baseline"] == want and want["B"]["n"] == 2 and want["A"]["n"] == 6
    assert set(r["kinds"]) == {"baseline", "am"}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Lesions A and B (the positive control)" in md and "2 of kind B" in md


def test_max_box_acc_in_processes_equals_it_in_process(run, monkeypatch):
    from minimal_amkp.run import report
    ds, mining, test, out, r = run
    names, size = mining["names"], r["max_box_acc_v2_size"]
    heatmaps = {"baseline": np.asarray(mining["cams"][0], np.float64), "am": fused(mining["cams"], mining["masks"])}
    args = (heatmaps, names, [frame(ds, n) for n in names], gt_by_class(ds, names), size, R.check_grid(mining["grid"]))
    alone = report.max_box_acc(*args)
    assert report.jsonable(alone) == r["max_box_acc_v2"]
    pools, real = [], report.processes
    monkeypatch.setattr(report, "processes", lambda n: (pools.append(n), real(n))[1])
    monkeypatch.setattr(report, "cpus", lambda: 3)
    monkeypatch.setattr(report, "POOL_MIN_MAPS", 1)
    assert report.max_box_acc(*args) == alone and pools == [3]
