"""The CSV writers: Data_Entry, BBox_List and the harvested boxes.csv read back as written,
names with commas and quotes included."""
import numpy as np
import pytest
from mining_world import make_world
from release import label_vector

from minimal_amkp.data import chestxray as cx
from minimal_amkp.data import writers as wr
from minimal_amkp.data.images import frame
from minimal_amkp.classes import CLASSES, BBox
from minimal_amkp.harvest import harvest


@pytest.mark.parametrize("harvested", [False, True])
def test_writers_round_trip(tmp_path, harvested):
    score = (lambda k: 0.5 + k) if harvested else (lambda k: None)
    boxes = [BBox(f"{k:08d}_000.png", k, 1.0 / 3 + k, 2.5, 10.125, 7.0, score(k),
                  k + 1 if harvested else None) for k in range(8)]
    wr.write_bbox_list(tmp_path / "b.csv", boxes)
    assert cx.read_bbox_list(tmp_path / "b.csv") == boxes
    text = (tmp_path / "b.csv").read_text()
    assert ",Infiltrate," in text and ",Infiltration," not in text
    assert text.startswith("Image Index,Finding Label,Bbox [x,y,w,h],")
    entries = [cx.Entry("a.png", label_vector("Mass", "Edema"), 0, 1, 40, "F", "AP", 64, 64,
                        (0.25, 0.25)),
               cx.Entry("b.png", label_vector(), 3, 2, 70, "M", "PA", 64, 64, (1 / 3, 1 / 3))]
    wr.write_data_entry(tmp_path / "d.csv", entries)
    back = cx.read_data_entry(tmp_path / "d.csv")
    assert all(line.endswith(",") for line in (tmp_path / "d.csv").read_text().splitlines())
    for a, b in zip(entries, back):
        assert np.array_equal(a.labels, b.labels)
        assert dataclass_fields(a) == dataclass_fields(b)


def dataclass_fields(e):
    return (e.image, e.follow_up, e.patient_id, e.age, e.gender, e.view, e.width, e.height,
            e.spacing)


def test_names_with_commas_and_quotes_round_trip_through_our_csv_writers(tmp_path):
    names = ['a,b.png', 'say "x".png', "00000001_000.png"]
    boxes = [BBox(n, 0, 1.0, 2.0, 3.0, 4.0, 0.5, 1) for n in names]
    wr.write_bbox_list(tmp_path / "boxes.csv", boxes)
    assert cx.read_bbox_list(tmp_path / "boxes.csv") == boxes
    entries = [cx.Entry(n, label_vector("Mass"), 0, 1, 40, "F", "AP", 64, 64, (0.25, 0.25)) for n in names]
    wr.write_data_entry(tmp_path / "d.csv", entries)
    assert [e.image for e in cx.read_data_entry(tmp_path / "d.csv")] == names


def test_boxes_csv_exact_and_round_trip(tmp_path):
    ds, mining = make_world(tmp_path)
    names = mining["names"]
    boxes = harvest(mining["cams"][0], names, mining["labels"], [frame(ds, n) for n in names], mining["grid"])
    path = tmp_path / "boxes.csv"
    wr.write_boxes_csv(path, boxes)
    lines = path.read_text().splitlines()
    assert lines[0] == "Image Index,Finding Label,Bbox [x,y,w,h],score,rank"
    assert len(lines) == len(boxes) + 1
    for line, b in zip(lines[1:], boxes):
        f = line.split(",")
        assert len(f) == 8, line
        want = "Infiltrate" if CLASSES[b.label] == "Infiltration" else CLASSES[b.label]
        assert f[0] == b.image and f[1] == want and int(f[7]) == b.rank
        assert [float(v) for v in f[2:7]] == [b.x, b.y, b.w, b.h, b.score]
    assert "Infiltrate" in path.read_text()
    assert cx.read_bbox_list(path) == boxes


def test_empty_boxes_csv_keeps_harvest_header(tmp_path):
    path = tmp_path / "boxes.csv"
    wr.write_boxes_csv(path, [])
    assert path.read_text() == "Image Index,Finding Label,Bbox [x,y,w,h],score,rank\n"
    assert cx.read_bbox_list(path) == []
