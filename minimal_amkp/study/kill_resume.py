"""SIGKILL a run at random moments, resume it each time, and compare with a run left alone.

    python -m minimal_amkp.study.kill_resume [--kills 20] [--seed 0] [--work runs/kill-resume]
        [--result minimal_amkp/study/results/kill-resume.md] [--images 600] [--size 128]
        [any option of python -m minimal_amkp but --data, --out, --resume, --overwrite]

A phantom of --images images at --size px is generated under --work, then:
1. the reference: `python -m minimal_amkp` on it, uninterrupted;
2. the same command (with --resume once the folder holds a run) started again and again, each
   start SIGKILLed at its own moment, until --kills kills have landed; then once more to the end.
The moments, drawn with --seed: a random time in the first seconds of a start (reading the data,
taking the folder, restoring the checkpoint, the first epochs); inside a checkpoint save (the
k-th `.checkpoint.pt.*.tmp` of that start to appear, k in 1..3); and, last, inside the writing
of one of the final outputs (a temporary file of mining.npz, test.npz, model.pt, boxes.csv,
report.md, report.json or a figure; a small file written within one poll is caught just after
its rename, while the next outputs are written). A start that ends before its moment counts no
kill and is followed by a kill while the (resumed, finished) run writes its outputs again. Passes when boxes.csv is byte-identical, every array of
mining.npz equal, and no *.tmp file is left. Every process runs with OMP_NUM_THREADS=1, as the
reference does, so float sums happen in one order. Writes a markdown table of the kills.
"""
import argparse
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from minimal_amkp.run.atomic import atomic_write_text

OUTPUTS = ("mining.npz", "test.npz", "model.pt", "boxes.csv", "report.md", "report.json", "figures/")
POLL_S = 0.002


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m minimal_amkp.study.kill_resume")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/kill-resume")
    p.add_argument("--result", default="minimal_amkp/study/results/kill-resume.md")
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--size", type=int, default=128)
    args, rest = p.parse_known_args(argv)
    bad = [t for t in rest if t.split("=")[0] in ("--data", "--out", "--resume", "--overwrite")]
    if bad or args.kills < 1:
        p.error(f"{bad[0]} is set by the measurement" if bad else "--kills must be >= 1")
    return args, rest


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        filter(None, [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH")])))


def command(data, out, options):
    resume = ["--resume"] if os.path.exists(os.path.join(out, "config.json")) else []
    return [sys.executable, "-m", "minimal_amkp", "--data", data, "--out", out, *options, *resume]


def temporaries(out):
    """Relative paths of the temporary files of atomic_open under out."""
    found = []
    for folder, _, files in os.walk(out):
        found += [os.path.relpath(os.path.join(folder, f), out) for f in files if f.endswith(".tmp")]
    return sorted(found)


def plan(kills, rng, reference_s):
    """[(kind, parameter)]: early kills and kills inside checkpoint saves in random order, then output kills.

    Early kills come within 8 s of a start, and within the first half of the reference run's time."""
    n_out = max(1, round(kills * 0.2))
    n_save = (kills - n_out) // 2 + (kills - n_out) % 2
    first = [("early", rng.uniform(0.2, min(8.0, reference_s / 2))) for _ in range(kills - n_out - n_save)] + \
            [("checkpoint save", rng.randint(1, 3)) for _ in range(n_save)]
    rng.shuffle(first)
    return first + [("output writing", rng.choice(OUTPUTS)) for _ in range(n_out)]


def written_since(out, param, since_ns):
    """Whether this start has already renamed output `param` (a file, or any file of a folder) into place."""
    where = os.path.join(out, param)
    paths = [os.path.join(where, f) for f in os.listdir(where)] if param.endswith("/") and os.path.isdir(where) \
        else [where]
    return any(os.path.isfile(p) and os.stat(p).st_mtime_ns >= since_ns for p in paths)


def target_seen(out, kind, param, seen, before, since_ns):
    """None, or how the moment to kill has come: "inside" a write (its temporary file exists) or "just
    after" it. `seen` collects the temporary checkpoint files this start made (those of earlier starts,
    `before`, are left for the run to remove). Small files are written within one poll, so an output
    whose temporary file was missed is caught just after its rename, while the next ones are written;
    report.json, the last, only inside."""
    tmps = [t for t in temporaries(out) if t not in before]
    if kind == "checkpoint save":
        seen.update(t for t in tmps if re.fullmatch(r"\.checkpoint\.pt\.\w{8}\.tmp", t))
        return "inside" if len(seen) >= param else None
    if param.endswith("/"):
        inside = any(t.startswith(param) for t in tmps)
    else:
        inside = any(re.fullmatch(rf"\.{re.escape(param)}\.\w{{8}}\.tmp", t) for t in tmps)
    if inside:
        return "inside"
    return "just after" if param != "report.json" and written_since(out, param, since_ns) else None


def attempt(cmd, out, kind, param, log):
    """One start of the run, killed at its moment: -> (how: None if it ended first, seconds, temporary
    files it had made by then)."""
    before = set(temporaries(out)) if os.path.isdir(out) else set()
    since_ns = time.time_ns()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT)
    start, seen = time.monotonic(), set()
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - start
            how = ("at" if elapsed >= param else None) if kind == "early" else \
                target_seen(out, kind, param, seen, before, since_ns)
            if how:
                left = [t for t in temporaries(out) if t not in before]
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return how, elapsed, left
            time.sleep(POLL_S)
        return None, time.monotonic() - start, []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_to_end(cmd, log):
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"minimal_amkp.study.kill_resume: {' '.join(cmd[:4])} ... exited {done.returncode}; see {log}")


