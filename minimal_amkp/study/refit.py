"""Does the erased-image loss prefer the lesions left after erasure? Two measurements on a run's N_A.

    python -m minimal_amkp.study.refit RUN [--holes none|matched] [--only-left]

RUN is a finished run (its checkpoint holds N_A, the network before mining). Both measurements
hold N_A's features X fixed, so they ask what loss (2) rewards, not whether an optimiser finds
it. M_1 and the lesions left:
- on the positive control (`--data.phantom-scenario hidden-sibling`, lesion_kinds.csv): M_1
  the oracle's, lesion A erased (job.oracle_masks); the lesions left are the B boxes;
- elsewhere (phantom v2): M_1 the run's own (mining.npz), as the report's later peaks have it;
  the lesions left are the class's ground-truth boxes on maps with two or more.

- Hole effect: the mean change of z_c when a test image's class-c branch gets a hole (the
  erased region of a mining positive of class c, the oracle's M_1), over the images negative
  and positive for c. g in eq. (2) averages over every cell, so a hole moves z_c of any image;
  a rise on negatives means the classifier reads a hole as evidence for the class.
- Refit: for each box class c, the head (w_c, b_c) fitted to convergence (L-BFGS, from N_A's)
  on loss (2) over the mining positives of c erased by M_1, the train_val positives whole and
  the train_val negatives, these with holes under --holes matched. Reported: the erased
  positives' loss before and after, and the share of the maps with a lesion left whose CAM
  peak over the live cells lies in its box, with N_A's head and with the refitted one. If
  mining's objective preferred the lesions left, the refitted head would peak on them.
  --only-left keeps only the erased positives that still carry such a lesion.
"""
import argparse
import os

import numpy as np
import torch

from minimal_amkp.classes import BOX_CLASSES
from minimal_amkp.config import RunError
from minimal_amkp.data.images import Images, frame
from minimal_amkp.harvest import read_mining
from minimal_amkp.loop import infer
from minimal_amkp.model import ResNetMSA, map_grid, map_size
from minimal_amkp.run import checkpoint
from minimal_amkp.run.job import load_data, oracle_masks
from minimal_amkp.run.lesions import peak_in_box
from minimal_amkp.run.settings import from_dict
from minimal_amkp.runner import Runner

B = len(BOX_CLASSES)


