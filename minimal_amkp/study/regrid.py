"""What the placement of map cells alone is worth: a finished run's maps re-reported on another grid.

    python -m minimal_amkp.study.regrid RUN OUT [--grid naive|network]

reads RUN's mining.npz and test.npz (a finished `python -m minimal_amkp --out RUN`), lays its
heatmaps on the plain-resize grid (reference.naive_grid: cell j at the centre of the j-th of h
equal tiles, what runs before the geometry fix assumed) or on the network's receptive-field
grid (reference.geometry, for the run's model configuration), and writes a full report into
OUT (report.md, report.json, boxes.csv, figures), the maps, scores and mining records left as
they are. So two reports of the same maps differ by where the cells were placed only.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

from minimal_amkp import reference as R
from minimal_amkp.config import RunError
from minimal_amkp.data.chestxray import read_dataset
from minimal_amkp.harvest import read_mining
from minimal_amkp.mine import ROUND_RECORD
from minimal_amkp.model import ResNetMSA, map_grid
from minimal_amkp.run.job import phantom_root
from minimal_amkp.run.report import write_report
from minimal_amkp.run.settings import from_dict


def load(run):
    """(mining dict, test dict, config dict, round records) of the finished run in `run`."""
    try:
        mining = read_mining(os.path.join(run, "mining.npz"))
        with np.load(os.path.join(run, "test.npz")) as z:
            test = {k: z[k] for k in z.files}
        with open(os.path.join(run, "report.json"), encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError, KeyError) as e:
        raise RunError(f"{run}: not a finished run ({e})") from None
    return mining, test, report["config"], report["rounds"]


def grid_of(config, kind, h, size):
    """The Grid of the run's h×h maps of a size-px input: the plain-resize one or the network's
    (model.map_grid of the run's model configuration)."""
    if kind == "naive":
        return R.naive_grid(h, size)
    with torch.device("meta"):
        model = ResNetMSA(from_dict(config).model)
    return map_grid(model, size)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minimal_amkp.study.regrid", description=__doc__.split("\n")[0])
    p.add_argument("run", help="a finished run's --out")
    p.add_argument("out", help="where the new report goes")
    p.add_argument("--grid", choices=("naive", "network"), default="naive")
    args = p.parse_args(argv)
    try:
        mining, test, config, rounds = load(args.run)
        grid = grid_of(config, args.grid, mining["cams"].shape[-1], int(mining["image_size"]))
        mining["grid"] = np.array(grid, dtype=np.float64)
        cfg = from_dict(config)
        ds = read_dataset(cfg.run.data or phantom_root(cfg))
        os.makedirs(args.out, exist_ok=True)
        rounds = [dict.fromkeys(ROUND_RECORD) | d for d in rounds]    # runs older than a record's newer keys
        r = write_report(args.out, mining, ds, test, config, rounds)
    except (RunError, ValueError) as e:
        sys.exit(f"regrid: {e}")
    s = r["summary"]
    print(f"regrid: {args.run} on the {args.grid} grid (stride {grid.stride:g}, offset {grid.offset:g}): mean Acc "
          f"at T(IoU)=0.3 baseline {s['baseline']:.3f}, am {s['am']:.3f}; see {args.out}/report.md")


if __name__ == "__main__":
    main()
