"""The end of a run: harvested boxes, the numbers of Table 2, and pictures, in one folder.

write_report(out_dir, mining, ds, test, config, rounds) writes
    boxes.csv       AM boxes (from H_f), BBox_List_2017.csv columns + score, rank
    figures/*.png   Fig. 2-style strips (figures.py); not with --report-extras false
    report.md       the tables below, with links to the figures
    report.json     every number, machine-readable (NaN as null); written last
Every number comes from minimal_amkp.reference (auroc, acc_afp_table, max_box_acc_v2); this
module only arranges inputs and outputs. Three localizers are compared on the mining images:
the box prior (no image, harvest.box_prior), the baseline H_1 (t = 1) and AM's H_f (t = T),
with the per-lesion numbers of lesions.py beside the tables and what each round of mining did,
and on the phantom's positive control (lesion_kinds.csv) the recall of its lesions A and B.
"""
import contextlib
import json
import math
import os
import re
import urllib.parse

import numpy as np

from minimal_amkp import reference as R
from minimal_amkp.run.atomic import atomic_write_text
from minimal_amkp.run.pool import cpus, processes
from minimal_amkp.classes import BOX_CLASSES, CLASSES, SHORT_NAMES
from minimal_amkp.run.figures import write_figures
from minimal_amkp.data.images import frame
from minimal_amkp.data.writers import write_boxes_csv
from minimal_amkp.harvest import box_prior, by_class, check_mining, fused, harvest, upsample
from minimal_amkp.run.lesions import (CUTS, EXTENDED, KIND_IOUS, gain_and_loss_picks, gains, ground_truth,
                                  kind_recall, later_peaks, lesion_numbers, peaks_in_chest)
from minimal_amkp.mine import ROUND_RECORD
from minimal_amkp.data.phantom import read_chest_masks

METHODS = ("prior", "baseline", "am")
TITLES = {"prior": "Box prior (mean GT box, leave-one-image-out)",
          "baseline": "Baseline (H_1, t = 1)", "am": "AM (H_f, eq. 8, t = T)"}
OVERLAPS = {"iou": "T(IoU)", "iobb": "T(IoBB)"}
SUMMARY_IOU = 0.3
ALL_BOXES_IOU = (0.1, 0.3)       # the T(IoU) columns of Tables 1 and 3: every box of B counts
# MaxBoxAccV2 thresholds each map 100 times. It is evaluated in the S×S model-input frame
# (Choe et al. use 224 px), capped at this size: IoU does not change when both boxes are scaled
# alike, so the cap costs little accuracy and saves minutes on 1024-px inputs.
MAXBOX_SIZE = 256
# MaxBoxAccV2 took 13 ms of CPU a map (100 thresholds, a labelling each) on the 2-core
# machine, and a worker process 0.75 s to start: from this many maps on (the default run has
# 1,248), the classes go to processes.
POOL_MIN_MAPS = 400
SKIPPED = "--report-extras false"


def check_test(test):
    """Validate the test dict; return scores (M, 14), labels (M, 14)."""
    missing = [k for k in ("names", "scores", "labels") if k not in test]
    if missing:
        raise ValueError(f"test: missing keys {missing}")
    m, c = len(test["names"]), len(CLASSES)
    scores, labels = np.asarray(test["scores"], dtype=np.float64), np.asarray(test["labels"])
    if scores.shape != (m, c) or labels.shape != (m, c):
        raise ValueError(f"test['scores'] {scores.shape} and test['labels'] {labels.shape} must "
                         f"both be (M = {m} names, {c})")
    return scores, labels


