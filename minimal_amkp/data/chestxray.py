"""Read the NIH ChestX-ray14 release (and the phantom, which copies its format exactly).

Files under a dataset root (see /work/shared/chestxray14.md for the facts):
    Data_Entry_2017[_v2020].csv        one row per image, labels `A|B` or `No Finding`
    BBox_List_2017.csv                 one row per box (x, y, w, h), 1024-px image frame
    train_val_list.txt, test_list.txt  one image name per line
    images/*.png                       8-bit grayscale (a few RGBA; some users keep 16-bit)
Every CSV may also be gzipped (`.csv.gz`). Bad input raises `DataError` naming the file, the line
and what is wrong; with `skip_bad=True` the bad row, box or image is dropped instead, with one
warning per problem and a count at the end.

Hostile input: an image name must be a plain file name (`plain_name`), so no name can reach a
file outside images/ or make an output land outside the run's folder; an image must decode
completely and hold at most MAX_PIXELS pixels (`check_images` decodes each one up front).
"""
import csv
import dataclasses
import gzip
import io
import math
import os
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from minimal_amkp.run.atomic import atomic_open
from minimal_amkp.classes import BOX_CLASSES, CLASSES, NO_FINDING, BBox
from minimal_amkp.config import RunError
from minimal_amkp.reference.checks import positive_int

# The bracketed column names contain commas, so a CSV reader splits them; trailing empty
# fields (the 2017 files end every line with a comma) are dropped before comparing.
ENTRY_HEADER = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
                "OriginalImagePixelSpacing[x", "y]")
BBOX_HEADER = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")
HARVEST_HEADER = BBOX_HEADER + ("score", "rank")      # the project's own mined boxes.csv
ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")   # the corrected one first
ALIASES = {"Infiltrate": "Infiltration"}              # BBox_List's spelling -> Data_Entry's
BBOX_SPELLING = {"Infiltration": "Infiltrate"}
# Rounded mirrors and float round-off move a box edge by under a pixel; 2 px tolerates that
# and still catches a box drawn in the wrong frame.
BOX_SLACK = 2.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_TRAILER = b"\x00\x00\x00\x00IEND\xaeB`\x82"       # the empty IEND chunk every PNG ends with
# The released PNGs are 1024x1024 and the largest original film in Data_Entry is 3827x3567
# (13.7 MP), so 4096x4096 admits every image of the release, and the originals should a user
# keep them, while a 20000x20000 header (a decompression bomb: 400 MP, 1.6 GB as float32) is
# refused before any pixel is decoded. A decoded image then costs at most 64 MiB as float32.
MAX_PIXELS = 4096 * 4096
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

    def image_path(self, name):
        return os.path.join(self.root, "images", name)


class _Problems:
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
    bad = _Problems(skip_bad)
    out = fn(path, bad)
    bad.done(str(path))
    return out


def read_data_entry(path, skip_bad=False):
    """Data_Entry_2017.csv (2017 or v2020 variant, optionally .gz) -> list[Entry]."""
    return _read(_read_data_entry, path, skip_bad)


def read_bbox_list(path, skip_bad=False):
    """BBox_List_2017.csv (any mirror) or a harvested boxes.csv, optionally .gz -> list[BBox]."""
    return [b for _, b in _read(_read_bbox_list, path, skip_bad)]


def read_split(path, skip_bad=False):
    """train_val_list.txt / test_list.txt (optionally .gz) -> list of image names."""
    return _read(_read_split, path, skip_bad)


def _find(root, names):
    for name in names:
        for candidate in (name, name + ".gz"):
            if os.path.isfile(os.path.join(root, candidate)):
                return os.path.join(root, candidate)
    raise DataError(f"{root}: none of {', '.join(n + '[.gz]' for n in names)} found")


def _png_size(path):
    """(width, height) from the IHDR chunk, or None when the file is missing or not a PNG."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _too_large(width, height):
    if width * height > MAX_PIXELS:
        return (f"{width}x{height} pixels, more than the {MAX_PIXELS} (4096x4096) this reader accepts "
                "(ChestX-ray14's largest film is 3827x3567)")
    return None


def png_frame(path):
    """(width, height) of a PNG from its header alone: the frame its boxes are in."""
    size = _png_size(path)
    if size is None:
        if not os.path.exists(path):
            raise DataError(f"{path}: image not found")
        raise DataError(f"{path}: not a PNG file")
    problem = _too_large(*size)
    if problem:
        raise DataError(f"{path}: {problem}")
    return size


def _outside(box, width, height):
    x, y, w, h = box
    return (x < -BOX_SLACK or y < -BOX_SLACK or x + w > width + BOX_SLACK
            or y + h > height + BOX_SLACK)


def read_dataset(root, skip_bad=False):
    """Find and read a ChestX-ray14 layout under root, cross-checking the files.

    Checks: every box's image is in Data_Entry and the box lies inside that image's PNG (for
    PNGs present; `check_images` finds missing ones), every split name is in Data_Entry, the
    splits do not overlap and neither is empty.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"{root}: dataset folder not found")
    if not os.path.isdir(os.path.join(root, "images")):
        raise DataError(f"{root}: no images/ folder")
    entry_path = _find(root, ENTRY_FILES)
    bbox_path = _find(root, ("BBox_List_2017.csv",))
    split_paths = _find(root, ("train_val_list.txt",)), _find(root, ("test_list.txt",))
    bad = _Problems(skip_bad)
    entries = {e.image: e for e in _read_data_entry(entry_path, bad)}
    ds = ChestXray14(root, entries, {}, [], [])
    for line, b in _read_bbox_list(bbox_path, bad):
        if b.image not in entries:
            bad(f"{bbox_path} line {line}: box for {b.image}, which "
                f"{os.path.basename(entry_path)} does not list")
            continue
        size = _png_size(ds.image_path(b.image))
        if size and _outside((b.x, b.y, b.w, b.h), *size):
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


