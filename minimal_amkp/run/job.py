"""One run from a Config: the output folder, the data, training, mining and the report.

    report = run(cfg)                 what `python -m minimal_amkp` and the study both call

`run` checks and locks cfg.run.out (outdir.Folder), reads and checks the data (generating the
phantom once when no --data is given), then trains the classification phases (classify.py),
mines (mine.attention_mining) and writes the outputs, saving a checkpoint after every epoch
and round so `run(cfg, resume=True)` continues an interrupted run. Under torchrun it runs on
every process (distributed.session hands the method its runner); files are written by rank 0.
"""
import json
import os
import shutil

import numpy as np
import torch

from minimal_amkp import reference as R
from minimal_amkp.classes import BOX_CLASSES
from minimal_amkp.classify import classification_epoch, plan, set_phase
from minimal_amkp.config import RunError, validate
from minimal_amkp.data import phantom
from minimal_amkp.data.phantom import sibling
from minimal_amkp.data.chestxray import read_dataset
from minimal_amkp.data.images import Images, check_images, frame
from minimal_amkp.loop import optimizer, predict
from minimal_amkp.mine import attention_mining
from minimal_amkp.model import ResNetMSA, load_init, map_grid, map_size
from minimal_amkp.run import checkpoint, distributed, outdir
from minimal_amkp.run.atomic import atomic_open, atomic_write_text
from minimal_amkp.run.pool import cpus
from minimal_amkp.run.progress import Progress, say
from minimal_amkp.run.report import write_report
from minimal_amkp.run.settings import apply, as_json, differences, from_dict, problem, to_dict

IGNORED_ON_RESUME = ("run.device", "run.backend", "run.out", "run.report_extras")   # may change between the halves of one run
RESTARTS = "TORCHELASTIC_RESTART_COUNT"      # torchrun sets it: 0 on the first start, k on the k-th restart


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is available")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def restarts():
    """How often torchrun restarted this job (TORCHELASTIC_RESTART_COUNT); 0 without torchrun."""
    text = os.environ.get(RESTARTS, "0")
    if not (text.isascii() and text.isdigit()):
        raise RunError(f"{RESTARTS}={text!r}: expected a whole number (torchrun sets it)")
    return int(text)


