"""The walkthrough's figures, drawn by the project's own code from a real run.

    python -m walkthrough.make_figures [--run DIR] [--out walkthrough/figures]

    architecture.png   ResNet-MSA, AM's C branches with their masks, KP between N_A and N_B
                       (architecture.py), after the paper's Fig. 1
    phantom.png        phantom images with their ground-truth boxes, between them all 8 box classes
    erasure.png        eq. (1) on the run's network: the channels of X that carry most of one
                       class's logit, before and after erasing with that map's M_1
    mining_rounds.png  H_1..H_T (eq. 7) of one mining image and class, each over the X-ray,
                       with the region erased before that round hatched
    fused.png          H_1 with the baseline's boxes beside H_f (eq. 8) with the AM boxes
    mining_rounds_loss.png, fused_loss.png   the same for the second case (pick_cases)
    receptive_field.png  |∂X[cell] / ∂image| of one cell of the run's network on a noise image,
                       its analytic centre (reference.geometry) against the plain-resize one
    control_rounds.png, control_fused.png   with --control DIR, a run on the positive control
                       (made if missing: CONTROL_RUN, then a fork of it with CONTROL_MINING):
                       the map whose lesion B boxes gain most from H_1 to H_f, B boxed

Heat panels that are compared share one colour scale, drawn under them (erasure.png: one per
channel, shared by its two rows), and every figure's last line names the command and the commit
that drew it. The run's figures read DIR/mining.npz, the heatmaps and masks of an end-to-end run
`python -m minimal_amkp --out DIR` (tiny preset on the phantom by default), and DIR/model.pt.
Without mining.npz the run is made (or resumed) first, which takes minutes on a CPU.
"""
import argparse
import json
import os
import sys
import tempfile
import zipfile

import numpy as np
from PIL import Image, ImageDraw

from minimal_amkp import reference as R
from minimal_amkp.classes import BOX_CLASSES
from minimal_amkp.data import phantom
from minimal_amkp.data.chestxray import read_dataset
from minimal_amkp.data.images import frame, load_image
from minimal_amkp.harvest import check_mining, harvest, read_mining, upsample
from minimal_amkp.run.cli import main as run_pipeline
from minimal_amkp.run.figures import (GREEN, RED, below, cells, draw_boxes, font, overlay_heatmap, save_png,
                                      scale_bar, span, strip)
from minimal_amkp.run.job import phantom_root
from minimal_amkp.run.lesions import gains
from minimal_amkp.run.machine import git_commit
from minimal_amkp.run.report import ground_truth
from minimal_amkp.run.settings import from_dict
from walkthrough.architecture import architecture_figure

HERE = os.path.dirname(os.path.abspath(__file__))
PANEL = 256                                               # pixels per side of every panel
LABEL = (255, 130, 130)                                  # class names: RED, lightened to read on black
ROW = 4                                                  # at most this many panels a row (phantom figure)


def grey_rgb(image):
    return np.round(np.repeat(image[..., None], 3, axis=-1) * 255).astype(np.uint8)


def provenance(run=None, option="--run"):
    """The command and the commit that drew a figure, for its last line."""
    command = "python -m walkthrough.make_figures" + (f" {option} {run}" if run else "")
    return f"drawn by {command} at commit {git_commit(outputs=[os.path.join(HERE, 'figures')])}"


def stack(pictures):
    """uint8 pictures one above the other, the narrower padded on the right with the background."""
    width = max(p.shape[1] for p in pictures)
    return np.concatenate([np.concatenate([p, np.broadcast_to(p[:1, -1:], (p.shape[0], width - p.shape[1], 3))],
                                          axis=1) for p in pictures])


def label_boxes(rgb, boxes, texts, color):
    """Copy of rgb with each text on a dark tab at a corner of its box (top-left inside first),
    the first place that covers no earlier tab and leaves no letter outside the image."""
    im = Image.fromarray(rgb)
    pen = ImageDraw.Draw(im)
    face = font()
    placed = []
    for (x, y, w, h), text in zip(boxes, texts):
        left, top, right, bottom = pen.textbbox((0, 0), text, font=face)
        spots = [(x + 3, y + 3), (x + 3, y + h - bottom - 3), (x + 3, y - bottom - 4), (x + 3, y + h + 3)]
        tabs = []
        for sx, sy in spots:
            tx = int(min(max(sx, 2 - left), rgb.shape[1] - 3 - right))
            ty = int(min(max(sy, 2 - top), rgb.shape[0] - 3 - bottom))
            tabs.append((tx + left - 2, ty + top - 1, tx + right + 1, ty + bottom + 1, tx, ty))
        free = [t for t in tabs if not any(t[0] < q[2] and q[0] < t[2] and t[1] < q[3] and q[1] < t[3] for q in placed)]
        tab = (free or tabs)[0]
        placed.append(tab)
        pen.rectangle(tab[:4], fill=(0, 0, 0))
        pen.text(tab[4:], text, fill=color, font=face)
    return np.asarray(im)


