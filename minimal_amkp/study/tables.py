"""The paper's Tables 1-3 beside the study's, and one verdict per claim (study/reproduce.py runs it).

The paper's numbers are transcribed from its Tables 1-3 (Cai et al., MICCAI 2018; columns in
BOX_CLASSES order: AT, CM, Effusion (PE), Infiltration, Mass, Nodule, Pneumonia, Pneumothorax).
The study's cells are means ± standard deviations over seeds. A claim compares two methods
paired by seed: the per-seed difference d of the claim's statistic, its mean and 95% t-interval
over the seeds.
    holds           the interval lies above 0
    does not hold   the interval lies below 0
    within noise    the interval contains 0 (or there is one seed only)
"""
import math
import warnings

import numpy as np
from scipy import stats

from minimal_amkp.classes import BOX_CLASSES, SHORT_NAMES

LESION_CUTS = ("iou 0.1", "iou 0.3", "iobb 0.5")   # run/lesions.py's cuts, as report.json names them
SMALL = (3, 4, 5)                          # Infiltration, Mass, Nodule: Table 1's "small-scale" findings
T2_IOU = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)

PAPER_T1 = {                               # Acc at T(IoU) 0.3, all boxes in B
    ("low", "none"): [0.21, 0.81, 0.37, 0.37, 0.21, 0.04, 0.38, 0.35],
    ("low", "bilinear"): [0.21, 0.62, 0.34, 0.54, 0.35, 0.24, 0.37, 0.29],
    ("low", "deconv"): [0.28, 0.55, 0.35, 0.50, 0.32, 0.20, 0.35, 0.27],
    ("high", "none"): [0.21, 0.19, 0.33, 0.37, 0.35, 0.09, 0.23, 0.09],
    ("high", "bilinear"): [0.11, 0.10, 0.30, 0.30, 0.15, 0.22, 0.05, 0.08],
    ("high", "deconv"): [0.07, 0.10, 0.23, 0.40, 0.13, 0.01, 0.05, 0.03],
}
_PAPER_T2 = """
0.1 ref 0.69-0.89 0.94-0.59 0.66-0.83 0.71-0.62 0.40-0.67 0.14-0.61 0.63-1.02 0.38-0.49
0.1 base 0.55-0.88 0.99-0.08 0.57-0.82 0.47-0.61 0.36-0.65 0.25-0.59 0.73-1.01 0.42-0.48
0.1 ours 0.68-0.88 0.97-0.18 0.65-0.82 0.52-0.61 0.56-0.65 0.46-0.59 0.65-1.01 0.43-0.48
0.2 ref 0.47-0.98 0.68-0.72 0.45-0.91 0.48-0.68 0.26-0.69 0.05-0.62 0.35-1.08 0.23-0.52
0.2 base 0.36-0.97 0.99-0.08 0.33-0.90 0.22-0.67 0.26-0.68 0.09-0.61 0.48-1.07 0.36-0.50
0.2 ours 0.51-0.97 0.90-0.28 0.52-0.90 0.44-0.67 0.47-0.68 0.27-0.61 0.54-1.07 0.24-0.50
0.3 ref 0.24-1.40 0.46-0.78 0.30-0.95 0.28-0.72 0.15-0.71 0.04-0.62 0.17-1.11 0.13-0.53
0.3 base 0.22-1.38 0.96-0.12 0.18-0.93 0.13-0.71 0.19-0.69 0.04-0.61 0.31-1.09 0.21-0.52
0.3 ours 0.33-1.38 0.85-0.35 0.34-0.93 0.28-0.71 0.33-0.69 0.11-0.61 0.39-1.09 0.16-0.52
0.4 ref 0.09-1.08 0.28-0.81 0.20-0.97 0.12-0.75 0.07-0.72 0.01-0.62 0.07-1.12 0.07-0.54
0.4 base 0.12-1.06 0.92-0.15 0.05-0.95 0.02-0.73 0.12-0.71 0.03-0.61 0.17-1.11 0.12-0.53
0.4 ours 0.23-1.06 0.73-0.47 0.18-0.95 0.20-0.73 0.18-0.71 0.03-0.61 0.23-1.11 0.11-0.53
0.5 ref 0.05-1.09 0.18-0.84 0.11-0.99 0.07-0.76 0.01-0.72 0.01-0.62 0.03-1.13 0.03-0.55
0.5 base 0.06-1.07 0.68-0.39 0.02-0.97 0.02-0.74 0.06-0.71 0.01-0.61 0.06-1.12 0.08-0.53
0.5 ours 0.11-1.07 0.60-0.60 0.10-0.97 0.12-0.74 0.07-0.71 0.03-0.61 0.17-1.12 0.08-0.53
0.6 ref 0.02-1.09 0.08-0.85 0.05-1.00 0.02-0.76 0.00-0.72 0.01-0.62 0.02-1.13 0.03-0.55
0.6 base 0.01-1.08 0.48-0.60 0.00-0.99 0.02-0.75 0.04-0.71 0.01-0.61 0.03-1.12 0.06-0.53
0.6 ours 0.03-1.08 0.44-0.76 0.05-0.99 0.06-0.75 0.05-0.71 0.01-0.61 0.05-1.12 0.07-0.53
0.7 ref 0.01-1.10 0.03-0.86 0.02-1.01 0.00-0.77 0.00-0.72 0.00-0.62 0.01-1.13 0.02-0.55
0.7 base 0.00-1.08 0.18-0.84 0.00-0.99 0.01-0.75 0.01-0.71 0.00-0.61 0.01-1.12 0.01-0.53
0.7 ours 0.01-1.08 0.17-0.84 0.01-0.99 0.02-0.75 0.01-0.71 0.00-0.61 0.02-1.12 0.02-0.53
"""
PAPER_T2 = {}                              # (T(IoU), ref|base|ours) -> (acc (8,), afp (8,))
for _row in _PAPER_T2.split("\n")[1:-1]:
    _t, _method, *_cells = _row.split()
    PAPER_T2[float(_t), _method] = tuple(np.array([[float(v) for v in c.split("-")] for c in _cells]).T)
