"""`python -m minimal_amkp`: options, the output folder, the data, then the whole job.

    python -m minimal_amkp [--preset tiny|paper] [--data DIR] [--out DIR] [--seed K]
        [--device auto|cpu|cuda] [--init PATH] [--skip-bad-images] [--resume] [--overwrite]
        [--SECTION.FIELD VALUE ...]            e.g. --train.lr 0.01 --mine.kp vanilla

Run options are flat; every hyper-parameter is `--section.field` (config.py lists them; dashes
and underscores both work). Without --data the phantom is generated once into
data/phantom-v<version>-n<images>-s<size>-seed<seed>/ under the current folder and reused after.
A problem the user must fix ends the run with one line on stderr: exit 2 for a bad command
line, 1 for bad data, checkpoints or folders. One run at a time may use an --out (outdir.py);
under torchrun's elastic restarts (--max-restarts) a restarted job resumes its own run.
"""
import argparse
import json
import os
import shutil
import sys
import time
import warnings

import numpy as np
import torch

from minimal_amkp import ops
from minimal_amkp.run import checkpoint
from minimal_amkp.run import distributed
from minimal_amkp.run import outdir
from minimal_amkp.data import phantom
from minimal_amkp.run.atomic import atomic_open, atomic_write_text
from minimal_amkp.data.chestxray import DataError, check_images, read_dataset
from minimal_amkp.classes import BOX_CLASSES
from minimal_amkp.config import Config, RunError, fields, from_dict, parse_value, preset, to_dict, validate
from minimal_amkp.mine import attention_mining
from minimal_amkp.model import ResNetMSA, load_init, map_size
from minimal_amkp.run.progress import clock, say
from minimal_amkp.run.report import write_report
from minimal_amkp.train import Images, classification_epoch, optimizer, pick_device, predict, set_phase

IGNORED_ON_RESUME = ("run.device", "run.out", "run.report_extras")   # may change between the halves of one run
RESTARTS = "TORCHELASTIC_RESTART_COUNT"      # torchrun sets it: 0 on the first start, k on the k-th restart


class UsageError(RunError):
    """A bad command line (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    p = _Parser(prog="python -m minimal_amkp", allow_abbrev=False,
                description="Attention mining with knowledge preservation on ChestX-ray14 (or the phantom).")
    p.add_argument("--resume", action="store_true", default=argparse.SUPPRESS,
                   help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                   help="replace the run in --out")
    p.add_argument("--skip-bad-images", dest="run.skip_bad_images", action="store_true",
                   default=argparse.SUPPRESS, help="drop corrupt or missing images with a warning")
    for section, name, kind in fields():
        if (section, name) == ("run", "skip_bad_images"):
            continue
        flags = [f"--{name.replace('_', '-')}"] if section == "run" else \
            sorted({f"--{section}.{name}", f"--{section}.{name.replace('_', '-')}"})
        p.add_argument(*flags, dest=f"{section}.{name}", default=argparse.SUPPRESS,
                       metavar=kind.__name__.upper())
    return p


def _apply(cfg, given):
    for key, text in given.items():
        section, name = key.split(".")
        kind = type(getattr(getattr(cfg, section), name))
        value = text if isinstance(text, bool) else parse_value(section, name, kind, text)
        setattr(getattr(cfg, section), name, value)
    return cfg


def parse(argv):
    """argv -> (config, resume, overwrite, explicitly given options)."""
    ns = vars(build_parser().parse_args(argv))
    resume, overwrite = ns.pop("resume", False), ns.pop("overwrite", False)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    try:
        ops.backend()                            # AMKP_BACKEND is read per op: check it up front
        distributed.timeout()
        _restarts()
    except (ValueError, RuntimeError, RunError) as e:
        raise UsageError(str(e)) from None
    try:
        cfg = validate(_apply(preset(ns.get("run.preset", "tiny")), ns))
    except RunError as e:
        raise UsageError(str(e)) from None
    return cfg, resume, overwrite, ns


def _json(d):
    return json.loads(json.dumps(d))


def _differences(a, b):
    return [f"{s}.{k}: {a[s][k]!r} -> {b[s].get(k)!r}" for s in a for k in a[s]
            if f"{s}.{k}" not in IGNORED_ON_RESUME and a[s][k] != b[s].get(k)]


def _restarts():
    text = os.environ.get(RESTARTS, "0")
    if not (text.isascii() and text.isdigit()):
        raise RunError(f"{RESTARTS}={text!r}: expected a whole number (torchrun sets it)")
    return int(text)


def _kind_ok(value, default):
    if isinstance(default, bool) or isinstance(default, str):
        return type(value) is type(default)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _config_problem(stored):
    """None if `stored` (parsed JSON) has the sections, fields and kinds of values of a Config, else what is off."""
    want = _json(to_dict(Config()))
    if not isinstance(stored, dict) or set(stored) != set(want):
        return f"its sections are {sorted(stored) if isinstance(stored, dict) else type(stored).__name__}"
    for section, defaults in want.items():
        if not isinstance(stored[section], dict):
            return f"{section} is {stored[section]!r}"
        for k, v in stored[section].items():
            if k not in defaults or not _kind_ok(v, defaults[k]):
                return f"{section}.{k} is {v!r}"
    return None


def _stored_config(path):
    """config.json as a dict of this program's settings; a RunError, the file left alone, when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: unreadable ({e}); it is left as it is: pick another --out") from None
    problem = _config_problem(stored)
    if problem:
        raise RunError(f"{path}: not a config.json of this program ({problem}); it is left as it is: "
                       "pick another --out")
    return stored


