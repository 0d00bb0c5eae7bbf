"""data.images.Images: shapes, dtypes and labels of its batches, preloaded or read on demand,
and its argument checks."""
import numpy as np
import pytest
import torch

from minimal_amkp.data import chestxray as cx
from minimal_amkp.data import phantom
from minimal_amkp.data.images import Images


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    phantom.generate(out, n_images=8, size=48, seed=4)
    return cx.read_dataset(out)


@pytest.mark.parametrize("size", [1, 17, 48, 64])
@pytest.mark.parametrize("preload", [False, True])
def test_batches_have_the_promised_shapes_dtypes_and_labels(ds, size, preload):
    names = ds.test + ds.train_val
    data = Images(ds, names, size, preload, workers=2)
    assert len(data) == len(names)
    idx = [len(names) - 1, 0]
    x, y = data.batch(idx)
    assert x.shape == (2, 1, size, size) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    assert y.shape == (2, 14) and y.dtype == torch.float32
    for row, k in enumerate(idx):
        np.testing.assert_array_equal(y[row].numpy(), ds.entries[names[k]].labels)
        torch.testing.assert_close(x[row], data.image(k), rtol=0, atol=0)


def test_an_empty_list_has_no_rows(ds):
    data = Images(ds, [], 32, preload=True, workers=1)
    assert len(data) == 0 and data.labels.shape == (0, 14)


def test_bad_arguments(ds):
    with pytest.raises(ValueError, match=r"names: 1 not in the dataset's Data_Entry, "
                                         r"e\.g\. 'x\.png'"):
        Images(ds, ["x.png"] + ds.test, 32, False, 1)
    for size in (0, 2.0, None):
        with pytest.raises(ValueError, match="size must be a positive int"):
            Images(ds, ds.test, size, False, 1)