PAPER_T3 = {                               # Acc, all boxes in B; (row, T(IoU)) -> (8,)
    ("t=1", 0.1): [0.57, 0.96, 0.84, 0.78, 0.58, 0.65, 0.66, 0.68],
    ("t=2", 0.1): [0.65, 0.97, 0.82, 0.77, 0.60, 0.61, 0.72, 0.72],
    ("t=3", 0.1): [0.68, 0.97, 0.83, 0.79, 0.62, 0.57, 0.73, 0.72],
    ("t=1", 0.3): [0.34, 0.73, 0.47, 0.40, 0.36, 0.33, 0.33, 0.30],
    ("t=2", 0.3): [0.32, 0.82, 0.47, 0.40, 0.34, 0.25, 0.42, 0.36],
    ("t=3", 0.3): [0.33, 0.85, 0.48, 0.42, 0.34, 0.20, 0.44, 0.38],
    ("none", 0.1): [0.67, 1.00, 0.48, 0.58, 0.54, 0.47, 0.70, 0.71],
    ("vanilla", 0.1): [0.65, 0.97, 0.78, 0.87, 0.61, 0.48, 0.73, 0.72],
    ("full", 0.1): [0.68, 0.97, 0.83, 0.79, 0.62, 0.57, 0.73, 0.72],
    ("none", 0.3): [0.22, 0.99, 0.11, 0.20, 0.20, 0.06, 0.29, 0.34],
    ("vanilla", 0.3): [0.26, 0.73, 0.41, 0.46, 0.32, 0.10, 0.42, 0.36],
    ("full", 0.3): [0.33, 0.85, 0.48, 0.42, 0.34, 0.20, 0.44, 0.38],
}
WIDE = 0.05                                # the interval half-width the study aims to stay within
MSA_NAMES = {"none": "baseline", "bilinear": "bilinear", "deconv": "deconv."}
KP_NAMES = {"none": "w/o KP", "vanilla": "KP-Vanilla", "full": "KP"}


