"""Multi-label classification training before attention mining (Sec. 3.1).

Phases, each with SGD + momentum (paper) or AdamW over a cosine schedule with a short warm-up,
and optional random shifts and zooms of the images (never during mining, where masks must stay put):
    BASE        ResNet-50 alone: GAP of layer4 -> 14 logits, loss (2)-(3) with all-ones masks
    MSA_FROZEN  MSA initialisation: layers below MSA fixed (weights and batch-norm statistics),
                MSA and the branches trained
    MSA         the whole ResNet-MSA end to end
    MINE        attention mining (mine.py): everything but the plain ResNet head
With `model.msa=none` only BASE runs before mining (it already trains the branches on X = layer4).
"""
import enum
import math
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from minimal_amkp import ops
from minimal_amkp.loop import autocast, chunks, order, run_epoch, to_device


class Phase(enum.Enum):
    BASE = "base"
    MSA_FROZEN = "msa_frozen"
    MSA = "msa"
    MINE = "mine"


def epochs(cfg):
    """{phase: its epochs} of the classification phases, from TrainConfig."""
    t = cfg.train
    return {Phase.BASE: t.base_epochs, Phase.MSA_FROZEN: t.msa_frozen_epochs, Phase.MSA: t.msa_epochs}


def plan(cfg):
    """[(phase, epochs)]: the classification phases before mining. A checkpoint says how far
    along this list a run got; index len(plan) is attention mining."""
    phases = [Phase.BASE] + ([Phase.MSA_FROZEN, Phase.MSA] if cfg.model.msa != "none" else [])
    return [(p, epochs(cfg)[p]) for p in phases]


def shift(images, rng, train, whole, runner):
    """Translate each image by up to train.shift·S pixels each way, edges replicated, and with
    train.zoom > 0 also rescale it about its centre by a factor in [1 − zoom, 1 + zoom]: cues to
    look at the lesion rather than at where it sits in the frame or how much of the frame a
    region fills (before mining only).

    `images` are this process's shard of a global minibatch of `whole` images: the draws are
    made for the whole minibatch, so they do not depend on the number of processes. They are
    drawn on the host; the pixels move on the images' device, the whole shard in a few ops.
    """
    s, zoom = int(round(train.shift * images.shape[-1])), train.zoom
    if s == 0 and zoom == 0:
        return images
    dy, dx = rng.integers(0, 2 * s + 1, size=(2, whole)) - s
    scale = rng.uniform(1 - zoom, 1 + zoom, whole) if zoom > 0 else np.ones(whole)
    dy, dx, scale = runner.shard(dy), runner.shard(dx), runner.shard(scale)
    if zoom == 0:
        return translate(images, dy, dx)
    # Output pixel u samples input (u − c)/scale + c − d, in grid_sample's [-1, 1] frame; theta is
    # built on the host and copied once, so the grid is made on the images' device.
    theta = np.zeros((len(images), 2, 3))
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, 0, 2] = -2 * dx / images.shape[-1]
    theta[:, 1, 2] = -2 * dy / images.shape[-2]
    theta = torch.as_tensor(theta, dtype=images.dtype).to(images.device, non_blocking=True)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def translate(images, dy, dx):
    """Image i (n, C, H, W) moved down dy[i] and right dx[i] whole pixels, edges replicated.

    Its crop of the replicate-padded image, taken for the whole batch at once: the windows of
    every offset are a view (unfold), and one indexing op on the images' device copies each
    image's own window.
    """
    dy, dx = np.asarray(dy, np.int64), np.asarray(dx, np.int64)
    s = int(np.abs(np.concatenate([dy, dx])).max(initial=0))
    n, _, h, w = images.shape
    padded = F.pad(images, (s, s, s, s), mode="replicate")
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)                      # (n, C, 2s + 1, 2s + 1, H, W)
    at = [torch.as_tensor(a).to(images.device, non_blocking=True) for a in (np.arange(n), s - dy, s - dx)]
    return windows[at[0], :, at[1], at[2]]


def lr_at(lr, step, total):
    """Cosine decay from lr to 0 over `total` steps after a linear warm-up of 5% of them."""
    warm = max(1, total // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def set_phase(model, phase):
    """Train mode and requires_grad for one Phase; returns the parameters it updates."""
    model.train()
    frozen = []
    if phase is Phase.BASE:
        frozen = [model.fc, model.msa] if model.msa is not None else []
    elif phase is Phase.MSA_FROZEN:
        frozen = model.below_msa()
    if model.msa is not None and phase is not Phase.BASE:
        frozen.append(model.base_fc)
    for p in model.parameters():
        p.requires_grad_(True)
    for mod in frozen:
        mod.eval()
        for p in mod.parameters():
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def classification_epoch(model, opt, phase, images, cfg, epoch, runner):
    """One epoch of a classification Phase over `images` (the train_val set)."""
    set_phase(model, phase)
    net = runner.replicate(model, "base_logits" if phase is Phase.BASE else "__call__")
    seed, device = cfg.run.seed, runner.device
    batches = chunks(order(seed, phase.value, epoch, len(images)), cfg.train.batch_size)
    runner.check_split([len(b) for b in batches], "--train.batch-size")
    rng = np.random.default_rng([seed, zlib.crc32(phase.value.encode()), epoch, 1])
    total = epochs(cfg)[phase]

    def loss_fn(idx):
        local = runner.shard(idx)                          # this process's slice of the minibatch
        x, y = images.batch(local)
        x, y = shift(to_device(x, device), rng, cfg.train, len(idx), runner), y.to(device)
        with autocast(device):
            logits = net(x) if phase is Phase.BASE else net(x).logits
        return runner.share(len(local), len(idx)) * ops.classification_loss(logits, y)

    return run_epoch(model, opt, [(len(b), b) for b in batches], loss_fn,
                     lambda i: lr_at(cfg.train.lr, epoch * len(batches) + i, total * len(batches)),
                     f"{phase.value} epoch {epoch + 1}/{total}", runner)
