"""Multi-label classification training before attention mining (Sec. 3.1), and what all stages share.

Phases, each with SGD + momentum (paper) or AdamW over a cosine schedule with a short warm-up,
and optional random shifts and zooms of the images (never during mining, where masks must stay put):
    base        ResNet-50 alone: GAP of layer4 -> 14 logits, loss (2)-(3) with all-ones masks
    msa_frozen  MSA initialisation: layers below MSA fixed (weights and batch-norm statistics),
                MSA and the branches trained
    msa         the whole ResNet-MSA end to end
With `model.msa=none` only `base` runs (it already trains the branches on X = layer4).
Data order is a pure function of (seed, phase, epoch), so a resumed run sees the same batches.
"""
import contextlib
import math
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from minimal_amkp import ops
from minimal_amkp.run import distributed
from minimal_amkp.config import RunError
from minimal_amkp.data.dataset import XrayDataset
from minimal_amkp.run.progress import Progress

def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is available")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def autocast(device):
    """bf16 autocast on CUDA; nothing on CPU, where float32 keeps runs reproducible."""
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def to_device(images, device):
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return images.to(device, non_blocking=True, memory_format=fmt)


class Images:
    """Images (n, 1, S, S) and labels (n, 14) of a fixed name list, by position.

    `preload` reads everything once (small sets: the phantom); otherwise each batch is read
    by `workers` threads when asked for.
    """

    def __init__(self, ds, names, size, preload, workers, label="reading images"):
        self.names = list(names)
        self.data = XrayDataset(ds, self.names, size)
        self.labels = torch.from_numpy(np.stack([ds.entries[n].labels for n in self.names])
                                       if self.names else np.zeros((0, 14), np.uint8)).float()
        self.pool = ThreadPoolExecutor(max(1, workers))
        self.cache = None
        if preload and self.names:
            progress, chunks = Progress(label, len(self.names)), []
            for start in range(0, len(self.names), 64):
                chunks.append(self._read(range(start, min(start + 64, len(self.names)))))
                progress.update(start + len(chunks[-1]), len(chunks[-1]))
            progress.close()
            self.cache = torch.cat(chunks)

    def _read(self, idx):
        return torch.stack(list(self.pool.map(lambda i: self.data[int(i)]["image"], idx)))

    def __len__(self):
        return len(self.names)

    def batch(self, idx):
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        images = self.cache[idx] if self.cache is not None else self._read(idx.tolist())
        return images, self.labels[idx]


def order(seed, tag, epoch, n):
    """A permutation of range(n) fixed by (seed, tag, epoch): the data order of one epoch."""
    return np.random.default_rng([seed, zlib.crc32(tag.encode()), epoch]).permutation(n)


def chunks(perm, size):
    """Minibatches of `size`; a short remainder is dropped (batch norm needs 2 images), but
    a set smaller than one batch is one batch."""
    if len(perm) < size:
        return [perm] if len(perm) >= 2 else []
    return [perm[i:i + size] for i in range(0, len(perm) - size + 1, size)]


def shift(images, rng, fraction, whole=None, zoom=0.0):
    """Translate each image by up to fraction·S pixels each way, edges replicated, and with
    zoom > 0 also rescale it about its centre by a factor in [1 − zoom, 1 + zoom]: cues to
    look at the lesion rather than at where it sits in the frame or how much of the frame a
    region fills (before mining only).

    With `whole`, `images` are this process's part of a minibatch of `whole` images: the
    draws are made for all of them, so they do not depend on the number of processes.
    """
    s = int(round(fraction * images.shape[-1]))
    if s == 0 and zoom == 0:
        return images
    n = whole or len(images)
    dy, dx = rng.integers(0, 2 * s + 1, size=(2, n)) - s
    scale = rng.uniform(1 - zoom, 1 + zoom, n) if zoom > 0 else np.ones(n)
    if whole is not None:
        dy, dx, scale = distributed.part(dy), distributed.part(dx), distributed.part(scale)
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
    """Train mode and requires_grad for one phase; returns the parameters it updates.

    `mine` (attention mining) trains everything but the plain ResNet head.
    """
    model.train()
    frozen = []
    if phase == "base":
        frozen = [model.fc, model.msa] if model.msa is not None else []
    elif phase == "msa_frozen":
        frozen = model.below_msa()
    if model.msa is not None and phase != "base":
        frozen.append(model.base_fc)
    for p in model.parameters():
        p.requires_grad_(True)
    for mod in frozen:
        mod.eval()
        for p in mod.parameters():
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def optimizer(params, lr, cfg):
    """cfg.optimizer of TrainConfig; mining uses the same kind with its own lr."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def run_epoch(model, opt, batches, loss_fn, lr_of, label):
    """One pass over `batches` (each (n_images, payload)) at rate lr_of(step in the epoch):
    loss_fn(payload) -> loss; returns the mean loss."""
    progress, losses = Progress(label, len(batches)), []
    for i, (n_images, payload) in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr_of(i)
        loss = loss_fn(payload)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.constrain()
        losses.append(distributed.average(loss))             # the global minibatch's loss
        if not math.isfinite(losses[-1]):
            raise RunError(f"{label}: the loss became {losses[-1]}; lower the learning rate")
        progress.update(i + 1, n_images, losses[-1])
    progress.close()
    return float(np.mean(losses)) if losses else float("nan")


def classification_epoch(model, opt, phase, images, cfg, seed, epoch, device):
    """One epoch of phase `base`, `msa_frozen` or `msa` over `images` (the train_val set)."""
    set_phase(model, phase)
    net = distributed.replicate(model, "base_logits" if phase == "base" else "__call__")
    batches = chunks(order(seed, phase, epoch, len(images)), cfg.train.batch_size)
    distributed.check_split([len(b) for b in batches], "--train.batch-size")
    rng = np.random.default_rng([seed, zlib.crc32(phase.encode()), epoch, 1])
    epochs = {"base": cfg.train.base_epochs, "msa_frozen": cfg.train.msa_frozen_epochs,
              "msa": cfg.train.msa_epochs}[phase]

    def loss_fn(idx):
        local = distributed.part(idx)                      # this process's slice of the minibatch
        x, y = images.batch(local)
        x, y = to_device(shift(x, rng, cfg.train.shift, len(idx), cfg.train.zoom), device), y.to(device)
        with autocast(device):
            logits = net(x) if phase == "base" else net(x).logits
        return distributed.share(len(local), len(idx)) * ops.classification_loss(logits, y)

    return run_epoch(model, opt, [(len(b), b) for b in batches], loss_fn,
                     lambda i: lr_at(cfg.train.lr, epoch * len(batches) + i, epochs * len(batches)),
                     f"{phase} epoch {epoch + 1}/{epochs}")


@torch.no_grad()
def infer(model, images, device, batch_size, label, rows, fn):
    """fn(x on device, positions) in eval mode and autocast over the images at positions `rows`
    (default all), batch by batch with a progress line -> the float32 CPU outputs, concatenated."""
    model.eval()
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    out, progress = [], Progress(label, len(rows))
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size]
        x, _ = images.batch(idx)
        with autocast(device):
            out.append(fn(to_device(x, device), idx).float().cpu())
        progress.update(start + len(idx), len(idx))
    progress.close()
    return torch.cat(out) if out else None


def predict(model, images, device, batch_size, label="scoring", rows=None):
    """Sigmoid class probabilities (n, 14) of the images at positions `rows` (default all), all-ones masks."""
    p = infer(model, images, device, batch_size, label, rows, lambda x, _: torch.sigmoid(model(x).logits.float()))
    return p.numpy() if p is not None else np.zeros((0, 14), np.float32)
