"""Pictures of attention mining: Fig. 2-style strips, plus the small drawing helpers others reuse.

A strip shows one mining image and one box class: the X-ray with its ground-truth boxes, then
H_1 ... H_T (eq. 7) each over the image with the region erased before that step hatched and
dimmed, then the fused H_f (eq. 8). Ground truth is red and harvested boxes green, as in the
paper's Fig. 2 (rank 1 thick); H_1 carries the baseline's boxes and H_f the AM boxes, so the
strip shows what mining changed. The heat panels share one colour scale, printed under the
strip: eq. (8) adds the rounds' raw values, so a round whose map is weaker must look weaker.
Text is wrapped to the width it has, never cut. Only NumPy and Pillow: the project has no
plotting library.
"""
import io
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from minimal_amkp.run.atomic import atomic_write_bytes, inside
from minimal_amkp.data.images import load_image
from minimal_amkp.classes import BOX_CLASSES
from minimal_amkp import reference as R
from minimal_amkp.harvest import upsample

RED = (230, 30, 30)
GREEN = (40, 220, 60)
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
LINE = 16                   # pixels per line of text in the default font
_RULER = ImageDraw.Draw(Image.new("RGB", (1, 1)))

# Anchors of a jet-like map (blue = cold, red = hot): the convention of CAM papers, Fig. 2 included.
_STOPS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_COLOURS = np.array([[0, 0, .5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [.5, 0, 0]])


def save_png(path, array):
    """Write a uint8 (H, W), (H, W, 3) or (H, W, 4) array, or floats in [0, 1], as a PNG atomically."""
    a = np.asarray(array)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or 0 in a.shape:
        raise ValueError(f"save_png: array must be (H, W), (H, W, 3) or (H, W, 4); got shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"save_png: array must be uint8 or float in [0, 1]; got dtype {a.dtype}")
        a = np.round(np.clip(np.nan_to_num(a), 0.0, 1.0) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=1)   # ~3x faster than 6, ~7% larger
    atomic_write_bytes(path, buf.getvalue())


def colormap(v):
    """(H, W) values in [0, 1] -> (H, W, 3) float RGB in [0, 1]."""
    v = np.clip(v, 0.0, 1.0)
    return np.stack([np.interp(v, _STOPS, _COLOURS[:, k]) for k in range(3)], axis=-1)


def font(size=None):
    """Pillow's own font (no font file needed), at `size` pixels where this Pillow can scale it."""
    if size is None:
        return ImageFont.load_default()
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                       # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def text_width(text, face):
    """Pixels `text` takes in `face` (ImageDraw.textlength: Pillow 8 and later)."""
    return _RULER.textlength(text, font=face)


def wrap(text, width, face=None):
    """text as lines no wider than `width` pixels in `face`, broken at spaces (a longer word at
    characters), so that nothing is cut at a panel's edge."""
    face = face or font()
    lines = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}" if line else word
            if text_width(trial, face) <= width:
                line = trial
                continue
            if line:
                lines.append(line)
            while text_width(word, face) > width and len(word) > 1:
                cut = max(k for k in range(1, len(word) + 1) if text_width(word[:k], face) <= width or k == 1)
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def span(maps, masks=None):
    """(lo, hi): the range of several maps over their kept cells (mask == 1; None keeps all), so
    that panels compared side by side share one colour scale."""
    kept = []
    for h, m in zip(maps, masks or [None] * len(maps)):
        h = np.asarray(h, np.float64)
        kept.append(h.ravel() if m is None or not np.any(m) else h[np.asarray(m) > 0])
    values = np.concatenate(kept)
    return float(values.min()), float(values.max())


def normalize(h, m=None, scale=None):
    """Scale h to [0, 1] by scale = (lo, hi), or by its own min and max over the kept pixels
    (m == 1); a constant map gives 0."""
    h = np.asarray(h, dtype=np.float64)
    lo, hi = span([h], [m]) if scale is None else scale
    return np.zeros_like(h) if hi <= lo else np.clip((h - lo) / (hi - lo), 0.0, 1.0)


def overlay_heatmap(image, heat, mask=None, alpha=0.6, scale=None):
    """Blend a colour heatmap over a grey image; hatch and dim where mask == 0 (the erased region).

    image (H, W) floats in [0, 1]; heat (H, W) any real values, scaled to scale = (lo, hi) (span
    of the maps compared with it), or alone to its own [min, max] over the kept pixels; mask (H, W)
    {0, 1} or None. The blend weight grows with heat (alpha * (0.3 + 0.7 h)) so that cold regions
    still show the anatomy underneath. Returns uint8 (H, W, 3).
    """
    image = np.asarray(image, dtype=np.float64)
    heat = np.asarray(heat)
    if image.ndim != 2 or heat.shape != image.shape or (mask is not None and np.shape(mask) != image.shape):
        raise ValueError(f"overlay_heatmap: image {image.shape}, heat {heat.shape} and mask "
                         f"{None if mask is None else np.shape(mask)} must all be the same (H, W)")
    h = normalize(heat, mask, scale)
    grey = np.repeat(image[..., None], 3, axis=-1)
    a = (alpha * (0.3 + 0.7 * h))[..., None]
    rgb = (1 - a) * grey + a * colormap(h)
    if mask is not None:
        erased = np.asarray(mask) == 0
        yy, xx = np.indices(image.shape)
        hatch = ((xx + yy) % 10) < 2
        dim = grey * 0.35
        dim[hatch] = 0.75
        rgb[erased] = dim[erased]
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def draw_boxes(rgb, boxes, color, width=2):
    """Copy of uint8 rgb (H, W, 3) with rectangles (x, y, w, h) in its pixel frame (pixel X spans [X, X+1))."""
    rgb = np.asarray(rgb)
    boxes = np.asarray(boxes, dtype=np.float64)
    boxes = boxes.reshape(0, 4) if boxes.size == 0 else boxes
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or boxes.ndim != 2 or boxes.shape[1] < 4:
        raise ValueError(f"draw_boxes: need uint8 rgb (H, W, 3) and boxes (K, >=4); got {rgb.dtype} "
                         f"{rgb.shape} and {boxes.shape}")
    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    for x, y, w, h in boxes[:, :4]:
        draw.rectangle([int(np.floor(x)), int(np.floor(y)), int(np.ceil(x + w)) - 1,
                        int(np.ceil(y + h)) - 1], outline=color, width=width)
    return np.asarray(im)


def strip(panels, titles, header="", gap=4):
    """Lay equal-height uint8 RGB panels side by side, each under its title, below a header; the
    header and titles wrap to the width they have."""
    face = font()
    ph, pw = panels[0].shape[:2]
    width = len(panels) * (pw + gap) + gap
    head = wrap(header, width - 2 * gap, face) if header else []
    title_lines = [wrap(t, pw, face) for t in titles]
    rows = max(len(t) for t in title_lines)
    top = LINE * (len(head) + rows)
    im = Image.new("RGB", (width, top + ph + gap), BACKGROUND)
    draw = ImageDraw.Draw(im)
    for j, text in enumerate(head):
        draw.text((gap, 2 + j * LINE), text, fill=TEXT, font=face)
    for k, (p, lines) in enumerate(zip(panels, title_lines)):
        x = gap + k * (pw + gap)
        for j, text in enumerate(lines):
            draw.text((x, LINE * (len(head) + j) + 2), text, fill=TEXT, font=face)
        im.paste(Image.fromarray(p), (x, top))
    return np.asarray(im)


def below(rgb, text, gap=4):
    """rgb with text under it, wrapped to its width, on the strips' background."""
    face = font()
    lines = wrap(text, rgb.shape[1] - 2 * gap, face)
    im = Image.new("RGB", (rgb.shape[1], LINE * len(lines) + 4), BACKGROUND)
    draw = ImageDraw.Draw(im)
    for j, line in enumerate(lines):
        draw.text((gap, 2 + j * LINE), line, fill=TEXT, font=face)
    return np.concatenate([rgb, np.asarray(im)])


def scale_bar(rgb, scale, what, gap=4, length=160):
    """rgb with its colour scale under it: a blue-to-red bar from lo to hi of scale, then `what`
    it applies to (on the bar's line if it fits, else wrapped below)."""
    face = font()
    lo, hi = (f"{v:.3g}" for v in scale)
    im = Image.new("RGB", (rgb.shape[1], LINE + 6), BACKGROUND)
    draw = ImageDraw.Draw(im)
    draw.text((gap, 3), lo, fill=TEXT, font=face)
    x = gap + int(text_width(lo, face)) + 4
    bar = colormap(np.tile(np.linspace(0, 1, length), (LINE - 4, 1)))
    im.paste(Image.fromarray(np.round(bar * 255).astype(np.uint8)), (x, 4))
    x += length + 4
    draw.text((x, 3), hi, fill=TEXT, font=face)
    x += int(text_width(hi, face)) + 12
    fits = text_width(what, face) <= rgb.shape[1] - gap - x
    if fits:
        draw.text((x, 3), what, fill=TEXT, font=face)
    out = np.concatenate([rgb, np.asarray(im)])
    return out if fits else below(out, what, gap)


def cells(m, p, grid):
    """Nearest-neighbour resize of a mask (h, w) on `grid` to (p, p), so every erased feature cell
    shows whole: panel pixel X takes the cell whose centre (reference.geometry) is nearest."""
    m = np.asarray(m)
    rows, cols = (R.nearest_cells(p, n, grid) for n in m.shape)
    return m[np.ix_(rows, cols)]


def ranked(rgb, boxes):
    """Harvested boxes (K, >=4) in rank order: rank 1 thick, the others thin."""
    return draw_boxes(draw_boxes(rgb, boxes[1:], GREEN, 1), boxes[:1], GREEN, 3)


def mining_strip(image, grid, cams, masks, h_f, gt, baseline, am, header=""):
    """One Fig. 2 strip. image (P, P) in [0, 1]; cams, masks (T, h, w) and h_f (h, w) on grid;
    gt (G, 4) and the rank-ordered baseline and am boxes (K, 4), all in the P × P frame."""
    p = image.shape[0]
    scale = span([*cams, h_f], [*masks, None])
    grey = np.round(np.repeat(image[..., None], 3, axis=-1) * 255).astype(np.uint8)
    panels, titles = [draw_boxes(grey, gt, RED)], ["image, ground truth"]
    for t, (h_t, m_t) in enumerate(zip(cams, masks), start=1):
        rgb = overlay_heatmap(image, upsample(h_t, p, p, grid), cells(m_t, p, grid), scale=scale)
        rgb = draw_boxes(rgb, gt, RED)
        panels.append(ranked(rgb, baseline) if t == 1 else rgb)
        titles.append("H1, baseline boxes" if t == 1 else f"H{t}, hatched = erased")
    panels.append(ranked(draw_boxes(overlay_heatmap(image, upsample(h_f, p, p, grid), scale=scale), gt, RED), am))
    titles.append("Hf (eq. 8), AM boxes")
    return scale_bar(strip(panels, titles, header), scale, "one colour scale for every heat panel: the range of "
                     "H1..HT (cells not erased) and Hf")


def write_figures(out_dir, mining, ds, grid, h_f, baseline, am, picks, panel=256):
    """Write figures/<class>_<image stem>.png strips; return their paths relative to out_dir.

    mining as for report.write_report (already checked), its maps on `grid`; h_f (n, 8, h, w); baseline and am:
    lists of classes.BBox in the images' PNG frames; picks: [(class index, image index,
    caption saying why this map was picked)]. Panels are panel × panel pixels.
    """
    names = list(mining["names"])
    cams, masks = np.asarray(mining["cams"]), np.asarray(mining["masks"])
    paths = []
    for c, i, why in picks:
        name = names[i]
        gt = [(b.x, b.y, b.w, b.h) for b in ds.boxes.get(name, ()) if b.label == c]
        mine = [[(b.x, b.y, b.w, b.h) for b in sorted(boxes, key=lambda b: b.rank)
                 if b.image == name and b.label == c] for boxes in (baseline, am)]
        image, scaled = load_image(ds.image_path(name), panel,
                                   np.array(gt + mine[0] + mine[1], dtype=np.float64).reshape(-1, 4))
        gt_p, base_p, am_p = np.split(scaled, np.cumsum([len(gt), len(mine[0])]))
        header = f"{name}  {BOX_CLASSES[c]}: {why}.   red = ground truth, green = harvested"
        rgb = mining_strip(image, grid, cams[:, i, c], masks[:, i, c], h_f[i, c], gt_p, base_p, am_p, header)
        rel = os.path.join("figures", f"{BOX_CLASSES[c]}_{os.path.splitext(name)[0]}.png")
        save_png(inside(out_dir, rel), rgb)       # plain names cannot leave out_dir; a linked figures/ could
        paths.append(rel)
    return paths
