"""The ChestX-ray14 reader on hand-built files in the release's formats, and on broken ones."""
import os
import re
import warnings

import numpy as np
import pytest
from release import BBOX_2017, BOX_ROWS, DE_2017, DE_2020, ROWS_2017, label_vector, make_root, write

from minimal_amkp.data import chestxray as cx
from minimal_amkp.data.images import check_images
from minimal_amkp.classes import CLASSES


# ---------------------------------------------------------------- real formats, read right

@pytest.mark.parametrize("header, suffix", [(DE_2017, ".csv"), (DE_2020, ".csv"),
                                            (DE_2017, ".csv.gz"), (DE_2020, ".csv.gz")])
def test_data_entry_variants_give_the_same_entries(tmp_path, header, suffix):
    rows = ROWS_2017 if header == DE_2017 else [r[:-1] for r in ROWS_2017]
    entries = cx.read_data_entry(write(tmp_path / f"Data_Entry_2017{suffix}", [header] + rows))
    assert [e.image for e in entries] == [r.split(",")[0] for r in ROWS_2017]
    assert np.array_equal(entries[0].labels, label_vector("Cardiomegaly"))
    assert np.array_equal(entries[1].labels, label_vector("Cardiomegaly", "Emphysema"))
    assert entries[2].labels.dtype == np.uint8 and not entries[2].labels.any()   # No Finding
    e = entries[3]
    assert np.array_equal(e.labels, label_vector("Atelectasis", "Infiltration"))
    assert (e.follow_up, e.patient_id, e.age, e.gender, e.view) == (8, 13118, 69, "F", "AP")
    assert (e.width, e.height, e.spacing) == (3056, 2544, (0.139, 0.139))


def test_infiltrate_in_data_entry_is_normalised_too(tmp_path):
    path = write(tmp_path / "d.csv", [DE_2020, "a.png,Infiltrate|Mass,0,1,50,M,PA,1,1,0.1,0.1"])
    assert np.array_equal(cx.read_data_entry(path)[0].labels, label_vector("Infiltration", "Mass"))


@pytest.mark.parametrize("header, rows", [
    (BBOX_2017, BOX_ROWS),                                                 # the release
    ("Image Index,Finding Label,Bbox [x,y,w,h]", BOX_ROWS),                # mirror, no commas
    (BBOX_2017, [r + ",,," for r in BOX_ROWS]),                            # rows with commas
    (BBOX_2017, ["00013118_008.png,Atelectasis,225,547,87,79",             # rounded numbers
                 "00013118_008.png,Infiltrate,600,100.5,200,300"]),
])
@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_bbox_list_variants(tmp_path, header, rows, suffix):
    boxes = cx.read_bbox_list(write(tmp_path / f"BBox_List_2017{suffix}", [header] + rows))
    assert [(b.image, CLASSES[b.label]) for b in boxes] == [
        ("00013118_008.png", "Atelectasis"), ("00013118_008.png", "Infiltration")]
    assert boxes[0].x == pytest.approx(225.084745762712, abs=0.5)
    assert boxes[0].h == pytest.approx(79.1864406779661, abs=0.5)
    assert (boxes[1].x, boxes[1].y, boxes[1].w, boxes[1].h) == (600.0, 100.5, 200.0, 300.0)
    assert boxes[0].score is None and boxes[0].rank is None


def test_harvested_boxes_csv_keeps_score_and_rank(tmp_path):
    path = write(tmp_path / "boxes.csv", ["Image Index,Finding Label,Bbox [x,y,w,h],score,rank",
                                          "x.png,Nodule,1.5,2,3,4,0.75,2"])
    (b,) = cx.read_bbox_list(path)
    assert (b.image, CLASSES[b.label], b.x, b.y, b.w, b.h, b.score, b.rank) == (
        "x.png", "Nodule", 1.5, 2.0, 3.0, 4.0, 0.75, 2)


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"])
def test_split_last_line_without_newline(tmp_path, suffix):
    path = write(tmp_path / f"test_list{suffix}", ["a.png", "b.png", "", "c.png"],
                 newline_at_end=False)
    assert cx.read_split(path) == ["a.png", "b.png", "c.png"]


