"""`python -m minimal_amkp`: options, the output folder, the data, then the whole job.

    python -m minimal_amkp [--preset tiny|paper] [--data DIR] [--out DIR] [--seed K]
        [--device auto|cpu|cuda] [--backend auto|torch|triton] [--init PATH] [--skip-bad-images]
        [--resume] [--overwrite]
        [--SECTION.FIELD VALUE ...]            e.g. --train.lr 0.01 --mine.kp vanilla

Run options are flat; every hyper-parameter is `--section.field` (config.py lists them; dashes
and underscores both work). Without --data the phantom is generated once into
data/phantom-v<version>[-<scenario>-b<B's version>]-n<images>-s<size>-seed<seed>/ under the current
folder (--data.phantom-scenario: v2, or the positive control's) and reused after.
A problem the user must fix ends the run with one line on stderr: exit 2 for a bad command
line, 1 for bad data, checkpoints or folders. One run at a time may use an --out (outdir.py);
under torchrun's elastic restarts (--max-restarts) a restarted job resumes its own run.
"""
import argparse
import os
import sys
import time
import warnings

from minimal_amkp import ops
from minimal_amkp.config import RunError, preset, validate
from minimal_amkp.run import distributed
from minimal_amkp.run.job import restarts, run
from minimal_amkp.run.progress import clock
from minimal_amkp.run.settings import apply, fields


class UsageError(RunError):
    """A bad command line (exit 2)."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors (one line, exit 2), not a usage dump and exit."""

    def error(self, message):
        raise UsageError(message)


def build_parser():
    p = Parser(prog="python -m minimal_amkp", allow_abbrev=False,
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


def parse(argv):
    """argv -> (config, resume, overwrite, explicitly given options)."""
    ns = vars(build_parser().parse_args(argv))
    resume, overwrite = ns.pop("resume", False), ns.pop("overwrite", False)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    try:
        # The one read of AMKP_BACKEND: the option's default; the model gets the name (job.py).
        ns["run.backend"] = ops.choose_backend(ns.get("run.backend"))
        distributed.timeout()
        restarts()
    except (ValueError, RuntimeError, RunError) as e:
        raise UsageError(str(e)) from None
    try:
        cfg = validate(apply(preset(ns.get("run.preset", "tiny")), ns))
    except RunError as e:
        raise UsageError(str(e)) from None
    return cfg, resume, overwrite, ns


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
    try:
        cfg, resume, overwrite, given = parse(sys.argv[1:] if argv is None else argv)
        report = run(cfg, resume, overwrite, given)
    except RunError as e:
        # An error that every process raises alike (a bad option, a bad --out) is printed once.
        if distributed.is_main() or not (isinstance(e, UsageError) or e.shared):
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
        warnings.formatwarning = formatwarning
    if distributed.is_main():
        print(summarize(report, cfg.run.out, time.perf_counter() - start, report["skipped"]))
    return 0
