"""A torch Dataset over ChestX-ray14 images: one resized one-channel image and its labels."""
import numpy as np
import torch

from minimal_amkp.data.chestxray import load_image


class XrayDataset(torch.utils.data.Dataset):
    """ds: a ChestXray14 (chestxray.read_dataset); names: the images to serve; size: side S.

    Item k = dict(image=float32 (1, S, S) in [0, 1], labels=float32 (14,), index=k), so a
    caller can map a batch back to names[k] (and its boxes) after shuffling.
    """

    def __init__(self, ds, names, size):
        self.ds, self.names, self.size = ds, list(names), size
        unknown = [n for n in self.names if n not in ds.entries]
        if unknown:
            raise ValueError(f"names: {len(unknown)} not in the dataset's Data_Entry, e.g. "
                             f"{unknown[0]!r}")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")

    def __len__(self):
        return len(self.names)

    def __getitem__(self, k):
        name = self.names[k]
        image, _ = load_image(self.ds.image_path(name), self.size)          # (S, S)
        labels = self.ds.entries[name].labels.astype(np.float32)           # (14,)
        return dict(image=torch.from_numpy(image)[None], labels=torch.from_numpy(labels),
                    index=k)
