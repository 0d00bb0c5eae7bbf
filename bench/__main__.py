"""`python -m bench`: time every formulation of the fused ops and the model's throughput; write bench/results/.

    python -m bench [--quick | --full] [--ops masked_cam,masked_gap,kp_distance,am_step] [--out DIR]
                    [--dtype float32|bfloat16] [--layout auto|nchw|channels_last] [--max-gb GB]
                    [--budget S] [--no-compile] [--compile-budget S] [--no-cuda-graphs]
                    [--no-throughput] [--threads N] [--note TEXT]

For each op and shape (N, C, D, H, W) it times every provider of bench.providers, forward alone
(under no_grad) and forward + backward (the training pass), and reports the median, GB/s from
the kernel's bytes-moved model, that as a % of a device-to-device copy measured in the same run
and of the device's data-sheet bandwidth, and the targets beside the Triton rows. Then
(bench.throughput) images per second of ResNet-MSA, torch vs triton backend. Results go to
DIR/<device>[-quick|-full].csv and .md, written atomically; a later run on the same device and
mode replaces them.

Modes. Max-autotune compiles are what made the first H200 run take over 10 minutes (5-9 s of
autotuning per matmul, shape and pass), so by default they run only where the targets are:
    (none)    designed for <= 3 min on an H200: the paper's shapes first, then the small ones;
              max-autotune at the paper shapes only; a time budget of 160 s in all (each op a
              fair share of what is left, the throughput rows' time set aside) and 90 s of
              compilation
    --quick   designed for <= 60 s: the small shapes only, no max-autotune, few repetitions,
              budget 50 s, 20 s of compilation, throughput at N = 16
    --full    everything: every shape, both compile modes everywhere, no budget
A row that would start after its budget is spent is reported as skipped, never estimated; the
budgets bound when rows start, so one compile in flight may overrun them by its own length.
--budget and --compile-budget override the mode's (0: no limit). Compiled providers keep their
compiled callable from shape to shape (and Inductor its caches), so a new shape costs only its
own compilation.

Copy baseline: the best of copy_ into a preallocated buffer of 256 MiB, 512 MiB and 1 GiB (the
sizes whose two buffers fit under --max-gb and free memory), timed like a provider but never in
a CUDA graph, counting read + write. On a GPU a row above 100% of it is marked ABOVE COPY: the
baseline or the bytes model is wrong, and no target counts as met on that row.

Timing. On a GPU: triton.testing.do_bench (CUDA events, L2 flushed before every repetition,
median), after warm-up calls of our own (compilation, autotuning) so that do_bench's estimate of
the repetition count sees a warm function; every provider is captured in a CUDA graph and the
graph replayed (--no-cuda-graphs: none is), so launch overhead is the same for all. fp32 dots
run in TF32 on both sides: the kernels' launch.FP32_PRECISION and, set here,
torch.set_float32_matmul_precision("high"). On the CPU: perf_counter medians, no graphs.
"""
import argparse
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass

import torch

from minimal_amkp.run.atomic import atomic_write_text
from minimal_amkp.run.machine import device_name

from . import report, throughput
from .providers import OPS, as_numpy, forget_compiled, function, providers

SMALL_SHAPES = [(8, 8, 64, 16, 16), (4, 14, 128, 7, 7), (3, 1, 100, 13, 13)]
# The paper's X at 512 px (32×32) and 1024 px (64×64), 8 box classes and all 14; a 16×16 map
# with N = 32, which only fills the GPU if the kernels split D.
PAPER_SHAPES = [(64, 8, 768, 32, 32), (64, 14, 768, 32, 32), (64, 8, 768, 64, 64), (64, 14, 768, 64, 64),
                (32, 14, 768, 16, 16)]
COPY_MIB = (256, 512, 1024)


@dataclass(frozen=True)
class Mode:
    shapes: tuple
    autotune_small: bool  # max-autotune at the small shapes too
    budget: float  # seconds for the whole bench (0: none)
    compile_budget: float  # seconds of compilation (0: none)
    throughput_s: float  # of the budget, kept for the throughput rows


