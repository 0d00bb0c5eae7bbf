"""A phantom ChestX-ray14: the release's files and formats, with sketched chests drawn in.

    python -m minimal_amkp.data.phantom --out DIR [--n-images N] [--size S] [--seed K]
                                   [--label-noise P] [--scenario NAME] [--preview]
    python -m minimal_amkp.data.phantom --stats DIR

writes DIR/images/*.png (8-bit grayscale, named patient_followup.png), Data_Entry_2017.csv
(2017 variant, trailing commas), BBox_List_2017.csv (real header, `Infiltrate`),
train_val_list.txt, test_list.txt, optionally preview.png, and one file the release does not
have: chest_masks.npz, each image's chest cavity (lungs, mediastinum, heart) as a
CHEST_SIDE² mask, so that a run can measure whether its heatmaps point into the chest.
`--stats DIR` compares a data set's boxes with the real release (stats.py).
`--scenario` picks what the findings of the box classes look like: v2 (the default, film.py),
or the positive control's hidden-sibling and sibling-alone (sibling.py: a lesion B beside or
instead of each class's sign A; no claim of realism). Those write one more file,
lesion_kinds.csv: BBox_List_2017.csv's rows, in its order, each with a column `kind`, A or B.
Choices where the release gives no answer:
- About half the images are No Finding (40% in test); the rest carry 1-3 findings, drawn with
  prevalence weights flattened from the release's counts so that every class has examples.
- The split is by patient, as in the release, with about a quarter of the images in test.
- Half the test images with a box-class finding are boxed (BOXED_SHARE), one box per drawn
  lesion of each of its box classes; the other half stay unboxed positives, as most are in the
  release, so classification of the box classes is measured on images that are never mined.
  Boxed images are never in train_val. Lesions of one class come 2-3 to an image often enough
  that attention mining has more to find (film.py says how later lesions differ).
- label_noise P flips each of the 14 labels of each train_val image independently with
  probability P in Data_Entry only (the picture keeps its true signs); test labels stay true.
- Image i depends only on (seed, i) and PNGs carry no timestamps, so runs are byte-identical
  whatever the number of worker processes (results come back in order; one process writes).
Every file is written atomically, images first and Data_Entry_2017.csv last: an interrupted
run never leaves a half-written file, and a folder without Data_Entry_2017.csv is unfinished.
"""
import argparse
import io
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw

from minimal_amkp.run.atomic import atomic_open, atomic_write_bytes, atomic_write_text
from minimal_amkp.run.pool import processes
from minimal_amkp.data.chestxray import LESION_KINDS, DataError, Entry, read_dataset
from minimal_amkp.data.writers import write_bbox_list, write_data_entry, write_lesion_kinds
from minimal_amkp.classes import BOX_CLASSES, CLASSES, BBox
from minimal_amkp.reference.checks import positive_int
from minimal_amkp.data.images import frame
from minimal_amkp.data.phantom.film import draw
from minimal_amkp.data.phantom import sibling
from minimal_amkp.data.phantom.stats import box_stats, format_stats

# Relative prevalence of each finding among abnormal images: the release's counts (Hernia 227
# ... Infiltration 19,894) flattened so a 2,000-image phantom still has every class.
PREVALENCE = {"Atelectasis": 1.2, "Cardiomegaly": 1.0, "Effusion": 1.3, "Infiltration": 1.5,
              "Mass": 1.0, "Nodule": 1.1, "Pneumonia": 0.9, "Pneumothorax": 1.0,
              "Consolidation": 0.6, "Edema": 0.5, "Emphysema": 0.5, "Fibrosis": 0.5,
              "Pleural_Thickening": 0.5, "Hernia": 0.3}
N_FINDINGS_P = (0.6, 0.3, 0.1)       # 1, 2 or 3 findings in an abnormal image
NORMAL_SHARE = {False: 0.5, True: 0.4}   # No Finding share in train_val, test
TEST_SHARE = 0.3
BOXED_SHARE = 0.5            # of the test images with a box-class finding
CHEST_SIDE = 64              # chest masks are stored at this resolution, whatever the image size
CHEST_MASKS = "chest_masks.npz"
# Bump whenever a seed's files change: cached phantoms (cli.phantom_root) are named by it, so a
# cache drawn by older code is never mistaken for the current one.
VERSION = 2
MIN_IMAGES, MIN_SIZE, MAX_SIZE = 4, 32, 2048
POOL_MIN_IMAGES = 100     # fewer draw in-process: starting workers would cost more
# Threads that write the PNGs, and how many writes may wait (_write_images). Syncing a small
# file took 2.2 ms alone and 0.2 ms each four at a time on the 2-core machine: the
# file system commits concurrent syncs together.
WRITERS, BACKLOG = 8, 256


