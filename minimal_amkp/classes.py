"""The ChestX-ray14 class order used everywhere in this project.

The 14 classes of Data_Entry_2017.csv ("No Finding" is the absence of all of them), ordered
so that the 8 classes that have hand-drawn boxes in BBox_List_2017.csv come first, in the
column order of the paper's Tables 1-3 (AT, CM, Effusion, Infiltration, Mass, Nodule, PNA,
PTx). A multi-hot label vector `y` of shape (14,) indexes this tuple; `y[:8]` are the box
classes that attention mining and the localization metric cover.
"""

CLASSES = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration",
    "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
BOX_CLASSES = CLASSES[:8]
NO_FINDING = "No Finding"
# The paper's column headings, for tables.
SHORT_NAMES = ("AT", "CM", "Effusion", "Infiltrat.", "Mass", "Nodule", "PNA", "PTx")
