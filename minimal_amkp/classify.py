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
    made for the whole minibatch, so they do not depend on the number of processes.
    """
    s, zoom = int(round(train.shift * images.shape[-1])), train.zoom
    if s == 0 and zoom == 0:
        return images
    dy, dx = rng.integers(0, 2 * s + 1, size=(2, whole)) - s
    scale = rng.uniform(1 - zoom, 1 + zoom, whole) if zoom > 0 else np.ones(whole)
    dy, dx, scale = runner.shard(dy), runner.shard(dx), runner.shard(scale)
    if zoom == 0:                # whole-pixel shifts: a crop of the replicate-padded image, exact
        padded = F.pad(images, (s, s, s, s), mode="replicate")
        size = images.shape[-1]
        return torch.stack([p[:, s - y:s - y + size, s - x:s - x + size] for p, y, x in zip(padded, dy, dx)])
    # Output pixel u samples input (u − c)/scale + c − d, in grid_sample's [-1, 1] frame.
    theta = torch.zeros(len(images), 2, 3, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = torch.as_tensor(1 / scale, dtype=images.dtype)
    theta[:, 0, 2] = torch.as_tensor(-2 * dx / images.shape[-1], dtype=images.dtype)
    theta[:, 1, 2] = torch.as_tensor(-2 * dy / images.shape[-2], dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


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
        x, y = to_device(shift(x, rng, cfg.train, len(idx), runner), device), y.to(device)
        with autocast(device):
            logits = net(x) if phase is Phase.BASE else net(x).logits
        return runner.share(len(local), len(idx)) * ops.classification_loss(logits, y)

    return run_epoch(model, opt, [(len(b), b) for b in batches], loss_fn,
                     lambda i: lr_at(cfg.train.lr, epoch * len(batches) + i, total * len(batches)),
                     f"{phase.value} epoch {epoch + 1}/{total}", runner)