def max_box_acc(heatmaps, names, frames, gt, size, grid):
    """MaxBoxAccV2 (reference) of each localizer per box class over its images with ground
    truth, and their mean.

    heatmaps {method: (n, 8, h, w) on `grid`}: each map is upsampled to size × size and the
    ground truth scaled by size/W, size/H; gt as ground_truth(). With POOL_MIN_MAPS maps or
    more, the (method, class) pairs are scored in processes (run/pool.py), which return them
    in order. They are sent the upsampled maps and run the reference alone: a worker that
    imported this module would import torch, which takes longer than the maps take to send.
    -> {method: {class: result or None, "mean": float}}.
    """
    maps, boxes = {}, {}
    for m, h in heatmaps.items():
        for c, cls in enumerate(BOX_CLASSES):
            rows = [i for i, name in enumerate(names) if len(gt[c][name])]
            if rows:
                maps[m, cls] = [upsample(h[i, c], size, size, grid) for i in rows]
                boxes[m, cls] = [gt[c][names[i]] * np.tile([size / frames[i][0], size / frames[i][1]], 2) for i in rows]
    workers = min(cpus(), len(maps))
    with contextlib.ExitStack() as stack:
        run = map
        if workers > 1 and sum(map(len, maps.values())) >= POOL_MIN_MAPS:
            run = stack.enter_context(processes(workers)).map
        results = dict(zip(maps, run(R.max_box_acc_v2, maps.values(), boxes.values())))
    out = {m: {cls: results.get((m, cls)) for cls in BOX_CLASSES} for m in heatmaps}
    for r in out.values():
        r["mean"] = nanmean([v["value"] for v in r.values() if v is not None])
    return out


def nanmean(values):
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else math.nan


