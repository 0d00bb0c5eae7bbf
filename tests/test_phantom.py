"""The phantom: written in the release's formats, read back equal, deterministic, sane lesions."""
import hashlib
import itertools
import os
import re
import threading

import numpy as np
import pytest
from PIL import Image

from minimal_amkp.data import chestxray as cx
from minimal_amkp.data import phantom
from minimal_amkp.data.images import check_images
from minimal_amkp.data.phantom import anatomy as phantom_anatomy
from minimal_amkp.data.phantom import film
from minimal_amkp.data.phantom import sibling
from minimal_amkp.data.phantom import stats as phantom_stats
from minimal_amkp.classes import BOX_CLASSES, CLASSES
from minimal_amkp.run.atomic import WriteError

N, SIZE, SEED = 24, 64, 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    summary = phantom.generate(out, n_images=N, size=SIZE, seed=SEED, preview=True)
    return out, summary


def digest(folder):
    """sha256 of every file under folder, by relative path."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_every_label_and_box_reads_back_equal(tiny):
    out, summary = tiny
    ds = cx.read_dataset(out)
    assert check_images(ds, ds.train_val + ds.test) == ds.train_val + ds.test
    plan = phantom.plan(N, SEED)
    assert list(ds.entries) == plan["name"]
    for i, name in enumerate(plan["name"]):
        e = ds.entries[name]
        assert np.array_equal(e.labels, plan["labels"][i]), name
        assert (e.width, e.height, e.view, e.follow_up) == (SIZE, SIZE, plan["view"][i],
                                                           plan["follow_up"][i])
        assert (name in ds.test) == plan["test"][i]
        if name not in ds.boxes:
            continue
        drawn = film.draw(np.random.default_rng([SEED, i + 1]), SIZE,
                                  plan["labels"][i], plan["view"][i]).boxes
        assert [(b.label, (b.x, b.y, b.w, b.h)) for b in ds.boxes[name]] == drawn, name
    assert summary["boxes"] == sum(len(v) for v in ds.boxes.values()) > 0
    assert summary["boxed_images"] == len(ds.boxes) >= 2


def test_boxed_images_are_test_images_with_every_positive_box_class_boxed(tiny):
    ds = cx.read_dataset(tiny[0])
    for name, entry in ds.entries.items():
        positive = set(np.flatnonzero(entry.labels[:len(BOX_CLASSES)]))
        boxed = {b.label for b in ds.boxes.get(name, [])}
        if name in ds.boxes:
            assert name in ds.test and boxed == positive, (name, positive, boxed)
        else:
            assert not boxed, name
    for boxes in ds.boxes.values():
        for b in boxes:
            assert 0 <= b.x and 0 <= b.y and b.x + b.w <= SIZE and b.y + b.h <= SIZE


def test_the_test_list_holds_boxed_and_unboxed_positives_of_the_box_classes():
    p = phantom.plan(2000, 0)
    positive = p["labels"][:, :len(BOX_CLASSES)].any(1)
    assert not (p["boxed"] & ~p["test"]).any() and not (p["boxed"] & ~positive).any()
    share = p["boxed"].sum() / (p["test"] & positive).sum()
    assert abs(share - phantom.BOXED_SHARE) < 0.08, share
    unboxed = p["test"] & positive & ~p["boxed"]
    for c in range(len(BOX_CLASSES)):                    # every class can be scored on test images
        assert p["labels"][unboxed, c].sum() >= 10, BOX_CLASSES[c]


def test_files_look_like_the_release(tiny):
    out = tiny[0]
    entry_lines = open(out / "Data_Entry_2017.csv").read().splitlines()
    assert entry_lines[0] == ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
                              "Patient Gender,View Position,OriginalImage[Width,Height],"
                              "OriginalImagePixelSpacing[x,y],")
    assert all(line.endswith(",") and line.count(",") == 11 for line in entry_lines)
    box_lines = open(out / "BBox_List_2017.csv").read().splitlines()
    assert box_lines[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    assert all(line.count(",") == 5 for line in box_lines[1:])
    assert "Infiltration" not in "".join(box_lines)
    for split in ("train_val_list.txt", "test_list.txt"):
        assert not open(out / split).read().endswith("\n")
    name = entry_lines[1].split(",")[0]
    assert len(name) == len("00000001_000.png") and name.endswith("_000.png")
    im = Image.open(out / "images" / name)
    assert (im.mode, im.size) == ("L", (SIZE, SIZE)) and "tIME" not in str(im.info)
    assert not [f for f in os.listdir(out) if f.startswith(".")]          # no temp files left
    preview = Image.open(out / "preview.png")
    assert preview.mode == "RGB" and preview.size[0] >= 256


def test_same_seed_gives_byte_identical_files_whatever_the_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(phantom, "POOL_MIN_IMAGES", 0)
    a = phantom.generate(tmp_path / "a", n_images=12, size=32, seed=7, workers=1)
    b = phantom.generate(tmp_path / "b", n_images=12, size=32, seed=7, workers=2)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert {k: v for k, v in a.items() if k not in ("out", "seconds")} == \
           {k: v for k, v in b.items() if k not in ("out", "seconds")}
    phantom.generate(tmp_path / "c", n_images=8, size=32, seed=8)
    phantom.generate(tmp_path / "d", n_images=8, size=32, seed=8)
    phantom.generate(tmp_path / "e", n_images=8, size=32, seed=9)
    assert digest(tmp_path / "c") == digest(tmp_path / "d") != digest(tmp_path / "e")


def test_images_are_written_by_threads_and_a_failed_write_stops_the_run(tmp_path, monkeypatch):
    threads, full, real = set(), [], phantom.atomic_write_bytes

    def write(path, data):
        threads.add(threading.current_thread())
        if full:
            raise WriteError(f"{path}: cannot write (No space left on device)")
        return real(path, data)
    monkeypatch.setattr(phantom, "atomic_write_bytes", write)
    phantom.generate(tmp_path / "a", n_images=40, size=32, seed=3, workers=1)
    assert threads and threading.main_thread() not in threads
    full.append(True)
    with pytest.raises(WriteError, match="No space left on device"):
        phantom.generate(tmp_path / "b", n_images=40, size=32, seed=3, workers=1)
    assert "Data_Entry_2017.csv" not in os.listdir(tmp_path / "b")


def test_label_noise_flips_train_val_labels_only(tmp_path):
    s = phantom.generate(tmp_path, n_images=40, size=32, seed=1, label_noise=0.5)
    ds, plan = cx.read_dataset(tmp_path), phantom.plan(40, 1)
    flipped = 0
    for i, name in enumerate(plan["name"]):
        diff = int((ds.entries[name].labels != plan["labels"][i]).sum())
        assert diff == 0 or name in ds.train_val
        flipped += diff
    assert flipped == s["label_flips"] and 0.3 < flipped / (len(ds.train_val) * 14) < 0.7


def test_interrupted_run_leaves_no_half_file_and_no_data_entry(tmp_path, monkeypatch, capsys):
    calls = itertools.count(1)

    def interrupted_at_5(*args):
        if next(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)
    real = phantom.draw
    monkeypatch.setattr(phantom, "draw", interrupted_at_5)
    with pytest.raises(SystemExit) as e:
        phantom.main(["--out", str(tmp_path / "a"), "--n-images", "10", "--size", "32"])
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err.endswith(f"phantom: interrupted; {tmp_path / 'a'} is unfinished\n")
    assert sorted(os.listdir(tmp_path / "a")) == ["images"]
    assert len(os.listdir(tmp_path / "a" / "images")) == 4                # no temp file either
    monkeypatch.setattr(phantom, "draw", real)

    def broken(path, entries):
        raise KeyboardInterrupt
    monkeypatch.setattr(phantom, "write_data_entry", broken)
    with pytest.raises(KeyboardInterrupt):
        phantom.generate(tmp_path / "b", n_images=6, size=32)
    assert sorted(os.listdir(tmp_path / "b")) == ["BBox_List_2017.csv", "chest_masks.npz", "images",
                                                  "test_list.txt", "train_val_list.txt"]
    with pytest.raises(cx.DataError, match="none of Data_Entry_2017_v2020.csv"):
        cx.read_dataset(tmp_path / "b")


@pytest.mark.parametrize("size", [32, 64])
def test_every_box_class_draws_tight_boxes_inside_the_image(size):
    multi = 0
    for c, name in enumerate(BOX_CLASSES):
        for k in range(6):
            y = np.zeros(len(CLASSES), np.uint8)
            y[c] = 1
            img, boxes = film.draw(np.random.default_rng([3, c, k]), size, y, "PA")[:2]
            assert img.dtype == np.uint8 and img.shape == (size, size)
            assert boxes and all(label == c for label, _ in boxes), (name, k)
            for _, (x0, y0, w, h) in boxes:
                assert x0 >= 0 and y0 >= 0 and w >= 1 and h >= 1
                assert x0 + w <= size and y0 + h <= size
                if name == "Nodule":            # stays small: at most 136 px of 1024
                    assert max(w, h) <= 136 * size / 1024 + 2
            multi += len(boxes) > 1
    assert 0.15 < multi / (8 * 6) < 0.6


def test_lesions_change_the_picture_where_their_box_is():
    y = np.zeros(len(CLASSES), np.uint8)
    y[CLASSES.index("Nodule")] = 1
    drawn = film.draw(np.random.default_rng([5, 0]), 128, y, "PA")
    without, none = film.draw(np.random.default_rng([5, 0]), 128, 0 * y, "PA")[:2]
    assert none == [] and len(drawn.cores) == len(drawn.boxes) > 0
    diff = np.abs(drawn.image.astype(int) - without.astype(int))
    outside = np.ones_like(diff, bool)
    for _, (x0, y0, w, h) in drawn.boxes:
        outside[int(y0):int(y0 + h), int(x0):int(x0 + w)] = False
    for core in drawn.cores:
        assert diff[core].mean() > 3 * max(diff[outside].mean(), 0.1)


@pytest.mark.parametrize("args, message", [
    (["--n-images", "0"], "n_images must be a whole number >= 4, got 0"),
    (["--size", "8"], r"size must be a whole number in \[32, 2048\], got 8"),
    (["--seed", "-1"], "seed must be a whole number >= 0, got -1"),
    (["--label-noise", "2"], r"label_noise must be a probability in \[0, 0.5\], got 2.0"),
    (["--size", "big"], "argument --size: invalid int value: 'big'"),
    (["--scenario", "control"], "argument --scenario: invalid choice: 'control'"),
])
def test_cli_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        phantom.main(["--out", str(tmp_path / "o")] + args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m minimal_amkp.data.phantom: error: ")
    assert re.search(message, err[-1]), err[-1]
    assert not os.path.exists(tmp_path / "o")


def test_cli_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        phantom.main(["--out", str(tmp_path / "f"), "--n-images", "4", "--size", "32"])
    assert re.search(r"error: out '.*f' exists and is not a folder$", capsys.readouterr().err)


def test_cli_writes_a_dataset_and_prints_a_summary(tmp_path, capsys):
    phantom.main(["--out", str(tmp_path), "--n-images", "6", "--size", "32", "--seed", "3",
                  "--preview"])
    cap = capsys.readouterr()
    assert cap.out.startswith("phantom: 6 images of 32 px in ")
    assert "\rphantom: 6/6 images" in cap.err
    assert len(cx.read_dataset(tmp_path).entries) == 6 and (tmp_path / "preview.png").exists()


def lesions_of(name, seed, size=128, count=None):
    """A chest and the lesions one sign draws into it (count: force that many)."""
    rng = np.random.default_rng(seed)
    ch = phantom_anatomy.Chest(rng, size, "PA", cardiomegaly=name == "Cardiomegaly")
    ch.anatomy()
    if count is not None:
        ch.count = lambda _: count
    return ch, film.SIGNS[name](ch)


@pytest.mark.parametrize("name", BOX_CLASSES)
def test_every_lesion_has_a_conspicuous_core_inside_a_fainter_extent(name):
    """The box is the whole finding: the extent's box holds the core's box and reaches beyond it."""
    beyond = 0
    for k in range(6):
        ch, lesions = lesions_of(name, [7, k])
        for lesion in lesions:
            core, whole = phantom_anatomy.box_of(lesion.core), phantom_anatomy.box_of(lesion.extent)
            assert core is not None and whole is not None, (name, k)
            assert whole[0] <= core[0] and whole[1] <= core[1], (name, k, core, whole)
            assert core[0] + core[2] <= whole[0] + whole[2] and core[1] + core[3] <= whole[1] + whole[3]
            beyond += whole[2] * whole[3] > 1.3 * core[2] * core[3]
            if name not in ("Pneumothorax", "Cardiomegaly"):     # these add density where they are
                fringe = lesion.extent & ~lesion.core
                assert ch.extra[lesion.core].mean() > 1.3 * ch.extra[fringe].mean() > 0, (name, k)
    assert beyond >= 5, f"{name}: the extent reaches beyond the core in only {beyond} lesions"


@pytest.mark.parametrize("name", [c for c in BOX_CLASSES if c != "Cardiomegaly"])
def test_later_lesions_of_a_class_are_less_conspicuous_than_the_first(name):
    ratios = []
    for k in range(12):
        ch, lesions = lesions_of(name, [8, k], count=2)
        if len(lesions) < 2:
            continue
        mass = [float(np.abs(ch.extra[lesion.extent]).sum()) for lesion in lesions]
        ratios.append(mass[1] / mass[0])
    assert len(ratios) >= 8 and np.median(ratios) < 0.8, (name, np.round(ratios, 2))


def test_a_later_lesion_is_smaller_fainter_or_mostly_its_faint_form():
    rng = np.random.default_rng(0)
    assert film.variant(rng, 0) == (1.0, 1.0, 1.0)
    for _ in range(200):
        size, strength, core = film.variant(rng, 1)
        assert max(size, strength, core) <= 1.0 and min(size, strength, core) <= 0.8


def test_chest_masks_cover_the_cavity_and_read_back(tiny):
    out = tiny[0]
    masks = phantom.read_chest_masks(out)
    ds = cx.read_dataset(out)
    assert set(masks) == set(ds.entries)
    side = phantom.CHEST_SIDE
    for name, m in masks.items():
        assert m.shape == (side, side) and m.dtype == bool
        assert m[side // 2, side // 2] and not m[0, 0] and not m[-1, -1] and not m[0, -1], name
        assert 0.25 < m.mean() < 0.7, (name, m.mean())
    ch, lesions = lesions_of("Nodule", [9, 0])
    assert all(ch.chest[lesion.core].all() for lesion in lesions)       # lung lesions lie in it
    assert phantom.read_chest_masks(out / "images") is None             # real data: no masks


def test_chest_mask_file_that_is_not_ours_is_refused(tmp_path):
    (tmp_path / phantom.CHEST_MASKS).write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="not a chest mask file of this program"):
        phantom.read_chest_masks(tmp_path)


@pytest.fixture(scope="module")
def stats_phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("stats")
    phantom.generate(out, n_images=3000, size=96, seed=0)
    return out


def test_box_sizes_and_places_match_the_real_release(stats_phantom):
    from minimal_amkp.data.images import frame
    ds = cx.read_dataset(stats_phantom)
    stats = phantom_stats.box_stats(ds, {n: frame(ds, n) for n in ds.boxes})
    for c, s in stats.items():
        assert s["n"] >= 25, (c, s["n"])
        assert 1 / 1.25 <= s["side_ratio"] <= 1.25, (c, s)
        assert abs(s["prior_gap"]) <= 0.15, (c, s)


def test_stats_command_prints_the_comparison(stats_phantom, capsys):
    phantom.main(["--stats", str(stats_phantom)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("class") and len(out) == 2 + len(BOX_CLASSES) + 1
    assert out[-1].endswith("met by every class")
    with pytest.raises(SystemExit):
        phantom.main(["--stats", str(stats_phantom / "nowhere")])
    assert "dataset folder not found" in capsys.readouterr().err


def test_leave_one_out_prior_by_hand():
    rel = np.array([[0.1, 0.1, 0.2, 0.2], [0.1, 0.1, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    # Box 0 against the mean of boxes 1, 2: (0.4, 0.4, 0.2, 0.2), no overlap; box 2 likewise.
    np.testing.assert_allclose(phantom_stats.leave_one_out_prior_acc(rel, (0.1,)), [0.0])
    np.testing.assert_allclose(phantom_stats.leave_one_out_prior_acc(rel[:2], (0.1, 0.9)), [1.0, 1.0])
    assert np.isnan(phantom_stats.leave_one_out_prior_acc(rel[:1])).all()


# ---------------------------------------------------------------- the positive control (sibling.py)

CONTROL_N, CONTROL_SIZE, CONTROL_SEED = 80, 64, 3


@pytest.fixture(scope="module")
def control():
    """Every image of one plan drawn in each scenario: {scenario: [Drawn]}, and the plan."""
    p = phantom.plan(CONTROL_N, CONTROL_SEED)
    drawn = {s: [film.draw(np.random.default_rng([CONTROL_SEED, i + 1]), CONTROL_SIZE, p["labels"][i], p["view"][i],
                           s, None if s == "v2" else sibling.stream(CONTROL_SEED, i)) for i in range(CONTROL_N)]
             for s in sibling.SCENARIOS}
    return drawn, p


def by_kind(d):
    """{(class, kind): [box centre (x, y)]} of one Drawn."""
    out = {}
    for (c, (x, y, w, h)), kind in zip(d.boxes, d.kinds):
        out.setdefault((c, kind), []).append((x + w / 2, y + h / 2))
    return out


def test_hidden_sibling_draws_one_a_per_positive_and_b_only_beside_it_far_away(control):
    drawn, p = control
    pairs = with_b = 0
    for d, labels in zip(drawn["hidden-sibling"], p["labels"]):
        found = by_kind(d)
        for c in range(len(BOX_CLASSES)):
            a, b = found.get((c, "A"), []), found.get((c, "B"), [])
            assert len(a) == labels[c] and len(b) <= len(a), (c, a, b)      # one A a positive; B never alone
            for bx, by in b:
                assert np.hypot(bx - a[0][0], by - a[0][1]) >= sibling.FAR * CONTROL_SIZE
            pairs, with_b = pairs + int(labels[c]), with_b + len(b)
    assert pairs >= 40 and 0.25 < with_b / pairs <= sibling.B_SHARE + 0.1, (with_b, pairs)


def test_sibling_alone_draws_b_alone_for_every_positive_of_a_box_class(control):
    drawn, p = control
    for d, labels in zip(drawn["sibling-alone"], p["labels"]):
        assert set(d.kinds) <= {"B"}
        assert sorted(c for c, _ in d.boxes) == list(np.flatnonzero(labels[:len(BOX_CLASSES)])), d.boxes


def test_an_image_with_no_b_and_one_lesion_a_class_is_drawn_as_in_v2(control):
    """B has a stream of its own, so A and the film around it are v2's wherever v2 drew one lesion a class."""
    drawn, _ = control
    same = 0
    for v2, hs in zip(drawn["v2"], drawn["hidden-sibling"]):
        classes = [c for c, _ in v2.boxes]
        if "B" not in hs.kinds and len(set(classes)) == len(classes):
            assert np.array_equal(v2.image, hs.image) and v2.boxes == hs.boxes
            same += 1
        elif "B" in hs.kinds:
            assert not np.array_equal(v2.image, hs.image)
    assert same >= 40