def _stored_config(path):
    """config.json as a dict of this program's settings; a RunError, the file left alone, when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: unreadable ({e}); it is left as it is: pick another --out") from None
    what = problem(stored)
    if what:
        raise RunError(f"{path}: not a config.json of this program ({what}); it is left as it is: "
                       "pick another --out")
    return stored


def _inspect(cfg, resume, overwrite, given):
    """What --out allows: (config, resume, fresh: start over, deleting the manifest's files).

    given: the options given on the command line, which win over the stored ones on --resume;
    None when cfg is whole (the study), so a resumed run must hold exactly cfg.
    Reads only; a RunError when the folder holds what this run must not touch.
    """
    out = cfg.run.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out}: exists and is not a folder")
    stored_path = os.path.join(out, "config.json")
    stored = _stored_config(stored_path) if os.path.exists(stored_path) else None
    if os.path.isdir(out) and outdir.read_manifest(out) is None:
        stray = outdir.foreign(out, [])
        if stray:
            raise RunError(f"--out {out}: holds files this program did not write ({', '.join(stray[:3])}"
                           f"{', ...' if len(stray) > 3 else ''}); pick an empty or a new folder")
    if restarts():                              # torchrun restarted the job: continue its own run
        resume, overwrite = stored is not None, False
    if overwrite:
        return cfg, False, True
    if stored is None:
        if resume:
            raise RunError(f"--resume: {out} holds no run to resume")
        return cfg, False, True
    if resume and given is not None:
        cfg = validate(apply(from_dict(stored), {k: v for k, v in given.items() if k != "run.preset"}))
        cfg.run.out, cfg.run.preset = out, given.get("run.preset", cfg.run.preset)
    diff = differences(stored, as_json(to_dict(cfg)), IGNORED_ON_RESUME)
    if diff:
        raise RunError(f"--out {out} holds a different run ({'; '.join(diff[:3])}); "
                       "use another --out or pass --overwrite")
    if not resume:
        raise RunError(f"--out {out} already holds this run; pass --resume to continue it or --overwrite to replace it")
    return cfg, True, False


def prepare_out(cfg, resume, overwrite, given, folder):
    """Check --out against what it holds, then lock it (outdir.Folder) -> (config, resume).

    On --resume the stored settings win where not given. --overwrite deletes the files of the
    last run's manifest and nothing else. Under torchrun's elastic restarts a folder holding
    this run is resumed and one holding none is started, whatever the first start was told.
    """
    _inspect(cfg, resume, overwrite, given)      # refuse before writing anything into --out
    folder.lock()
    cfg, resume, fresh = _inspect(cfg, resume, overwrite, given)   # again: no other run can change it now
    if fresh:
        folder.remove_outputs()
    return cfg, resume


def phantom_root(cfg):
    """The cached phantom for these settings, generated on first use (atomically: a folder rename).
    A positive-control scenario is named with the version of its lesion B; v2's name has neither."""
    d = cfg.data
    scenario = "" if d.phantom_scenario == "v2" else f"-{d.phantom_scenario}-b{sibling.VERSION}"
    name = f"phantom-v{phantom.VERSION}{scenario}-n{d.phantom_images}-s{d.phantom_size}-seed{d.phantom_seed}"
    root = os.path.join("data", name)
    if not os.path.isdir(root):
        tmp = f"{root}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        say(f"generating the phantom data set into {root} (once)")
        # Every CPU: the files are the same whatever the number of processes (phantom.generate).
        phantom.generate(tmp, n_images=d.phantom_images, size=d.phantom_size, seed=d.phantom_seed,
                         progress=True, scenario=d.phantom_scenario, workers=cpus())
        try:
            os.rename(tmp, root)
        except OSError:                          # a concurrent run got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def load_data(cfg):
    """The data set and its three name lists (mining, train, test), every image checked."""
    root = cfg.run.data or phantom_root(cfg)
    if not os.path.isdir(root):
        raise RunError(f"--data {root}: no such folder")
    ds = read_dataset(root, skip_bad=cfg.run.skip_bad_images)
    mining = [n for n in ds.boxes if n in ds.entries]
    boxed = set(mining)
    train = [n for n in ds.train_val if n not in boxed]
    test = [n for n in ds.test if n not in boxed]
    check_space(cfg, len(mining))                # a full disk is found before the long image check
    good = set(check_images(ds, mining + train + test, workers=cfg.data.workers,
                            skip_bad=cfg.run.skip_bad_images))
    mining, train, test = ([n for n in names if n in good] for names in (mining, train, test))
    if not mining:
        raise RunError(f"{root}: no usable image has a box, so there is nothing to mine")
    if len(train) < 2:
        raise RunError(f"{root}: fewer than 2 usable train_val images")
    return ds, mining, train, test


def space_needed(cfg, n_mining):
    """Bytes the run's largest files take at once: checkpoint.pt twice (the new one is written
    beside the last), model.pt and mining.npz. Weights in float32; N_A, and each optimizer
    slot (SGD's momentum, AdamW's two moments), as large as the model; masks and CAMs of T rounds."""
    with torch.device("meta"):
        weights = 4 * sum(t.numel() for t in ResNetMSA(cfg.model).state_dict().values())
    h = map_size(cfg.data.image_size, cfg.model.msa, len(cfg.model.blocks))
    maps = n_mining * len(BOX_CLASSES) * h * h * cfg.mine.rounds * (1 + 4)       # uint8 masks, float32 CAMs
    slots = 2 if cfg.train.optimizer == "adamw" else 1
    return 2 * ((2 + slots) * weights + maps) + weights + maps


def check_space(cfg, n_mining):
    """RunError when --out's disk has less room than space_needed (counting the files the run replaces)."""
    out = cfg.run.out
    need = space_needed(cfg, n_mining)
    mine = sum(os.path.getsize(os.path.join(out, n)) for n in (checkpoint.NAME, "model.pt", "mining.npz")
               if os.path.isfile(os.path.join(out, n)))
    free = shutil.disk_usage(out).free
    if free + mine < need:
        raise RunError(f"--out {out}: {free / 2**20:.0f} MiB free on its disk, and this run needs about "
                       f"{(need - mine) / 2**20:.0f} MiB more (checkpoint.pt twice while it is rewritten, model.pt, "
                       "mining.npz); free some space or pick another --out")


def _save_npz(path, **arrays):
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def oracle_masks(ds, names, grid, h):
    """M_1 of --mine.oracle: in each mining image's mask of a class, the cells whose footprint
    (centre ± stride/2, the pixels reference.erase_image takes with the cell) meets one of its
    lesion A boxes (the positive control's lesion_kinds.csv) set to 0, so that image erasure
    leaves no strip of A -> uint8 (n, 8, h, h). RunError on data without lesion_kinds.csv."""
    if ds.kinds is None:
        raise RunError("--mine.oracle: the data has no lesion_kinds.csv; only the positive control "
                       "(--data.phantom-scenario hidden-sibling) says which box is lesion A")
    index = {name: i for i, name in enumerate(names)}
    m = np.ones((len(names), len(BOX_CLASSES), h, h), np.uint8)
    for box, kind in ds.kinds:
        if kind == "A" and box.image in index:
            width, height = frame(ds, box.image)
            gx, gy = grid[0] / 2 * width / grid[2], grid[0] / 2 * height / grid[2]     # half a stride in the frame
            grown = (box.x - gx, box.y - gy, box.w + 2 * gx, box.h + 2 * gy)
            m[index[box.image], box.label][R.cells_in_box(grown, h, grid, width, height)] = 0
    return torch.from_numpy(m)


def run_job(cfg, data, resume, runner):
    """Train, mine, score the test split and write the report; resumable after every epoch."""
    ds, mining_names, train_names, test_names = data
    out, seed, device = cfg.run.out, cfg.run.seed, runner.device
    torch.manual_seed(seed)
    model = distributed.sync_batch_norm(ResNetMSA(cfg.model, backend=cfg.run.backend).to(device), device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)      # inputs follow in loop.to_device
    h = map_size(cfg.data.image_size, cfg.model.msa, len(cfg.model.blocks))
    oracle = oracle_masks(ds, mining_names, map_grid(model, cfg.data.image_size), h) \
        if cfg.mine.oracle else None
    phases, done = plan(cfg), (0, 0)
    fingerprint = checkpoint.fingerprint(ds, mining_names, train_names, test_names)
    state = runner.on_main(checkpoint.load, out, phases=phases, mine=cfg.mine, n_mining=len(mining_names),
                                h=h, config=to_dict(cfg), ignored=IGNORED_ON_RESUME, data=fingerprint) if resume else None
    if state is None and cfg.run.init:
        load_init(model, cfg.run.init)
    runner.on_main(atomic_write_text, os.path.join(out, "config.json"), json.dumps(to_dict(cfg), indent=2) + "\n")
    if state is not None:
        checkpoint.restore_model(model, state["model"], checkpoint.path(out))
        checkpoint.restore_rng(state, device)
        done = (state["phase"], state["epoch"])
        where = f"epoch {done[1]} of phase {done[0] + 1}/{len(phases)}" if done[0] < len(phases) else \
            f"round {state['mining']['round']} of attention mining" if state["mining"] else "training"
        say(f"resuming {out} after {where}")
    size, workers, preload = cfg.data.image_size, cfg.data.workers, cfg.data.preload
    read = dict(progress=runner.progress, device=device)        # preloaded sets are held on the device
    train = Images(ds, train_names, size, preload, workers, "reading train_val images", **read)
    mining = Images(ds, mining_names, size, preload, workers, "reading mining images", **read)
    test = Images(ds, test_names, size, preload, workers, "reading test images", **read)
    for p, (phase, epochs) in enumerate(phases):
        if p < done[0]:
            continue
        start = done[1] if p == done[0] else 0
        opt = optimizer(set_phase(model, phase), cfg.train.lr, cfg.train)
        if state is not None and p == done[0] and 0 < start < epochs and state["optimizer"] is not None:
            checkpoint.restore_optimizer(opt, state["optimizer"], checkpoint.path(out))
        for epoch in range(start, epochs):
            classification_epoch(model, opt, phase, train, cfg, epoch, runner)
            runner.on_main(checkpoint.save, out, config=to_dict(cfg), data=fingerprint, phase=p,
                                epoch=epoch + 1, model=model, opt=opt, mining=None)

    def save(mined):
        runner.on_main(checkpoint.save, out, config=to_dict(cfg), data=fingerprint, phase=len(phases),
                            epoch=0, model=model, opt=None, mining=mined)
    mined = attention_mining(model, mining, train, test, cfg, runner,
                             state["mining"] if state is not None else None, save, oracle)
    scores = predict(model, test, 2 * cfg.train.batch_size, runner, "scoring the test split")
    mining_arrays = dict(names=mining_names, labels=mining.labels.numpy().astype(np.uint8),
                         cams=mined["cams"].numpy(), masks=mined["masks"].numpy(), image_size=size,
                         grid=np.array(map_grid(model, size), dtype=np.float64))
    tested = dict(names=test_names, scores=scores, labels=test.labels.numpy().astype(np.uint8))
    return runner.on_main(write_outputs, out, model, mining_arrays, ds, tested, to_dict(cfg),
                               mined["records"])


def write_outputs(out, model, mined, ds, tested, config, rounds):
    """mining.npz, test.npz, model.pt, then the report, boxes and figures; returns the report."""
    _save_npz(os.path.join(out, "mining.npz"), **{k: np.asarray(v) for k, v in mined.items()})
    _save_npz(os.path.join(out, "test.npz"), **{k: np.asarray(v) for k, v in tested.items()})
    with atomic_open(os.path.join(out, "model.pt"), "wb") as f:
        torch.save(model.state_dict(), f)
    return write_report(out, mined, ds, tested, config, rounds)


def start_from_classifier(cfg, model, data):
    """Make cfg.run.out a run whose classification is done, with `model` as its classifier, so
    that run(cfg, resume=True) goes straight to attention mining (the study's forks share one
    trained network). data: checkpoint.fingerprint of the data it was trained on."""
    folder = outdir.Folder(cfg.run.out)          # the files go into the manifest the run continues
    folder.lock()
    try:
        torch.manual_seed(cfg.run.seed)
        checkpoint.save(cfg.run.out, config=to_dict(cfg), data=data, phase=len(plan(cfg)), epoch=0,
                        model=model, opt=None, mining=None)
        # config.json last: a folder holding it holds a whole run, so resume may continue it.
        atomic_write_text(os.path.join(cfg.run.out, "config.json"), json.dumps(to_dict(cfg), indent=2) + "\n")
    finally:
        folder.release()


def run(cfg, resume=False, overwrite=False, given=None):
    """The whole job for a validated Config -> its report (report.json's dict, plus `skipped`:
    how many images --skip-bad-images dropped, for the run's last line).

    resume continues the run in cfg.run.out, overwrite replaces it (never both); given: the
    options the user gave (cli.parse), which win over the stored settings on resume.
    RunError (DataError is one) for a problem the user must fix; the folder is left locked by
    no one when it returns or raises.
    """
    folder = outdir.Folder(cfg.run.out)
    try:
        with distributed.session(pick_device(cfg.run.device), Progress) as runner:
            cfg, resume = runner.on_main(prepare_out, cfg, resume, overwrite, given, folder)
            data = runner.on_main(load_data, cfg)
            report = run_job(cfg, data, resume, runner)
            report["skipped"] = len(data[0].skipped)
            return report
    finally:
        folder.release()
