"""Mine again from a finished run's classifier with other mining settings.

    python -m minimal_amkp.study.fork SOURCE OUT [--mine.FIELD VALUE ...]

SOURCE is a run's --out whose classification has finished (its checkpoint holds N_A, the
network as it was before mining). OUT becomes a run with SOURCE's run, model, data and
training settings, the preset's mining settings as this code defines them (not SOURCE's), and
the options given here on top (mining options: the model, data and training must stay those
that trained N_A), whose classification is done: attention mining starts at once and OUT gets the
whole of a run's outputs. An interrupted fork is continued by the same command. Each mining
round's record (report.md, "Attention-mining rounds") is printed at the end.
"""
import json
import os
import sys
import time

from minimal_amkp.config import RunError, preset, validate
from minimal_amkp.run import cli
from minimal_amkp.run.job import run
from minimal_amkp.run.settings import apply, from_dict
from minimal_amkp.study.reproduce import fork


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0].startswith("-") or argv[1].startswith("-"):
        sys.exit("usage: python -m minimal_amkp.study.fork SOURCE OUT [--mine.FIELD VALUE ...]")
    source, out, options = argv[0], argv[1], argv[2:]
    try:
        with open(os.path.join(source, "config.json"), encoding="utf-8") as f:
            stored = json.load(f)
        given = cli.parse(["--out", out, *options])[3]                  # the options given here only
        cfg = from_dict(stored)
        cfg.mine = preset(cfg.run.preset).mine
        cfg = validate(apply(cfg, {k: v for k, v in given.items() if k != "run.preset"}))
        start = time.perf_counter()
        if not os.path.exists(os.path.join(out, "config.json")):
            fork(source, cfg)
        report = run(cfg, resume=True)
    except (OSError, ValueError, KeyError, RunError) as e:
        sys.exit(f"fork: {e}")
    print(f"fork: {out} from {source}'s classifier, {' '.join(options) or 'no options'}: "
          f"{time.perf_counter() - start:.0f} s")
    for d in report["rounds"]:
        print(f"  round {d['t']}: {d['epochs']} epochs, erased-image loss {d['loss_before']:.3f} -> "
              f"{d['loss_after']:.3f} ({(d['loss_after'] - d['loss_before']) / d['loss_before']:+.1%}), "
              f"box AUROC N_B {d['auroc_b']:.3f} (N_A {d['auroc_a']:.3f})")


if __name__ == "__main__":
    main()