def _inspect(cfg, resume, overwrite, given):
    """What --out allows: (config, resume, fresh: start over, deleting the manifest's files).

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
    if _restarts():                              # torchrun restarted the job: continue its own run
        resume, overwrite = stored is not None, False
    if overwrite:
        return cfg, False, True
    if stored is None:
        if resume:
            raise RunError(f"--resume: {out} holds no run to resume")
        return cfg, False, True
    if resume:
        cfg = validate(_apply(from_dict(stored), {k: v for k, v in given.items() if k != "run.preset"}))
        cfg.run.out, cfg.run.preset = out, given.get("run.preset", cfg.run.preset)
    diff = _differences(stored, _json(to_dict(cfg)))
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
    """The cached phantom for these settings, generated on first use (atomically: a folder rename)."""
    d = cfg.data
    name = f"phantom-v{phantom.VERSION}-n{d.phantom_images}-s{d.phantom_size}-seed{d.phantom_seed}"
    root = os.path.join("data", name)
    if not os.path.isdir(root):
        tmp = f"{root}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        say(f"generating the phantom data set into {root} (once)")
        phantom.generate(tmp, n_images=d.phantom_images, size=d.phantom_size, seed=d.phantom_seed,
                         progress=True)
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


def plan(cfg):
    """[(phase, epochs)]: the classification phases before mining (Sec. 3.1). A checkpoint says
    how far along this list a run got; index len(plan) is attention mining."""
    phases = [("base", cfg.train.base_epochs)]
    if cfg.model.msa != "none":
        phases += [("msa_frozen", cfg.train.msa_frozen_epochs), ("msa", cfg.train.msa_epochs)]
    return phases


def _save_npz(path, **arrays):
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def run_job(cfg, data, resume):
    """Train, mine, score the test split and write the report; resumable after every epoch."""
    ds, mining_names, train_names, test_names = data
    out, seed = cfg.run.out, cfg.run.seed
    device = pick_device(cfg.run.device)
    torch.manual_seed(seed)
    model = distributed.sync_batch_norm(ResNetMSA(cfg.model).to(device), device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)      # inputs follow in train.to_device
    h = map_size(cfg.data.image_size, cfg.model.msa, len(cfg.model.blocks))
    phases, done = plan(cfg), (0, 0)
    fingerprint = checkpoint.fingerprint(ds, mining_names, train_names, test_names)
    state = distributed.on_main(checkpoint.load, out, phases=phases, mine=cfg.mine, n_mining=len(mining_names),
                                h=h, config=to_dict(cfg), ignored=IGNORED_ON_RESUME, data=fingerprint) if resume else None
    if state is None and cfg.run.init:
        load_init(model, cfg.run.init)
    distributed.on_main(atomic_write_text, os.path.join(out, "config.json"), json.dumps(to_dict(cfg), indent=2) + "\n")
    if state is not None:
        checkpoint.restore_model(model, state["model"], checkpoint.path(out))
        checkpoint.restore_rng(state, device)
        done = (state["phase"], state["epoch"])
        where = f"epoch {done[1]} of phase {done[0] + 1}/{len(phases)}" if done[0] < len(phases) else \
            f"round {state['mining']['round']} of attention mining" if state["mining"] else "training"
        say(f"resuming {out} after {where}")
    size, workers, preload = cfg.data.image_size, cfg.data.workers, cfg.data.preload
    train = Images(ds, train_names, size, preload, workers, "reading train_val images")
    mining = Images(ds, mining_names, size, preload, workers, "reading mining images")
    test = Images(ds, test_names, size, preload, workers, "reading test images")
    for p, (phase, epochs) in enumerate(phases):
        if p < done[0]:
            continue
        start = done[1] if p == done[0] else 0
        opt = optimizer(set_phase(model, phase), cfg.train.lr, cfg.train)
        if state is not None and p == done[0] and 0 < start < epochs and state["optimizer"] is not None:
            checkpoint.restore_optimizer(opt, state["optimizer"], checkpoint.path(out))
        for epoch in range(start, epochs):
            classification_epoch(model, opt, phase, train, cfg, seed, epoch, device)
            distributed.on_main(checkpoint.save, out, config=to_dict(cfg), data=fingerprint, phase=p,
                                epoch=epoch + 1, model=model, opt=opt, mining=None)

    def save(mined):
        distributed.on_main(checkpoint.save, out, config=to_dict(cfg), data=fingerprint, phase=len(phases),
                            epoch=0, model=model, opt=None, mining=mined)
    mined = attention_mining(model, mining, train, test, cfg, device,
                             state["mining"] if state is not None else None, save)
    scores = distributed.gather(predict(model, test, device, 2 * cfg.train.batch_size, "scoring the test split",
                                        distributed.part(np.arange(len(test_names)))))
    mining_arrays = dict(names=mining_names, labels=mining.labels.numpy().astype(np.uint8),
                         cams=mined["cams"].numpy(), masks=mined["masks"].numpy(), image_size=size)
    tested = dict(names=test_names, scores=scores, labels=test.labels.numpy().astype(np.uint8))
    return distributed.on_main(write_outputs, out, model, mining_arrays, ds, tested, to_dict(cfg),
                               mined["records"])


def write_outputs(out, model, mined, ds, tested, config, rounds):
    """mining.npz, test.npz, model.pt, then the report, boxes and figures; returns the report."""
    _save_npz(os.path.join(out, "mining.npz"), **{k: np.asarray(v) for k, v in mined.items()})
    _save_npz(os.path.join(out, "test.npz"), **{k: np.asarray(v) for k, v in tested.items()})
    with atomic_open(os.path.join(out, "model.pt"), "wb") as f:
        torch.save(model.state_dict(), f)
    return write_report(out, mined, ds, tested, config, rounds)


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"minimal_amkp: warning: {message}\n"


def summarize(report, out, seconds, skipped=0):
    """The run's last line: the summary Acc of each localizer (report.json), any images dropped, where to look."""
    def num(v):
        return "n/a" if v is None else f"{v:.2f}"
    acc = ", ".join(f"{k} {num(v)}" for k, v in report["summary"].items())
    dropped = f"; {skipped} bad image(s) skipped (--skip-bad-images, warnings above)" if skipped else ""
    chest = report["h1_peaks_in_chest"]
    inside = "" if chest is None else f"; H_1 peaks in the chest {100 * chest:.0f}%"
    return (f"done in {clock(seconds)}: mean Acc over the 8 box classes at T(IoU)=0.3: {acc}; "
            f"box-class test AUROC {num(report['box_auroc'])}{inside}{dropped}; see {os.path.join(out, 'report.md')}")


