"""Turn bench rows into the CSV and the markdown table of bench/results/, targets included."""
import csv
import datetime
import io
import os
import platform
import re

import numpy as np
import torch

from kernels import launch
from minimal_amkp.run.machine import git_commit

KEYS = ["device", "threads", "date", "commit", "python", "torch", "triton", "numpy", "layout", "load"]  # every row
FIELDS = KEYS + ["op", "N", "C", "D", "H", "W", "dtype", "provider", "pass", "median_ms", "reps",
                 "gb_per_s", "pct_copy", "pct_spec", "compile_s", "images_per_s", "full_pass_h", "note"]
CPU_FUSED_VS_NAIVE = 10.0  # the torch provider's forward at least this many times faster than torch_naive
GPU_PCT_COPY = 90.0  # masked-CAM forward (the CAM pass), % of the copy bandwidth of the same run
GPU_VS_COMPILE = {"masked_cam": 1.3, "masked_gap": 1.3, "kp_distance": 1.3, "am_step": 2.0}  # fwd+bwd
MASKED_OPS = ("masked_cam", "masked_gap")  # the ops whose naive form materialises X ⊙ M̂_c
COMPILED = ("compile_default", "compile_max-autotune")
# A GPU row cannot move its bytes faster than a copy of the same device (L2 is flushed before
# every repetition), so a row above it means the baseline or the op's bytes model is wrong.
ABOVE_COPY = "ABOVE COPY: check the bytes model/baseline"
SPEC_UNKNOWN = "spec unknown"
# HBM bandwidth from the vendor's data sheet, bytes/s, by torch.cuda.get_device_name; the first
# match wins. Only names that say which part (and memory) they are: a GH200 has HBM3 or HBM3e
# and the name does not say which, so it stays unknown like every part not listed.
SPEC_BANDWIDTH = [
    (r"(?<!G)H200", 4.8e12),
    (r"H100 80GB HBM3|H100 SXM", 3.35e12),
    (r"H100 NVL", 3.9e12),
    (r"H100 PCIe", 2.0e12),
    (r"A100-SXM4-80GB", 2.039e12),
    (r"A100 80GB PCIe", 1.935e12),
    (r"A100-(SXM4|PCIE)-40GB", 1.555e12),
]


def spec_bandwidth(device_name):
    """The data sheet's memory bandwidth of a GPU in bytes/s, or None when the table lacks it."""
    return next((bps for pattern, bps in SPEC_BANDWIDTH if re.search(pattern, device_name)), None)


