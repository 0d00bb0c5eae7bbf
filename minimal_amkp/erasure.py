"""Where M_{t-1} takes effect on one mining minibatch: in X or in the pixels, and the holes of
the negatives (the erasure ladder's `--mine.erase` and `--mine.holes`; mine.py's rounds).

A mining minibatch holds n mining images, erased by their masks M_{t-1} for the box classes they
are labelled with, and N − n train_val images left whole (mine.mining_batches). `minibatch`
reads one and hands the network its images and masks:
- erase feature (eq. 1, the paper's): the images whole, the masks applied to X;
- erase image: the erased cells' pixels filled (reference.erase_image), X left whole;
- holes matched: every image also gets, for each box class it is negative for, the erased
  region of a mining positive of that class (hole_masks), so that a hole is no cue to a class.
"""
import zlib

import numpy as np
import torch

from minimal_amkp import ops
from minimal_amkp.classes import BOX_CLASSES
from minimal_amkp.loop import to_device
from minimal_amkp.model import map_grid

B = len(BOX_CLASSES)                                       # masks cover the 8 box classes


def batch_masks(m8, classes):
    """Mining masks (n, 8, h, w) -> (n, classes, h, w): the unboxed classes are never erased."""
    pad = torch.ones(m8.shape[0], classes - m8.shape[1], *m8.shape[2:], dtype=m8.dtype, device=m8.device)
    return torch.cat([m8, pad], dim=1)


def hole_masks(y, masks, mining_labels, rng):
    """--mine.holes matched (our addition): for each image of a minibatch (labels y (N, 14)) and
    box class c it is negative for, the mask M_{t-1} of class c of a mining image positive for c,
    drawn by the numpy Generator rng among those that erase something; all ones elsewhere
    -> uint8 (N, 8, h, w). masks (n_mine, 8, h, w) = M_{t-1}, mining_labels (n_mine, 14).

    Why: g in eq. (2) averages over every cell, so a hole moves z_c of any image, and the
    classifier may already read a hole as evidence for the class (a hole in a negative test
    image raises its logit by 0.32 to 0.83 on average with the control's classifiers,
    `python -m minimal_amkp.study.refit RUN`; study/results/mining.md). Mining on erased positives alone then
    fits them by that cue, whatever is left in the image; a negative with a hole of the same
    size makes the cue worthless, so only what remains in the erased positives can fit them.
    """
    out = torch.ones(len(y), B, *masks.shape[2:], dtype=torch.uint8)
    erasing = (masks == 0).flatten(2).any(-1) & mining_labels[:, :B].bool()        # (n_mine, 8)
    negative = ~y[:, :B].bool()                                                      # (N, 8)
    for c in range(B):
        pool, rows = torch.nonzero(erasing[:, c]).flatten(), torch.nonzero(negative[:, c]).flatten()
        if len(pool) and len(rows):
            out[rows, c] = masks[pool[torch.as_tensor(rng.integers(0, len(pool), len(rows)))], c]
    return out


def minibatch(idx, mining, train, masks, runner, shard=True, rng=None, grid=None):
    """This process's slice (shard=False: all) of one mining minibatch idx = (mining positions,
    train_val positions) -> x (n, 1, S, S), y (n, 14), m (n, 14, h, w) float32 (the train_val
    images' all ones, or with rng the holes of hole_masks, drawn for the whole minibatch) on the
    runner's device, and how many of them are erased mining images. With the maps' grid
    (--mine.erase image), m's cells are erased in x's pixels instead (erase) and m is all ones."""
    mi, ti = idx
    m8 = torch.cat([masks[torch.as_tensor(mi)], torch.ones(len(ti), *masks.shape[1:], dtype=masks.dtype)])
    if rng is not None:
        m8 = m8 * hole_masks(torch.cat([mining.labels[mi], train.labels[ti]]), masks, mining.labels, rng)
    m8m, m8t = m8[:len(mi)], m8[len(mi):]
    if shard:
        mi, ti, m8m, m8t = (runner.shard(a) for a in (mi, ti, m8m, m8t))
    xm, ym = mining.batch(mi)
    m8 = torch.cat([m8m, m8t])
    if len(ti):
        xt, yt = train.batch(ti)
        xm, ym = torch.cat([xm, xt]), torch.cat([ym, yt])
    device = runner.device
    x, m = erase(to_device(xm, device), m8.to(device), grid)
    return x, ym.to(device), batch_masks(m, ym.shape[1]).to(torch.float32), len(mi)


def erase(x, m8, grid):
    """Where M_{t-1} (m8 (n, 8, h, w), on x's device) takes effect -> (x, the masks the network
    applies to X): eq. (1) on X (grid None) leaves x whole; --mine.erase image (the maps' grid)
    fills the erased cells' pixels (ops.erase_image) and erases nothing in X, so N_B sees what a
    network would see had the region never been there, receptive field and all."""
    if grid is None:
        return x, m8
    return ops.erase_image(x, m8, grid), torch.ones_like(m8)


def image_grid(model, cfg):
    """The maps' grid under --mine.erase image, else None (erase)."""
    return tuple(map_grid(model, cfg.data.image_size)) if cfg.mine.erase == "image" else None


def hole_rng(k, seed, round_, epoch, step):
    """The Generator of hole_masks for one minibatch (None unless --mine.holes matched): a pure
    function of where it is, so a resumed run and K processes draw the same holes."""
    return np.random.default_rng([seed, zlib.crc32(b"holes"), round_, epoch, step]) if k.holes == "matched" else None
