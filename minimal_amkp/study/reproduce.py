"""Tables 1-3 of the paper, re-run with several seeds: `python -m minimal_amkp.study.reproduce`.

    python -m minimal_amkp.study.reproduce [--seeds 0,...,5] [--sizes S1[,S2]] [--out runs/reproduce]
        [--result minimal_amkp/study/results/reproduction.md] [--notes minimal_amkp/study/results/reproduction_notes.md]
        [--mining-only STUDY] [any option of python -m minimal_amkp but those set per cell]

`--mining-only STUDY` runs only the am-* cells (Tables 2, 3), each from the classifier that
STUDY's am-full cell trained for that seed: mining settings (--mine.lr ...) can be tried in
minutes. The classifier's model, data and train settings must be the ones given here.

Without --data the study runs on the default run's phantom (phantom v2, 6000 images). With
`--preset paper --data DIR` it runs the same study on ChestX-ray14 (sizes 512,1024; a GPU).
By default the `tiny` preset studies one size, the preset's (128), and `paper` two (512, 1024):
`--sizes S1` alone leaves out Table 1's second resolution (the t1-*-S2 cells, each about 4
times the cost of an S1 cell at twice the side) and its claim, so that the 6 seeds fit 90
minutes on 2 CPU cores.

Every cell is an ordinary run of `python -m minimal_amkp` in its own folder <out>/<cell>-seed<k>,
so nothing is lost when the study is interrupted: rerun the same command and finished cells
(report.json present, written under the same settings) are read back, a cell cut short resumes
from its checkpoint. Per seed:

    am-full              ResNet-MSA (bilinear) at S1, T = 3 AM rounds with full KP   Tables 2, 3
    am-vanilla, am-none  KP-Vanilla, no KP: forked from am-full's N_A (the classifier as it was
                         before mining, so it is trained once and the three differ in KP only)
    t1-<msa>-<S>         msa none | bilinear | deconv at S1 and S2: H_1 of the trained classifier,
                         no AM fine-tuning (T = 1, 0 mining epochs)                  Table 1
                         (t1-bilinear-S1 is forked from am-full too)

The no-MSA network trains for as many epochs as ResNet-MSA does in all its phases together.
Tables 1 and 3 score all boxes in B (no AFP cap) at T(IoU) 0.1 and 0.3; Table 2 is each
am-full's report.json (prior, H_1 and H_f under the AFP bounds of Table 2). study/tables.py
writes the tables, the paper's numbers beside them and the verdicts.
"""
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from minimal_amkp.study import tables
from minimal_amkp.run import checkpoint
from minimal_amkp.run import cli
from minimal_amkp.run.job import IGNORED_ON_RESUME, phantom_root, run, start_from_classifier
from minimal_amkp import reference as R
from minimal_amkp.run.atomic import atomic_write_text
from minimal_amkp.run.machine import device_name
from minimal_amkp.data.chestxray import DataError, read_dataset
from minimal_amkp.classes import BOX_CLASSES
from minimal_amkp.config import RunError
from minimal_amkp.run.settings import as_json, differences, from_dict, problem, to_dict
from minimal_amkp.data.images import frame
from minimal_amkp.harvest import by_class, check_mining, fused, harvest, read_mining
from minimal_amkp.run.lesions import peak_in_box
from minimal_amkp.model import ResNetMSA
from minimal_amkp.run.progress import clock
from minimal_amkp.run.report import ground_truth

ALL_BOXES_IOU = (0.1, 0.3)                 # the T(IoU) columns of Tables 1 and 3
# The study reads neither MaxBoxAccV2 nor the figures of its cells' reports: a minute saved per cell at 256 px.
STUDY_DEFAULTS = ["--report-extras", "false"]
# Set by the study for each cell; given on the command line they would make the cells alike.
MANAGED = ("--seed", "--out", "--resume", "--overwrite", "--data.image-size", "--data.image_size",
           "--data.phantom-size", "--data.phantom_size", "--model.msa", "--mine.kp", "--mine.rounds")


