"""Read the NIH ChestX-ray14 release (and the phantom, which copies its format exactly).

Files under a dataset root (docs/chestxray14.md has the facts):
    Data_Entry_2017[_v2020].csv        one row per image, labels `A|B` or `No Finding`
    BBox_List_2017.csv                 one row per box (x, y, w, h), 1024-px image frame
    train_val_list.txt, test_list.txt  one image name per line
    images/*.png                       8-bit grayscale (a few RGBA; some users keep 16-bit)
    lesion_kinds.csv                   the phantom's positive control only: BBox_List's rows,
                                       each with its kind, A or B (phantom/sibling.py)
Every CSV may also be gzipped (`.csv.gz`). Bad input raises `DataError` naming the file, the line
and what is wrong; with `skip_bad=True` the bad row, box or image is dropped instead, with one
warning per problem and a count at the end. The images themselves are checked and loaded by
data/images.py; data/writers.py writes these files back.

Hostile input: an image name must be a plain file name (`plain_name`), so no name can reach a
file outside images/ or make an output land outside the run's folder; an image must decode
completely and hold at most images.MAX_PIXELS pixels (`images.check_images` decodes each one up
front).
"""
import csv
import dataclasses
import gzip
import io
import math
import os
import warnings

import numpy as np

from minimal_amkp.classes import BOX_CLASSES, CLASSES, NO_FINDING, BBox
from minimal_amkp.config import RunError

# The bracketed column names contain commas, so a CSV reader splits them; trailing empty
# fields (the 2017 files end every line with a comma) are dropped before comparing.
ENTRY_HEADER = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
                "OriginalImagePixelSpacing[x", "y]")
BBOX_HEADER = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")
HARVEST_HEADER = BBOX_HEADER + ("score", "rank")      # the project's own mined boxes.csv
KINDS_HEADER = BBOX_HEADER + ("kind",)                # the positive control's lesion_kinds.csv
LESION_KINDS = "lesion_kinds.csv"
KINDS = ("A", "B")
ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")   # the corrected one first
ALIASES = {"Infiltrate": "Infiltration"}              # BBox_List's spelling -> Data_Entry's
# Rounded mirrors and float round-off move a box edge by under a pixel; 2 px tolerates that
# and still catches a box drawn in the wrong frame.
BOX_SLACK = 2.0
# Here, not in images.py, because read_dataset checks each box against its PNG's header.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A leading = + - @ makes a spreadsheet read the cell as a formula; no real name starts so.
FORMULA_START = ("=", "+", "-", "@")
_INDEX = {name: i for i, name in enumerate(CLASSES)}


class DataError(RunError, ValueError):
    """A dataset file is missing, malformed or inconsistent; the message says where and why.
    A RunError, so a run reports it in one line like any other problem the user must fix."""


@dataclasses.dataclass(frozen=True, eq=False)
class Entry:
    """One Data_Entry row. width/height are OriginalImage[Width,Height], the scan's size before
    NIH resized it to the 1024-px PNG (boxes are in the PNG's frame, not this one); the phantom
    writes its PNG size there."""
    image: str
    labels: np.ndarray          # (14,) uint8 multi-hot in CLASSES order; all zero = No Finding
    follow_up: int
    patient_id: int
    age: int
    gender: str
    view: str
    width: int
    height: int
    spacing: tuple



@dataclasses.dataclass
class ChestXray14:
    root: str
    entries: dict               # image name -> Entry
    boxes: dict                 # image name -> list[BBox]
    train_val: list
    test: list
    digests: dict = dataclasses.field(default_factory=dict)   # name -> CRC-32 of its file (check_images)
    skipped: list = dataclasses.field(default_factory=list)   # names check_images dropped (skip_bad)
    kinds: list | None = None   # [(BBox, "A" or "B")] from lesion_kinds.csv; None without one

    def image_path(self, name):
        return os.path.join(self.root, "images", name)


