"""Write ChestX-ray14's CSVs the way the release has them, and the project's own boxes.csv.

The phantom writes Data_Entry_2017.csv and BBox_List_2017.csv with these (and, for the positive
control, lesion_kinds.csv: BBox_List_2017.csv's columns plus kind); a run writes its mined
boxes as boxes.csv (BBox_List_2017.csv's columns plus score and rank). Every file is written
atomically, and chestxray.py's reader reads each of them back to the same entries and boxes.
"""
import csv
import io

import numpy as np

from minimal_amkp.classes import CLASSES, NO_FINDING
from minimal_amkp.data.chestxray import BBOX_HEADER, ENTRY_HEADER, HARVEST_HEADER, KINDS_HEADER
from minimal_amkp.run.atomic import atomic_open, atomic_write_text

BBOX_SPELLING = {"Infiltration": "Infiltrate"}        # Data_Entry's spelling -> BBox_List's


def _csv_lines(header, rows):
    """The header line as given, then rows through the csv module, so a comma or a quote in a
    field is quoted and reads back as itself."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return header + "\n" + buf.getvalue()


def write_data_entry(path, entries):
    """Write Data_Entry_2017.csv in the original 2017 variant (trailing comma), atomically."""
    rows = []
    for e in entries:
        names = sorted(CLASSES[i] for i in np.flatnonzero(e.labels)) or [NO_FINDING]
        rows.append([e.image, "|".join(names), e.follow_up, e.patient_id, e.age, e.gender, e.view,
                     e.width, e.height, repr(e.spacing[0]), repr(e.spacing[1]), ""])
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(_csv_lines(",".join(ENTRY_HEADER) + ",", rows))


def _bbox_row(b):
    """A box's 6 fields of BBox_List_2017.csv, its label in the release's spelling."""
    name = BBOX_SPELLING.get(CLASSES[b.label], CLASSES[b.label])
    return [b.image, name, repr(float(b.x)), repr(float(b.y)), repr(float(b.w)), repr(float(b.h))]


def write_bbox_list(path, boxes):
    """Write boxes as BBox_List_2017.csv (real header, 6-field rows, `Infiltrate`), atomically;
    when the boxes carry scores, as a harvested boxes.csv (8 fields, + score, rank)."""
    harvested = any(b.score is not None for b in boxes)
    header = ",".join(HARVEST_HEADER) if harvested else ",".join(BBOX_HEADER) + ",,,"
    rows = [_bbox_row(b) + ([repr(float(b.score)), int(b.rank)] if harvested else []) for b in boxes]
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(_csv_lines(header, rows))


def write_lesion_kinds(path, boxes, kinds):
    """lesion_kinds.csv, atomically: the rows of BBox_List_2017.csv for `boxes`, in that order,
    each with its kind ("A" or "B", the positive control's lesions) as a 7th field."""
    rows = [_bbox_row(b) + [kind] for b, kind in zip(boxes, kinds, strict=True)]
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(_csv_lines(",".join(KINDS_HEADER), rows))


def write_boxes_csv(path, boxes):
    """boxes.csv: BBox_List_2017.csv columns plus score and rank (write_bbox_list)."""
    if boxes:
        write_bbox_list(path, boxes)
    else:        # write_bbox_list picks its header from the boxes; none still means harvested
        atomic_write_text(path, ",".join(HARVEST_HEADER) + "\n")