def jsonable(x):
    """NumPy -> plain Python for json; NaN and infinities -> None (JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def fmt(v):
    return "n/a" if v is None or math.isnan(v) else f"{v:.2f}"


def rounds_markdown(rounds):
    """The table of what each mining round did (mine.ROUND_RECORD), as report.md lines."""
    if not rounds:
        return []
    lines = ["## Attention-mining rounds", "",
             "| t | epochs | erased-image loss before → after | λ, mean λ·L_KP / L_cls | "
             "‖∇‖ erased positives / rest of L_cls / λ·L_KP | box-class AUROC N_B (N_A) | movement |",
             "|---|---|---|---|---|---|---|"]
    for d in rounds:
        norms = " / ".join("n/a" if d[k] is None else f"{d[k]:.3f}" for k in ("grad_am", "grad_cls", "grad_kp"))
        lines.append(f"| {d['t']} | {d['epochs']} | {d['loss_before']:.4f} → {d['loss_after']:.4f} | "
                     f"{fmt(d['lam'])}, {fmt(d['kp_ratio'])} | {norms} | {fmt(d['auroc_b'])} ({fmt(d['auroc_a'])}) | "
                     f"{fmt(d['movement'])} |")
    return lines + [""] + [f"- {k}: {v}" for k, v in ROUND_RECORD.items() if k != "t"] + [""]


def lesions_markdown(lesions, later):
    """Recall by lesion count and extent IoU (lesions.py) for H_1 and H_f, and where later
    rounds peak on multi-lesion maps, as report.md lines."""
    lines = ["## Lesion by lesion (every box of an image counts)", "",
             "| method | " + " | ".join(f"recall {k}: multi / single" for k in lesions["baseline"]["recall"])
             + " | extent IoU |", "|" + "---|" * (len(CUTS) + 2)]
    for m in ("baseline", "am"):
        rec = lesions[m]["recall"]
        lines.append(f"| {TITLES[m]} | " + " | ".join(f"{fmt(v['multi'])} / {fmt(v['single'])}" for v in rec.values())
                     + f" | {fmt(lesions[m]['extent_iou_mean'])} |")
    some = next(iter(lesions["baseline"]["recall"].values()))
    lines += ["", f"Multi: the {some['n_multi']} ground-truth boxes of images with two or more boxes of their "
              f"class; single: the other {some['n_single']}. Extent IoU: the best IoU of an image's boxes "
              f"with each ground-truth box, mean over {', '.join(EXTENDED)}.", "",
              "| extent IoU | " + " | ".join(SHORT_NAMES) + " |", "|" + "---|" * (len(SHORT_NAMES) + 1)]
    lines += [f"| {m} | " + " | ".join(fmt(lesions[m]["extent_iou"][c]) for c in BOX_CLASSES) + " |"
              for m in ("baseline", "am")]
    if later:
        lines += ["", "Do later rounds find the other lesions? On maps with two or more ground-truth boxes, "
                  "the share whose peak over the cells M_{t-1} left lies in a box: H_t of the network as "
                  "mining trained it, against a frozen network's H_1 ⊙ M_{t-1} (H_1's next peak).", "",
                  "| t | maps | learnt H_t | frozen H_1 ⊙ M_{t-1} |", "|---|---|---|---|"]
        lines += [f"| {d['t']} | {d['maps']} | {fmt(d['learned'])} | {fmt(d['frozen'])} |" for d in later]
    return lines + [""]


def kinds_markdown(kinds):
    """Recall of the positive control's lesions A and B (lesions.kind_recall) for H_1 and H_f, as
    report.md lines; none without lesion_kinds.csv."""
    if kinds is None:
        return []
    heads = [(k, f"iou {t:g}") for k in kinds["baseline"] for t in KIND_IOUS]
    lines = ["## Lesions A and B (the positive control)", "",
             "| method | " + " | ".join(f"{k}: recall IoU {c[4:]}" for k, c in heads) + " |",
             "|" + "---|" * (len(heads) + 1)]
    lines += [f"| {TITLES[m]} | " + " | ".join(fmt(kinds[m][k][c]) for k, c in heads) + " |" for m in ("baseline", "am")]
    counts = ", ".join(f"{v['n']} of kind {k}" for k, v in kinds["baseline"].items())
    return lines + ["", f"Ground-truth boxes of the mining images: {counts} (lesion_kinds.csv). A lesion is found when "
                    "some box harvested for its image and class overlaps it by that IoU.", ""]


def md_text(text):
    """text (on one line) as literal Markdown inside a link or image text: the characters that
    could end the text, start markup or an HTML tag are backslash-escaped."""
    return re.sub(r"([\\`*_\[\]()<>!&|])", r"\\\1", " ".join(str(text).split()))


def md_link(path):
    """A relative path as a Markdown link target: percent-encoded, so ( ) spaces and < > stay inside it."""
    return urllib.parse.quote(path.replace(os.sep, "/"))


def markdown(r, figures):
    """report.md from the report dict r (before jsonable) and the figure paths (None: not drawn)."""
    s = r["summary"]
    lines = [
        "# Attention-mining report", "",
        f"{r['n_mining_images']} mining images, T = {r['T']} mining steps, model input "
        f"{r['image_size']}×{r['image_size']}, heatmaps {r['heatmap_size'][0]}×"
        f"{r['heatmap_size'][1]}, {sum(r['n_gt_boxes'].values())} ground-truth boxes.", "",
        f"**Mean Acc over the 8 box classes at T(IoU) = {SUMMARY_IOU}:** box prior "
        f"{fmt(s['prior'])}, baseline (t = 1) {fmt(s['baseline'])}, AM (t = T) {fmt(s['am'])}.", "",
        f"**Classifier:** mean test AUROC over the 8 box classes {fmt(r['box_auroc'])} (on test "
        f"images that are never mined); H_1 peaks inside the chest in "
        + ("n/a (no chest masks: real data)" if r["h1_peaks_in_chest"] is None
           else f"{100 * r['h1_peaks_in_chest']:.0f}% of the labelled mining maps") + ".", "",
        "## Every box in B (Tables 1 and 3)", "",
        "Acc with all of each method's boxes taken, no AFP bound.", "",
        "| T(IoU) | method | " + " | ".join(SHORT_NAMES) + " | mean |", "|" + "---|" * (len(SHORT_NAMES) + 3),
        *(f"| {t:g} | {m} | " + " | ".join(fmt(a) for a in r["all_boxes"][m][str(t)]) +
          f" | {fmt(nanmean(r['all_boxes'][m][str(t)]))} |" for t in ALL_BOXES_IOU for m in METHODS), "",
        *rounds_markdown(r["rounds"]),
        *lesions_markdown(r["lesions"], r["later_peaks"]),
        *kinds_markdown(r["kinds"]),
        "## Boxes per class", "",
        "| | " + " | ".join(SHORT_NAMES) + " |", "|" + "---|" * (len(SHORT_NAMES) + 1),
        "| ground truth | " + " | ".join(str(r["n_gt_boxes"][c]) for c in BOX_CLASSES) + " |",
        *("| " + m + " | " + " | ".join(str(r["n_boxes"][m][c]) for c in BOX_CLASSES) + " |"
          for m in METHODS), ""]
    for ov, head in OVERLAPS.items():
        same = " The same bounds serve T(IoBB)." if ov == "iobb" else ""
        lines += [f"## Localization, Acc-AFP at {head} (Table 2)", "",
                  f"Boxes are taken from the ranked list B until AFP would pass the bound (the "
                  f"\"ref.\" AFP of Table 2).{same}", ""]
        for m in METHODS:
            lines += [f"### {TITLES[m]}", "", R.format_acc_afp(r["acc_afp"][ov][m]), ""]
    lines += ["## MaxBoxAccV2 (mean over δ ∈ {0.3, 0.5, 0.7})", ""]
    if r["max_box_acc_v2"] is None:
        lines.append(f"Not computed ({SKIPPED}).")
    else:
        lines += ["| method | " + " | ".join(SHORT_NAMES) + " | mean |", "|" + "---|" * (len(SHORT_NAMES) + 2)]
        for m in ("baseline", "am"):
            mb = r["max_box_acc_v2"][m]
            cells = [fmt(mb[c]["value"] if mb[c] else None) for c in BOX_CLASSES]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {fmt(mb['mean'])} |")
    lines += ["", f"## Classification, AUROC on the test split ({r['n_test_images']} images)", "",
              "| class | AUROC | positives |", "|---|---|---|"]
    lines += [f"| {c} | {fmt(r['auroc'][c])} | {r['test_positives'][c]} |" for c in CLASSES]
    lines += [f"| mean | {fmt(r['mean_auroc'])} | |", "", "## Figures", "",
              "Per box class, the map where H_f gains most over H_1 and the one where it loses most, by "
              "the mean over the map's ground-truth boxes of (best IoU of the AM boxes) − (best IoU of the "
              "baseline boxes); each strip says which. Image with ground truth (red); H_1 with the "
              "baseline's boxes (green); H_2..H_T with the region erased before that step hatched; H_f "
              "with the AM boxes (green).", ""]
    lines += [f"Not drawn ({SKIPPED})."] if figures is None else \
        [f"![{md_text(os.path.basename(p))}]({md_link(p)})" for p in figures]
    lines += ["", "## Notes", "",
              "- Box prior: each class's mean ground-truth box (relative centre and size), one per "
              "positive image, averaged over the OTHER mining images' boxes. ChestX-ray14's training "
              "split has no boxes, so this is a generous prior: it has seen the other true boxes.",
              "- Harvested boxes: up to 3 per image and labelled box class, from the heatmap upsampled "
              f"bilinear to the PNG's frame, each cell at its receptive-field centre (cell (r, c) at "
              f"{r['grid']['stride']:g}·(c, r) + {r['grid']['offset']:g} px of the {r['image_size']}-px input, "
              "reference/geometry.py); boxes.csv holds the AM boxes.",
              f"- MaxBoxAccV2 is computed per class in a {r['max_box_acc_v2_size']}-px square frame "
              "(the model input, capped); its mean is over classes.", "", "## Config", "", "```json",
              # a backquote inside a value (a path, say) could close the fence: JSON may spell it \u0060
              json.dumps(jsonable(r["config"]), indent=2, sort_keys=True).replace("`", "\\u0060"), "```", ""]
    return "\n".join(lines)


def write_report(out_dir, mining, ds, test, config, rounds=()):
    """Harvest, evaluate and draw; write boxes.csv, figures/, report.md, report.json. -> report dict.

    mining: names (n), labels (n, 14), cams and masks (T, n, 8, h, w), image_size S;
    ds: ChestXray14; test: names (M), scores (M, 14), labels (M, 14); config: JSON-able dict;
    rounds: the round records of mine.attention_mining (mine.ROUND_RECORD), if any.
    """
    names, labels, cams, masks, size, grid = check_mining(mining, ds)
    scores, test_labels = check_test(test)
    try:
        json.dumps(jsonable(config))
    except (TypeError, ValueError) as e:
        raise ValueError(f"config: not JSON-able ({e})") from None
    extras = config.get("run", {}).get("report_extras", True)
    frames = [frame(ds, name) for name in names]
    h_1, h_f = np.asarray(cams[0], dtype=np.float64), fused(cams, masks)   # (n, 8, h, w) each
    boxes = {"prior": box_prior(names, labels, frames, ds.boxes),
             "baseline": harvest(h_1, names, labels, frames, grid),
             "am": harvest(h_f, names, labels, frames, grid)}
    gt = ground_truth(names, ds.boxes)
    acc_afp = {ov: {m: R.acc_afp_table(by_class(boxes[m], names), gt, overlap=ov) for m in METHODS}
               for ov in OVERLAPS}
    at = R.DEFAULT_IOU_THRESHOLDS.index(SUMMARY_IOU)
    all_boxes = {m: {str(t): R.acc_afp_table(by_class(boxes[m], names), gt, thresholds=(t,),
                                             bounds=np.inf)["acc"][0] for t in ALL_BOXES_IOU}
                 for m in METHODS}
    auroc = {c: R.auroc(scores[:, k], test_labels[:, k]) for k, c in enumerate(CLASSES)}
    r = dict(
        n_mining_images=len(names), T=int(cams.shape[0]), image_size=size,
        heatmap_size=list(cams.shape[3:]), grid=dict(stride=grid.stride, offset=grid.offset),
        n_test_images=len(scores),
        n_gt_boxes={c: sum(len(g) for g in gt[k].values()) for k, c in enumerate(BOX_CLASSES)},
        n_boxes={m: {c: sum(b.label == k for b in boxes[m]) for k, c in enumerate(BOX_CLASSES)}
                 for m in METHODS},
        summary={m: nanmean(acc_afp["iou"][m]["acc"][at]) for m in METHODS},
        acc_afp=acc_afp, afp_bounds=R.DEFAULT_AFP_BOUNDS,
        max_box_acc_v2_size=min(size, MAXBOX_SIZE),
        max_box_acc_v2=max_box_acc({"baseline": h_1, "am": h_f}, names, frames, gt, min(size, MAXBOX_SIZE), grid)
        if extras else None,
        all_boxes=all_boxes, rounds=[dict(d) for d in rounds],
        lesions={m: lesion_numbers(boxes[m], names, gt) for m in ("baseline", "am")},
        kinds=None if ds.kinds is None else {m: kind_recall(boxes[m], names, ds.kinds) for m in ("baseline", "am")},
        later_peaks=later_peaks(np.asarray(cams, dtype=np.float64), masks, names, frames, gt, grid),
        h1_peaks_in_chest=peaks_in_chest(h_1, names, labels, read_chest_masks(ds.root), grid),
        auroc=auroc, mean_auroc=nanmean(list(auroc.values())),
        box_auroc=nanmean([auroc[c] for c in BOX_CLASSES]),
        test_positives={c: int(test_labels[:, k].sum()) for k, c in enumerate(CLASSES)},
        config=config)
    picks = gain_and_loss_picks(gains(boxes["baseline"], boxes["am"], names, gt))
    figures = write_figures(out_dir, mining, ds, grid, h_f, boxes["baseline"], boxes["am"], picks) if extras else None
    write_boxes_csv(os.path.join(out_dir, "boxes.csv"), boxes["am"])
    atomic_write_text(os.path.join(out_dir, "report.md"), markdown(r, figures))
    r["figures"] = figures or []
    r = jsonable(r)
    atomic_write_text(os.path.join(out_dir, "report.json"), json.dumps(r, indent=1) + "\n")
    return r
