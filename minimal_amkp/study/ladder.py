"""The erasure ladder's table: one row per finished run, what its mining learnt.

    python -m minimal_amkp.study.ladder RUN [RUN ...]

Each RUN is a run's --out (usually forks of one classifier, `python -m minimal_amkp.study.fork`,
one per rung: --mine.erase feature | image, --mine.dilate R, --mine.holes matched,
--mine.oracle true). A row gives its mining options (those that differ from the preset's), the
erased-image loss change of each round, the box-class AUROC of N_B after the last round against
N_A's, and the maps:
- control runs (lesion_kinds.csv): the recall at IoU 0.3 of lesions A and B by H_1 and by H_f;
  on the maps with a B box, the share whose round-2 peak over the live cells lies in a B box,
  learnt H_2 against the frozen H_1 ⊙ M_1;
- other runs: multi-lesion recall at IoU 0.3 and mean Acc at IoU 0.3 under the AFP bounds, H_1
  and H_f; the report's round-2 peaks in a ground-truth box, learnt against frozen;
- all: the rim share, the maps whose round-2 peak over the live cells touches the region M_1
  erased (8-neighbours), learnt against frozen. A learnt rim share far above the frozen one
  would mean N_B reads what the receptive field carries across the region's edge.
"""
import json
import os
import sys

import numpy as np
from scipy import ndimage

from minimal_amkp.classes import BOX_CLASSES
from minimal_amkp.config import RunError, preset
from minimal_amkp.data.chestxray import read_dataset
from minimal_amkp.data.images import frame
from minimal_amkp.harvest import read_mining
from minimal_amkp.run.job import phantom_root
from minimal_amkp.run.lesions import peak_in_box
from minimal_amkp.run.settings import from_dict
from minimal_amkp.study.refit import targets

B = len(BOX_CLASSES)


def round2_maps(cams, masks, labels):
    """(image, class) -> [the learnt H_2, the frozen H_1 ⊙ M_1], −∞ on the cells M_1 erased, for
    the labelled maps where M_1 erased some but not all cells: their peaks are the live cells'."""
    out = {}
    for i, c in zip(*np.nonzero(labels[:, :B])):
        live = masks[1, i, c] > 0
        if not live.all() and live.any():
            out[(i, c)] = [np.where(live, h, -np.inf) for h in (cams[1, i, c], cams[0, i, c])]
    return out


def rim_share(maps, masks):
    """[learnt, frozen] share of round2_maps whose peak lies on the rim of M_1's erased region."""
    hits = []
    for (i, c), pair in maps.items():
        erased = masks[1, i, c] == 0
        rim = ndimage.binary_dilation(erased, np.ones((3, 3), bool)) & ~erased
        hits.append([rim[np.unravel_index(np.argmax(h), h.shape)] for h in pair])
    return np.mean(hits, axis=0) if hits else [float("nan")] * 2


def b_peak_share(maps, names, grid, ds):
    """[learnt, frozen] share of round2_maps with a lesion B box whose peak lies in a B box."""
    boxes = targets(ds, names)
    hits = [[peak_in_box(h, grid, boxes[key], *frame(ds, names[key[0]])) for h in pair]
            for key, pair in maps.items() if key in boxes]
    return np.mean(hits, axis=0) if hits else [float("nan")] * 2


def options(cfg):
    """The mining options of a run that differ from its preset's."""
    base = preset(cfg.run.preset).mine
    return " ".join(f"--mine.{k.replace('_', '-')} {str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in vars(cfg.mine).items() if getattr(base, k) != v) or "(preset)"


def row(run):
    """One table row (dict of formatted cells) for the finished run `run`."""
    path = os.path.join(run, "report.json")
    if not os.path.isfile(path):
        raise RunError(f"{run}: no report.json (not a finished run)")
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    cfg = from_dict(report["config"])
    mining = read_mining(os.path.join(run, "mining.npz"))
    ds = read_dataset(cfg.run.data or phantom_root(cfg))
    cams, masks, labels = mining["cams"], mining["masks"], mining["labels"]
    rounds = report["rounds"]
    out = dict(run=os.path.basename(os.path.normpath(run)), options=options(cfg),
               loss=" / ".join(f"{(d['loss_after'] - d['loss_before']) / d['loss_before']:+.1%}" for d in rounds),
               auroc=f"{rounds[-1]['auroc_b']:.3f} ({rounds[-1]['auroc_a']:.3f})")
    maps = round2_maps(cams, masks, labels) if len(cams) > 1 else {}
    rim = rim_share(maps, masks)
    out["rim"] = f"{rim[0]:.2f} vs {rim[1]:.2f}"
    if report.get("kinds"):
        k = report["kinds"]
        out["maps"] = " · ".join(f"{kind} {k['baseline'][kind]['iou 0.3']:.3f} → {k['am'][kind]['iou 0.3']:.3f}"
                                 for kind in ("A", "B"))
        share = b_peak_share(maps, mining["names"], mining["grid"], ds)
        out["peaks"] = f"B {share[0]:.2f} vs {share[1]:.2f}"
    else:
        lesions = report["lesions"]
        out["maps"] = (f"multi {lesions['baseline']['recall']['iou 0.3']['multi']:.3f} → "
                       f"{lesions['am']['recall']['iou 0.3']['multi']:.3f} · Acc "
                       f"{report['summary']['baseline']:.3f} → {report['summary']['am']:.3f}")
        later = report.get("later_peaks") or [dict(learned=float("nan"), frozen=float("nan"))]
        out["peaks"] = f"box {later[0]['learned']:.2f} vs {later[0]['frozen']:.2f}"
    return out


HEADER = ("| run | mining options | erased-image loss, per round | box AUROC N_B (N_A) | recall@0.3 H_1 → H_f "
          "(control: A · B; v2: multi-lesion · Acc AFP-bounded) | round-2 peak in a box, learnt vs frozen | "
          "round-2 peak on the rim, learnt vs frozen |\n|---|---|---|---|---|---|---|")


def main(argv=None):
    runs = sys.argv[1:] if argv is None else argv
    if not runs or any(r.startswith("-") for r in runs):
        sys.exit("usage: python -m minimal_amkp.study.ladder RUN [RUN ...]")
    try:
        rows = [row(r) for r in runs]
    except (OSError, KeyError, ValueError, RunError) as e:
        sys.exit(f"ladder: {e}")
    print(HEADER)
    for r in rows:
        print(f"| {r['run']} | `{r['options']}` | {r['loss']} | {r['auroc']} | {r['maps']} | {r['peaks']} | {r['rim']} |")


if __name__ == "__main__":
    main()