@dataclass
class StudyConfig:
    seeds: tuple = (0, 1, 2, 3, 4, 5)      # training seeds; the data (phantom seed) stays fixed
    sizes: tuple = ()                      # (S1[, S2]) of Table 1; () = the preset's S (tiny), S and 2 S (paper)
    out: str = "runs/reproduce"
    result: str = "minimal_amkp/study/results/reproduction.md"
    notes: str = "minimal_amkp/study/results/reproduction_notes.md"   # findings written by hand, quoted verbatim
    mining_only: str = ""                  # a finished study: run its am-* cells again from its classifiers


def _ints(option, text, counts=None):
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise cli.UsageError(f"{option}: cannot read {text!r} as comma-separated integers") from None
    if counts is not None and len(values) not in counts:
        raise cli.UsageError(f"{option}: needs {' or '.join(map(str, counts))} values, got {text!r}")
    if len(set(values)) != len(values):
        raise cli.UsageError(f"{option}: values must differ, got {text!r}")
    return values


def parse(argv):
    """argv -> (StudyConfig, the options passed on to every cell)."""
    p = cli.Parser(prog="python -m minimal_amkp.study.reproduce", allow_abbrev=False)
    for name in ("seeds", "sizes", "out", "result", "notes", "mining-only"):
        p.add_argument(f"--{name}")
    ns, rest = p.parse_known_args(argv)
    for token in rest:
        if token.split("=")[0] in MANAGED:
            raise cli.UsageError(f"{token.split('=')[0]}: set by the study for each cell; see --help of "
                                 "minimal_amkp.study.reproduce (--seeds, --sizes, --out)")
    study = StudyConfig(out=ns.out or StudyConfig.out, result=ns.result or StudyConfig.result,
                        notes=StudyConfig.notes if ns.notes is None else ns.notes,
                        mining_only=ns.mining_only or "")
    if study.mining_only and not os.path.isdir(study.mining_only):
        raise RunError(f"--mining-only {study.mining_only}: no such folder")
    if ns.seeds is not None:
        study.seeds = _ints("--seeds", ns.seeds)
    given = STUDY_DEFAULTS + rest
    cfg = cli.parse(given)[0]                  # every passed option checked once, up front
    if cfg.run.data and not os.path.isdir(cfg.run.data):
        raise RunError(f"--data {cfg.run.data}: no such folder")
    size = cfg.data.image_size
    # tiny: one size, so the 6 seeds fit 90 minutes on 2 CPU cores (results/reproduction_notes.md).
    default = (size,) if cfg.run.preset == "tiny" else (size, 2 * size)
    study.sizes = _ints("--sizes", ns.sizes, (1, 2)) if ns.sizes is not None else default
    if min(study.sizes) < 32:
        raise cli.UsageError(f"--sizes: each size must be >= 32, got {ns.sizes!r}")
    return study, given


def cells(study):
    """[(name, options, folder of the cell to fork from or None)] in run order, forks after their source."""
    s1 = study.sizes[0]
    out = []
    for seed in study.seeds:
        def cell(kind, *opts, source=None, s=s1):
            name = f"{kind}-seed{seed}"
            out.append((name, ["--seed", str(seed), "--out", os.path.join(study.out, name),
                               "--data.image-size", str(s), "--data.phantom-size", str(s), *opts], source))
        trained = os.path.join(study.mining_only or study.out, f"am-full-seed{seed}")
        for kp in ("full", "vanilla", "none"):
            cell(f"am-{kp}", "--model.msa", "bilinear", "--mine.kp", kp, "--mine.rounds", "3",
                 source=trained if kp != "full" or study.mining_only else None)
        for s in () if study.mining_only else study.sizes:
            for msa in ("none", "bilinear", "deconv"):
                cell(f"t1-{msa}-{s}", "--model.msa", msa, "--mine.rounds", "1", "--mine.epochs", "0",
                     source=trained if (msa, s) == ("bilinear", s1) else None, s=s)
    return out


def with_epochs(given, options):
    """The no-MSA network trains base + msa_frozen + msa epochs in its one phase."""
    cfg = cli.parse(given + options)[0]
    if cfg.model.msa != "none":
        return options
    t = cfg.train
    return options + ["--train.base-epochs", str(t.base_epochs + t.msa_frozen_epochs + t.msa_epochs)]