def phantom_figure(n_images=300, seed=0):
    """Phantom images that between them show every box class (greedy: each next image adds the most
    classes not yet shown, ties by name), with their ground-truth boxes and class names."""
    with tempfile.TemporaryDirectory() as tmp:
        phantom.generate(tmp, n_images=n_images, size=PANEL, seed=seed)
        ds = read_dataset(tmp)
        names, seen, picked = sorted(ds.boxes), set(), []
        while len(seen) < len(BOX_CLASSES):
            new = [len({b.label for b in ds.boxes[n]} - seen) for n in names]
            if max(new, default=0) == 0:
                break
            picked.append(names.pop(int(np.argmax(new))))
            seen |= {b.label for b in ds.boxes[picked[-1]]}
        shown = []
        for name in picked:
            boxes = ds.boxes[name]
            image, scaled = load_image(ds.image_path(name), PANEL,
                                       np.array([(b.x, b.y, b.w, b.h) for b in boxes]))
            rgb = draw_boxes(grey_rgb(image), scaled, RED)
            shown.append(label_boxes(rgb, scaled, [BOX_CLASSES[b.label] for b in boxes], LABEL))
    header = (f"phantom ChestX-ray14 (seed {seed}): ground-truth boxes and their classes in red; "
              f"{len(seen)} of the {len(BOX_CLASSES)} box classes in {len(picked)} images")
    per_row = -(-len(shown) // -(-len(shown) // ROW))                      # rows as even as they can be
    rows = [strip(shown[k:k + per_row], picked[k:k + per_row], header if k == 0 else "")
            for k in range(0, len(shown), per_row)]
    return below(stack(rows), provenance())


def ensure_run(run):
    """DIR/mining.npz, running (or resuming) the end-to-end pipeline into DIR if it is missing."""
    path = os.path.join(run, "mining.npz")
    if not os.path.exists(path):
        resume = ["--resume"] if os.path.exists(os.path.join(run, "config.json")) else []
        if run_pipeline(["--out", run, *resume]) != 0:
            sys.exit(f"make_figures: the run into {run} failed (see above)")
    return path


def pick_cases(ds, names, labels, cams, h_f, grid, boxes=None):
    """The two cases the walkthrough shows, by the rule it states (§7.2): of the maps (mining
    image, labelled box class) with two or more ground-truth boxes, the one where the boxes of H_f gain
    most over those of H_1 and the one where they lose most, by the report's measure
    (run.lesions.gains: mean over the ground-truth boxes of the best IoU, H_f's minus H_1's); ties
    go to the first image, then class. boxes {image: [BBox]}: the ground truth scored (default
    ds.boxes; with others, every map with one of them counts).
    -> [(i, c, gain, gt (g, 4), H_1's boxes, H_f's boxes)]."""
    frames = [frame(ds, n) for n in names]
    base = harvest(cams[0], names, labels, frames, grid)
    am = harvest(h_f, names, labels, frames, grid)
    gt = ground_truth(names, ds.boxes if boxes is None else boxes)
    least = 2 if boxes is None else 1
    multi = [(g, i, c) for (c, i), g in gains(base, am, names, gt).items() if len(gt[c][names[i]]) >= least]
    if not multi:
        sys.exit("make_figures: no mining image has two or more ground-truth boxes of a class it is labelled with")
    picks = [min(multi, key=lambda m: (-m[0], m[1], m[2])), min(multi, key=lambda m: (m[0], m[1], m[2]))]

    def rows(boxes, i, c):
        return np.array([(b.x, b.y, b.w, b.h) for b in boxes if b.image == names[i] and b.label == c]).reshape(-1, 4)
    return [(i, c, g, gt[c][names[i]], rows(base, i, c), rows(am, i, c)) for g, i, c in picks]


def mining_summary(labels, cams, masks, h_f):
    """One line on what mining did over every (image, positive box class) map of the run."""
    pos = labels[:, :len(BOX_CLASSES)].astype(bool)                                 # (n, 8)
    erased = [1 - masks[t][pos].mean() for t in range(masks.shape[0])]
    change = np.abs(h_f - cams[0])[pos].mean() / np.abs(cams[0][pos]).mean()
    stalled = [int(np.all(masks[t] == masks[t - 1], axis=(-2, -1))[pos].sum())
               for t in range(2, masks.shape[0])]
    n, rounds = int(pos.sum()), range(1, masks.shape[0])
    return (f"{n} (image, labelled class) maps: erased after round "
            + ", ".join(f"{t}: {erased[t]:.0%}" for t in rounds) + " on average; "
            + "".join(f"M{t} = M{t - 1} on {k} of {n}; " for t, k in enumerate(stalled, start=2))
            + f"mean |Hf - H1| / mean |H1| = {change:.1%}")


def load_run(run):
    """(names, labels, cams, masks, data set, grid) of the finished run in `run`, checked."""
    path = ensure_run(run)
    try:
        mining = read_mining(path)
        check_mining(mining)                     # before the data set, which may be generated
        with open(os.path.join(run, "config.json"), encoding="utf-8") as f:
            cfg = from_dict(json.load(f))
        ds = read_dataset(cfg.run.data or phantom_root(cfg))
        names, labels, cams, masks, _, grid = check_mining(mining, ds)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        sys.exit(f"make_figures: --run {run}: {e}")
    return names, labels, cams.astype(np.float64), masks.astype(np.float64), ds, grid


def case_figures(ds, grid, names, cams, masks, h_f, summary, run, i, c, gain, gt, base, am, truth="ground truth",
                 option="--run"):
    """(mining_rounds, fused) of map (i, c): the rounds over the X-ray, then H_1 and H_f with their
    boxes, every heat panel of both on one colour scale (the range of H_1..H_T's live cells and H_f);
    truth: what the red boxes gt are; option: make_figures' option that named the run."""
    image, scaled = load_image(ds.image_path(names[i]), PANEL, np.concatenate([gt, base, am]))
    gt_p, base_p, am_p = np.split(scaled, np.cumsum([len(gt), len(base)]))
    title = (f"{names[i]}  {BOX_CLASSES[c]}  ({masks.shape[-1]}x{masks.shape[-2]} feature map)  "
             f"best-box IoU Hf - H1 {gain:+.2f}")
    print(f"make_figures: {names[i]} {BOX_CLASSES[c]}: {len(gt)} ground-truth boxes, gain {gain:+.3f}")
    scale = span([*cams[:, i, c], h_f[i, c]], [*masks[:, i, c], None])

    def heat(h, m=None):
        return draw_boxes(overlay_heatmap(image, upsample(h, PANEL, PANEL, grid),
                                          None if m is None else cells(m, PANEL, grid), scale=scale), gt_p, RED)

    def finish(picture, what):
        return below(scale_bar(picture, scale, f"one colour scale for {what}"), provenance(run, option))

    rounds = [draw_boxes(grey_rgb(image), gt_p, RED)]
    titles = [f"X-ray, {truth}"]
    for t in range(cams.shape[0]):
        rounds.append(heat(cams[t, i, c], masks[t, i, c]))
        titles.append(f"H{t + 1}, under M{t}" + (" (all ones)" if t == 0 else ", hatched = erased"))
    fused = [draw_boxes(heat(cams[0, i, c]), base_p, GREEN), draw_boxes(heat(h_f[i, c]), am_p, GREEN)]
    rounds_title = f"attention mining rounds: {title}; red = {truth}"
    return (finish(below(strip(rounds, titles, rounds_title), summary), "every heat panel, and fused.png's"),
            finish(strip(fused, ["H1, baseline boxes", "Hf (eq. 8), AM boxes"],
                         f"{title}; red = {truth}, green = harvested"), "both panels, and mining_rounds.png's"))


# The control's figures: seed 1's classifier (the seed whose H_1 meets the control's gate 2),
# mined with A erased by the oracle in pixels, negatives given matched holes (walkthrough §7.5).
CONTROL_RUN = ["--data.phantom-scenario", "hidden-sibling", "--seed", "1"]
CONTROL_MINING = ["--mine.erase", "image", "--mine.oracle", "true", "--mine.holes", "matched"]


def ensure_control(run):
    """DIR/mining.npz of the control figures' run, made first if missing: the control run into
    DIR-classifier, then `study.fork` of its classifier into DIR with CONTROL_MINING."""
    from minimal_amkp.study import fork
    if not os.path.exists(os.path.join(run, "mining.npz")):
        source = f"{os.path.normpath(run)}-classifier"
        if not os.path.exists(os.path.join(source, "report.json")):
            resume = ["--resume"] if os.path.exists(os.path.join(source, "config.json")) else []
            if run_pipeline(["--out", source, *CONTROL_RUN, *resume]) != 0:
                sys.exit(f"make_figures: the control run into {source} failed (see above)")
        fork.main([source, run, *CONTROL_MINING])


def control_figures(run):
    """{control_rounds, control_fused}: case_figures of the map of the positive-control run `run`
    whose lesion B boxes gain most from H_1's boxes to H_f's, B boxed in red."""
    ensure_control(run)
    names, labels, cams, masks, ds, grid = load_run(run)
    if ds.kinds is None:
        sys.exit(f"make_figures: --control {run}: its data has no lesion_kinds.csv (not the positive control)")
    h_f = R.fuse_heatmaps(list(cams), list(masks))
    b_boxes = {}
    for box, kind in ds.kinds:
        if kind == "B":
            b_boxes.setdefault(box.image, []).append(box)
    case = pick_cases(ds, names, labels, cams, h_f, grid, b_boxes)[0]
    rounds, fused = case_figures(ds, grid, names, cams, masks, h_f, mining_summary(labels, cams, masks, h_f),
                                 run, *case, truth="lesion B", option="--control")
    return {"control_rounds": rounds, "control_fused": fused}


def load_model(run):
    """(config, the run's final network in eval mode) from DIR/config.json and DIR/model.pt."""
    import torch

    from minimal_amkp.model import ResNetMSA
    with open(os.path.join(run, "config.json"), encoding="utf-8") as f:
        cfg = from_dict(json.load(f))
    model = ResNetMSA(cfg.model)
    model.load_state_dict(torch.load(os.path.join(run, "model.pt"), map_location="cpu", weights_only=True))
    return cfg, model.eval()


def erasure_figure(run, ds, grid, names, masks, i, c, channels=3, panel=200):
    """Eq. (1) on one map: the `channels` channels d of X with the largest share w_c,d · mean(X_d)
    of class c's logit, over image i, and the same channels times M_1 (the mask the first round
    left); each channel on one colour scale, its range before erasing."""
    import torch

    cfg, model = load_model(run)
    size = cfg.data.image_size
    with torch.no_grad():
        x = model(torch.from_numpy(load_image(ds.image_path(names[i]), size)[0])[None, None]).x[0]
    x, w = x.double().numpy(), model.fc.weight[c].detach().double().numpy()         # (D, h, w), (D,)
    share = w * x.mean((-2, -1))                                                    # sums to z_c - b_c
    top = np.argsort(-share)[:channels]
    t = min(1, masks.shape[0] - 1)
    m, image = masks[t, i, c], load_image(ds.image_path(names[i]), panel)[0]
    erased = cells(m, panel, grid)
    row_x, row_hat = [grey_rgb(image)], [overlay_heatmap(image, np.zeros_like(image), erased, alpha=0.0)]
    titles_x, titles_hat = ["X-ray"], [f"M{t}: hatched cells are 0"]
    for d in top:
        scale = span([x[d]])
        row_x.append(overlay_heatmap(image, upsample(x[d], panel, panel, grid), scale=scale))
        row_hat.append(overlay_heatmap(image, upsample(x[d] * m, panel, panel, grid), erased, scale=scale))
        titles_x.append(f"X, channel {d}: {share[d] / share.sum():.0%} of z_c - b_c, range {scale[0]:.2g}..{scale[1]:.2g}")
        titles_hat.append(f"X-hat = X * M{t}, channel {d}")
    header = (f"eq. (1) on {names[i]}, {BOX_CLASSES[c]} (c = {c}): the {channels} channels of X (of {len(w)}) "
              f"that carry most of the logit, before and after erasing with M{t} of the run's mining; "
              f"X of the run's final network; each channel one colour scale (blue = its minimum, red = its maximum)")
    return below(stack([strip(row_x, titles_x, header), strip(row_hat, titles_hat)]), provenance(run))


def cross(rgb, x, y, color, arm=6):
    """Copy of rgb with a 3-px-wide cross at (x, y) in its pixel frame."""
    im = Image.fromarray(rgb)
    pen = ImageDraw.Draw(im)
    pen.line([x - arm, y, x + arm, y], fill=color, width=3)
    pen.line([x, y - arm, x, y + arm], fill=color, width=3)
    return np.asarray(im)


def receptive_field_figure(run, images=16, seed=0):
    """Where one cell of the run's X looks: the gradient of its channel sum with respect to the
    input, in magnitude, averaged over `images` noise images; the cell's analytic centre
    (green), that gradient's centroid (white dot), its plain-resize centre (red) and the tile
    a plain resize gives it (white); the whole input, then a zoom on the cell."""
    import torch

    from minimal_amkp.model import map_grid, map_size
    cfg, model = load_model(run)
    size = cfg.data.image_size
    grid, h = map_grid(model, size), map_size(size, cfg.model.msa, len(cfg.model.blocks))
    image = torch.rand(images, 1, size, size, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    r = c = h // 2
    x3, x4 = model.backbone(image)
    (x4 if model.msa is None else model.msa(x3, x4))[:, :, r, c].sum().backward()
    mass = image.grad.abs()[:, 0].mean(0).double().numpy()                          # (S, S)
    centre = np.arange(size) + 0.5
    gx, gy = (mass.sum(0) * centre).sum() / mass.sum(), (mass.sum(1) * centre).sum() / mass.sum()
    (cx, cy), naive = R.cell_centres([c, r], grid, size), (c + 0.5) * size / h
    half = size / h * 3                                         # the zoom: three tiles each way
    panels = []
    for lo, scale in ((0.0, PANEL / size), (cx - half, PANEL / (2 * half))):
        pixels = np.arange(PANEL) / scale + lo                  # input pixel under each panel pixel
        idx = np.clip(pixels.astype(int), 0, size - 1)
        heat = mass[np.ix_(idx, idx)] / mass.max()
        rgb = overlay_heatmap(np.full((PANEL, PANEL), 0.5), heat)
        tile = np.array([[c * size / h, r * size / h, size / h, size / h]])
        rgb = draw_boxes(rgb, (tile - [lo, lo, 0, 0]) * scale, (255, 255, 255), 1)
        rgb = cross(rgb, (naive - lo) * scale, (naive - lo) * scale, RED)
        rgb = cross(rgb, (cx - lo) * scale, (cy - lo) * scale, GREEN)
        panels.append(cross(rgb, (gx - lo) * scale, (gy - lo) * scale, (255, 255, 255), arm=1))
    title = (f"cell ({r}, {c}) of X: green ({cx:g}, {cy:g}) receptive-field centre, white ({gx:.1f}, {gy:.1f}) "
             f"centroid, red ({naive:g}, {naive:g}) plain resize")
    return scale_bar(strip(panels, [f"the {size}-px input", f"zoom x{PANEL / (2 * half):.3g}"], title),
                     (0.0, float(mass.max())), "|gradient|, one colour scale for both panels")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m walkthrough.make_figures", description=__doc__.split("\n")[0])
    p.add_argument("--run", default=os.path.join("runs", "walkthrough"),
                   help="folder of an end-to-end run (made if it holds no mining.npz)")
    p.add_argument("--out", default=os.path.join(HERE, "figures"), help="where the PNGs go")
    p.add_argument("--control", help="a run on the positive control (made if missing, about 10 min on a "
                                     "2-core CPU): draw control_*.png")
    args = p.parse_args(argv)
    names, labels, cams, masks, ds, grid = load_run(args.run)                          # (T, n, 8, h, w)
    h_f = R.fuse_heatmaps(list(cams), list(masks))                                  # (n, 8, h, w)
    summary = mining_summary(labels, cams, masks, h_f)
    print(f"make_figures: {args.run}: {summary}")
    cases = pick_cases(ds, names, labels, cams, h_f, grid)
    (rounds, fused), (rounds_loss, fused_loss) = [
        case_figures(ds, grid, names, cams, masks, h_f, summary, args.run, *case) for case in cases]
    pictures = {"architecture": below(architecture_figure(), provenance()),
                "phantom": phantom_figure(),
                "erasure": erasure_figure(args.run, ds, grid, names, masks, *cases[0][:2]),
                "mining_rounds": rounds, "fused": fused, "mining_rounds_loss": rounds_loss, "fused_loss": fused_loss,
                "receptive_field": below(receptive_field_figure(args.run), provenance(args.run))}
    if args.control:
        pictures.update(control_figures(args.control))
    for name, picture in pictures.items():
        save_png(os.path.join(args.out, f"{name}.png"), picture)
    print(f"wrote {', '.join(f'{name}.png' for name in pictures)} to {args.out}")


if __name__ == "__main__":
    main()
