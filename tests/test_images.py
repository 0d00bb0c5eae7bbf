"""data/images.py: Images (shapes, dtypes and labels of its batches, preloaded or read on demand,
and its argument checks), the loader and the PNG frame, and the up-front image checks on broken
and hostile files."""
import os
import re
import warnings

import numpy as np
import pytest
import torch
from mining_world import CELL, make_world
from PIL import Image
from release import make_root, png

from minimal_amkp.data import chestxray as cx
from minimal_amkp.data import images as im
from minimal_amkp.data import phantom
from minimal_amkp.data.images import Images


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    phantom.generate(out, n_images=8, size=48, seed=4)
    return cx.read_dataset(out)


@pytest.mark.parametrize("size", [1, 17, 48, 64])
@pytest.mark.parametrize("preload", [False, True])
def test_batches_have_the_promised_shapes_dtypes_and_labels(ds, size, preload):
    names = ds.test + ds.train_val
    data = Images(ds, names, size, preload, workers=2)
    assert len(data) == len(names)
    idx = [len(names) - 1, 0]
    x, y = data.batch(idx)
    assert x.shape == (2, 1, size, size) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    assert y.shape == (2, 14) and y.dtype == torch.float32
    for row, k in enumerate(idx):
        np.testing.assert_array_equal(y[row].numpy(), ds.entries[names[k]].labels)
        torch.testing.assert_close(x[row], data.image(k), rtol=0, atol=0)


def test_an_empty_list_has_no_rows(ds):
    data = Images(ds, [], 32, preload=True, workers=1)
    assert len(data) == 0 and data.labels.shape == (0, 14)


def test_bad_arguments(ds):
    with pytest.raises(ValueError, match=r"names: 1 not in the dataset's Data_Entry, "
                                         r"e\.g\. 'x\.png'"):
        Images(ds, ["x.png"] + ds.test, 32, False, 1)
    for size in (0, 2.0, None):
        with pytest.raises(ValueError, match="size must be a positive int"):
            Images(ds, ds.test, size, False, 1)


# ---------------------------------------------------------------- the loader and the frame

@pytest.mark.parametrize("mode, value, expected", [
    ("L", 128, 128 / 255), ("RGBA", (128, 128, 128, 255), 128 / 255),
    ("RGB", (64, 64, 64), 64 / 255), ("LA", (200, 255), 200 / 255),
    ("I;16", 32768, 32768 / 65535)])
def test_load_image_converts_every_mode_to_one_channel(tmp_path, mode, value, expected):
    img, boxes = im.load_image(png(tmp_path / "a.png", (40, 30), mode, value), 16)
    assert img.shape == (16, 16) and img.dtype == np.float32
    np.testing.assert_allclose(img, expected, atol=1e-6)
    assert boxes.shape == (0, 4)


def test_load_image_reads_16_bit_range_and_scales_boxes_with_the_image(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 100).astype(np.uint16), (50, 1))   # (H=50, W=100)
    Image.fromarray(ramp).save(tmp_path / "r.png")
    img, boxes = im.load_image(tmp_path / "r.png", 20, [[10, 5, 50, 25], [0, 0, 100, 50]])
    assert img.min() >= 0 and img.max() <= 1 and np.all(np.diff(img[0]) > 0)
    np.testing.assert_allclose(boxes, [[2, 2, 10, 10], [0, 0, 20, 20]])
    assert boxes.dtype == np.float64


def test_load_image_same_size_is_untouched(tmp_path):
    a = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(a).save(tmp_path / "a.png")
    img, _ = im.load_image(tmp_path / "a.png", 8)
    np.testing.assert_array_equal(img, a / np.float32(255))


def test_frame_is_png_size_not_data_entry(tmp_path):
    ds, mining = make_world(tmp_path)
    name = mining["names"][0]
    entry = ds.entries[name]
    ds.entries[name] = cx.Entry(name, entry.labels, 0, 0, 50, "M", "PA", 2500, 2048, (0.1, 0.1))
    assert im.frame(ds, name) == (8 * CELL, 6 * CELL)


# ---------------------------------------------------------------- broken input, clear errors

