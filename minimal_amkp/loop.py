"""What every stage of the method shares: data order, minibatches, one optimisation pass, inference.

Data order is a pure function of (seed, tag, epoch), so a resumed run sees the same batches and
K processes see the global minibatches one process would (each takes its `runner.shard`).
Inference runs over a process's positions and returns CPU float32 rows for `runner.gather`.
"""
import contextlib
import math
import zlib

import numpy as np
import torch

from minimal_amkp.config import RunError

LOSS_READS = 16                  # training steps between reads of their losses (run_epoch)


def autocast(device):
    """bf16 autocast on CUDA; nothing on CPU, where float32 keeps runs reproducible."""
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def to_device(images, device):
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return images.to(device, non_blocking=True, memory_format=fmt)


def order(seed, tag, epoch, n):
    """A permutation of range(n) fixed by (seed, tag, epoch): the data order of one epoch."""
    return np.random.default_rng([seed, zlib.crc32(tag.encode()), epoch]).permutation(n)


def chunks(perm, size):
    """Minibatches of `size`; a short remainder is dropped (batch norm needs 2 images), but
    a set smaller than one batch is one batch."""
    if len(perm) < size:
        return [perm] if len(perm) >= 2 else []
    return [perm[i:i + size] for i in range(0, len(perm) - size + 1, size)]


def optimizer(params, lr, train):
    """train.optimizer of TrainConfig `train`; mining uses the same kind with its own lr."""
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay)


def run_epoch(model, opt, batches, loss_fn, lr_of, label, runner):
    """One pass over `batches` (each (n_images, payload)) at rate lr_of(step in the epoch):
    loss_fn(payload) -> loss; returns the mean of the global minibatches' losses.

    The losses are read (runner.average) LOSS_READS steps at a time: on CUDA a read waits for
    the device, so the host queues the steps of a window instead of waiting at every one. A
    non-finite loss still ends the epoch within LOSS_READS steps."""
    progress, pending, losses = runner.progress(label, len(batches)), [], []

    def read():
        for n_images, loss in pending:
            losses.append(runner.average(loss))
            if not math.isfinite(losses[-1]):
                raise RunError(f"{label}: the loss became {losses[-1]}; lower the learning rate")
            progress.update(len(losses), n_images, losses[-1])
        pending.clear()

    for i, (n_images, payload) in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr_of(i)
        loss = loss_fn(payload)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.constrain()
        pending.append((n_images, loss.detach()))
        if len(pending) == LOSS_READS:
            read()
    read()
    progress.close()
    return float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def infer(model, images, batch_size, label, rows, fn, runner):
    """fn(x on runner.device, positions) in eval mode and autocast over the images at positions
    `rows`, batch by batch with a progress line -> the float32 CPU outputs, concatenated (None
    for no rows). The outputs stay on the device until the last batch: one copy, one wait."""
    model.eval()
    rows, device = np.asarray(rows), runner.device
    out, progress = [], runner.progress(label, len(rows))
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size]
        x, _ = images.batch(idx)
        with autocast(device):
            out.append(fn(to_device(x, device), idx).float())
        progress.update(start + len(idx), len(idx))
    progress.close()
    return torch.cat(out).cpu() if out else None


def predict(model, images, batch_size, runner, label="scoring"):
    """Sigmoid class probabilities (n, 14) of every image, all-ones masks: each process scores
    its shard, and every process gets all rows."""
    p = infer(model, images, batch_size, label, runner.rows(len(images)),
              lambda x, _: torch.sigmoid(model(x).logits.float()), runner)
    return runner.gather(p.numpy() if p is not None else np.zeros((0, 14), np.float32))