def _nanmean(values, axis=None):
    """np.nanmean without its warning: all-NaN slices are NaN (a class the data has no box of)."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.asarray(values, dtype=np.float64), axis=axis)


def class_mean(acc, classes=None):
    """Mean over the box classes (or a subset) that have ground truth: (..., 8) -> (...)."""
    a = np.asarray(acc, dtype=np.float64)
    return _nanmean(a[..., list(classes)] if classes is not None else a, axis=-1)


def verdict(a, b):
    """Paired by seed: a, b (seeds,) -> (verdict, mean d, half-width of its 95% interval)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return "no data", math.nan, math.nan
    mean = float(d.mean())
    if d.size < 2:
        return "within noise", mean, math.inf
    half = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    if mean - half > 0:
        return "holds", mean, half
    if mean + half < 0:
        return "does not hold", mean, half
    return "within noise", mean, half


def seeds_needed(a, b, width=None):
    """Seeds the paired 95% interval of a - b would need to be ±width or narrower, at the spread
    the seeds measured here: the least n >= 2 with t(0.975, n - 1)·sd/√n <= width. None when
    fewer than 2 seeds measured it."""
    width = WIDE if width is None else width
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return None
    sd, n = float(d.std(ddof=1)), 2
    while stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) > width:
        n += 1
    return n


def _pm(values):
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "n/a"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if v.size > 1 else f"{v.mean():.2f}"


def _row(label, per_class, paper=False):
    """per_class (seeds, 8) study values, or (8,) paper numbers -> a Markdown row with a mean column."""
    v = np.asarray(per_class, dtype=np.float64)
    if paper:
        return f"| {label} | " + " | ".join(f"{x:.2f}" for x in v) + f" | {v.mean():.2f} |"
    cells = [_pm(v[:, c]) for c in range(v.shape[1])] + [_pm(class_mean(v))]
    return f"| {label} | " + " | ".join(cells) + " |"


def _header(first):
    return [f"| {first} | " + " | ".join(SHORT_NAMES) + " | mean |", "|" + "---|" * (len(SHORT_NAMES) + 2)]


def _seeds(results, kind, fn):
    """fn(metrics of one seed) for every seed of a cell kind -> array (seeds, ...)."""
    return np.array([fn(m) for _, m in sorted(results[kind].items())], dtype=np.float64)


def _t1(results, s, msa):
    return _seeds(results, f"t1-{msa}-{s}", lambda m: m["all_boxes"][1][1])          # T(IoU) 0.3


def _t3(results, kind, t, i):
    return _seeds(results, kind, lambda m: m["all_boxes"][t][i])


def _t2(results, method, key):
    return _seeds(results, "am-full", lambda m: m["acc_afp"][method][key])            # (seeds, 7, 8)


def _lesions(results, kind, method, fn):
    """fn(lesion numbers of `method` (baseline | am) in one seed's report) over seeds -> (seeds,)."""
    return _seeds(results, kind, lambda m: fn(m["lesions"][method]))