def _check(n_images, size, seed, label_noise, scenario):
    def whole(name, v, lo, hi=None):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (
                hi is not None and v > hi):
            bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise ValueError(f"{name} must be a whole number {bound}, got {v!r}")
    whole("n_images", n_images, MIN_IMAGES)
    whole("size", size, MIN_SIZE, MAX_SIZE)
    whole("seed", seed, 0)
    if not isinstance(label_noise, (int, float)) or not 0.0 <= label_noise <= 0.5:
        raise ValueError(f"label_noise must be a probability in [0, 0.5], got {label_noise!r}")
    if scenario not in sibling.SCENARIOS:
        raise ValueError(f"scenario must be one of {', '.join(sibling.SCENARIOS)}, got {scenario!r}")


def plan(n_images, seed):
    """Patients, follow-ups, views, true labels and the patient-wise split of every image.

    -> dict of arrays over images: name, patient, follow_up, age, gender, view, test (bool),
    labels (N, 14) uint8, boxed (bool: a test image with a box-class finding chosen for boxes).
    """
    rng = np.random.default_rng([seed, 0])
    rows, pid = [], 0
    while len(rows) < n_images:
        pid += 1
        # Cap the first patient so there are always two patients to split.
        visits = min(int(rng.geometric(0.35)), 8, n_images - len(rows) - (pid == 1))
        age, gender = int(rng.integers(18, 90)), "M" if rng.random() < 0.56 else "F"
        for k in range(visits):
            rows.append((pid, k, age + k // 3, gender, "PA" if rng.random() < 0.6 else "AP"))
    patients = rng.permutation(sorted({r[0] for r in rows}))
    per = np.bincount([r[0] for r in rows])
    want, test_ids, taken = max(1, round(TEST_SHARE * n_images)), set(), 0
    for patient in patients[:-1]:
        if taken >= want:
            break
        test_ids.add(int(patient))
        taken += per[patient]
    test = np.array([r[0] in test_ids for r in rows])
    weights = np.array([PREVALENCE[c] for c in CLASSES])
    labels = np.zeros((n_images, len(CLASSES)), np.uint8)
    for i in range(n_images):
        if rng.random() >= NORMAL_SHARE[bool(test[i])]:
            k = rng.choice(3, p=N_FINDINGS_P) + 1
            labels[i, rng.choice(len(CLASSES), k, replace=False, p=weights / weights.sum())] = 1
    boxed = test & labels[:, :len(BOX_CLASSES)].any(1) & (rng.random(n_images) < BOXED_SHARE)
    return dict(boxed=boxed, name=[f"{r[0]:08d}_{r[1]:03d}.png" for r in rows],
                patient=[r[0] for r in rows], follow_up=[r[1] for r in rows],
                age=[r[2] for r in rows], gender=[r[3] for r in rows],
                view=[r[4] for r in rows], test=test, labels=labels)


def _png(img):
    buf = io.BytesIO()
    # No tIME chunk, so the bytes are deterministic; level 1 is 3x faster than the default.
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _chest_mask(chest):
    """A boolean (S, S) chest cavity -> (CHEST_SIDE, CHEST_SIDE) bool, by area (nearest below)."""
    im = Image.fromarray(chest.astype(np.uint8) * 255)
    return np.asarray(im.resize((CHEST_SIDE, CHEST_SIDE), Image.Resampling.BOX)) >= 128


def _draw_one(job):
    seed, i, size, labels, view, scenario = job
    d = draw(np.random.default_rng([seed, i + 1]), size, labels, view, scenario,
             None if scenario == "v2" else sibling.stream(seed, i))
    return _png(d.image), list(zip(d.boxes, d.kinds)), _chest_mask(d.chest)


def write_chest_masks(path, names, masks):
    """chest_masks.npz: names (n,) and the masks (n, CHEST_SIDE, CHEST_SIDE) bit-packed."""
    with atomic_open(path, "wb") as f:
        np.savez_compressed(f, names=np.array(names), side=CHEST_SIDE,
                            bits=np.packbits(np.asarray(masks, bool).reshape(len(names), -1), axis=1))


def read_chest_masks(root):
    """{name: bool (CHEST_SIDE, CHEST_SIDE)} from a phantom's chest_masks.npz; None without one
    (a real ChestX-ray14 folder). The mask covers the image, row-major, top row first."""
    path = os.path.join(root, CHEST_MASKS)
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as z:
            names, side, bits = list(z["names"]), int(z["side"]), z["bits"]
        masks = np.unpackbits(bits, axis=1, count=side * side).reshape(-1, side, side).astype(bool)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a chest mask file of this program ({e})") from None
    if len(masks) != len(names):
        raise ValueError(f"{path}: {len(names)} names but {len(masks)} masks")
    return dict(zip(names, masks))


def _write_images(out, names, drawn, boxed, progress, t0):
    """Write each (png, found [((class, box), kind)], chest) in order; return the boxes of the
    boxed images, their kinds, the chest masks and the number of B lesions in all images.

    The PNGs are written by WRITERS threads: each write waits for the disk (atomic_write_bytes
    syncs the file), and those waits overlap rather than queue. At most BACKLOG writes are
    pending, so a failed one stops the run within that many images, and an interrupted run
    still writes every image it drew.
    """
    boxes, kinds, chests, n_b, shown, writes = [], [], [], 0, 0.0, deque()
    with ThreadPoolExecutor(WRITERS) as writer:
        for i, (png, found, chest) in enumerate(drawn):
            writes.append(writer.submit(atomic_write_bytes, os.path.join(out, "images", names[i]), png))
            if len(writes) > BACKLOG:
                writes.popleft().result()
            chests.append(chest)
            n_b += sum(kind == "B" for _, kind in found)
            if boxed[i]:
                boxes += [BBox(names[i], c, *b) for (c, b), _ in found]
                kinds += [kind for _, kind in found]
            if progress and (time.perf_counter() - shown > 0.25 or i + 1 == len(names)):
                shown = time.perf_counter()
                sys.stderr.write(f"\rphantom: {i + 1}/{len(names)} images, {shown - t0:.1f} s")
                sys.stderr.flush()
        for w in writes:
            w.result()
    if progress:
        sys.stderr.write("\n")
    return boxes, kinds, chests, n_b


def generate(out, n_images=2000, size=256, seed=0, label_noise=0.0, preview=False,
             progress=False, workers=2, scenario="v2"):
    """Write a phantom dataset under out (see the module docstring); return a summary dict.

    workers > 1 draws in that many processes (runs under POOL_MIN_IMAGES draw in-process).
    The summary's b_share (not in v2): the B lesions over the positives of box classes, all
    splits, which B_SHARE aims at and the room in the lungs allows.
    """
    _check(n_images, size, seed, label_noise, scenario)
    positive_int("workers", workers)
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out {out!r} exists and is not a folder")
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    t0 = time.perf_counter()
    p = plan(n_images, seed)
    boxed = p["boxed"]
    jobs = ((seed, i, size, p["labels"][i], p["view"][i], scenario) for i in range(n_images))
    if workers > 1 and n_images >= POOL_MIN_IMAGES:
        with processes(workers) as pool:
            drawn = pool.map(_draw_one, jobs, chunksize=8)
            boxes, kinds, chests, n_b = _write_images(out, p["name"], drawn, boxed, progress, t0)
    else:
        boxes, kinds, chests, n_b = _write_images(out, p["name"], map(_draw_one, jobs), boxed,
                                                  progress, t0)
    noise_rng = np.random.default_rng([seed, n_images + 1])
    flips = (noise_rng.random(p["labels"].shape) < label_noise) & ~p["test"][:, None]
    observed = p["labels"] ^ flips.astype(np.uint8)
    entries = [Entry(name, observed[i], p["follow_up"][i], p["patient"][i], p["age"][i],
                     p["gender"][i], p["view"][i], size, size,
                     (round(400.0 / size, 4),) * 2)      # a 40 cm film over size pixels
               for i, name in enumerate(p["name"])]
    write_bbox_list(os.path.join(out, "BBox_List_2017.csv"), boxes)
    if scenario != "v2":
        write_lesion_kinds(os.path.join(out, LESION_KINDS), boxes, kinds)
    write_chest_masks(os.path.join(out, CHEST_MASKS), p["name"], chests)
    test = [n for n, t in zip(p["name"], p["test"]) if t]
    train_val = [n for n, t in zip(p["name"], p["test"]) if not t]
    # The release's lists end without a final newline; so do these.
    atomic_write_text(os.path.join(out, "train_val_list.txt"), "\n".join(train_val))
    atomic_write_text(os.path.join(out, "test_list.txt"), "\n".join(test))
    write_data_entry(os.path.join(out, "Data_Entry_2017.csv"), entries)    # last: "finished"
    if preview:
        write_preview(os.path.join(out, "preview.png"), out, p["name"], boxes)
    per_image = Counter(b.image for b in boxes)
    multi = len({name for (name, _), k in Counter((b.image, b.label) for b in boxes).items()
                 if k > 1})
    positives = int(p["labels"][:, :len(BOX_CLASSES)].sum())
    return dict(out=out, n_images=n_images, size=size, seed=seed, label_noise=label_noise,
                scenario=scenario, b_share=None if scenario == "v2" else n_b / max(positives, 1),
                train_val=len(train_val), test=len(test), boxed_images=int(boxed.sum()),
                boxes=len(boxes), boxed_with_2plus_of_one_class=multi,
                max_boxes_per_image=max(per_image.values(), default=0),
                labels={c: int(v) for c, v in zip(CLASSES, observed.sum(0))},
                box_counts={c: sum(b.label == k for b in boxes) for k, c in enumerate(BOX_CLASSES)},
                label_flips=int(flips.sum()), seconds=round(time.perf_counter() - t0, 2))


COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230))