class Problems:
    """Raise the first problem, or (skip_bad) warn once per problem and count them."""

    def __init__(self, skip_bad):
        self.skip_bad, self.count = skip_bad, 0

    def __call__(self, message):
        if not self.skip_bad:
            raise DataError(message)
        self.count += 1
        warnings.warn(f"skipped: {message}", stacklevel=3)

    def done(self, what):
        if self.count:
            warnings.warn(f"{what}: skipped {self.count} bad item(s), see the warnings above",
                          stacklevel=3)


def _read_text(path):
    try:
        with (gzip.open(path) if str(path).endswith(".gz") else open(path, "rb")) as f:
            return f.read().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _rows(path):
    """[(line number, fields)] of the non-blank lines of a CSV or CSV.gz."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        return [(reader.line_num, row) for row in reader if "".join(row).strip()]
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: {e}") from None


def _header(path, rows, variants):
    if not rows:
        raise DataError(f"{path}: empty file, expected a header line")
    line, row = rows[0]
    got = tuple(f.strip() for f in row)
    while got and not got[-1]:
        got = got[:-1]
    for name, header in variants.items():
        if got == header:
            return name
    expected = " or ".join(repr(",".join(h)) for h in variants.values())
    raise DataError(f"{path} line {line}: unknown header {','.join(row)!r}, expected {expected}")


def _fields(row, n):
    """The first n fields of a row whose remaining fields are empty (trailing commas)."""
    if len(row) < n:
        raise DataError(f"too few fields: expected {n}, got {len(row)}")
    if "".join(row[n:]).strip():
        raise DataError(f"too many fields: expected {n}, got {len(row)}")
    return [f.strip() for f in row[:n]]


def plain_name(name):
    """None if `name` is a plain file name, else what is wrong with it.

    Names are joined to images/ to read an image and to figures/ to write one, so a path
    separator, `..` or an absolute name would reach outside those folders. Control characters
    cannot survive the one-name-per-line split lists; a leading = + - @ is a spreadsheet formula.
    """
    if not name:
        return "an empty image name"
    if "/" in name or "\\" in name or ".." in name or name == ".":
        return f"image name {name!r} is not a plain file name (no path separator or '..' allowed)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"image name {name!r} holds a control character"
    if name.startswith(FORMULA_START):
        return f"image name {name!r} starts with {name[0]!r}, which a spreadsheet reads as a formula"
    return None


def _name(text):
    problem = plain_name(text)
    if problem:
        raise DataError(problem)
    return text


def _int(column, text):
    # Some copies write ages as `058Y`.
    digits = text[:-1] if column == "Patient Age" and text.endswith("Y") else text
    if not (digits.isascii() and digits.isdigit()):
        raise DataError(f"{column} {text!r} is not a whole number")
    return int(digits)


def _float(column, text):
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise DataError(f"{column} {text!r} is not a finite number")
    return v


def _label(text):
    name = ALIASES.get(text, text)
    if name not in _INDEX:
        raise DataError(f"unknown label {text!r}, expected one of {', '.join(CLASSES)} or "
                        f"{NO_FINDING}")
    return _INDEX[name]


def _labels(text):
    y = np.zeros(len(CLASSES), np.uint8)                                  # (14,)
    names = [s.strip() for s in text.split("|")]
    if names == [NO_FINDING]:
        return y
    if NO_FINDING in names:
        raise DataError(f"{NO_FINDING!r} together with other labels in {text!r}")
    for name in names:
        y[_label(name)] = 1
    return y


def _entry(row):
    f = _fields(row, len(ENTRY_HEADER))
    return Entry(image=_name(f[0]), labels=_labels(f[1]), follow_up=_int("Follow-up #", f[2]),
                 patient_id=_int("Patient ID", f[3]), age=_int("Patient Age", f[4]),
                 gender=f[5], view=f[6], width=_int("OriginalImage Width", f[7]),
                 height=_int("OriginalImage Height", f[8]),
                 spacing=(_float("PixelSpacing x", f[9]), _float("PixelSpacing y", f[10])))


def _bbox(row, harvested):
    f = _fields(row, len(HARVEST_HEADER if harvested else BBOX_HEADER))
    label = _label(f[1])
    if label >= len(BOX_CLASSES):
        raise DataError(f"label {f[1]!r} is not one of the 8 box classes {', '.join(BOX_CLASSES)}")
    x, y, w, h = (_float(c, t) for c, t in zip("xywh", f[2:6]))
    if w <= 0 or h <= 0:
        raise DataError(f"box ({x}, {y}, {w}, {h}) has a non-positive size")
    if x < -BOX_SLACK or y < -BOX_SLACK:
        raise DataError(f"box ({x}, {y}, {w}, {h}) starts outside the image")
    score, rank = (_float("score", f[6]), _int("rank", f[7])) if harvested else (None, None)
    return BBox(_name(f[0]), label, x, y, w, h, score, rank)


def _read_data_entry(path, bad):
    rows = _rows(path)
    _header(path, rows, {"Data_Entry": ENTRY_HEADER})
    entries = {}
    for line, row in rows[1:]:
        try:
            e = _entry(row)
        except DataError as err:
            bad(f"{path} line {line}: {err}")
            continue
        if e.image in entries:
            bad(f"{path} line {line}: {e.image} is listed twice")
            continue
        entries[e.image] = e
    return list(entries.values())


def _read_bbox_list(path, bad):
    """[(line number, BBox)]."""
    rows = _rows(path)
    harvested = _header(path, rows, {"BBox_List": BBOX_HEADER, "boxes": HARVEST_HEADER}) == "boxes"
    out = []
    for line, row in rows[1:]:
        try:
            out.append((line, _bbox(row, harvested)))
        except DataError as err:
            bad(f"{path} line {line}: {err}")
    return out


def _read_split(path, bad):
    names, seen = [], set()
    for line, text in enumerate(_read_text(path).splitlines(), 1):
        name = text.strip()
        problem = plain_name(name) if name else None
        if problem:
            bad(f"{path} line {line}: {problem}")
        elif name in seen:
            bad(f"{path} line {line}: {name} is listed twice")
        elif name:
            names.append(name)
            seen.add(name)
    if not names:
        raise DataError(f"{path}: empty split list, expected one image name per line")
    return names


def _read(fn, path, skip_bad):
    bad = Problems(skip_bad)
    out = fn(path, bad)
    bad.done(str(path))
    return out


def read_data_entry(path, skip_bad=False):
    """Data_Entry_2017.csv (2017 or v2020 variant, optionally .gz) -> list[Entry]."""
    return _read(_read_data_entry, path, skip_bad)


def read_bbox_list(path, skip_bad=False):
    """BBox_List_2017.csv (any mirror) or a harvested boxes.csv, optionally .gz -> list[BBox]."""
    return [b for _, b in _read(_read_bbox_list, path, skip_bad)]


def read_lesion_kinds(path, listed):
    """lesion_kinds.csv -> [(BBox, kind)], checked row for row against `listed`, the boxes of
    BBox_List_2017.csv in its order; a malformed or mismatched file is a DataError (never
    skipped: which lesion is which is what the positive control measures)."""
    rows = _rows(path)
    _header(path, rows, {"lesion_kinds": KINDS_HEADER})
    if len(rows) - 1 != len(listed):
        raise DataError(f"{path}: {len(rows) - 1} boxes, but BBox_List_2017.csv has {len(listed)}")
    out = []
    for (line, row), want in zip(rows[1:], listed):
        try:
            f = _fields(row, len(KINDS_HEADER))
            box = _bbox(f[:len(BBOX_HEADER)], harvested=False)
        except DataError as err:
            raise DataError(f"{path} line {line}: {err}") from None
        if f[-1] not in KINDS:
            raise DataError(f"{path} line {line}: kind {f[-1]!r} is not one of {', '.join(KINDS)}")
        if box != want:
            raise DataError(f"{path} line {line}: {box.image} {f[1]} ({box.x}, {box.y}, {box.w}, {box.h}) "
                            "is not the box on the same row of BBox_List_2017.csv")
        out.append((box, f[-1]))
    return out


def read_split(path, skip_bad=False):
    """train_val_list.txt / test_list.txt (optionally .gz) -> list of image names."""
    return _read(_read_split, path, skip_bad)


def _find(root, names):
    for name in names:
        for candidate in (name, name + ".gz"):
            if os.path.isfile(os.path.join(root, candidate)):
                return os.path.join(root, candidate)
    raise DataError(f"{root}: none of {', '.join(n + '[.gz]' for n in names)} found")


def png_size(path):
    """(width, height) from the IHDR chunk, or None when the file is missing or not a PNG."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def box_outside(box, width, height):
    """Whether box (x, y, w, h) reaches more than BOX_SLACK px outside a width x height image."""
    x, y, w, h = box
    return (x < -BOX_SLACK or y < -BOX_SLACK or x + w > width + BOX_SLACK
            or y + h > height + BOX_SLACK)