def test_b_is_a_striped_disk_unlike_any_v2_sign():
    """B changes the film only in and just around its box, with stripes at its class's angle: the
    film along the stripes varies far less than across them."""
    y = np.zeros(len(CLASSES), np.uint8)
    for c in (0, 5, 2):
        y[:] = 0
        y[c] = 1
        d = film.draw(np.random.default_rng([4, c]), 128, y, "PA", "sibling-alone", sibling.stream(4, c))
        plain = film.draw(np.random.default_rng([4, c]), 128, 0 * y, "PA")
        (_, (x0, y0, w, h)), = d.boxes
        diff = d.image.astype(float) - plain.image
        inside = np.zeros(diff.shape, bool)
        inside[int(y0) - 2:int(y0 + h) + 2, int(x0) - 2:int(x0 + w) + 2] = True     # the disk's soft edge, blurred
        assert np.abs(diff[inside]).max() > 40 and np.abs(diff[~inside]).max() <= 2, c
        angle, period = sibling.code(c)
        th = np.deg2rad(angle)
        cy, cx = y0 + h / 2, x0 + w / 2
        t = np.linspace(-0.4, 0.4, 25) * period * 128                 # from a bright stripe to near a dark one
        along = [d.image[int(cy + k * np.sin(th)), int(cx + k * np.cos(th))] for k in t]
        across = [d.image[int(cy + k * np.cos(th)), int(cx - k * np.sin(th))] for k in t]
        assert np.std(across) > 2 * np.std(along), (c, np.std(across), np.std(along))


