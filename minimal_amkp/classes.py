"""The ChestX-ray14 class order used everywhere in this project, and `BBox`, one box of one class.

The 14 classes of Data_Entry_2017.csv ("No Finding" is the absence of all of them), ordered
so that the 8 classes that have hand-drawn boxes in BBox_List_2017.csv come first, in the
column order of the paper's Tables 1-3 (AT, CM, Effusion, Infiltration, Mass, Nodule, PNA,
PTx). A multi-hot label vector `y` of shape (14,) indexes this tuple; `y[:8]` are the box
classes that attention mining and the localization metric cover. A `BBox` is one row of
BBox_List_2017.csv (a hand-drawn box) or of a harvested boxes.csv (a mined one, scored and ranked).
"""
import dataclasses

CLASSES = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration",
    "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
BOX_CLASSES = CLASSES[:8]
NO_FINDING = "No Finding"
# The paper's column headings, for tables.
SHORT_NAMES = ("AT", "CM", "Effusion", "Infiltrat.", "Mass", "Nodule", "PNA", "PTx")


@dataclasses.dataclass(frozen=True)
class BBox:
    """One box, (x, y) its top-left corner, in the pixel frame of the image's PNG."""
    image: str
    label: int                  # index into CLASSES, < 8
    x: float
    y: float
    w: float
    h: float
    score: float | None = None  # only in harvested boxes.csv
    rank: int | None = None