def fork(source, cfg):
    """Make cfg.run.out a run of Config cfg that starts from the source run's N_A, the network
    as trained before mining began (its model, data and train settings must be cfg's)."""
    out = cfg.run.out
    state = checkpoint.load(source)
    if state is None or state["mining"] is None:
        raise RunError(f"{source}: holds no network trained up to mining to fork {out} from")
    # Through from_dict, so a setting newer than the source run reads as its default.
    trained, wanted = as_json(to_dict(from_dict(state["config"]))), as_json(to_dict(cfg))
    diff = [f"{s}.{k}: {trained[s].get(k)!r} there, {v!r} here" for s in ("model", "data", "train")
            for k, v in wanted[s].items() if k not in ("workers", "preload") and trained[s].get(k) != v]
    diff += [f"run.{k}" for k in ("data", "init") if trained["run"][k] != wanted["run"][k]]
    if diff:
        raise RunError(f"{source}: its network was trained with other settings ({'; '.join(diff[:3])}); "
                       f"cannot fork {out} from it")
    model = ResNetMSA(cfg.model)
    checkpoint.restore_model(model, state["mining"]["model_a"], checkpoint.path(source))
    shutil.rmtree(out, ignore_errors=True)
    start_from_classifier(cfg, model, state["data"])     # the fork mines from N_A as its own classifier


def check_finished(name, argv):
    """RunError unless the cell's report.json was written by a run of exactly these settings."""
    out = argv[argv.index("--out") + 1]
    path = os.path.join(out, "report.json")
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f).get("config")
    except (OSError, ValueError, AttributeError) as e:
        raise RunError(f"cell {name}: {path} is unreadable ({e}); delete {out} to run the cell again") from None
    what = problem(stored)
    diff = [what] if what else differences(stored, as_json(to_dict(cli.parse(argv)[0])), IGNORED_ON_RESUME)
    if diff:
        raise RunError(f"cell {name}: {path} came from other settings ({'; '.join(diff[:3])}); use another --out, "
                       f"or delete {out} to run the cell again")


def run_cell(name, argv, source):
    """Run (or resume, or fork and then run) one cell unless it has finished; its time goes to seconds.json."""
    out = argv[argv.index("--out") + 1]
    if os.path.exists(os.path.join(out, "report.json")):
        check_finished(name, argv)
        return
    start = time.perf_counter()
    if source is not None and not os.path.exists(os.path.join(out, "config.json")):
        fork(source, cli.parse(argv)[0])
    resume = os.path.exists(os.path.join(out, "config.json"))
    if not resume and os.path.isdir(out):
        shutil.rmtree(out)                     # a cell that died before its first checkpoint
    try:
        run(cli.parse(argv)[0], resume=resume)
    except RunError as e:
        raise RunError(f"cell {name} failed ({e}); its folder is {out}") from None
    seconds = time.perf_counter() - start
    atomic_write_text(os.path.join(out, "seconds.json"), json.dumps({"seconds": seconds}) + "\n")


def all_boxes_acc(h_f, grid, names, labels, frames, gt):
    """Acc of every box class at ALL_BOXES_IOU using all of B, boxes from h_f (n, 8, h, w) on grid. -> (2, 8)."""
    boxes = harvest(h_f, names, labels, frames, grid)
    return R.acc_afp_table(by_class(boxes, names), gt, thresholds=ALL_BOXES_IOU, bounds=np.inf)["acc"]


def peak_hits(cams, masks, grid, names, frames, gt):
    """How often the peak of H_t (over the cells alive under M_{t-1}) and of H_f lies in a box.

    Over every (image, box class) with ground truth. -> {"H1".., "Hf": share of maps whose peak
    hits, "later": share of the maps whose H_1 peak missed where some later H_t's peak hits,
    "H2/H1 max": mean ratio of H_2's largest value over its live cells to H_1's largest}.
    """
    h_f = fused(cams, masks)                                                         # (n, 8, h, w)
    hits = {f"H{t + 1}": [] for t in range(len(cams))} | {"Hf": [], "later": [], "H2/H1 max": []}
    for c in range(len(BOX_CLASSES)):
        for i, name in enumerate(names):
            g = gt[c][name]
            if not len(g):
                continue
            per_t = [peak_in_box(np.where(masks[t, i, c] > 0, cams[t, i, c], -np.inf), grid, g, *frames[i])
                     for t in range(len(cams))]
            for t, v in enumerate(per_t):
                hits[f"H{t + 1}"].append(v)
            hits["Hf"].append(peak_in_box(h_f[i, c], grid, g, *frames[i]))
            if cams[0, i, c].max() > 0:
                hits["H2/H1 max"].append(np.max(cams[1, i, c][masks[1, i, c] > 0], initial=0) / cams[0, i, c].max())
            if not per_t[0]:
                hits["later"].append(any(per_t[1:]))
    return {k: float(np.mean(v)) if v else float("nan") for k, v in hits.items()}