def _crc(path):
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _check_png(path):
    """(None, CRC-32 of the file) if path holds a complete PNG that decodes, else (what is wrong, None).

    Cheap tests first (24 bytes at the start, the IEND chunk every PNG ends with, the size in
    its header), then a full decode: damage in the middle of a file shows only there, and
    found now it cannot stop a run hours in.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            f.seek(max(0, os.fstat(f.fileno()).st_size - len(PNG_TRAILER)))
            tail = f.read()
        if head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
            return "not a PNG file", None
        if tail != PNG_TRAILER or len(head) < 24:
            return "truncated PNG file (no IEND at the end)", None
        crc = _crc(path)
    except FileNotFoundError:
        return "missing", None
    except OSError as e:
        return f"unreadable ({e.strerror or e})", None
    try:
        _decode(path)
    except DataError as e:
        return str(e).removeprefix(f"{path}: "), None
    return None, crc


def check_images(ds, names, workers=2, skip_bad=False):
    """Check, in parallel, that every named image is a complete PNG that decodes; return the good names.

    Raises DataError naming the bad files, or with skip_bad drops them with one warning each.
    Records each good file's CRC-32 in ds.digests (a resumed run compares them) and the
    dropped names in ds.skipped.
    """
    positive_int("workers", workers)
    names = list(names)
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda n: _check_png(ds.image_path(n)), names))
    bad_ones = [(n, p) for n, (p, _) in zip(names, results) if p]
    if bad_ones and not skip_bad:
        shown = "; ".join(f"{ds.image_path(n)}: {p}" for n, p in bad_ones[:5])
        more = f" (and {len(bad_ones) - 5} more)" if len(bad_ones) > 5 else ""
        raise DataError(f"{len(bad_ones)} bad image(s): {shown}{more}")
    bad = _Problems(True)
    for n, p in bad_ones:
        bad(f"{ds.image_path(n)}: {p}")
    bad.done(os.path.join(ds.root, "images"))
    ds.skipped += [n for n, _ in bad_ones]
    ds.digests.update((n, crc) for n, (p, crc) in zip(names, results) if not p)
    return [n for n, (p, _) in zip(names, results) if not p]


def _gray(im, path):
    """PIL image -> float32 (H, W) in [0, 1]."""
    if im.mode.startswith("I;16") or im.mode == "I":          # 16-bit PNGs
        return np.clip(np.asarray(im, np.float32) / 65535.0, 0.0, 1.0)
    if im.mode in ("L", "LA", "RGB", "RGBA", "P", "PA", "1"):
        return np.asarray(im.convert("L"), np.float32) / 255.0
    raise DataError(f"{path}: unsupported image mode {im.mode!r}")


def _decode(path):
    """The whole image as float32 (H, W) in [0, 1]; any failure is a one-line DataError.

    A PNG's size is read from its header and refused above MAX_PIXELS before Pillow sees the
    file; other formats are refused after Pillow has read their header, before any pixel.
    Pillow raises ValueError for oversized text and ICC chunks and DecompressionBombError for
    sizes it distrusts: both are damage here, like the OSError of a corrupt stream.
    """
    size = _png_size(path)
    problem = size and _too_large(*size)
    if problem:
        raise DataError(f"{path}: {problem}")
    try:
        with Image.open(path) as im:
            problem = _too_large(*im.size)
            if problem:
                raise DataError(f"{path}: {problem}")
            im.load()
            return _gray(im, path)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def load_image(path, size, boxes=None):
    """PNG -> (image float32 (size, size) in [0, 1], boxes float64 (K, 4) scaled to match).

    The image is made one-channel (RGBA, RGB, LA and 16-bit PNGs included) and resized bilinear
    to size x size; boxes (x, y, w, h) in the PNG's pixel frame are scaled by the same x and y
    factors. boxes=None gives an empty (0, 4) array.
    """
    positive_int("size", size)
    b = np.zeros((0, 4)) if boxes is None else np.asarray(boxes, np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be (K, 4) rows of (x, y, w, h), got shape {b.shape}")
    img = _decode(path)                                                   # (H, W)
    height, width = img.shape
    for i, box in enumerate(b):
        if _outside(box, width, height):
            raise DataError(f"{path}: box {i} {tuple(box)} lies outside the {width}x{height} image")
    if (width, height) != (size, size):
        resized = Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR)
        img = np.clip(np.asarray(resized, np.float32), 0.0, 1.0)          # (size, size)
    return img, b * np.array([size / width, size / height, size / width, size / height])


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


def write_bbox_list(path, boxes):
    """Write boxes as BBox_List_2017.csv (real header, 6-field rows, `Infiltrate`), atomically;
    when the boxes carry scores, as a harvested boxes.csv (8 fields, + score, rank)."""
    harvested = any(b.score is not None for b in boxes)
    header = ",".join(HARVEST_HEADER) if harvested else ",".join(BBOX_HEADER) + ",,,"
    rows = []
    for b in boxes:
        name = BBOX_SPELLING.get(CLASSES[b.label], CLASSES[b.label])
        row = [b.image, name, repr(float(b.x)), repr(float(b.y)), repr(float(b.w)), repr(float(b.h))]
        rows.append(row + ([repr(float(b.score)), int(b.rank)] if harvested else []))
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(_csv_lines(header, rows))