def main(argv=None):
    start = time.perf_counter()
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    folder = None
    try:
        cfg, resume, overwrite, given = parse(sys.argv[1:] if argv is None else argv)
        folder = outdir.Folder(cfg.run.out)
        with distributed.session(pick_device(cfg.run.device)):     # several processes under torchrun
            cfg, resume = distributed.on_main(prepare_out, cfg, resume, overwrite, given, folder)
            data = distributed.on_main(load_data, cfg)
            report = run_job(cfg, data, resume)
    except (RunError, DataError) as e:
        # An error that every process raises alike (a bad option, a bad --out) is printed once.
        if distributed.is_main() or not (isinstance(e, UsageError) or getattr(e, "shared", False)):
            print(f"minimal_amkp: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except RuntimeError as e:
        if not distributed.lost_peer(e):
            raise
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        print(f"minimal_amkp: error: process {distributed.rank()}: talking to the other processes failed "
              f"({first[:300]}); one of them died or hung ({distributed.TIMEOUT_VARIABLE} bounds the wait); "
              "--resume continues from the last checkpoint", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if distributed.is_main():
            print("minimal_amkp: interrupted; --resume continues from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        if folder is not None:
            folder.release()
        warnings.formatwarning = formatwarning
    if distributed.is_main():
        print(summarize(report, cfg.run.out, time.perf_counter() - start, len(data[0].skipped)))
    return 0
