"""XrayDataset: shapes, dtypes and labels of its items, and its argument checks."""
import numpy as np
import pytest
import torch

from minimal_amkp.data import chestxray as cx
from minimal_amkp.data import phantom
from minimal_amkp.data.dataset import XrayDataset


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    phantom.generate(out, n_images=8, size=48, seed=4)
    return cx.read_dataset(out)


@pytest.mark.parametrize("size", [1, 17, 48, 64])
def test_items_have_the_promised_shapes_dtypes_and_labels(ds, size):
    names = ds.test + ds.train_val
    data = XrayDataset(ds, names, size)
    assert len(data) == len(names)
    for k in (0, len(names) - 1):
        item = data[k]
        assert item["image"].shape == (1, size, size) and item["image"].dtype == torch.float32
        assert 0 <= item["image"].min() and item["image"].max() <= 1
        assert item["labels"].shape == (14,) and item["labels"].dtype == torch.float32
        np.testing.assert_array_equal(item["labels"].numpy(), ds.entries[names[k]].labels)
        assert item["index"] == k


def test_batches_through_a_dataloader(ds):
    loader = torch.utils.data.DataLoader(XrayDataset(ds, ds.test + ds.train_val, 32), batch_size=3)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 1, 32, 32) and batch["labels"].shape == (3, 14)
    assert batch["index"].tolist() == [0, 1, 2]


def test_bad_arguments(ds):
    with pytest.raises(ValueError, match=r"names: 1 not in the dataset's Data_Entry, "
                                         r"e\.g\. 'x\.png'"):
        XrayDataset(ds, ["x.png"] + ds.test, 32)
    for size in (0, 2.0, None):
        with pytest.raises(ValueError, match="size must be a positive int"):
            XrayDataset(ds, ds.test, size)