def test_check_images_finds_missing_foreign_and_truncated_files(tmp_path):
    ds = cx.read_dataset(make_root(tmp_path))
    names = ds.train_val + ds.test
    os.remove(ds.image_path(names[0]))
    with open(ds.image_path(names[1]), "wb") as f:
        f.write(b"GIF89a" + bytes(100))
    data = open(ds.image_path(names[2]), "rb").read()
    with open(ds.image_path(names[2]), "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(cx.DataError, match=r"3 bad image\(s\): .*00000001_000\.png: missing; "
                                           r".*00000001_001\.png: not a PNG file; "
                                           r".*00000002_000\.png: truncated PNG file"):
        im.check_images(ds, names, workers=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert im.check_images(ds, names, skip_bad=True) == [names[3]]
    messages = [str(w.message) for w in caught]
    assert [m.split(": ")[-1] for m in messages[:3]] == [
        "missing", "not a PNG file", "truncated PNG file (no IEND at the end)"]
    assert len(messages) == 4 and "skipped 3 bad item(s)" in messages[3]
    with pytest.raises(ValueError, match="workers must be a positive int"):
        im.check_images(ds, names, workers=0)


def test_load_image_errors(tmp_path):
    with pytest.raises(cx.DataError, match=r"a\.png: image not found"):
        im.load_image(tmp_path / "a.png", 8)
    (tmp_path / "b.png").write_bytes(b"definitely not an image")
    with pytest.raises(cx.DataError, match=r"b\.png: cannot read image"):
        im.load_image(tmp_path / "b.png", 8)
    noisy = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    Image.fromarray(noisy).save(tmp_path / "c.png")
    data = open(tmp_path / "c.png", "rb").read()
    (tmp_path / "c.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(cx.DataError, match=r"c\.png: cannot read image"):
        im.load_image(tmp_path / "c.png", 8)
    png(tmp_path / "d.png", (64, 32))
    with pytest.raises(cx.DataError, match=r"d\.png: box 1 .* lies outside the 64x32 image"):
        im.load_image(tmp_path / "d.png", 8, [[0, 0, 64, 32], [0, 10, 10, 30]])
    with pytest.raises(ValueError, match=r"boxes must be \(K, 4\).*got shape \(4,\)"):
        im.load_image(tmp_path / "d.png", 8, [0, 0, 1, 1])
    for size in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="size must be a positive int"):
            im.load_image(tmp_path / "d.png", size)
    Image.new("F", (4, 4)).save(tmp_path / "e.tiff")
    with pytest.raises(cx.DataError, match=r"e\.tiff: unsupported image mode 'F'"):
        im.load_image(tmp_path / "e.tiff", 8)


# ---------------------------------------------------------------- hostile images

def hostile_root(tmp_path):
    """make_root with its four images replaced: a bomb, a 4 MB zTXt, a 4 MB iCCP, damage in the middle."""
    from hostile import big_chunk, bomb, damage_middle
    ds = cx.read_dataset(make_root(tmp_path, boxes=[], size=(64, 64)))
    names = ds.train_val + ds.test
    bomb(tmp_path / "images" / names[0])
    big_chunk(tmp_path / "images" / names[1], b"zTXt")
    big_chunk(tmp_path / "images" / names[2], b"iCCP")
    noisy = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    Image.fromarray(noisy).save(tmp_path / "images" / names[3])
    damage_middle(tmp_path / "images" / names[3])
    return ds, names


HOSTILE = [r"20000x20000 pixels, more than the 16777216 \(4096x4096\) this reader accepts",
           r"cannot read image \(ValueError: Decompressed data too large",
           r"cannot read image \(ValueError: Decompressed data too large",
           r"cannot read image \(OSError: "]


def test_bombs_huge_chunks_and_damage_in_the_middle_end_in_one_line_or_are_skipped(tmp_path):
    ds, names = hostile_root(tmp_path)
    for name, message in zip(names, HOSTILE):
        with pytest.raises(cx.DataError, match=re.escape(ds.image_path(name)) + ": " + message):
            im.load_image(ds.image_path(name), 16)
        with pytest.raises(cx.DataError, match=r"1 bad image\(s\): .*" + message):
            im.check_images(ds, [name])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert im.check_images(ds, names, skip_bad=True) == []
    assert len(caught) == 5 and "skipped 4 bad item(s)" in str(caught[-1].message)
    for w, message in zip(caught, HOSTILE):
        assert re.search(message, str(w.message)) and "\n" not in str(w.message), w.message
    assert ds.skipped == names and ds.digests == {}


def test_a_bomb_is_refused_before_pillow_decodes_it(tmp_path, monkeypatch):
    from hostile import bomb
    path = bomb(tmp_path / "b.png")
    monkeypatch.setattr(im.Image, "open", lambda *a, **k: pytest.fail("Pillow opened the bomb"))
    with pytest.raises(cx.DataError, match="20000x20000 pixels"):
        im.load_image(path, 8)
    with pytest.raises(cx.DataError, match="20000x20000 pixels"):
        im.png_frame(path)


def test_the_largest_real_film_fits_the_pixel_limit():
    assert 3827 * 3567 <= im.MAX_PIXELS < 20000 * 20000


def test_check_images_records_each_file_crc(tmp_path):
    import zlib
    ds = cx.read_dataset(make_root(tmp_path, boxes=[], size=(16, 16)))
    names = ds.train_val + ds.test
    assert im.check_images(ds, names) == names
    assert ds.digests == {n: zlib.crc32((tmp_path / "images" / n).read_bytes()) for n in names}


def test_a_preloaded_set_is_batched_on_its_device_and_one_read_on_demand_on_the_cpu(ds):
    names = ds.test + ds.train_val
    meta = torch.device("meta")                       # a device that is not the CPU, on any machine
    held = Images(ds, names, 32, preload=True, workers=1, device=meta)
    x, y = held.batch([len(names) - 1, 0])
    assert (x.device, y.device, x.shape, y.shape, x.dtype) == (meta, meta, (2, 1, 32, 32), (2, 14), torch.float32)
    assert held.labels.device.type == "cpu"
    x, y = Images(ds, names, 32, preload=False, workers=1, device=meta).batch([0])
    assert x.device.type == y.device.type == "cpu"