MODES = {
    "quick": Mode(tuple(SMALL_SHAPES), False, 50.0, 20.0, 15.0),
    "default": Mode(tuple(PAPER_SHAPES + SMALL_SHAPES), False, 160.0, 90.0, 40.0),
    "full": Mode(tuple(SMALL_SHAPES + PAPER_SHAPES), True, 0.0, 0.0, 0.0),
}


def cpu_time(fn, budget_s, max_reps):
    """Median seconds of fn() after one warm-up call; repetitions fit roughly in budget_s."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    reps = max(3, min(max_reps, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), reps


def gpu_time(fn, graphs):
    """Median seconds of fn() by do_bench, after 3 warm-up calls on a side stream; with `graphs`
    fn is captured once in a CUDA graph and its replay is what do_bench times."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # graph capture wants its warm-up off the default stream
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    if graphs:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        fn = graph.replay
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3, None


def timer(device, args, graphs=None):
    """time_fn(fn) -> (median seconds, repetitions or None); graphs: override --no-cuda-graphs."""
    budget, max_reps = (0.3, 50) if args.quick else (1.0, 100)
    if device.type == "cuda":
        graphs = args.cuda_graphs if graphs is None else graphs
        return lambda fn: gpu_time(fn, graphs)
    return lambda fn: cpu_time(fn, budget, max_reps)


def copy_sizes(limit):
    """Bytes of the copy buffers to time: COPY_MIB's sizes whose source and destination fit in
    `limit` bytes, or one size that fits when none of them does."""
    return [m << 20 for m in COPY_MIB if 2 * (m << 20) <= limit] or [max(1, int(limit) >> 21) << 20]


def free_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: --max-gb alone bounds the buffers
        return math.inf


def copy_bandwidth(device, sizes, time_fn):
    """(best bytes/s, description) of copy_ into a preallocated buffer of each size, read + write.

    The best of several large buffers: one alone can land on a slow size. Preallocated: on CPU a
    clone would mostly time the page faults of its fresh allocation. time_fn must not capture a
    CUDA graph: a copy in a graph becomes a memcpy node, which the first H200 run measured at
    2.75 TB/s where a plain copy moves about 4.3."""
    seen = {}
    for nbytes in sizes:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)  # pages touched
        dst = torch.empty_like(src)
        t, _ = time_fn(lambda: dst.copy_(src))
        seen[nbytes] = 2 * nbytes / t
        del src, dst
        if device.type == "cuda":
            torch.cuda.empty_cache()
    each = ", ".join(f"{n >> 20} MiB {bps / 1e9:.0f}" for n, bps in seen.items())
    return max(seen.values()), (f"{max(seen.values()) / 1e9:.2f} GB/s, the best copy_ into a preallocated "
                                f"buffer (read + write, no CUDA graph) of: {each} GB/s")


def shapes_for(op, mode):
    shapes = MODES[mode].shapes
    if op == "kp_distance":  # no classes: one row per (N, K, H, W)
        seen = {}
        for s in shapes:
            seen.setdefault((s[0], s[2], s[3], s[4]), s)
        shapes = tuple(seen.values())
    return shapes


def skip_reason(op, provider, shape, args, device, itemsize, backward):
    if provider == "numpy" and backward:
        return "reference has no backward"
    if provider == "numpy" and device.type == "cuda":
        return "the float64 CPU reference is not timed on a GPU"
    if provider.startswith("triton") and device.type != "cuda":
        return "needs a CUDA device; the interpreter is not a speed path"
    if provider.startswith("compile") and args.no_compile:
        return "--no-compile"
    if provider == "compile_max-autotune" and shape not in PAPER_SHAPES and not MODES[args.mode].autotune_small:
        return "max-autotune runs at the paper's shapes only; --full runs it at every shape"
    if provider.startswith("compile") and device.type == "cpu" and not shutil.which("c++"):
        return "torch.compile on CPU needs a C++ compiler"
    extra = op.extra_bytes(provider, shape, itemsize, backward)
    if extra > args.max_gb * 1e9:
        return f"would materialise {extra / 1e9:.1f} GB > --max-gb {args.max_gb:g}"
    return None