def device_slug(device_name):
    """A device name as a file or folder name: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()


def measured(row, nbytes, seconds, copy_bps, spec_bps, cuda):
    """Row with its timing, bandwidth, % of copy and of spec filled in, and ABOVE_COPY as its
    note where a GPU row beats the copy baseline (on a CPU small shapes sit in cache, so there
    the column may pass 100 and means nothing more)."""
    bps = nbytes / seconds
    pct = 100 * bps / copy_bps
    return row | dict(ms=f"{seconds * 1e3:.3f}", gbps=f"{bps / 1e9:.2f}", pct_copy=f"{pct:.1f}",
                      pct_spec=f"{100 * bps / spec_bps:.1f}" if spec_bps else SPEC_UNKNOWN,
                      note=ABOVE_COPY if cuda and pct > 100 else row["note"])


def above_copy(row):
    return row["note"] == ABOVE_COPY


MODE_TEXT = {"quick": "quick (small shapes, no max-autotune, few repetitions)",
         "default": "default (paper shapes first, then the small ones; max-autotune at the paper shapes only)",
         "full": "full (every shape, every compile mode, no time budget)"}


def versions():
    return dict(python=platform.python_version(), torch=torch.__version__,
                triton=launch.triton.__version__ if launch.triton is not None else "missing", numpy=np.__version__)


def metadata(device_name, args, device, load, layout):
    cuda = device.type == "cuda"
    timing = ("triton.testing.do_bench: CUDA events, L2 flushed before each repetition, median, after "
              "3 warm-up calls; " + ("every provider captured in a CUDA graph and replayed" if args.cuda_graphs
                                     else "no CUDA graphs (--no-cuda-graphs)")
              + f"; fp32 dots in TF32 on both sides (kernels: {launch.FP32_PRECISION}, torch: "
                "set_float32_matmul_precision('high'))") if cuda else \
        "time.perf_counter, median after one warm-up call; no CUDA graphs (CPU)"
    budget = f"; time budget {args.budget:g} s" if args.budget else ""
    return dict(device=device_name, commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                **versions(), threads=torch.get_num_threads(), cuda=cuda, layout=layout,
                timing=timing, mode=MODE_TEXT[args.mode] + budget, spec=spec_bandwidth(device_name) if cuda else None,
                max_gb=args.max_gb, load="n/a" if load is None else f"{load:.2f}", note=args.note)


def _dims(row):
    N, C, D, H, W = row["shape"]
    return dict(N=N, C="" if row["op"] == "kp_distance" else C, D=D, H=H, W=W)


def to_csv(rows, tput, meta):
    out = io.StringIO()
    writer = csv.DictWriter(out, FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: meta[k] for k in KEYS} | _dims(r) | {
            "op": r["op"], "dtype": r["dtype"], "provider": r["provider"], "pass": r["pass_"],
            "median_ms": r["ms"], "reps": r["reps"], "gb_per_s": r["gbps"], "pct_copy": r["pct_copy"],
            "pct_spec": r["pct_spec"], "compile_s": r["compile_s"], "note": r["note"]})
    for r in tput:
        writer.writerow({k: meta[k] for k in KEYS} | {
            "op": f"throughput_{r['kind']}", "N": r["N"], "H": r["size"], "W": r["size"],
            "provider": r["backend"], "pass": "train step" if r["kind"] == "train" else "cam pass",
            "median_ms": r["ms"], "images_per_s": r["images_per_s"], "full_pass_h": r["full_pass_h"],
            "note": r["note"]})
    return out.getvalue()


def _shape_label(op, shape):
    N, C, D, H, W = shape
    return f"{N}×{D}×{H}×{W}" if op == "kp_distance" else f"{N}×{C}×{D}×{H}×{W}"


def _ms(rows, op, shape, provider, pass_):
    """Median ms of one measurement, or None when it was skipped or is absent."""
    for r in rows:
        if (r["op"], r["shape"], r["provider"], r["pass_"]) == (op, shape, provider, pass_) and r["ms"]:
            return float(r["ms"])
    return None


def _best_compile(rows, op, shape, pass_):
    return min((t for t in (_ms(rows, op, shape, p, pass_) for p in COMPILED) if t), default=None)


def row_target(rows, row):
    """The target a measured triton row answers to, with its value and verdict, or None."""
    if row["provider"] != "triton" or not row["ms"]:
        return None
    op, shape = row["op"], row["shape"]
    small = "" if _paper(shape) else " (small shape; the target is for the paper's)"
    if row["pass_"] == "fwd":
        if op != "masked_cam":
            return None
        pct = float(row["pct_copy"])
        text, met = f"≥ {GPU_PCT_COPY:g}% of copy: {pct:.1f}%", pct >= GPU_PCT_COPY
    else:
        goal = GPU_VS_COMPILE.get(op)
        best = _best_compile(rows, op, shape, "fwd+bwd")
        if goal is None:
            return None
        if best is None:
            return f"≥ {goal:g}× the best torch.compile: not measured (no torch.compile row)"
        ratio = best / float(row["ms"])
        text, met = f"≥ {goal:g}× the best torch.compile: {ratio:.2f}×", ratio >= goal
    verdict = f"not counted, {ABOVE_COPY}" if above_copy(row) else "met" if met else "NOT met"
    return f"{text} {verdict}{small}"


def _paper(shape):
    return shape[0] >= 32 and shape[2] == 768


def _table(rows, op, notes):
    """Markdown table of one op; providers that never ran are named once below it instead."""
    lines = [f"### {op}", "",
             "| shape | provider | fwd ms | fwd GB/s | fwd % copy | fwd % spec | fwd+bwd ms | fwd+bwd GB/s "
             "| fwd speed-up vs naive | target |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows if r["op"] == op))
    providers = list(dict.fromkeys(r["provider"] for r in rows if r["op"] == op))
    idle = {p: r["note"] for p in providers for r in rows
            if (r["op"], r["provider"]) == (op, p) and not any(
                q["ms"] for q in rows if (q["op"], q["provider"]) == (op, p))}
    providers = [p for p in providers if p not in idle]
    for shape in shapes:
        naive = _ms(rows, op, shape, "torch_naive", "fwd")
        for provider in providers:
            cells = {}
            for r in rows:
                if (r["op"], r["shape"], r["provider"]) == (op, shape, provider):
                    cells[r["pass_"]] = r
            fwd, bwd = cells.get("fwd"), cells.get("fwd+bwd")

            def cell(r, key):
                if r is None:
                    return ""
                if r[key]:
                    return r[key]
                notes.setdefault(r["note"], len(notes) + 1)
                return f"— ({notes[r['note']]})"

            mine = _ms(rows, op, shape, provider, "fwd")
            speed = f"{naive / mine:.1f}×" if naive and mine else ""
            target = "; ".join(row_target(rows, r) or f"{r['pass_']}: {ABOVE_COPY}" for r in (fwd, bwd)
                               if r and (row_target(rows, r) or above_copy(r)))
            lines.append(f"| {_shape_label(op, shape)} | {provider} | {cell(fwd, 'ms')} | "
                         f"{cell(fwd, 'gbps')} | {cell(fwd, 'pct_copy')} | {cell(fwd, 'pct_spec')} | "
                         f"{cell(bwd, 'ms')} | {cell(bwd, 'gbps')} | {speed} | {target} |")
    return lines + [""] + [f"Not timed: {p} ({n.removeprefix('skipped: ')})." for p, n in idle.items()] + [""]


def _ratios(rows, op, slow, fast, pass_):
    """slow / fast median ratio for every shape of op where both ran."""
    out = {}
    for shape in dict.fromkeys(r["shape"] for r in rows if r["op"] == op):
        s = slow(shape) if callable(slow) else _ms(rows, op, shape, slow, pass_)
        f = _ms(rows, op, shape, fast, pass_)
        if s and f:
            out[_shape_label(op, shape)] = s / f
    return out


def _verdict(ratios, goal, unit="×"):
    if not ratios:
        return "not measured (no paper shape where both providers ran; --quick runs small shapes only)"
    worst = min(ratios.values())
    each = ", ".join(f"{k}: {v:.1f}{unit}" for k, v in ratios.items())
    return f"{'met' if worst >= goal else 'NOT met'}: worst {worst:.1f}{unit} ({each})"


def targets(rows, meta):
    lines = ["## Targets", "", "| target | result |", "|---|---|"]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    # Targets are about the paper's shapes; small ones sit in cache (CPU) or are launch-bound (GPU).
    paper = [r for r in rows if _paper(r["shape"])]
    if meta["cuda"]:
        lines.append(f"| CPU: torch forward ≥ {CPU_FUSED_VS_NAIVE:g}× faster than torch_naive | "
                     "not measured here (this run is on a GPU) |")
    else:
        small = [r for r in rows if r not in paper and r["shape"][1] >= 8]
        for op in (o for o in ops if o in MASKED_OPS):
            ratios = _ratios(paper, op, "torch_naive", "torch", "fwd")
            context = ", ".join(f"{k}: {v:.1f}×" for k, v in
                                _ratios(small, op, "torch_naive", "torch", "fwd").items())
            extra = f"; small shapes with C ≥ 8, not part of the target: {context}" if context else ""
            verdict = _verdict(ratios, CPU_FUSED_VS_NAIVE)
            lines.append(f"| CPU, {op}: the torch provider's forward ≥ {CPU_FUSED_VS_NAIVE:g}× faster "
                         f"than torch_naive at the paper's shapes | {verdict}{extra} |")
    gpu = [("masked_cam", "fwd", f"GPU: masked-CAM forward (the CAM pass) ≥ {GPU_PCT_COPY:g}% of the copy "
                                 "bandwidth measured in the same run")]
    gpu += [(op, "fwd+bwd", f"GPU: {op} forward + backward ≥ {goal:g}× faster than the best torch.compile"
             + (" (the fused AM step: logits, KP at X, one dX)" if op == "am_step" else ""))
            for op, goal in GPU_VS_COMPILE.items()]
    for op, pass_, text in gpu:
        if not meta["cuda"]:
            lines.append(f"| {text} | not measured: no GPU was lent to this run |")
            continue
        if op not in ops:
            continue
        mine = [r for r in paper if (r["op"], r["provider"], r["pass_"]) == (op, "triton", pass_) and r["ms"]]
        flagged = [_shape_label(op, r["shape"]) for r in mine if above_copy(r)]
        counted = [r for r in paper if not (r in mine and above_copy(r))]
        if pass_ == "fwd":
            result = _verdict({_shape_label(op, r["shape"]): float(r["pct_copy"]) for r in mine
                               if not above_copy(r)}, GPU_PCT_COPY, "%")
        else:
            result = _verdict(_ratios(counted, op, lambda shape, op=op: _best_compile(counted, op, shape, pass_),
                                      "triton", pass_), GPU_VS_COMPILE[op])
        if flagged:
            result = (f"{result}; " if len(flagged) < len(mine) else "") + \
                f"not counted, {ABOVE_COPY}: {', '.join(flagged)}"
        lines.append(f"| {text} (paper's shapes) | {result} |")
    return lines + [""]


def _throughput(tput, notes):
    if not tput:
        return []
    lines = ["## Throughput: ResNet-MSA (paper model, 512 px)", "",
             "| row | backend | N | ms | images/s | 112,120 images (h) |", "|---|---|---:|---:|---:|---:|"]
    for r in tput:
        if r["ms"]:
            cells = [r["ms"], r["images_per_s"], r["full_pass_h"]]
        else:
            notes.setdefault(r["note"], len(notes) + 1)
            cells = [f"— ({notes[r['note']]})", "", ""]
        what = "AM train step (N_A + N_B, KP full, backward, SGD)" if r["kind"] == "train" else "CAM pass"
        lines.append(f"| {what} | {r['backend']} | {r['N']} | " + " | ".join(cells) + " |")
    return lines + [""]


def to_markdown(rows, tput, meta):
    notes = {}
    body = []
    for op in dict.fromkeys(r["op"] for r in rows):
        body += _table(rows, op, notes)
    body += _throughput(tput, notes)
    dtype = rows[0]["dtype"] if rows else "?"
    head = [f"# Bench: {meta['device']}", "",
            f"- date: {meta['date']}",
            f"- versions: python {meta['python']}, torch {meta['torch']}, triton {meta['triton']}, "
            f"numpy {meta['numpy']}",
            f"- torch threads: {meta['threads']}; load average at start: {meta['load']}",
            f"- mode: {meta['mode']}; dtype {dtype}; feature maps {meta['layout']}; --max-gb {meta['max_gb']:g}",
            f"- timing: {meta['timing']}",
            f"- commit: {meta['commit']}",
            f"- copy bandwidth: {meta['copy']}",
            f"- spec memory bandwidth: " + (f"{meta['spec'] / 1e9:.0f} GB/s (data sheet)" if meta["spec"]
                                            else SPEC_UNKNOWN) + "; % spec = GB/s / that",
            *([] if meta["cuda"] else ["- no GPU was lent to this run: no GPU number here is measured, and the "
                                       "triton rows are skipped (the interpreter is not a speed path)"]),
            "- GB/s = the op's bytes-moved model (`bytes_moved` in kernels/*.py) / median time; "
            "% copy = that / copy bandwidth. fwd runs under no_grad (masked_cam: ops.cam, the CAM pass); "
            "fwd+bwd is the training pass: ops.branch_logits into x, w, b (masked_cam), P into x "
            "(masked_gap), the loss into fb only (kp_distance, N_A frozen), logits and KP at X into "
            "x, w, b (am_step).",
            "- shape: N×C×D×H×W (kp_distance: N×K×H×W). On CPU the small shapes stay in cache, "
            "so their % copy can pass 100. On a GPU (L2 flushed before every repetition) a row above 100% "
            f"of copy says \"{ABOVE_COPY}\": one of the two is wrong, and no target counts as met on it.",
            *([f"- note: {meta['note']}"] if meta["note"] else []), "", "## Results", ""]
    foot = ["Skipped or failed cells:", ""] + [f"{i}. {n}" for n, i in notes.items()] + [""] if notes else []
    return "\n".join(head + body + foot + targets(rows, meta))