def test_the_control_writes_lesion_kinds_row_for_row_with_bbox_list(tmp_path, control):
    drawn, p = control
    s = phantom.generate(tmp_path, n_images=CONTROL_N, size=CONTROL_SIZE, seed=CONTROL_SEED, workers=1,
                         scenario="hidden-sibling")
    ds = cx.read_dataset(tmp_path)
    assert [b for b, _ in ds.kinds] == cx.read_bbox_list(tmp_path / "BBox_List_2017.csv")
    assert {k for _, k in ds.kinds} == {"A", "B"}
    for i, name in enumerate(p["name"]):
        if name in ds.boxes:
            d = drawn["hidden-sibling"][i]
            assert [(b.label, (b.x, b.y, b.w, b.h), k) for b, k in ds.kinds if b.image == name] == \
                [(c, box, k) for (c, box), k in zip(d.boxes, d.kinds)]
    assert s["scenario"] == "hidden-sibling"
    assert s["b_share"] == sum(d.kinds.count("B") for d in drawn["hidden-sibling"]) / p["labels"][:, :8].sum()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]          # written atomically


def test_v2_is_unchanged(tmp_path):
    """A seed's v2 files as the phantom drew them before the positive control existed: CSVs and
    lists byte for byte, images and chest masks by their pixels (not their compressed bytes)."""
    s = phantom.generate(tmp_path, n_images=12, size=32, seed=11, workers=1)
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(tmp_path)):
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            h.update(os.path.relpath(path, tmp_path).encode())
            if f.endswith(".png"):
                h.update(np.asarray(Image.open(path)).tobytes())
            elif f.endswith(".npz"):
                with np.load(path) as z:
                    h.update(z["bits"].tobytes())
            else:
                h.update(open(path, "rb").read())
    assert h.hexdigest() == "f4a89dbd1af06e1131c4eb5d4cbd509543c473f720edeb77880861cff7adeff9"
    assert s["boxes"] == 7 and s["b_share"] is None and not (tmp_path / cx.LESION_KINDS).exists()


def test_an_unknown_scenario_is_refused():
    with pytest.raises(ValueError, match="scenario must be one of v2, hidden-sibling, sibling-alone, got 'x'"):
        phantom.generate("/nonexistent/never", n_images=4, size=32, scenario="x")