def make_call(op, provider, tensors, backward):
    """A no-argument callable running one forward (or forward + backward) of `provider`."""
    fn = function(op, provider, backward)
    if provider == "numpy":
        arrays = as_numpy(tensors)
        return lambda: fn(*arrays)
    if not backward:
        def forward():
            with torch.no_grad():
                return fn(*tensors)
        return forward
    leaves = [t.detach().requires_grad_(i in op.grad_inputs) for i, t in enumerate(tensors)]
    wrt = [leaves[i] for i in op.grad_inputs]
    return lambda: torch.autograd.grad(op.loss(fn(*leaves)), wrt)


def op_deadline(end, now, ops_left):
    """When the next op's last row may start: an equal share of the time left to the ops left,
    so an op that finishes early leaves its time to the later ones; None without a budget."""
    return None if end is None else now + (end - now) / ops_left


def bench_op(op, args, device, dtype, fmt, copy_bps, time_fn, compile_left, deadline, spec_bps):
    """Rows of one op; compile_left is a one-element list of compile seconds still allowed,
    deadline the perf_counter time after which no row starts (None: no limit)."""
    rows = []
    itemsize = torch.finfo(dtype).bits // 8
    cuda = device.type == "cuda"
    for shape in shapes_for(op.name, args.mode):
        tensors = None  # made when the first row of the shape runs: none may, once the budget is spent
        for backward in (False, True):
            nbytes = op.bytes_moved(shape, itemsize, backward)
            for provider in providers(op, backward):
                row = dict(op=op.name, shape=shape, dtype=str(dtype).replace("torch.", ""), provider=provider,
                           pass_="fwd+bwd" if backward else "fwd", ms="", reps="", gbps="", pct_copy="",
                           pct_spec="", compile_s="", note="")
                reason = skip_reason(op, provider, shape, args, device, itemsize, backward)
                if reason is None and deadline is not None and time.perf_counter() >= deadline:
                    reason = "--budget spent"
                if reason is None and provider.startswith("compile") and compile_left[0] <= 0:
                    reason = "--compile-budget spent"
                if reason:
                    rows.append(row | dict(note=f"skipped: {reason}"))
                    continue
                try:
                    if tensors is None:
                        tensors = op.inputs(shape, dtype, device, torch.Generator().manual_seed(0), fmt)
                    call = make_call(op, provider, tensors, backward)
                    if provider.startswith("compile"):
                        t0 = time.perf_counter()
                        call()
                        row["compile_s"] = f"{time.perf_counter() - t0:.1f}"
                        compile_left[0] -= time.perf_counter() - t0
                    t, reps = time_fn(call)
                except Exception as e:  # a provider that cannot run here is a finding, not a crash
                    first = (str(e).splitlines() or [""])[0][:120]
                    rows.append(row | dict(note=f"failed: {type(e).__name__}: {first}"))
                    continue
                rows.append(report.measured(row | dict(reps=reps or "do_bench"), nbytes, t, copy_bps, spec_bps, cuda))
                r = rows[-1]
                target = report.row_target(rows, r)
                spec = r["pct_spec"] if r["pct_spec"] == report.SPEC_UNKNOWN else f"{r['pct_spec']}% of spec"
                print(f"{op.name:12s} {str(shape):24s} {r['pass_']:8s} {provider:26s} {t * 1e3:10.3f} ms  "
                      f"{r['gbps']:>8s} GB/s  {r['pct_copy']:>6s}% of copy  {spec}"
                      + (f"  target {target}" if target else f"  {r['note']}" if report.above_copy(r) else ""),
                      flush=True)
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0],
                                epilog=__doc__[__doc__.index("Modes."):__doc__.index("Copy baseline")].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="small shapes only, no max-autotune, few repetitions")
    mode.add_argument("--full", action="store_true",
                      help="every shape, both compile modes everywhere, no budget")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"), help="results folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--layout", default="auto", choices=["auto", "nchw", "channels_last"],
                   help="feature-map layout (auto: channels_last on CUDA, as training runs; nchw on CPU)")
    p.add_argument("--max-gb", type=float, default=None,
                   help="skip providers materialising more than this (default: 2 on CPU, 1/4 of GPU memory)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which no row starts, throughput rows included (default: "
                        f"{MODES['default'].budget:g}, --quick {MODES['quick'].budget:g}, --full none; 0: no limit)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile providers")
    p.add_argument("--compile-budget", type=float, default=None,
                   help=f"seconds of compilation allowed in all (default: {MODES['default'].compile_budget:g}, "
                        f"--quick {MODES['quick'].compile_budget:g}, --full none; 0: no limit)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="time every provider eagerly instead of replaying a CUDA graph of it")
    p.add_argument("--no-throughput", dest="throughput", action="store_false",
                   help="skip the ResNet-MSA images/s rows")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--note", default="", help="free text recorded with the results (e.g. machine load)")
    args = p.parse_args(argv)
    args.ops = [o for o in args.ops.split(",") if o]
    unknown = [o for o in args.ops if o not in OPS]
    if unknown or not args.ops:
        p.error(f"--ops: unknown {unknown or 'empty list'}; choose from {','.join(OPS)}")
    args.mode = "quick" if args.quick else "full" if args.full else "default"
    for name in ("budget", "compile_budget"):
        value = getattr(args, name)
        if value is None:
            setattr(args, name, getattr(MODES[args.mode], name))
        elif not (math.isfinite(value) and value >= 0):
            p.error(f"--{name.replace('_', '-')} must be a number of seconds >= 0 (0: no limit), got {value:g}")
    return args


def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if args.max_gb is None:  # the naive forms must not crowd out the run on either device
        args.max_gb = torch.cuda.get_device_properties(device).total_memory / 4e9 if gpu else 2.0
    if args.threads:
        torch.set_num_threads(args.threads)
    if gpu:
        torch.set_float32_matmul_precision("high")  # TF32, like the kernels' fp32 tl.dot
    else:
        # Inductor's pool of compile workers would compete with the timed runs on a small CPU.
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    dtype = getattr(torch, args.dtype)
    layout = args.layout if args.layout != "auto" else ("channels_last" if gpu else "nchw")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    time_fn = timer(device, args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta = report.metadata(device_name(device), args, device, load, layout)
    sizes = copy_sizes(min(args.max_gb * 1e9, free_bytes(device) / 2))
    copy_bps, meta["copy"] = copy_bandwidth(device, sizes, timer(device, args, graphs=False))
    print(f"{meta['device']}: copy bandwidth {meta['copy']}; spec "
          + (f"{meta['spec'] / 1e9:.0f} GB/s" if meta["spec"] else report.SPEC_UNKNOWN)
          + f"; mode {meta['mode']}; timing: {meta['timing']}", flush=True)
    reserve = MODES[args.mode].throughput_s if args.throughput else 0.0
    end = start + args.budget - reserve if args.budget else None
    rows, compile_left = [], [args.compile_budget or math.inf]
    for i, name in enumerate(args.ops):
        deadline = op_deadline(end, time.perf_counter(), len(args.ops) - i)
        rows += bench_op(OPS[name], args, device, dtype, fmt, copy_bps, time_fn, compile_left, deadline, meta["spec"])
        forget_compiled()  # each op's compiled callables serve its shapes only
    tput = throughput.run(device, args.quick) if args.throughput else []
    slug = report.device_slug(meta["device"]) + ("" if args.mode == "default" else f"-{args.mode}")
    atomic_write_text(os.path.join(args.out, f"{slug}.csv"), report.to_csv(rows, tput, meta))
    atomic_write_text(os.path.join(args.out, f"{slug}.md"), report.to_markdown(rows, tput, meta))
    print(f"wrote {os.path.join(args.out, slug)}.csv and .md ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