def claims(results, sizes):
    """[(claim, test on the study, study a (seeds,), b (seeds,), paper a, paper b)]; paper values
    are NaN for the claims the paper does not make (per-lesion numbers, the reading of (8))."""
    s1, s2 = (*sizes, None)[:2]
    out = []
    for msa in ("bilinear", "deconv") if f"t1-none-{s1}" in results else ():
        out.append((f"Table 1: at 512, MSA ({MSA_NAMES[msa]}) beats the baseline on the small findings",
                    f"t1 {msa} vs none at {s1}, mean Acc(0.3) of Inf., Mass, Nod.",
                    class_mean(_t1(results, s1, msa), SMALL), class_mean(_t1(results, s1, "none"), SMALL),
                    class_mean(PAPER_T1["low", msa], SMALL), class_mean(PAPER_T1["low", "none"], SMALL)))
    for msa in ("none", "bilinear", "deconv") if f"t1-none-{s2}" in results else ():
        out.append((f"Table 1: 512 beats 1024 ({MSA_NAMES[msa]})",
                    f"t1 {msa} at {s1} vs {s2}, mean Acc(0.3) of 8 classes",
                    class_mean(_t1(results, s1, msa)), class_mean(_t1(results, s2, msa)),
                    class_mean(PAPER_T1["low", msa]), class_mean(PAPER_T1["high", msa])))
    paper = {m: np.array([PAPER_T2[t, m][0] for t in T2_IOU]) for m in ("ref", "base", "ours")}   # (7, 8)
    am, base, prior = (_t2(results, m, "acc") for m in ("am", "baseline", "prior"))
    out.append(("Table 2: ours (t = 3) beats base. (t = 1) across classes and thresholds",
                "AM vs baseline, Acc-AFP, mean Acc over 7 T(IoU) × 8 classes",
                class_mean(am).mean(-1), class_mean(base).mean(-1),
                paper["ours"].mean(), paper["base"].mean()))
    out.append(("Table 2: ours beats ref. (Wang et al.; here the box prior stands in)",
                "AM vs box prior, same statistic", class_mean(am).mean(-1), class_mean(prior).mean(-1),
                paper["ours"].mean(), paper["ref"].mean()))
    for i, t in enumerate((0.1, 0.3)):
        out.append((f"Table 3: AM t = 3 beats t = 1 at T(IoU) {t}", f"am-full H_f(t = 3) vs H_1, mean Acc({t})",
                    class_mean(_t3(results, "am-full", 3, i)), class_mean(_t3(results, "am-full", 1, i)),
                    class_mean(PAPER_T3["t=3", t]), class_mean(PAPER_T3["t=1", t])))
    nan = math.nan
    out.append(("Eq. (8) read with each H_t normalised to [0, 1] (Sec. 3.2) vs raw H_t (the default)",
                "am-full t = 3: H_f of min-max normalised H_t vs of raw H_t, mean Acc(0.3)",
                class_mean(_t3(results, "am-full", "normalised", 1)), class_mean(_t3(results, "am-full", 3, 1)),
                nan, nan))
    for cut in ("iou 0.1", "iou 0.3"):
        out.append((f"AM finds more of the lesions of multi-lesion images (recall at {cut.upper()})",
                    f"am-full H_f vs H_1, recall of the gt boxes of images with 2+ boxes of a class at {cut}",
                    _lesions(results, "am-full", "am", lambda n: n["recall"][cut]["multi"]),
                    _lesions(results, "am-full", "baseline", lambda n: n["recall"][cut]["multi"]), nan, nan))
    out.append(("AM covers more of large findings (extent IoU)",
                "am-full H_f vs H_1, best-box IoU per gt box, mean over the 6 spreading classes",
                _lesions(results, "am-full", "am", lambda n: n["extent_iou_mean"]),
                _lesions(results, "am-full", "baseline", lambda n: n["extent_iou_mean"]), nan, nan))
    for better, worse in (("full", "vanilla"), ("vanilla", "none")):
        for i, t in enumerate((0.1, 0.3)):
            out.append((f"Table 3: {KP_NAMES[better]} beats {KP_NAMES[worse]} at T(IoU) {t}",
                        f"am-{better} vs am-{worse} at t = 3, mean Acc({t})",
                        class_mean(_t3(results, f"am-{better}", 3, i)),
                        class_mean(_t3(results, f"am-{worse}", 3, i)),
                        class_mean(PAPER_T3[better, t]), class_mean(PAPER_T3[worse, t])))
    return out


def _verdict_table(results, sizes):
    lines = ["| claim | tested on the study as | study: a vs b, Δ [95% CI] | interval ± | seeds for ±0.05 "
             "| paper: a vs b | verdict |", "|---|---|---|---|---|---|---|"]
    for claim, test, a, b, pa, pb in claims(results, sizes):
        v, mean, half = verdict(a, b)
        ci = f"[{mean - half:+.3f}, {mean + half:+.3f}]" if math.isfinite(half) else "(one seed)"
        width = f"{half:.3f}" + (" (> 0.05)" if half > WIDE else "") if math.isfinite(half) else "n/a"
        ahead = f"a > b in {int(np.sum(np.asarray(a) > np.asarray(b)))} of {len(a)} seeds"
        paper = f"{float(pa):.2f} vs {float(pb):.2f}" if math.isfinite(pa) else "not in the paper"
        need = seeds_needed(a, b)
        lines.append(f"| {claim} | {test} | {_nanmean(a):.3f} vs {_nanmean(b):.3f}, Δ {mean:+.3f} {ci}, {ahead} "
                     f"| {width} | {'n/a' if need is None else need} | {paper} | **{v}** |")
    return lines


