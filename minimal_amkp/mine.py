"""Attention mining (Sec. 2.1, 3.2) with knowledge preservation (Sec. 2.2).

Masks M live at the resolution of X, one per mining image and box class, and start all ones
(M_0). Round t = 1..T: fine-tune N_B on the mining images erased by M_{t-1} with loss (6);
compute H_t = CAM of every mining image under M_{t-1} (eq. 7, all 8 box classes); then
M_t = update_masks(H_t, M_{t-1}) for the classes an image is labelled with, while the
classes it is negative for keep all-ones masks (nothing there to mine). Round 1 erases
nothing: its H_1 is the CAM baseline of Table 2. Only the mining images' labels are used.

KP modes, our reading of Sec. 2.2 (the paper does not spell out the batch recipe):
    full     each minibatch of N holds n = N·fraction mining images with erased maps and
             N − n train_val images left whole; L = L_cls (all N) + λ L_KP, L_KP over the
             N − n whole images between N_A (frozen before mining) and N_B at layer3,
             layer4, the MSA output X and the logits (K of Sec. 3.2)
    vanilla  the same minibatches, L = L_cls
    none     minibatches of N mining images only, all erased, L = L_cls
The mining images are never augmented: a moved pixel would leave its mask behind.
"""
import copy

import numpy as np
import torch

from minimal_amkp import distributed, ops
from minimal_amkp import reference as R
from minimal_amkp.classes import BOX_CLASSES
from minimal_amkp.train import autocast, chunks, infer, order, run_epoch, set_phase, to_device

B = len(BOX_CLASSES)                                       # masks and CAMs cover the 8 box classes


def frozen_copy(model):
    """N_A: a copy of the network taken before mining, never updated.

    Its batch norm normalises with the statistics of the minibatch it sees and keeps no
    running statistics, exactly as N_B does while it trains on the same minibatch: so N_A and
    N_B agree until N_B's weights move (Sec. 2.2: "Initially, N_A and N_B are identical").
    Our choice; frozen running statistics in N_B instead make the KP gradient explode.
    """
    model_a = copy.deepcopy(model).train()
    for mod in model_a.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.track_running_stats = False
    for p in model_a.parameters():
        p.requires_grad_(False)
    return model_a


