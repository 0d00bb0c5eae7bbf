"""A little ChestX-ray14 release built by hand in the 2017 formats, and the means to write its
files: what the reader, image and writer tests start from."""
import gzip

import numpy as np
from PIL import Image

from minimal_amkp.classes import CLASSES

DE_2017 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
           "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
DE_2020 = DE_2017[:-1]
BBOX_2017 = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
ROWS_2017 = [
    "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143,",
    "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171,",
    "00013118_008.png,Atelectasis|Infiltration,8,13118,069Y,F,AP,3056,2544,0.139,0.139,",
]
BOX_ROWS = [
    "00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,"
    "79.1864406779661",
    "00013118_008.png,Infiltrate,600,100.5,200,300",
]


def label_vector(*names):
    y = np.zeros(len(CLASSES), np.uint8)
    y[[CLASSES.index(n) for n in names]] = 1
    return y


def write(path, lines, newline_at_end=True):
    text = "\n".join(lines) + ("\n" if newline_at_end else "")
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def png(path, size=(1024, 1024), mode="L", value=0):
    Image.new(mode, size, value).save(path)
    return path


def make_root(tmp, entries=ROWS_2017, boxes=BOX_ROWS, train_val=None, test=None,
              entry_name="Data_Entry_2017.csv", size=(1024, 1024)):
    """A complete little release under tmp, in the 2017 formats."""
    (tmp / "images").mkdir(exist_ok=True)
    write(tmp / entry_name, [DE_2017 if "v2020" not in entry_name else DE_2020] + list(entries))
    write(tmp / "BBox_List_2017.csv", [BBOX_2017] + list(boxes))
    names = [r.split(",")[0] for r in entries]
    for n in names:
        png(tmp / "images" / n, size)
    write(tmp / "train_val_list.txt", names[:2] if train_val is None else train_val)
    write(tmp / "test_list.txt", names[2:] if test is None else test, newline_at_end=False)
    return tmp
