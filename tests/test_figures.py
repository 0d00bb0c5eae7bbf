"""figures.py: the drawing helpers and the Fig. 2-style strips written for a mining result."""
import os

import numpy as np
import pytest
from PIL import Image
from mining_world import make_world

from minimal_amkp import reference as R
from minimal_amkp.run import figures as F
from minimal_amkp.classes import BOX_CLASSES
from minimal_amkp.data.images import frame
from minimal_amkp.harvest import fused, harvest


def test_save_png_round_trip_and_atomic(tmp_path):
    a = np.arange(7 * 5 * 3, dtype=np.uint8).reshape(7, 5, 3)
    F.save_png(tmp_path / "a.png", a)
    F.save_png(tmp_path / "g.png", np.linspace(0, 1, 35).reshape(5, 7))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), a)
    g = np.asarray(Image.open(tmp_path / "g.png"))
    assert g.shape == (5, 7) and g[0, 0] == 0 and g[-1, -1] == 255
    assert sorted(os.listdir(tmp_path)) == ["a.png", "g.png"]          # no temporaries left


@pytest.mark.parametrize("array, message", [
    (np.zeros((4, 4, 2), np.uint8), "shape (4, 4, 2)"),
    (np.zeros((0, 4), np.uint8), "shape (0, 4)"),
    (np.zeros(4, np.uint8), "shape (4,)"),
    (np.zeros((4, 4), np.int32), "dtype int32"),
])
def test_save_png_bad_input(tmp_path, array, message):
    with pytest.raises(ValueError) as e:
        F.save_png(tmp_path / "x.png", array)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not os.listdir(tmp_path)


def test_overlay_hatches_erased_region_and_colours_the_rest():
    image = np.full((20, 30), 0.5)
    heat = np.tile(np.linspace(0, 1, 30), (20, 1))
    mask = np.ones((20, 30))
    mask[5:10, 20:] = 0                      # erase part of the hot side
    rgb = F.overlay_heatmap(image, heat, mask)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    erased = rgb[5:10, 20:].reshape(-1, 3)
    assert np.all(erased[:, 0] == erased[:, 1]) and np.all(erased[:, 1] == erased[:, 2])  # grey
    assert len(np.unique(erased[:, 0])) == 2                           # dimmed + hatch lines
    assert rgb[0, -1, 0] > rgb[0, -1, 2] and rgb[0, 0, 2] > rgb[0, 0, 0]  # hot red, cold blue
    flat = F.overlay_heatmap(image, np.zeros((20, 30)))                # constant map: no NaN
    assert np.all(flat == flat[0, 0])