def mining_batches(kp, n_mine, n_train, batch_size, fraction, seed, round_, epoch):
    """One epoch: [(mining positions, train_val positions)], a pass over the mining images.

    full/vanilla take n = round(N·fraction) (at least 1) mining images per batch and fill it
    up with train_val images drawn without replacement, reshuffled when they run out.
    """
    tag = f"mine{round_}"
    if kp == "none":
        return [(b, np.zeros(0, np.int64)) for b in chunks(order(seed, tag, epoch, n_mine), batch_size)]
    n = max(1, round(batch_size * fraction))
    mine = order(seed, tag, epoch, n_mine)
    mine_batches = [mine[i:i + n] for i in range(0, n_mine, n)]
    need = (batch_size - n) * len(mine_batches)
    laps = -(-need // max(n_train, 1))
    stream = np.concatenate([order(seed, f"{tag}-train{lap}", epoch, n_train) for lap in range(laps)]) \
        if n_train and laps else np.zeros(0, np.int64)
    step = batch_size - n if n_train else 0
    return [(mb, stream[i * step:(i + 1) * step]) for i, mb in enumerate(mine_batches)]


def batch_masks(m8, classes):
    """Mining masks (n, 8, h, w) -> (n, classes, h, w): the unboxed classes are never erased."""
    pad = torch.ones(m8.shape[0], classes - m8.shape[1], *m8.shape[2:], dtype=m8.dtype)
    return torch.cat([m8, pad], dim=1)


def am_loss(model, model_a, x, y, m, n_erased, kp, lam):
    """Eq. (6) on one minibatch whose first n_erased images carry masks m[:n_erased].

    `model` is N_B or a callable running it (DDP); x (N, 1, S, S), y (N, 14), m (N, 14, h, w)
    -> (L, L_cls, L_KP or None).
    """
    if kp != "full" or n_erased == x.shape[0]:
        l_cls = ops.classification_loss(model(x, m).logits, y)
        return l_cls, l_cls, None
    with torch.no_grad():
        a = model_a(x)                  # the whole minibatch: the same batch-norm statistics as N_B
    # The logits and the KP term at X come from one op (ops.am_step), so backward writes dX once.
    out, l_kp_x = model(x, m, (a.x[n_erased:], n_erased))
    l_cls = ops.classification_loss(out.logits, y)
    layers = [(a.layer3, out.layer3), (a.logits, out.logits)]
    if model_a.msa is not None:              # without MSA, X is layer4 and l_kp_x is its term
        layers.insert(1, (a.layer4, out.layer4))
    l_kp = ops.kp_loss([(fa[n_erased:], fb[n_erased:]) for fa, fb in layers], [l_kp_x])
    return ops.total_loss(l_cls, l_kp, lam), l_cls, l_kp


def mine_epoch(model, model_a, opt, mining, train, masks, cfg, seed, round_, epoch, device):
    """One fine-tuning epoch of round `round_` (1-based); masks (n_mine, 8, h, w) = M_{t-1}."""
    k = cfg.mine
    set_phase(model, "mine")
    net = distributed.replicate(model)
    batches = mining_batches(k.kp, len(mining), len(train), k.batch_size, k.fraction, seed, round_, epoch)
    if k.kp == "full":                  # KP needs whole images in every process's slice
        distributed.check_split([len(t) for _, t in batches], "--mine.batch-size (its N − n whole images)")
    else:
        distributed.check_split([len(m) + len(t) for m, t in batches], "--mine.batch-size")

    def loss_fn(idx):
        mi, ti = (distributed.part(i) for i in idx)       # this process's slice of each kind
        xm, ym = mining.batch(mi)
        m = batch_masks(masks[torch.as_tensor(mi)], ym.shape[1])
        if len(ti):
            xt, yt = train.batch(ti)
            xm, ym = torch.cat([xm, xt]), torch.cat([ym, yt])
            m = torch.cat([m, torch.ones(len(ti), *m.shape[1:], dtype=m.dtype)])
        with autocast(device):
            _, l_cls, l_kp = am_loss(net, model_a, to_device(xm, device), ym.to(device),
                                     m.to(device, torch.float32), len(mi), k.kp, k.lam)
        # L_cls is a mean over all N images, L_KP over the N − n whole ones (eq. 4).
        l_cls = distributed.share(len(mi) + len(ti), sum(map(len, idx))) * l_cls
        return l_cls if l_kp is None else ops.total_loss(l_cls, distributed.share(len(ti), len(idx[1])) * l_kp, k.lam)

    return run_epoch(model, opt, [(len(mi) + len(ti), (mi, ti)) for mi, ti in batches], loss_fn, k.lr,
                     epoch * len(batches), k.epochs * len(batches),
                     f"AM round {round_}/{k.rounds} epoch {epoch + 1}/{k.epochs}")


def compute_cams(model, mining, masks, device, batch_size, label="CAMs", rows=None):
    """H_t: eq. (7) under masks M_{t-1} (n, 8, h, w) for the mining images at positions `rows`
    (default all) -> float32 (len(rows), 8, h, w)."""
    h = infer(model, mining, device, batch_size, label, rows,
              lambda x, idx: model.cam(x, masks[torch.as_tensor(idx)].to(device, torch.float32), B))
    return h if h is not None else torch.zeros(0, B, *masks.shape[2:])


def next_masks(h, m, labels, threshold):
    """M_t from H_t (n, 8, h, w) and M_{t-1} (uint8, same shape); only positive classes change."""
    updated = R.update_masks(h.double().numpy(), m.numpy(), threshold)                # (n, 8, h, w)
    positive = labels[:, :B].numpy().astype(bool)[:, :, None, None]                  # (n, 8, 1, 1)
    return torch.from_numpy(np.where(positive, updated, m.numpy()).astype(np.uint8))