def read_dataset(root, skip_bad=False):
    """Find and read a ChestX-ray14 layout under root, cross-checking the files.

    Checks: every box's image is in Data_Entry and the box lies inside that image's PNG (for
    PNGs present; `images.check_images` finds missing ones), every split name is in Data_Entry,
    the splits do not overlap and neither is empty. The positive control's lesion_kinds.csv,
    where there is one, goes to ds.kinds (read_lesion_kinds).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"{root}: dataset folder not found")
    if not os.path.isdir(os.path.join(root, "images")):
        raise DataError(f"{root}: no images/ folder")
    entry_path = _find(root, ENTRY_FILES)
    bbox_path = _find(root, ("BBox_List_2017.csv",))
    split_paths = _find(root, ("train_val_list.txt",)), _find(root, ("test_list.txt",))
    bad = Problems(skip_bad)
    entries = {e.image: e for e in _read_data_entry(entry_path, bad)}
    ds = ChestXray14(root, entries, {}, [], [])
    listed = _read_bbox_list(bbox_path, bad)
    if os.path.isfile(os.path.join(root, LESION_KINDS)):
        ds.kinds = read_lesion_kinds(os.path.join(root, LESION_KINDS), [b for _, b in listed])
    for line, b in listed:
        if b.image not in entries:
            bad(f"{bbox_path} line {line}: box for {b.image}, which "
                f"{os.path.basename(entry_path)} does not list")
            continue
        size = png_size(ds.image_path(b.image))
        if size and box_outside((b.x, b.y, b.w, b.h), *size):
            bad(f"{bbox_path} line {line}: box ({b.x}, {b.y}, {b.w}, {b.h}) lies outside the "
                f"{size[0]}x{size[1]} image {b.image}")
            continue
        ds.boxes.setdefault(b.image, []).append(b)
    train_val, test = (_read_split(p, bad) for p in split_paths)
    for names, path in ((train_val, split_paths[0]), (test, split_paths[1])):
        for name in names:
            if name not in entries:
                bad(f"{path}: {name} is not listed in {os.path.basename(entry_path)}")
    in_test = set(test)
    for name in train_val:
        if name in in_test:
            bad(f"{split_paths[0]}: {name} is also in {os.path.basename(split_paths[1])}")
    ds.train_val = [n for n in train_val if n in entries and n not in in_test]
    ds.test = [n for n in test if n in entries]
    for names, path in ((ds.train_val, split_paths[0]), (ds.test, split_paths[1])):
        if not names:
            raise DataError(f"{path}: no usable image names left")
    bad.done(root)
    return ds