def test_read_dataset_finds_and_cross_checks_the_files(tmp_path):
    ds = cx.read_dataset(make_root(tmp_path))
    assert set(ds.entries) == {r.split(",")[0] for r in ROWS_2017}
    assert ds.train_val == ["00000001_000.png", "00000001_001.png"]
    assert ds.test == ["00000002_000.png", "00013118_008.png"]
    assert [CLASSES[b.label] for b in ds.boxes["00013118_008.png"]] == ["Atelectasis",
                                                                        "Infiltration"]
    assert ds.image_path("x.png") == os.path.join(str(tmp_path), "images", "x.png")
    assert check_images(ds, ds.train_val + ds.test) == ds.train_val + ds.test


def test_read_dataset_prefers_v2020_and_accepts_gzip(tmp_path):
    make_root(tmp_path, entry_name="Data_Entry_2017_v2020.csv.gz",
              entries=[r[:-1] for r in ROWS_2017])
    write(tmp_path / "Data_Entry_2017.csv", ["garbage header"])
    assert len(cx.read_dataset(tmp_path).entries) == 4


# ---------------------------------------------------------------- broken input, clear errors

def bad_csv(tmp_path, header, rows, name="f.csv"):
    return write(tmp_path / name, [header] + rows)


@pytest.mark.parametrize("reader, header, rows, message", [
    (cx.read_data_entry, "Image Index,Labels", [], r"f\.csv line 1: unknown header"),
    (cx.read_bbox_list, "Image Index,Finding Label,Bbox", [], r"f\.csv line 1: unknown header"),
    (cx.read_data_entry, DE_2017, ["a.png,Pneumonitis,0,1,50,M,PA,1,1,0.1,0.1,"],
     r"f\.csv line 2: unknown label 'Pneumonitis'"),
    (cx.read_data_entry, DE_2017, ["a.png,No Finding|Mass,0,1,50,M,PA,1,1,0.1,0.1,"],
     r"line 2: 'No Finding' together with other labels"),
    (cx.read_data_entry, DE_2017, ["a.png,Mass,0,1,50"],
     r"line 2: too few fields: expected 11, got 5"),
    (cx.read_data_entry, DE_2017, ["a.png,Mass,0,1,5x,M,PA,1,1,0.1,0.1,"],
     r"line 2: Patient Age '5x' is not a whole number"),
    (cx.read_data_entry, DE_2017, ["a.png,Mass,0,1,50,M,PA,1,1,0.1,0.1,",
                                   "a.png,Mass,1,1,50,M,PA,1,1,0.1,0.1,"],
     r"line 3: a\.png is listed twice"),
    (cx.read_bbox_list, BBOX_2017, ["a.png,Nodule,1,2,3"],
     r"line 2: too few fields: expected 6, got 5"),
    (cx.read_bbox_list, BBOX_2017, ["a.png,Nodule,1,2,0,4"],
     r"line 2: box \(1.0, 2.0, 0.0, 4.0\) has a non-positive size"),
    (cx.read_bbox_list, BBOX_2017, ["a.png,Nodule,1,2,-3,4"], r"line 2: .* non-positive size"),
    (cx.read_bbox_list, BBOX_2017, ["a.png,Nodule,-10,2,3,4"],
     r"line 2: .* starts outside the image"),
    (cx.read_bbox_list, BBOX_2017, ["a.png,Edema,1,2,3,4"],
     r"line 2: label 'Edema' is not one of the 8 box classes"),
    (cx.read_bbox_list, BBOX_2017, ["a.png,Nodules,1,2,3,4"], r"line 2: unknown label 'Nodules'"),
    (cx.read_bbox_list, BBOX_2017, ["a.png,Nodule,1,2,nan,4"],
     r"line 2: w 'nan' is not a finite number"),
])
def test_bad_csv_rows_name_file_line_and_problem(tmp_path, reader, header, rows, message):
    with pytest.raises(cx.DataError, match=message):
        reader(bad_csv(tmp_path, header, rows))