def write_preview(path, root, names, boxes, n=8, tile=256):
    """A grid of up to n images (boxed ones first) with their boxes and labels drawn."""
    by_image = {}
    for b in boxes:
        by_image.setdefault(b.image, []).append(b)
    shown = (list(by_image) + [m for m in names if m not in by_image])[:n]
    cols = min(4, len(shown))
    sheet = Image.new("RGB", (cols * tile, -(-len(shown) // cols) * tile))
    for k, name in enumerate(shown):
        im = Image.open(os.path.join(root, "images", name)).convert("RGB")
        f = tile / im.width
        im = im.resize((tile, tile), Image.Resampling.BILINEAR)
        pen = ImageDraw.Draw(im)
        for b in by_image.get(name, []):
            pen.rectangle([b.x * f, b.y * f, (b.x + b.w) * f - 1, (b.y + b.h) * f - 1],
                          outline=COLOURS[b.label])
            pen.text((b.x * f + 2, b.y * f + 1), CLASSES[b.label][:5], fill=COLOURS[b.label])
        pen.text((3, tile - 12), name, fill=(255, 255, 255))
        sheet.paste(im, ((k % cols) * tile, (k // cols) * tile))
    with atomic_open(path, "wb") as fh:
        sheet.save(fh, format="PNG")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minimal_amkp.data.phantom",
                                 description=__doc__.split("\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", help="output folder")
    what.add_argument("--stats", metavar="DIR",
                      help="compare the boxes of the data set in DIR with the real release")
    ap.add_argument("--n-images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label-noise", type=float, default=0.0,
                    help="probability of flipping each train_val label in Data_Entry")
    ap.add_argument("--scenario", default="v2", choices=sibling.SCENARIOS,
                    help="v2, or the positive control (hidden-sibling, sibling-alone)")
    ap.add_argument("--preview", action="store_true", help="also write DIR/preview.png")
    ap.add_argument("--workers", type=int, default=2, help="drawing processes (output is the same)")
    args = ap.parse_args(argv)
    if args.stats:
        try:
            ds = read_dataset(args.stats)
            stats = box_stats(ds, {name: frame(ds, name) for name in ds.boxes})
        except (DataError, OSError) as e:
            ap.error(str(e))
        print(format_stats(stats))
        return
    try:
        s = generate(args.out, args.n_images, args.size, args.seed, args.label_noise,
                     args.preview, progress=True, workers=args.workers, scenario=args.scenario)
    except (ValueError, OSError) as e:
        ap.error(str(e))
    except KeyboardInterrupt:
        sys.stderr.write(f"\nphantom: interrupted; {args.out} is unfinished\n")
        sys.exit(130)
    print(f"phantom: {s['n_images']} images of {s['size']} px in {s['out']} ({s['seconds']} s): "
          f"train_val {s['train_val']}, test {s['test']}, {s['boxed_images']} boxed images with "
          f"{s['boxes']} boxes ({s['boxed_with_2plus_of_one_class']} with 2+ of one class)"
          + ("" if s["b_share"] is None else
             f"; {s['scenario']}: lesion B in {100 * s['b_share']:.0f}% of the box-class positives"))
