"""The images: a PNG's frame from its header, the up-front PNG checks, the loader, and `Images`.

`png_frame(path)` / `frame(ds, name)` read the (width, height) a PNG's boxes are in from its
header alone. `check_images` decodes every image once before a run, so a damaged file or a
decompression bomb (more than MAX_PIXELS pixels) stops the run at the start, not hours in.
`load_image` makes one image one-channel float32, resized, with its boxes scaled to match.

`Images(ds, names, size, ...)` is the one object the method is handed for a set of images
(the train_val set, the mining set, the test split): `len(images)`, `images.labels` (n, 14)
and `images.batch(positions)` -> (float32 (k, 1, S, S) in [0, 1], labels (k, 14)). It is only
duck-typed there, so tests hand the method in-memory stand-ins; the method moves what a batch
gives it to its device, which costs nothing when it is there already.
"""
import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from minimal_amkp.data.chestxray import PNG_SIGNATURE, DataError, Problems, box_outside, png_size
from minimal_amkp.reference.checks import positive_int
from minimal_amkp.runner import Silent

PNG_TRAILER = b"\x00\x00\x00\x00IEND\xaeB`\x82"       # the empty IEND chunk every PNG ends with
# The released PNGs are 1024x1024 and the largest original film in Data_Entry is 3827x3567
# (13.7 MP), so 4096x4096 admits every image of the release, and the originals should a user
# keep them, while a 20000x20000 header (a decompression bomb: 400 MP, 1.6 GB as float32) is
# refused before any pixel is decoded. A decoded image then costs at most 64 MiB as float32.
MAX_PIXELS = 4096 * 4096


def _too_large(width, height):
    if width * height > MAX_PIXELS:
        return (f"{width}x{height} pixels, more than the {MAX_PIXELS} (4096x4096) this reader accepts "
                "(ChestX-ray14's largest film is 3827x3567)")
    return None


def png_frame(path):
    """(width, height) of a PNG from its header alone: the frame its boxes are in."""
    size = png_size(path)
    if size is None:
        if not os.path.exists(path):
            raise DataError(f"{path}: image not found")
        raise DataError(f"{path}: not a PNG file")
    problem = _too_large(*size)
    if problem:
        raise DataError(f"{path}: {problem}")
    return size


def frame(ds, name):
    """(width, height) of the image's PNG, the frame its boxes are in; reads only the header.

    A DataError when the file is missing, is not a PNG or claims more than MAX_PIXELS.
    """
    return png_frame(ds.image_path(name))


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
    bad = Problems(True)
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
    size = png_size(path)
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
        if box_outside(box, width, height):
            raise DataError(f"{path}: box {i} {tuple(box)} lies outside the {width}x{height} image")
    if (width, height) != (size, size):
        resized = Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR)
        img = np.clip(np.asarray(resized, np.float32), 0.0, 1.0)          # (size, size)
    return img, b * np.array([size / width, size / height, size / width, size / height])


class Images:
    """Images (n, 1, S, S) and labels (n, 14) of a fixed name list, by position.

    `preload` reads everything once (small sets: the phantom), drawing progress(label, n)'s
    line, and holds it on `device` with the labels: a batch is then one indexing op there, with
    no copy from the host per step. Otherwise each batch is read by `workers` threads when
    asked for and comes on the CPU. `labels` stays on the CPU either way.
    """

    def __init__(self, ds, names, size, preload, workers, label="reading images", progress=Silent,
                 device=torch.device("cpu")):
        self.ds, self.names, self.size = ds, list(names), size
        unknown = [n for n in self.names if n not in ds.entries]
        if unknown:
            raise ValueError(f"names: {len(unknown)} not in the dataset's Data_Entry, e.g. {unknown[0]!r}")
        positive_int("size", size)
        self.labels = torch.from_numpy(np.stack([ds.entries[n].labels for n in self.names])
                                       if self.names else np.zeros((0, 14), np.uint8)).float()
        self.pool = ThreadPoolExecutor(max(1, workers))
        self.cache = None
        if preload and self.names:
            progress, chunks = progress(label, len(self.names)), []
            for start in range(0, len(self.names), 64):
                chunks.append(self._read(range(start, min(start + 64, len(self.names)))))
                progress.update(start + len(chunks[-1]), len(chunks[-1]))
            progress.close()
            self.cache = (torch.cat(chunks).to(device), self.labels.to(device))

    def image(self, k):
        """Image k as float32 (1, S, S) in [0, 1]."""
        image, _ = load_image(self.ds.image_path(self.names[k]), self.size)          # (S, S)
        return torch.from_numpy(image)[None]

    def _read(self, idx):
        return torch.stack(list(self.pool.map(lambda i: self.image(int(i)), idx)))

    def __len__(self):
        return len(self.names)

    def batch(self, idx):
        """(images (k, 1, S, S), labels (k, 14)) at positions idx: on the preload's device, else on the CPU."""
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        if self.cache is None:
            return self._read(idx.tolist()), self.labels[idx]
        images, labels = self.cache
        idx = idx.to(images.device, non_blocking=True)
        return images[idx], labels[idx]