def _table1(results, sizes):
    stand = (f"study sizes {sizes[0]} and {sizes[1]} stand for the paper's 512 and 1024" if len(sizes) > 1 else
             f"study size {sizes[0]} stands for the paper's 512; the second resolution was not run")
    lines = ["## Table 1: MSA setups, Acc at T(IoU) = 0.3, all boxes in B", "",
             f"H_1 of the trained classifier (no AM fine-tuning); {stand}.", ""] + _header("method")
    for level, s, ps in zip(("low", "high"), sizes, (512, 1024)):
        for msa in ("none", "bilinear", "deconv"):
            lines.append(_row(f"{s}-{MSA_NAMES[msa]}", _t1(results, s, msa)))
            lines.append(_row(f"*paper {ps}-{MSA_NAMES[msa]}*", PAPER_T1[level, msa], paper=True))
    return lines


def _table2(results):
    names = (("prior", "box prior (stands in for ref.)", "ref"), ("baseline", "base. (H_1, t = 1)", "base"),
             ("am", "ours (H_f, t = 3)", "ours"))
    lines = ["## Table 2: Acc-AFP under the AFP bounds of the paper's \"ref.\" rows", "",
             "Each cell is Acc (mean ± sd over seeds) - AFP (mean over seeds).", ""]
    for i, t in enumerate(T2_IOU):
        lines += [f"### T(IoU) = {t}", ""] + _header("method")
        for method, label, paper in names:
            acc, afp = _t2(results, method, "acc")[:, i], _t2(results, method, "afp")[:, i]
            cells = [f"{_pm(acc[:, c])} - {_nanmean(afp[:, c]):.2f}" for c in range(len(BOX_CLASSES))]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {_pm(class_mean(acc))} |")
        for method, label, paper in names:
            acc, afp = PAPER_T2[t, paper]
            lines.append(f"| *paper {paper}.* | " + " | ".join(f"{a:.2f}-{f:.2f}" for a, f in zip(acc, afp))
                         + f" | {acc.mean():.2f} |")
        lines.append("")
    return lines


def _table3(results):
    lines = ["## Table 3: AM rounds and KP, Acc with all boxes in B", ""]
    for i, t in enumerate((0.1, 0.3)):
        lines += [f"### T(IoU) = {t}", ""] + _header("method")
        for r in (1, 2, 3):
            lines.append(_row(f"AM t={r}", _t3(results, "am-full", r, i)))
            lines.append(_row(f"*paper t={r}*", PAPER_T3[f"t={r}", t], paper=True))
        for kp in ("none", "vanilla", "full"):
            lines.append(_row(f"{KP_NAMES[kp]} (t = 3)", _t3(results, f"am-{kp}", 3, i)))
            lines.append(_row(f"*paper {KP_NAMES[kp]}*", PAPER_T3[kp, t], paper=True))
        lines.append(_row("diagnostic: KP, t = 3, each H_t min-max normalised before (8)",
                          _t3(results, "am-full", "normalised", i)))
        lines.append("")
    return lines


