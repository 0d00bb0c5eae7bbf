"""`python -m bench.gpu_check` (`make gpu-check`): the GPU path in one prepared run of <= 8 minutes.

    python -m bench.gpu_check [--out DIR] [--budget 480] [--examples 3] [--tests-only]
                              [--steps kernel-tests,bench,throughput,run-tiny,run-paper]

Steps, in this order, each a child process with its own timeout, all within --budget seconds:
    kernel-tests  the kernel and ops property tests (KERNEL_TESTS) compiled, TRITON_INTERPRET
                  unset, the same tolerances and NaN-poison checks as under the interpreter,
                  AMKP_TEST_EXAMPLES=--examples generated examples per property besides the
                  explicit ones (compiled, every new shape autotunes: seconds each)
    bench         `python -m bench --no-throughput --budget 140`: the default mode, its budget
                  cut so that it ends, and writes its results, well inside the step's timeout
    throughput    `python -m bench.throughput`: ResNet-MSA at the paper's shape (N = 64, 512 px),
                  an AM training step and a CAM pass, torch vs triton backend
    run-tiny      `python -m minimal_amkp --out TMP` in an empty folder: the default run (tiny
                  preset), phantom generation included; wall time and the time of each phase
    run-paper     `--preset paper --backend triton` on a PAPER_IMAGES-image 512-px phantom with
                  each training phase cut to one epoch and each mining round to one (bf16
                  autocast and channels-last, as every CUDA run); phase times and peak memory
Both runs go through a small wrapper that prints torch.cuda.max_memory_allocated at exit, and
both are checked for every file their manifest names (and the outputs every run writes).

Everything measured goes to DIR/<device>/ (bench.report.device_slug of the CUDA device's name):
gpu-check.md and gpu-check.json (device, python, torch, triton, commit, date, and per step its
command, status, wall time and numbers), gpu-check-<step>.log (the step's output, each line
with the second it ended), and the bench's own <device>.csv and .md. A step that times out is
reported as such, with what it printed until then, never as a finished time. Exit 1 when a step
did not succeed. Set AMKP_COMMIT where the tree was copied without its .git.

Without CUDA every step prints "<step>: skipped: no CUDA device", nothing is written, exit 0.

--tests-only is `make test-gpu`: the kernel tests alone in the foreground, compiled on a GPU and
under Triton's interpreter without one (tests/conftest.py), with the same example cap.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import torch

from bench import report
from minimal_amkp.config import RunError
from minimal_amkp.run import outdir
from minimal_amkp.run.atomic import atomic_write_text
from minimal_amkp.run.machine import device_name, git_commit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_TESTS = ("tests/test_masked_cam.py", "tests/test_masked_gap.py", "tests/test_kp_distance.py",
                "tests/test_am_step.py", "tests/test_ops.py")
# Seconds each step may take. Their sum stays under the default --budget with room for this
# process's own start; designed, not yet measured, from the first H200 run (issue 23): the
# compiled tests at full example counts took minutes, the bench's default mode is built for
# 3 min, the tiny run's target is 30 s (it took over 130 s there).
STEPS = {"kernel-tests": 100, "bench": 175, "throughput": 55, "run-tiny": 50, "run-paper": 90}
BENCH = ("-m", "bench", "--no-throughput", "--budget", "140", "--note", "make gpu-check")
PAPER_IMAGES = 256
PAPER_RUN = ("--preset", "paper", "--backend", "triton", "--data.phantom-images", str(PAPER_IMAGES),
             "--data.phantom-size", "512", "--train.base-epochs", "1", "--train.msa-frozen-epochs", "1",
             "--train.msa-epochs", "1", "--mine.epochs", "1", "--mine.min-epochs", "1")
RUN_OUTPUTS = ("config.json", "checkpoint.pt", "mining.npz", "test.npz", "model.pt", "report.json", "report.md",
               "boxes.csv")
PEAK = "gpu_check: peak GPU memory"
# `python -m minimal_amkp` exactly (runpy), with the peak of its CUDA allocations printed at exit.
RUN_WRAPPER = f"""
import atexit, runpy, sys
def peak():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        print(f"{PEAK} {{torch.cuda.max_memory_allocated()}} bytes", file=sys.stderr, flush=True)
atexit.register(peak)
sys.argv = ["minimal_amkp", *sys.argv[1:]]
runpy.run_module("minimal_amkp", run_name="__main__", alter_sys=True)
"""
# The last line of a progress bar (run/progress.py): label, steps, ..., and its time in brackets;
# and the phantom generator's own last line.
PHASE = re.compile(r"^(?P<label>.+?)  \d+/\d+ .*\((?P<clock>(?:\d+:)?\d+:\d\d)\)$")
PHANTOM = re.compile(r"^phantom: \d+/\d+ images, (?P<s>[0-9.]+) s$")


def child_env(**extra):
    """This environment with the project importable, TRITON_INTERPRET unset (on a GPU the kernels
    must compile; conftest.py sets it again where there is none), and `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env | extra


def kernel_tests(examples):
    """(command, environment) of the compiled kernel tests."""
    return ([sys.executable, "-m", "pytest", "--durations=10", *KERNEL_TESTS],
            child_env(AMKP_TEST_EXAMPLES=str(examples)))


def execute(command, timeout, cwd, env):
    """Run command in its own process group -> (exit code or None when it timed out, wall seconds,
    [(second it ended, line)]). A timeout kills the whole group (Inductor's and the phantom's
    worker processes too). Progress bars redraw with \\r: a line keeps its last state."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    lines = []

    def read():
        for raw in iter(proc.stdout.readline, b""):
            text = raw.decode("utf-8", "replace").rstrip("\n").split("\r")[-1]
            lines.append((time.perf_counter() - t0, text))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        rc = None
    with contextlib.suppress(ProcessLookupError):  # also what a finished child left behind
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join(5)
    return rc, time.perf_counter() - t0, lines


def seconds(clock):
    return sum(int(p) * 60 ** k for k, p in enumerate(reversed(clock.split(":"))))


def phases(lines):
    """[(label, seconds its progress line shows, second of the run it ended)] of a run's output."""
    found = []
    for t, line in lines:
        bar, drawn = PHASE.match(line), PHANTOM.match(line)
        if bar:
            found.append((bar["label"], seconds(bar["clock"]), round(t, 1)))
        elif drawn:
            found.append(("phantom generation", float(drawn["s"]), round(t, 1)))
    return found


def peak_bytes(lines):
    return next((int(line.split()[-2]) for _, line in lines if line.startswith(PEAK)), None)


def missing_outputs(out):
    """Outputs a finished run should hold and does not (or holds empty), by its manifest."""
    try:
        listed = outdir.read_manifest(out) or []
    except RunError as e:  # an unreadable manifest is a finding of this check, not a crash of it
        return [f"{outdir.MANIFEST} ({e})"]
    want = sorted(set(listed) | set(RUN_OUTPUTS))
    return [f for f in want if not (os.path.isfile(os.path.join(out, f)) and os.path.getsize(os.path.join(out, f)))]


def status(rc, timeout):
    return "ok" if rc == 0 else f"timed out after {timeout:.0f} s" if rc is None else f"failed (exit {rc})"


def step_kernel_tests(work, results, timeout, args):
    command, env = kernel_tests(args.examples)
    rc, wall, lines = execute(command, timeout, ROOT, env)
    summary = next((line for _, line in reversed(lines) if re.search(r"\d+ (passed|failed|error)", line)), "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary)}
    return dict(status=status(rc, timeout), wall_s=round(wall, 1), summary=summary.strip("= "), counts=counts,
                examples=args.examples), lines


def step_bench(work, results, timeout, args):
    rc, wall, lines = execute([sys.executable, *BENCH, "--out", results], timeout, ROOT, child_env())
    kept = [line for _, line in lines if line.startswith("wrote ") or "copy bandwidth" in line]
    return dict(status=status(rc, timeout), wall_s=round(wall, 1), lines=kept), lines


def step_throughput(work, results, timeout, args):
    rc, wall, lines = execute([sys.executable, "-m", "bench.throughput"], timeout, ROOT, child_env())
    kept = [line for _, line in lines if line.startswith("throughput")]
    return dict(status=status(rc, timeout), wall_s=round(wall, 1), lines=kept), lines


def run_step(extra, name, work, timeout):
    out = os.path.join(work, name)
    rc, wall, lines = execute([sys.executable, "-c", RUN_WRAPPER, "--out", out, *extra], timeout, work,
                              child_env())
    missing = missing_outputs(out) if rc == 0 else []
    if rc != 0:
        outputs = "not checked (the run did not finish)"
    else:
        outputs = "missing: " + ", ".join(missing) if missing else "all written"
    done = next((line for _, line in lines if line.startswith("done in ")), "")
    peak = peak_bytes(lines)
    return dict(status="failed: outputs missing" if missing else status(rc, timeout), wall_s=round(wall, 1),
                summary=done, phases=phases(lines), peak_gpu_gib=None if peak is None else round(peak / 2 ** 30, 2),
                outputs=outputs), lines


def step_run_tiny(work, results, timeout, args):
    return run_step((), "run-tiny", work, timeout)


def step_run_paper(work, results, timeout, args):
    return run_step(PAPER_RUN, "run-paper", work, timeout)


RUNNERS = {"kernel-tests": step_kernel_tests, "bench": step_bench, "throughput": step_throughput,
           "run-tiny": step_run_tiny, "run-paper": step_run_paper}
WHAT = {"kernel-tests": "compiled kernel and ops property tests: pytest " + " ".join(KERNEL_TESTS),
        "bench": "python " + " ".join(BENCH),
        "throughput": "python -m bench.throughput (N = 64, 512 px, bf16 autocast, channels-last)",
        "run-tiny": "python -m minimal_amkp --out TMP (tiny preset, phantom generated)",
        "run-paper": "python -m minimal_amkp " + " ".join(PAPER_RUN)}


def metadata(name, budget):
    return dict(device=name, **report.versions(), commit=git_commit(), budget_s=budget,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def to_markdown(meta, steps):
    lines = [f"# make gpu-check: {meta['device']}", "",
             f"- date: {meta['date']}; commit: {meta['commit']}",
             f"- versions: python {meta['python']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"numpy {meta['numpy']}",
             f"- budget: {meta['budget_s']:g} s in all; each step's timeout below", "",
             "| step | what | status | wall s | timeout s |", "|---|---|---|---:|---:|"]
    lines += [f"| {s['step']} | {WHAT[s['step']]} | {s['status']} | {s.get('wall_s', '')} | {s.get('timeout_s', '')} |"
              for s in steps]
    for s in steps:
        if "wall_s" not in s:
            continue
        lines += ["", f"## {s['step']}", ""]
        if s["step"] == "kernel-tests":
            lines.append(f"- pytest: {s['summary'] or 'no summary line'}; {s['examples']} generated examples per "
                         "property (AMKP_TEST_EXAMPLES) besides the explicit ones; TRITON_INTERPRET unset")
        elif s["step"] in ("bench", "throughput"):
            lines += [f"- {line}" for line in s["lines"]] or ["- no result line"]
        else:
            lines.append(f"- {s['summary'] or 'no summary line (the run did not finish)'}")
            lines.append("- peak GPU memory (torch.cuda.max_memory_allocated): "
                         + ("not reported" if s["peak_gpu_gib"] is None else f"{s['peak_gpu_gib']} GiB"))
            lines.append(f"- outputs: {s['outputs']}")
            if s["phases"]:
                lines += ["", "| phase (progress bar) | its time s | ended at s |", "|---|---:|---:|"]
                lines += [f"| {label} | {t} | {end} |" for label, t, end in s["phases"]]
        lines.append(f"\nLog: gpu-check-{s['step']}.log")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0],
                                epilog=__doc__[__doc__.index("Steps,"):].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"),
                   help="results folder; the numbers go to OUT/<device>/")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--examples", type=int, default=3,
                   help="generated examples per property test (AMKP_TEST_EXAMPLES)")
    p.add_argument("--tests-only", action="store_true",
                   help="the kernel tests alone, in the foreground, on any device (make test-gpu)")
    args = p.parse_args(argv)
    names = [s for s in args.steps.split(",") if s]
    unknown = [s for s in names if s not in STEPS]
    if unknown or not names:
        p.error(f"--steps: unknown {unknown or 'empty list'}; choose from {','.join(STEPS)}")
    args.steps = [s for s in STEPS if s in names]  # always in the order that fits the budget
    if not (math.isfinite(args.budget) and args.budget > 0):
        p.error(f"--budget must be a positive number of seconds, got {args.budget:g}")
    if args.examples < 1:
        p.error(f"--examples must be >= 1, got {args.examples}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.tests_only:
        command, env = kernel_tests(args.examples)
        return subprocess.call(command, cwd=ROOT, env=env)
    if not torch.cuda.is_available():
        for name in args.steps:
            print(f"{name}: skipped: no CUDA device", flush=True)
        print("gpu-check: nothing measured, nothing written (no CUDA device)")
        return 0
    start = time.perf_counter()
    name = device_name(torch.device("cuda"))
    results = os.path.join(args.out, report.device_slug(name))
    meta, steps = metadata(name, args.budget), []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        for step in args.steps:
            left = args.budget - (time.perf_counter() - start)
            timeout = min(STEPS[step], left)
            if timeout < 10:
                steps.append(dict(step=step, status="skipped: --budget spent"))
                print(f"{step}: skipped: --budget spent", flush=True)
                continue
            print(f"{step}: running (timeout {timeout:.0f} s)", flush=True)
            result, lines = RUNNERS[step](work, results, timeout, args)
            steps.append(dict(step=step, timeout_s=round(timeout), **result))
            atomic_write_text(os.path.join(results, f"gpu-check-{step}.log"),
                              "".join(f"[{t:7.1f} s] {line}\n" for t, line in lines))
            print(f"{step}: {result['status']} in {result['wall_s']:.0f} s", flush=True)
    atomic_write_text(os.path.join(results, "gpu-check.json"), json.dumps(dict(meta, steps=steps), indent=1) + "\n")
    atomic_write_text(os.path.join(results, "gpu-check.md"), to_markdown(meta, steps))
    print(f"wrote {os.path.join(results, 'gpu-check.md')} ({time.perf_counter() - start:.0f} s)")
    return 0 if all(s["status"] == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