def refit_head(g, y, w0, b0, iters=500):
    """The logistic head of one branch fitted to convergence: min over (w, b) of the mean
    binary cross-entropy of σ(wᵀ g_i + b) against y_i (eq. 2 with X fixed), by L-BFGS from
    (w0, b0). g (n, D) pooled features g(X̂_c), y (n,) in {0, 1} -> (w (D,), b) float64."""
    g, y = torch.as_tensor(g, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    w = torch.tensor(np.asarray(w0, np.float64), requires_grad=True)
    b = torch.tensor(float(b0), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(g @ w + b, y)
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach().numpy(), b.item()


def bce(g, y, w, b):
    """Mean −[y log σ(z) + (1 − y) log(1 − σ(z))], z = g w + b (NumPy, float64)."""
    z = np.asarray(g, np.float64) @ np.asarray(w, np.float64) + b
    return float(np.mean(np.logaddexp(0, z) - np.asarray(y) * z))


def features(model, images, runner):
    """X of every image (no masks), float64 (n, D, h, w)."""
    x = infer(model, images, 64, "features X", np.arange(len(images)), lambda x, _: model(x).x, runner)
    return x.double().numpy()


def targets(ds, names):
    """{(image position, class): (k, 4) boxes of the lesions left}: the control's lesion B boxes
    (lesion_kinds.csv), else every box of a class on images with two or more."""
    index, out = {n: i for i, n in enumerate(names)}, {}
    rows = [(b, k) for b, k in ds.kinds if k == "B"] if ds.kinds is not None else \
        [(b, None) for bs in ds.boxes.values() for b in bs]
    for box, _ in rows:
        if box.image in index:
            out.setdefault((index[box.image], box.label), []).append((box.x, box.y, box.w, box.h))
    least = 1 if ds.kinds is not None else 2
    return {k: np.array(v, np.float64) for k, v in out.items() if len(v) >= least}


def measure(run, holes="matched", only_left=False, n_train=1500, seed=0):
    """The module's two measurements on RUN -> (hole effect {"negatives", "positives"}, rows:
    one dict per box class)."""
    state = checkpoint.load(run)
    if state is None or state["mining"] is None:
        raise RunError(f"{run}: holds no network trained up to mining")
    cfg = from_dict(state["config"])
    ds, mining_names, train_names, test_names = load_data(cfg)
    model = ResNetMSA(cfg.model)
    checkpoint.restore_model(model, state["mining"]["model_a"], checkpoint.path(run))
    model.eval()
    size, runner, rng = cfg.data.image_size, Runner(), np.random.default_rng(seed)
    grid, h = map_grid(model, size), map_size(size, cfg.model.msa, len(cfg.model.blocks))
    if ds.kinds is not None:
        m1 = oracle_masks(ds, mining_names, grid, h).numpy()                            # (n, 8, h, h)
    else:
        masks = read_mining(os.path.join(run, "mining.npz"))["masks"]
        if len(masks) < 2:
            raise RunError(f"{run}: mined one round only, so it has no M_1")
        m1 = masks[1]
    mining, train, test = (Images(ds, names, size, True, cfg.data.workers, "reading images")
                           for names in (mining_names, train_names[:n_train], test_names[:n_train]))
    xm, xt, xs = features(model, mining, runner), features(model, train, runner), features(model, test, runner)
    ym, yt, ys = mining.labels.numpy()[:, :B], train.labels.numpy()[:, :B], test.labels.numpy()[:, :B]
    w0, b0 = model.fc.weight.detach().double().numpy()[:B], model.fc.bias.detach().double().numpy()[:B]
    boxes, effect = targets(ds, mining_names), {"negatives": [], "positives": []}
    rows = []
    for c in range(B):
        erased = np.flatnonzero((ym[:, c] > 0) & (m1[:, c].reshape(len(m1), -1).min(1) == 0))
        if not len(erased):
            continue
        pool = m1[erased, c]                                                           # (p, h, h)
        hole = pool[rng.integers(0, len(pool), len(xs))]
        dz = np.einsum("d,ndhw->n", w0[c], xs * hole[:, None] - xs) / (h * h)
        effect["negatives"].append(dz[ys[:, c] == 0])
        effect["positives"].append(dz[ys[:, c] > 0])
        if only_left:
            erased = np.array([i for i in erased if (i, c) in boxes], np.int64)
        neg, pos = np.flatnonzero(yt[:, c] == 0), np.flatnonzero(yt[:, c] > 0)
        holes_neg = pool[rng.integers(0, len(pool), len(neg))] if holes == "matched" else np.ones((len(neg), h, h))
        g = np.concatenate([(xm[erased] * m1[erased, c][:, None]).mean((2, 3)),
                            (xt[neg] * holes_neg[:, None]).mean((2, 3)), xt[pos].mean((2, 3))])
        y = np.r_[np.ones(len(erased)), np.zeros(len(neg)), np.ones(len(pos))]
        w, b = refit_head(g, y, w0[c], b0[c])
        share = []
        for head in (w0[c], w):
            hits = [peak_in_box(np.where(m1[i, c] > 0, np.einsum("d,dhw->hw", head, xm[i]), -np.inf), grid,
                                boxes[(i, c)], *frame(ds, mining_names[i])) for i in erased if (i, c) in boxes]
            share.append(float(np.mean(hits)) if hits else float("nan"))
        rows.append(dict(c=BOX_CLASSES[c], erased=len(erased), left=sum((i, c) in boxes for i in erased),
                         loss_before=bce(g[:len(erased)], y[:len(erased)], w0[c], b0[c]),
                         loss_after=bce(g[:len(erased)], y[:len(erased)], w, b), share_a=share[0], share_refit=share[1]))
    return {k: float(np.mean(np.concatenate(v))) for k, v in effect.items()}, rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minimal_amkp.study.refit",
                                description="What loss (2) rewards on the positive control, N_A's features fixed.")
    p.add_argument("run", help="a finished run (its N_A and, off the control, its M_1)")
    p.add_argument("--holes", choices=("none", "matched"), default="matched",
                   help="negatives' holes in the refit (default matched)")
    p.add_argument("--only-left", action="store_true", help="refit on the erased positives with a lesion left only")
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join(a.run, "config.json")):
        p.exit(1, f"refit: {a.run}: no run there (no config.json)\n")
    try:
        effect, rows = measure(a.run, a.holes, a.only_left)
    except RunError as e:
        p.exit(1, f"refit: {e}\n")
    print(f"hole effect on z_c (N_A): negatives {effect['negatives']:+.3f}, positives {effect['positives']:+.3f}")
    print("| class | erased positives (with a lesion left) | their loss: N_A's head → refitted | "
          "peak in a lesion left: N_A's head → refitted |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['c']} | {r['erased']} ({r['left']}) | {r['loss_before']:.2f} → {r['loss_after']:.2f} | "
              f"{r['share_a']:.2f} → {r['share_refit']:.2f} |")


if __name__ == "__main__":
    main()
