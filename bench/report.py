"""Turn bench rows into the CSV and the markdown table of bench/results/, targets included."""
import csv
import datetime
import io
import platform

import numpy as np
import torch

from kernels import launch

KEYS = ["device", "threads", "date", "python", "torch", "triton", "numpy"]  # every CSV row carries these
FIELDS = KEYS + ["op", "N", "C", "D", "H", "W", "dtype", "provider", "pass", "median_ms", "reps",
                 "gb_per_s", "pct_copy", "compile_s", "note"]
CPU_FUSED_VS_NAIVE = 10.0  # torch_fused forward at least this many times faster than torch_naive
GPU_PCT_COPY, GPU_VS_COMPILE, GPU_VS_NAIVE = 85.0, 1.5, 3.0
MASKED_OPS = ("masked_cam", "masked_gap")  # the ops whose naive form materialises X ⊙ M̂_c


def metadata(device_name, args, device, load):
    return dict(device=device_name,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                python=platform.python_version(), torch=torch.__version__,
                triton=launch.triton.__version__ if launch.triton is not None else "missing",
                numpy=np.__version__, threads=torch.get_num_threads(), cuda=device.type == "cuda",
                mode="quick (small shapes, few repetitions)" if args.quick
                else "full (small and paper shapes)",
                max_gb=args.max_gb, load="n/a" if load is None else f"{load:.2f}", note=args.note)


def _dims(row):
    N, C, D, H, W = row["shape"]
    return dict(N=N, C="" if row["op"] == "kp_distance" else C, D=D, H=H, W=W)


def to_csv(rows, meta):
    out = io.StringIO()
    writer = csv.DictWriter(out, FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: meta[k] for k in KEYS} | _dims(r) | {
            "op": r["op"], "dtype": r["dtype"], "provider": r["provider"], "pass": r["pass_"],
            "median_ms": r["ms"], "reps": r["reps"], "gb_per_s": r["gbps"], "pct_copy": r["pct_copy"],
            "compile_s": r["compile_s"], "note": r["note"]})
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


def _table(rows, op, notes):
    """Markdown table of one op; providers that never ran are named once below it instead."""
    lines = [f"### {op}", "",
             "| shape | provider | fwd ms | fwd GB/s | fwd % copy | fwd+bwd ms | fwd+bwd GB/s "
             "| fwd speed-up vs naive |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
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
            lines.append(f"| {_shape_label(op, shape)} | {provider} | {cell(fwd, 'ms')} | "
                         f"{cell(fwd, 'gbps')} | {cell(fwd, 'pct_copy')} | {cell(bwd, 'ms')} | "
                         f"{cell(bwd, 'gbps')} | {speed} |")
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
    paper = [r for r in rows if r["shape"][0] == 64 and r["shape"][2] == 768]
    if meta["cuda"]:
        lines.append(f"| CPU: torch_fused forward ≥ {CPU_FUSED_VS_NAIVE:g}× faster than torch_naive | "
                     "not measured here (this run is on a GPU) |")
    else:
        small = [r for r in rows if r not in paper and r["shape"][1] >= 8]
        for op in (o for o in ops if o in MASKED_OPS):
            ratios = _ratios(paper, op, "torch_naive", "torch_fused", "fwd")
            context = ", ".join(f"{k}: {v:.1f}×" for k, v in
                                _ratios(small, op, "torch_naive", "torch_fused", "fwd").items())
            extra = f"; small shapes with C ≥ 8, not part of the target: {context}" if context else ""
            verdict = _verdict(ratios, CPU_FUSED_VS_NAIVE)
            lines.append(f"| CPU, {op}: torch_fused forward ≥ {CPU_FUSED_VS_NAIVE:g}× faster than "
                         f"torch_naive at the paper's shapes | {verdict}{extra} |")
    gpu = [(f"GPU: triton forward ≥ {GPU_PCT_COPY:g}% of copy bandwidth", "pct"),
           (f"GPU: triton forward ≥ {GPU_VS_COMPILE:g}× faster than the best torch.compile mode",
            "compile"),
           (f"GPU: triton fwd+bwd ≥ {GPU_VS_NAIVE:g}× faster than torch_naive fwd+bwd", "naive")]
    rows = paper
    for text, kind in gpu:
        if not meta["cuda"]:
            lines.append(f"| {text} | not measured: no GPU lent |")
            continue
        for op in ops:
            if kind == "pct":
                pct = {_shape_label(op, r["shape"]): float(r["pct_copy"]) for r in rows
                       if (r["op"], r["provider"], r["pass_"]) == (op, "triton", "fwd") and r["pct_copy"]}
                result = _verdict(pct, GPU_PCT_COPY, "%")
            elif kind == "compile":
                def best_compile(shape, op=op):
                    ts = [_ms(rows, op, shape, p, "fwd") for p in ("compile_default", "compile_max-autotune")]
                    return min((t for t in ts if t), default=None)
                result = _verdict(_ratios(rows, op, best_compile, "triton", "fwd"), GPU_VS_COMPILE)
            else:
                result = _verdict(_ratios(rows, op, "torch_naive", "triton", "fwd+bwd"), GPU_VS_NAIVE)
            lines.append(f"| {text} ({op}, paper's shapes) | {result} |")
    return lines + [""]


def to_markdown(rows, meta):
    notes = {}
    body = []
    for op in dict.fromkeys(r["op"] for r in rows):
        body += _table(rows, op, notes)
    dtype = rows[0]["dtype"] if rows else "?"
    head = [f"# Bench: {meta['device']}", "",
            f"- date: {meta['date']}",
            f"- versions: python {meta['python']}, torch {meta['torch']}, triton {meta['triton']}, "
            f"numpy {meta['numpy']}",
            f"- torch threads: {meta['threads']}; load average at start: {meta['load']}",
            f"- mode: {meta['mode']}; dtype {dtype}; --max-gb {meta['max_gb']:g}",
            f"- copy bandwidth: {meta['copy']}",
            "- GB/s = the op's bytes-moved model (`bytes_moved` in kernels/*.py) / median time; "
            "% copy = that / copy bandwidth. fwd runs under no_grad; fwd+bwd backpropagates the logits "
            "(masked_cam), P (masked_gap) or the loss into fb only (kp_distance, N_A frozen).",
            "- shape: N×C×D×H×W (kp_distance: N×K×H×W). On CPU the small shapes stay in cache, "
            "so their % copy can pass 100.",
            *([f"- note: {meta['note']}"] if meta["note"] else []), "", "## Results", ""]
    foot = ["Skipped or failed cells:", ""] + [f"{i}. {n}" for n, i in notes.items()] + [""] if notes else []
    return "\n".join(head + body + foot + targets(rows, meta))