def _lesion_table(results):
    lines = ["## Lesion by lesion (am-full): every box of an image counts, no AFP bound", "",
             "Recall: share of ground-truth boxes that some box of their image overlaps by the cut, for "
             "images with two or more boxes of the class (multi) and with one (single). Extent IoU: the best "
             "IoU of an image's boxes with each ground-truth box, mean over the 6 classes whose findings "
             "spread. Mean ± sd over seeds.", "",
             "| method | " + " | ".join(f"recall {c}: multi / single" for c in LESION_CUTS) + " | extent IoU |",
             "|" + "---|" * (len(LESION_CUTS) + 2)]
    for method, label in (("baseline", "H_1 (t = 1)"), ("am", "H_f (t = 3)")):
        cells = [f"{_pm(_lesions(results, 'am-full', method, lambda n: n['recall'][c]['multi']))} / "
                 f"{_pm(_lesions(results, 'am-full', method, lambda n: n['recall'][c]['single']))}"
                 for c in LESION_CUTS]
        lines.append(f"| {label} | " + " | ".join(cells) + " | "
                     + _pm(_lesions(results, "am-full", method, lambda n: n["extent_iou_mean"])) + " |")
    return lines


def _peaks(results):
    kinds = [k for k in ("am-full", "am-vanilla", "am-none") if k in results]
    keys = list(next(iter(results[kinds[0]].values()))["peaks"])
    lines = ["## Diagnostic: does a round's heatmap peak inside a ground-truth box?", "",
             "Share of the (mining image, box class with ground truth) maps whose peak cell - over the "
             "cells still alive under M_{t-1} for H_t - has its centre inside a box of that class; "
             "`later`: of the maps whose H_1 peak missed, the share where the peak of H_2 or H_3 hits; "
             "`H2/H1 max`: the largest value of H_2 over its live cells divided by that of H_1, averaged. "
             "Mean ± sd over seeds. Not in the paper: it tells whether mining finds new regions (later) "
             "and whether eq. (8) lets them through (Hf).", "",
             "| cell | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(_pm(_seeds(results, kind, lambda m: m["peaks"][k]))
                                                 for k in keys) + " |")
    return lines


def _cost(results):
    total = sum(m["seconds"] for cells in results.values() for m in cells.values() if math.isfinite(m["seconds"]))
    lines = ["## Cost", "", "| cell | seeds | mean seconds each |", "|---|---|---|"]
    for kind, cells in results.items():
        sec = [m["seconds"] for m in cells.values() if math.isfinite(m["seconds"])]
        lines.append(f"| {kind} | {len(cells)} | {np.mean(sec):.0f} |" if sec else f"| {kind} | {len(cells)} | n/a |")
    return total, lines


def markdown(results, meta, notes=None):
    """The whole of reproduction.md from {cell kind: {seed: metrics}} (minimal_amkp.study.reproduce.measure)."""
    sizes = meta["sizes"]
    total, cost = _cost(results)
    first = next(iter(results["am-full"].values()))
    data = meta["data"] or f"the phantom ({meta['phantom_images']} images, phantom seed 0)"
    lines = [
        "# Tables 1-3 of Cai et al. (MICCAI 2018), reproduced", "",
        f"Produced by `{meta['command']}` on {meta['date']}: {meta['machine']}, {meta['cpus']} CPUs, "
        f"{meta['threads']} torch threads, torch {meta['torch']}. Preset `{meta['preset']}` on {data}; "
        f"seeds {', '.join(map(str, meta['seeds']))}; {first['n_mining']} mining images with "
        f"{first['n_gt']} ground-truth boxes at size {sizes[0]}. Compute: {total / 60:.1f} minutes, the sum "
        "over cells of their wall time (a resumed cell counts its last part only).", "",
        "Study cells are mean ± standard deviation over the seeds; the paper's numbers are in the "
        "italic rows beside them. How the cells are made: `minimal_amkp/study/reproduce.py`; how verdicts are "
        "decided: `minimal_amkp/study/tables.py` (paired by seed, 95% t-interval of the mean difference).", "",
        "## Verdicts", ""] + _verdict_table(results, sizes) + [""]
    if notes:
        lines += ["## What we found", "", notes.strip(), ""]
    if f"t1-none-{sizes[0]}" in results:
        lines += _table1(results, sizes) + [""]
    lines += (_table2(results) + _table3(results) + _lesion_table(results) + [""] + _peaks(results) + [""]
              + cost + [""])
    return "\n".join(lines)