def measure(out, datasets):
    """One finished cell -> {all_boxes: {t: (2, 8)}, acc_afp: report.json's T(IoU) tables, seconds}."""
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    cfg = from_dict(report["config"])
    root = cfg.run.data or phantom_root(cfg)
    if root not in datasets:
        datasets[root] = read_dataset(root)
    ds = datasets[root]
    names, labels, cams, masks, _, grid = check_mining(read_mining(os.path.join(out, "mining.npz")), ds)
    frames = [frame(ds, n) for n in names]
    gt = ground_truth(names, ds.boxes)
    seconds = float("nan")
    if os.path.exists(os.path.join(out, "seconds.json")):
        with open(os.path.join(out, "seconds.json"), encoding="utf-8") as f:
            seconds = json.load(f)["seconds"]
    all_boxes = {t: all_boxes_acc(fused(cams[:t], masks[:t]), grid, names, labels, frames, gt)
                 for t in range(1, len(cams) + 1)}
    if len(cams) > 1:
        all_boxes["normalised"] = all_boxes_acc(fused(R.normalise_live(cams, masks), masks), grid, names, labels,
                                                frames, gt)
    return dict(all_boxes=all_boxes,
                acc_afp=report["acc_afp"]["iou"], seconds=seconds,
                peaks=peak_hits(cams, masks, grid, names, frames, gt) if len(cams) > 1 else None,
                lesions=report["lesions"],
                n_mining=len(names),
                n_gt=sum(report["n_gt_boxes"].values()))


def run_study(study, given, argv):
    plan = cells(study)
    start = time.perf_counter()
    for i, (name, options, source) in enumerate(plan):
        cell_argv = given + with_epochs(given, options)
        print(f"minimal_amkp.study.reproduce: cell {i + 1}/{len(plan)} {name}  ({clock(time.perf_counter() - start)} "
              "so far)", file=sys.stderr, flush=True)
        run_cell(name, cell_argv, source)
    datasets, results = {}, {}
    for name, options, _ in plan:
        kind, seed = name.rsplit("-seed", 1)
        results.setdefault(kind, {})[int(seed)] = measure(options[options.index("--out") + 1], datasets)
    cfg = cli.parse(given + ["--data.image-size", str(study.sizes[0])])[0]
    notes = None
    if study.notes and os.path.exists(study.notes):
        with open(study.notes, encoding="utf-8") as f:
            notes = f.read()
    meta = dict(machine=device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                threads=torch.get_num_threads(), cpus=os.cpu_count(), torch=torch.__version__,
                command=" ".join(["python -m minimal_amkp.study.reproduce", *argv]), preset=cfg.run.preset, data=cfg.run.data,
                phantom_images=cfg.data.phantom_images, seeds=list(study.seeds), sizes=list(study.sizes),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    text = tables.markdown(results, meta, notes)
    os.makedirs(os.path.dirname(os.path.abspath(study.result)), exist_ok=True)
    atomic_write_text(study.result, text)
    return results


def main(argv=None):
    try:
        argv = sys.argv[1:] if argv is None else argv
        study, given = parse(argv)
        run_study(study, given, argv)
    except (RunError, DataError) as e:
        print(f"minimal_amkp.study.reproduce: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2 if isinstance(e, cli.UsageError) else 1
    except KeyboardInterrupt:
        print("minimal_amkp.study.reproduce: interrupted; the same command continues the study", file=sys.stderr)
        return 130
    print(f"minimal_amkp.study.reproduce: tables and verdicts in {study.result}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