def compare(whole, killed):
    """[problems] between the reference run and the killed one (empty: identical)."""
    problems = []
    with open(os.path.join(whole, "boxes.csv"), "rb") as a, open(os.path.join(killed, "boxes.csv"), "rb") as b:
        if a.read() != b.read():
            problems.append("boxes.csv differs")
    with np.load(os.path.join(whole, "mining.npz")) as a, np.load(os.path.join(killed, "mining.npz")) as b:
        if sorted(a.files) != sorted(b.files):
            problems.append(f"mining.npz holds {sorted(b.files)}, not {sorted(a.files)}")
        problems += [f"mining.npz[{k}] differs" for k in a.files if k in b.files and not np.array_equal(a[k], b[k])]
    left = temporaries(killed)
    if left:
        problems.append(f"temporary files left: {left}")
    return problems


def main(argv=None):
    args, options = parse(sys.argv[1:] if argv is None else argv)
    rng = random.Random(args.seed)
    work = os.path.abspath(args.work)
    data, whole, killed, log = (os.path.join(work, n) for n in ("data", "whole", "killed", "log.txt"))
    if os.path.exists(work) and os.listdir(work):
        raise SystemExit(f"minimal_amkp.study.kill_resume: {work} is not empty; pick another --work")
    os.makedirs(work, exist_ok=True)
    load = os.getloadavg()
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "minimal_amkp.data.phantom", "--out", data, "--n-images", str(args.images),
                    "--size", str(args.size)], env=env(), check=True, stdout=subprocess.DEVNULL)
    options = ["--data.image-size", str(args.size), *options]
    t0 = time.monotonic()
    run_to_end(command(data, whole, options), log)
    reference_s = time.monotonic() - t0
    rows, todo = [], plan(args.kills, rng, reference_s)
    while todo and sum(bool(r[4]) for r in rows) < args.kills and len(rows) < 3 * args.kills:
        kind, param = todo.pop(0)
        cmd = command(data, killed, options)
        how, seconds, left = attempt(cmd, killed, kind, param, log)
        state = "ended before the kill" if not how else ", ".join(left) or "no temporary file"
        rows.append((kind, param, "--resume" in cmd, seconds, how, state))
        print(f"minimal_amkp.study.kill_resume: {len(rows)} {kind} ({param}): {how or 'not'} killed after {seconds:.2f} s; "
              f"{state}", file=sys.stderr, flush=True)
        if not how:        # the run got to its end first; resumed, a finished run writes its outputs again
            todo.append(("output writing", rng.choice(OUTPUTS)))
    run_to_end(command(data, killed, options), log)
    problems = compare(whole, killed)
    total_s = time.monotonic() - started
    lines = ["# SIGKILL at random moments, then --resume, against a run left alone", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
             f"({_cpu_name()}); load average at start {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}",
             f"- versions: python {platform.python_version()}, torch {torch.__version__}",
             f"- command: python -m minimal_amkp.study.kill_resume {' '.join(argv if argv is not None else sys.argv[1:])}",
             f"- data: phantom, {args.images} images at {args.size} px; options: {' '.join(options)}",
             f"- reference run: {reference_s:.0f} s; whole measurement: {total_s / 60:.1f} min", "",
             f"**Result: {'PASS' if not problems else 'FAIL'}** after {sum(bool(r[4]) for r in rows)} kills: "
             + ("boxes.csv byte-identical, every array of mining.npz equal, no *.tmp left."
                if not problems else "; ".join(problems)), "",
             "| # | moment | start | killed after | temporary files this start had made |", "|---|---|---|---:|---|"]
    for i, (kind, param, resumed, seconds, how, state) in enumerate(rows, 1):
        moment = (f"at {param:.2f} s" if kind == "early" else f"inside checkpoint save #{param}"
                  if kind == "checkpoint save" else f"{how or 'while'} writing {param}")
        lines.append(f"| {i} | {moment} | {'--resume' if resumed else 'fresh'} | "
                     f"{seconds:.2f} s{'' if how else ' (not killed)'} | {state} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.result)), exist_ok=True)
    atomic_write_text(args.result, "\n".join(lines) + "\n")
    print(f"minimal_amkp.study.kill_resume: {'PASS' if not problems else 'FAIL: ' + '; '.join(problems)}; see {args.result}",
          file=sys.stderr)
    return 0 if not problems else 1


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