def test_overlay_bad_shapes():
    with pytest.raises(ValueError, match=r"image \(4, 5\), heat \(4, 4\)"):
        F.overlay_heatmap(np.zeros((4, 5)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"mask \(3, 5\)"):
        F.overlay_heatmap(np.zeros((4, 5)), np.zeros((4, 5)), np.ones((3, 5)))


def test_draw_boxes_covers_the_boxes_pixels():
    rgb = np.zeros((12, 16, 3), np.uint8)
    out = F.draw_boxes(rgb, [(3, 2, 5, 4)], F.RED, width=1)            # columns 3..7, rows 2..5
    on = np.all(out == F.RED, axis=-1)
    want = np.zeros((12, 16), bool)
    want[2:6, 3:8] = True
    want[3:5, 4:7] = False
    bad = np.argwhere(on != want)
    assert bad.size == 0, f"first mismatch at {tuple(bad[0])}"
    assert np.all(rgb == 0)                                            # input untouched
    np.testing.assert_array_equal(F.draw_boxes(rgb, np.zeros((0, 4)), F.RED), rgb)
    with pytest.raises(ValueError, match=r"boxes \(K, >=4\)"):
        F.draw_boxes(rgb, np.zeros((2, 3)), F.RED)


def test_write_figures_names_and_sizes(tmp_path):
    ds, mining = make_world(tmp_path)
    names, labels = mining["names"], mining["labels"]
    frames = [frame(ds, n) for n in names]
    h_f = fused(mining["cams"], mining["masks"])
    grid = mining["grid"]
    base, am = harvest(mining["cams"][0], names, labels, frames, grid), harvest(h_f, names, labels, frames, grid)
    picks = [(0, 0, "most gained"), (3, 3, "most lost"), (1, 5, "most gained")]
    paths = F.write_figures(tmp_path / "out", mining, ds, grid, h_f, base, am, picks, panel=64)
    assert paths == [os.path.join("figures", f"{BOX_CLASSES[c]}_{names[i][:-4]}.png") for c, i, _ in picks]
    T = mining["cams"].shape[0]
    for p in paths:
        im = Image.open(tmp_path / "out" / p)
        # header and titles wrap to 64-px panels, and the colour scale sits under the strip
        assert im.size[0] == (T + 2) * (64 + 4) + 4 and im.size[1] > 3 * 16 + 64 and im.mode == "RGB"


def test_wrap_keeps_every_word_and_no_line_is_wider_than_asked():
    face = F.font()
    text = "red = ground truth, green = harvested, one colour scale for every heat panel Infiltration"
    lines = F.wrap(text, 90, face)
    assert len(lines) > 1 and " ".join(lines) == text
    assert max(F.text_width(s, face) for s in lines) <= 90
    assert "".join(F.wrap("Pneumothorax", 20, face)) == "Pneumothorax"     # a long word breaks, whole


def test_a_long_header_wraps_instead_of_being_cut():
    panel = np.zeros((32, 32, 3), np.uint8)
    short = F.strip([panel, panel], ["a", "b"], "one line")
    long = F.strip([panel, panel], ["a", "b"], "a header far wider than two panels of thirty-two pixels")
    assert long.shape[1] == short.shape[1] and long.shape[0] >= short.shape[0] + 2 * F.LINE


def test_compared_panels_share_one_colour_scale():
    """H_2 at half of H_1 must look colder than H_1, not the same: one span for both."""
    h1 = np.tile(np.linspace(0.0, 4.0, 8), (8, 1))
    h2, m = h1 / 2, np.ones((8, 8))
    m[:, :2] = 0
    assert F.span([h1, h2], [None, m]) == (0.0, 4.0)
    assert F.span([h2], [m]) == (h2[:, 2:].min(), 2.0)                   # erased cells do not count
    image = np.full((8, 8), 0.5)
    hot1 = F.overlay_heatmap(image, h1, scale=(0.0, 4.0))[0, -1]
    hot2 = F.overlay_heatmap(image, h2, scale=(0.0, 4.0))[0, -1]
    alone = F.overlay_heatmap(image, h2)[0, -1]
    assert not np.array_equal(hot2, hot1) and np.array_equal(alone, hot1)  # alone, H_2 would look as hot


@pytest.mark.parametrize("h, p", [(8, 64), (7, 64), (16, 50), (1, 5), (5, 5)])
def test_cells_takes_the_cell_under_each_pixel_centre(h, p):
    """On the plain-resize grid a panel pixel takes the cell under its centre; on the network's
    grid, the cell whose receptive-field centre is nearest."""
    m = np.arange(h * h).reshape(h, h)
    centre = np.floor((np.arange(p) + 0.5) * h / p).astype(int)
    np.testing.assert_array_equal(F.cells(m, p, R.naive_grid(h, 8 * h)), m[np.ix_(centre, centre)])
    grid = R.Grid(8, 0.5, 8 * h)
    distance = np.abs((np.arange(p) + 0.5)[:, None] - R.cell_centres(np.arange(h), grid, p)[None])  # (p, h)
    got = F.cells(m, p, grid)                                             # (p, p) cell ids r·h + c
    for axis, cell in ((0, got[:, 0] // h), (1, got[0] % h)):
        far = np.flatnonzero(distance[np.arange(p), cell] > distance.min(1) + 1e-9)
        assert far.size == 0, f"axis {axis}: pixel {far[:1]} takes cell {cell[far[:1]]}, not a nearest one"


def test_figures_are_not_written_through_a_link_that_leaves_the_run_folder(tmp_path):
    from minimal_amkp.config import RunError
    ds, mining = make_world(tmp_path)
    names, labels = mining["names"], mining["labels"]
    frames = [frame(ds, n) for n in names]
    h_f = fused(mining["cams"], mining["masks"])
    base = harvest(mining["cams"][0], names, labels, frames, mining["grid"])
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "figures")
    with pytest.raises(RunError, match=r"out/figures/.*\.png: refusing to write outside .*out$"):
        F.write_figures(tmp_path / "out", mining, ds, mining["grid"], h_f, base, base, [(0, 0, "why")], panel=32)
    assert os.listdir(tmp_path / "elsewhere") == []
