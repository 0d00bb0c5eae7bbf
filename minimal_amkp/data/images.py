"""The images of a fixed list of names, resized, with their labels: what training and mining read.

`Images(ds, names, size, ...)` is the one object the method is handed for a set of images
(the train_val set, the mining set, the test split): `len(images)`, `images.labels` (n, 14)
and `images.batch(positions)` -> (float32 (k, 1, S, S) in [0, 1], labels (k, 14)). It is only
duck-typed there, so tests hand the method in-memory stand-ins.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from minimal_amkp.data.chestxray import load_image
from minimal_amkp.reference.checks import positive_int
from minimal_amkp.runner import Silent


class Images:
    """Images (n, 1, S, S) and labels (n, 14) of a fixed name list, by position.

    `preload` reads everything once (small sets: the phantom), drawing progress(label, n)'s
    line; otherwise each batch is read by `workers` threads when asked for.
    """

    def __init__(self, ds, names, size, preload, workers, label="reading images", progress=Silent):
        self.ds, self.names, self.size = ds, list(names), size
        unknown = [n for n in self.names if n not in ds.entries]
        if unknown:
            raise ValueError(f"names: {len(unknown)} not in the dataset's Data_Entry, e.g. {unknown[0]!r}")
        positive_int("size", size)
        self.labels = torch.from_numpy(np.stack([ds.entries[n].labels for n in self.names])
                                       if self.names else np.zeros((0, 14), np.uint8)).float()
        self.pool = ThreadPoolExecutor(max(1, workers))
        self.cache = None
        if preload and self.names:
            progress, chunks = progress(label, len(self.names)), []
            for start in range(0, len(self.names), 64):
                chunks.append(self._read(range(start, min(start + 64, len(self.names)))))
                progress.update(start + len(chunks[-1]), len(chunks[-1]))
            progress.close()
            self.cache = torch.cat(chunks)

    def image(self, k):
        """Image k as float32 (1, S, S) in [0, 1]."""
        image, _ = load_image(self.ds.image_path(self.names[k]), self.size)          # (S, S)
        return torch.from_numpy(image)[None]

    def _read(self, idx):
        return torch.stack(list(self.pool.map(lambda i: self.image(int(i)), idx)))

    def __len__(self):
        return len(self.names)

    def batch(self, idx):
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        images = self.cache[idx] if self.cache is not None else self._read(idx.tolist())
        return images, self.labels[idx]