def test_unreadable_files(tmp_path):
    with pytest.raises(cx.DataError, match=r"nope\.csv: file not found"):
        cx.read_data_entry(tmp_path / "nope.csv")
    (tmp_path / "x.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(cx.DataError, match=r"x\.csv\.gz: cannot read"):
        cx.read_bbox_list(tmp_path / "x.csv.gz")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(cx.DataError, match=r"e\.csv: empty file"):
        cx.read_data_entry(tmp_path / "e.csv")


def test_empty_and_duplicated_splits(tmp_path):
    with pytest.raises(cx.DataError, match=r"t\.txt: empty split list"):
        cx.read_split(write(tmp_path / "t.txt", ["", "  "]))
    with pytest.raises(cx.DataError, match=r"u\.txt line 3: a\.png is listed twice"):
        cx.read_split(write(tmp_path / "u.txt", ["a.png", "b.png", "a.png"]))


@pytest.mark.parametrize("change, message", [
    (dict(boxes=["99999999_000.png,Mass,1,2,3,4"]),
     r"BBox_List_2017\.csv line 2: box for 99999999_000\.png, "
     r"which Data_Entry_2017\.csv does not list"),
    (dict(boxes=["00013118_008.png,Mass,1000,2,30,4"]),
     r"line 2: box \(1000.0, 2.0, 30.0, 4.0\) lies outside the 1024x1024 image 00013118_008\.png"),
    (dict(test=["00000002_000.png", "00099999_000.png"]),
     r"test_list\.txt: 00099999_000\.png is not listed in Data_Entry_2017\.csv"),
    (dict(train_val=["00000001_000.png", "00000002_000.png"]),
     r"train_val_list\.txt: 00000002_000\.png is also in test_list\.txt"),
    (dict(test=[]), r"test_list\.txt: empty split list"),
])
def test_read_dataset_cross_check_errors(tmp_path, change, message):
    with pytest.raises(cx.DataError, match=message):
        cx.read_dataset(make_root(tmp_path, **change))


def test_box_within_slack_is_accepted(tmp_path):
    ds = cx.read_dataset(make_root(tmp_path, boxes=["00013118_008.png,Mass,1000,-1.5,25.5,4"]))
    assert len(ds.boxes["00013118_008.png"]) == 1


def test_read_dataset_missing_pieces(tmp_path):
    with pytest.raises(cx.DataError, match=r"dataset folder not found"):
        cx.read_dataset(tmp_path / "nowhere")
    with pytest.raises(cx.DataError, match=r"no images/ folder"):
        cx.read_dataset(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(cx.DataError, match=r"none of Data_Entry_2017_v2020\.csv\[\.gz\], "
                                           r"Data_Entry_2017\.csv\[\.gz\] found"):
        cx.read_dataset(tmp_path)
    make_root(tmp_path)
    os.remove(tmp_path / "BBox_List_2017.csv")
    with pytest.raises(cx.DataError, match=r"none of BBox_List_2017\.csv\[\.gz\] found"):
        cx.read_dataset(tmp_path)


def test_skip_bad_drops_each_problem_with_one_warning_and_a_count(tmp_path):
    rows = ROWS_2017 + ["00000003_000.png,Pneumonitis,0,3,50,M,PA,1,1,0.1,0.1,"]
    boxes = BOX_ROWS + ["99999999_000.png,Mass,1,2,3,4", "00013118_008.png,Mass,1,2,0,4"]
    make_root(tmp_path, entries=rows, boxes=boxes, test=["00000002_000.png",
                                                         "00013118_008.png", "00000003_000.png"])
    with pytest.raises(cx.DataError):
        cx.read_dataset(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = cx.read_dataset(tmp_path, skip_bad=True)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 5, messages
    for part, message in zip(["unknown label 'Pneumonitis'", "non-positive size",
                              "box for 99999999_000.png", "00000003_000.png is not listed"],
                             messages):
        assert message.startswith("skipped: ") and part in message
    assert messages[4].endswith("skipped 4 bad item(s), see the warnings above")
    assert len(ds.entries) == 4 and len(ds.boxes["00013118_008.png"]) == 2
    assert ds.test == ["00000002_000.png", "00013118_008.png"]


# ---------------------------------------------------------------- hostile names

@pytest.mark.parametrize("name", ["q/-.png", "q/../../../X.png", "/etc/passwd", "..", ".", "a\\b.png",
                                  "x..png", "=HYPERLINK(1).png", "-1+2.png", "@x.png", "a\tb.png"])
def test_only_plain_image_names_are_read(tmp_path, name):
    quoted = '"' + name.replace('"', '""') + '"'
    entry = write(tmp_path / "d.csv", [DE_2017, f"{quoted},Mass,0,1,50,M,PA,1,1,0.1,0.1,"])
    with pytest.raises(cx.DataError, match=r"d\.csv line 2: image name .* (not a plain file name|control "
                                           r"character|spreadsheet reads as a formula)"):
        cx.read_data_entry(entry)
    boxes = write(tmp_path / "b.csv", [BBOX_2017, f"{quoted},Mass,1,2,3,4"])
    with pytest.raises(cx.DataError, match=r"b\.csv line 2: image name"):
        cx.read_bbox_list(boxes)
    split = write(tmp_path / "s.txt", ["00000001_000.png", name])
    with pytest.raises(cx.DataError, match=r"s\.txt line 2: image name"):
        cx.read_split(split)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cx.read_split(split, skip_bad=True) == ["00000001_000.png"]
    assert re.search(r"^skipped: .*s\.txt line 2: image name", str(caught[0].message)) and len(caught) == 2


def test_a_traversing_name_in_a_release_is_refused_or_skipped(tmp_path):
    rows = ROWS_2017 + ["q/../../../X.png,Mass,0,5,50,M,PA,1,1,0.1,0.1,"]
    make_root(tmp_path, entries=ROWS_2017, boxes=BOX_ROWS + ["q/-.png,Mass,1,2,3,4"])
    write(tmp_path / "Data_Entry_2017.csv", [DE_2017] + rows)
    with pytest.raises(cx.DataError, match=r"Data_Entry_2017\.csv line 6: image name 'q/\.\./\.\./\.\./X\.png' "
                                           r"is not a plain file name"):
        cx.read_dataset(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = cx.read_dataset(tmp_path, skip_bad=True)
    assert len(caught) == 3 and "skipped 2 bad item(s)" in str(caught[-1].message)
    assert set(ds.entries) == {r.split(",")[0] for r in ROWS_2017}
    assert all("/" not in b.image for bs in ds.boxes.values() for b in bs)


KINDS_HEAD = "Image Index,Finding Label,Bbox [x,y,w,h],kind"


def test_lesion_kinds_read_back_row_for_row_with_bbox_list(tmp_path):
    root = make_root(tmp_path)
    assert cx.read_dataset(root).kinds is None                       # v2 and the release: no file
    write(root / cx.LESION_KINDS, [KINDS_HEAD, BOX_ROWS[0] + ",A", BOX_ROWS[1] + ",B"])
    ds = cx.read_dataset(root)
    assert [k for _, k in ds.kinds] == ["A", "B"]
    assert [b for b, _ in ds.kinds] == ds.boxes["00013118_008.png"]


@pytest.mark.parametrize("rows, message", [
    ([KINDS_HEAD, BOX_ROWS[0] + ",A"], r"lesion_kinds\.csv: 1 boxes, but BBox_List_2017\.csv has 2$"),
    ([KINDS_HEAD, BOX_ROWS[0] + ",A", BOX_ROWS[1] + ",C"], r"lesion_kinds\.csv line 3: kind 'C' is not one of A, B$"),
    ([KINDS_HEAD, BOX_ROWS[1] + ",A", BOX_ROWS[0] + ",B"],
     r"lesion_kinds\.csv line 2: 00013118_008\.png Infiltrate \(600\.0, 100\.5, 200\.0, 300\.0\) is not the box "
     r"on the same row of BBox_List_2017\.csv$"),
    ([KINDS_HEAD, BOX_ROWS[0], BOX_ROWS[1] + ",B"], r"lesion_kinds\.csv line 2: too few fields: expected 7, got 6$"),
    ([BBOX_2017, BOX_ROWS[0] + ",A", BOX_ROWS[1] + ",B"], r"lesion_kinds\.csv line 1: unknown header"),
])
def test_a_malformed_lesion_kinds_file_is_one_data_error_line(tmp_path, rows, message):
    root = make_root(tmp_path)
    write(root / cx.LESION_KINDS, rows)
    with pytest.raises(cx.DataError) as e:
        cx.read_dataset(root, skip_bad=True)                         # which lesion is which is never skipped
    assert re.search(message, str(e.value)) and "\n" not in str(e.value), str(e.value)
