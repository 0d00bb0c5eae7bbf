"""`python -m bench`: time every formulation of the fused ops and the model's throughput; write bench/results/.

    python -m bench [--quick] [--ops masked_cam,masked_gap,kp_distance,am_step] [--out DIR]
                    [--dtype float32|bfloat16] [--layout auto|nchw|channels_last] [--max-gb GB]
                    [--no-compile] [--compile-budget 300] [--no-cuda-graphs] [--no-throughput]
                    [--threads N] [--note TEXT]

For each op and shape (N, C, D, H, W) it times every provider of bench.providers, forward alone
(under no_grad) and forward + backward (the training pass), and reports the median, GB/s from
the kernel's bytes-moved model, that as a % of a device-to-device copy measured in the same run,
and the targets beside the Triton rows. Then (bench.throughput) images per second of ResNet-MSA,
torch vs triton backend. Results go to DIR/<device>[-quick].csv and .md, written atomically; a
later run on the same device and mode replaces them.

Timing. On a GPU: triton.testing.do_bench (CUDA events, L2 flushed before every repetition,
median), after warm-up calls of our own (compilation, autotuning) so that do_bench's estimate of
the repetition count sees a warm function; every provider is captured in a CUDA graph and the
graph replayed (--no-cuda-graphs: none is), so launch overhead is the same for all. fp32 dots
run in TF32 on both sides: the kernels' launch.FP32_PRECISION and, set here,
torch.set_float32_matmul_precision("high"). On the CPU: perf_counter medians, no graphs.
"""
import argparse
import os
import re
import shutil
import statistics
import time

import torch

from minimal_amkp.run.atomic import atomic_write_text
from minimal_amkp.run.machine import device_name

from . import report, throughput
from .providers import OPS, as_numpy, function, providers

SMALL_SHAPES = [(8, 8, 64, 16, 16), (4, 14, 128, 7, 7), (3, 1, 100, 13, 13)]
# The paper's X at 512 px (32×32) and 1024 px (64×64), 8 box classes and all 14; a 16×16 map
# with N = 32, which only fills the GPU if the kernels split D.
PAPER_SHAPES = [(64, 8, 768, 32, 32), (64, 14, 768, 32, 32), (64, 8, 768, 64, 64), (64, 14, 768, 64, 64),
                (32, 14, 768, 16, 16)]


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


def timer(device, args):
    budget, max_reps = (0.3, 50) if args.quick else (1.0, 100)
    if device.type == "cuda":
        return lambda fn: gpu_time(fn, args.cuda_graphs)
    return lambda fn: cpu_time(fn, budget, max_reps)


def copy_bandwidth(device, nbytes, time_fn):
    """Bytes/s of a device-to-device copy (read + write), the roofline the kernels aim at.

    Copies into a preallocated buffer: on CPU a clone would mostly time the page faults of its
    fresh allocation (on GPU the caching allocator makes the two the same)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t, _ = time_fn(lambda: dst.copy_(src))
    return 2 * nbytes / t


def shapes_for(op, quick):
    shapes = SMALL_SHAPES if quick else SMALL_SHAPES + PAPER_SHAPES
    if op == "kp_distance":  # no classes: one row per (N, K, H, W)
        seen = {}
        for s in shapes:
            seen.setdefault((s[0], s[2], s[3], s[4]), s)
        shapes = list(seen.values())
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


def bench_op(op, args, device, dtype, fmt, copy_bps, time_fn, compile_left):
    """Rows of one op; compile_left is a one-element list of compile seconds still allowed."""
    rows = []
    itemsize = torch.finfo(dtype).bits // 8
    for shape in shapes_for(op.name, args.quick):
        tensors = op.inputs(shape, dtype, device, torch.Generator().manual_seed(0), fmt)
        for backward in (False, True):
            nbytes = op.bytes_moved(shape, itemsize, backward)
            for provider in providers(op, backward):
                row = dict(op=op.name, shape=shape, dtype=str(dtype).replace("torch.", ""), provider=provider,
                           pass_="fwd+bwd" if backward else "fwd", ms="", reps="", gbps="", pct_copy="",
                           compile_s="", note="")
                reason = skip_reason(op, provider, shape, args, device, itemsize, backward)
                if reason is None and provider.startswith("compile") and compile_left[0] <= 0:
                    reason = "--compile-budget spent"
                if reason:
                    rows.append(row | dict(note=f"skipped: {reason}"))
                    continue
                try:
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
                rows.append(row | dict(ms=f"{t * 1e3:.3f}", reps=reps or "do_bench", gbps=f"{nbytes / t / 1e9:.2f}",
                                       pct_copy=f"{100 * nbytes / t / copy_bps:.1f}"))
                target = report.row_target(rows, rows[-1])
                print(f"{op.name:12s} {str(shape):24s} {row['pass_']:8s} {provider:26s} "
                      f"{t * 1e3:10.3f} ms  {nbytes / t / 1e9:7.2f} GB/s"
                      + (f"  target {target}" if target else ""), flush=True)
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes only, few repetitions")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"), help="results folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--layout", default="auto", choices=["auto", "nchw", "channels_last"],
                   help="feature-map layout (auto: channels_last on CUDA, as training runs; nchw on CPU)")
    p.add_argument("--max-gb", type=float, default=None,
                   help="skip providers materialising more than this (default: 2 on CPU, 1/4 of GPU memory)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile providers")
    p.add_argument("--compile-budget", type=float, default=300.0,
                   help="seconds of compilation allowed in all")
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
    return args


def main(argv=None):
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
    copy_mb = 64 if args.quick else (256 if not gpu else 1024)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta = report.metadata(device_name(device), args, device, load, layout)
    copy_bps = copy_bandwidth(device, copy_mb << 20, time_fn)
    meta["copy"] = (f"{copy_bps / 1e9:.2f} GB/s (copy_ of {copy_mb} MiB into a preallocated buffer, "
                    "read + write)")
    print(f"{meta['device']}: copy bandwidth {copy_bps / 1e9:.2f} GB/s; timing: {meta['timing']}", flush=True)
    rows, compile_left = [], [args.compile_budget]
    for name in args.ops:
        rows += bench_op(OPS[name], args, device, dtype, fmt, copy_bps, time_fn, compile_left)
    tput = throughput.run(device, args.quick) if args.throughput else []
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"]).strip("-").lower() + ("-quick" if args.quick else "")
    atomic_write_text(os.path.join(args.out, f"{slug}.csv"), report.to_csv(rows, tput, meta))
    atomic_write_text(os.path.join(args.out, f"{slug}.md"), report.to_markdown(rows, tput, meta))
    print(f"wrote {os.path.join(args.out, slug)}.csv and .md")


if __name__ == "__main__":
    main()
