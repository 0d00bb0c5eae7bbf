"""reference/geometry.py and model.map_grid: a map cell sits where the network looks."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minimal_amkp import reference as R
from minimal_amkp.config import preset
from minimal_amkp.model import ResNetMSA, map_grid, map_size, upsample2


def gradient_centroid(model, size, cells, seed=0):
    """Input-pixel centroid (x, y) of |∂ Σ_d X[d, r, c] / ∂ image| for each (r, c) in cells,
    one noise image per cell (eval mode: the images do not see each other)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(len(cells), 1, size, size, generator=g, requires_grad=True)
    x3, x4 = model.backbone(image)
    x = x4 if model.msa is None else model.msa(x3, x4)                  # (n, D, h, w)
    torch.stack([x[i, :, r, c].sum() for i, (r, c) in enumerate(cells)]).sum().backward()
    mass = image.grad.abs()[:, 0].double()                              # (n, S, S)
    centre = torch.arange(size, dtype=torch.float64) + 0.5
    total = mass.sum((1, 2))
    return np.stack([((mass.sum(1) * centre).sum(1) / total).numpy(),
                     ((mass.sum(2) * centre).sum(1) / total).numpy()], axis=1)   # (n, 2)


def random_model(name, msa, seed=0):
    """A random-weight model of the preset with every residual branch alive (the init zeroes
    bn3) and every kernel point-symmetric (w + w rotated 180°): a random kernel leans its
    receptive field by up to 2 px one way or another, which is the weights' doing, not the
    layers' geometry that map_grid derives."""
    cfg = preset(name).model
    cfg.msa = msa
    if name == "paper":             # ResNet-50's layers at a quarter of its width: the same geometry, 1/16 the cost
        cfg.width, cfg.msa_channels = 16, (128, 64)
    torch.manual_seed(seed)
    model = ResNetMSA(cfg).eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.fill_(1.0)
            elif isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                mod.weight.add_(mod.weight.flip(-2, -1))
    return model


# Cells about the middle of the map, as (row, column) steps from it: the image's border cuts
# their receptive fields alike on every side (a cut on one side only pulls a centroid inward).
NEAR_MIDDLE = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]


@pytest.mark.parametrize("msa", ["bilinear", "deconv", "none"])
@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_analytic_centre_is_the_gradient_centroid(name, msa):
    """Averaged over several cells (one noise image each), the input-pixel centroid of a cell's
    gradient lies within 1 px of map_grid's centre; the plain-resize centre does not."""
    model, size = random_model(name, msa), 256 if name == "tiny" else 512
    grid = map_grid(model, size)
    h = map_size(size, msa, len(model.stages))
    cells = [(h // 2 + dr, h // 2 + dc) for dr, dc in NEAR_MIDDLE]
    got = gradient_centroid(model, size, cells)                                 # (n, 2) x, y
    yx = np.array(cells, dtype=np.float64)                                      # (n, 2) r, c
    want = (grid.stride * yx + grid.offset)[:, ::-1]
    naive = R.cell_centres(yx, R.naive_grid(h, size), size)[:, ::-1]
    err = (got - want).mean(0)
    assert np.abs(err).max() <= 1.0, (f"{name}/{msa}: the gradient centroids lie {err.round(2).tolist()} px "
                                      f"(x, y) from the analytic centres on average; per cell "
                                      f"{(got - want).round(2).tolist()}")
    assert np.abs((got - naive).mean(0)).min() > 1.0, "the plain-resize centres agree too: the test cannot fail"


@pytest.mark.parametrize("name", ["tiny", "paper"])
@pytest.mark.parametrize("msa", ["bilinear", "deconv", "none"])
def test_grid_of_every_configuration(name, msa):
    cfg = preset(name).model
    cfg.msa = msa
    with torch.device("meta"):
        model = ResNetMSA(cfg)
    stages = len(cfg.blocks)
    stride = 2 ** (stages + (msa == "none"))
    assert map_grid(model, 512) == R.Grid(stride, 0.5, 512)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 99))
def test_upsample2_reads_half_indices(n_h, n_w, seed):
    """Output j of the MSA upsampling is the linear interpolation of the input at j/2 (edge clamped)."""
    a = torch.from_numpy(np.random.default_rng(seed).standard_normal((1, 2, n_h, n_w)))
    h, w = 2 * n_h - seed % 2, 2 * n_w
    got = upsample2(a, h, w)[0].numpy()                                    # (2, h, w)
    # Input i sits at output pixel 2i + 0.5: a grid of stride 2, offset 0.5 in the output frame.
    want = R.resize(R.resize(a[0].numpy(), h, R.Grid(2, 0.5, h), axis=1), w, R.Grid(2, 0.5, w), axis=2)
    bad = np.argwhere(~np.isclose(got, want, atol=1e-12))
    assert got.shape == want.shape and bad.size == 0, f"first mismatch at {tuple(bad[0])}"


def test_compose_by_hand():
    assert R.compose([]) == (1, 0.5)
    assert R.compose([(7, 2, 3), (3, 2, 1)]) == (4, 0.5)            # ResNet's stem: centred
    assert R.compose([(2, 2, 0)]) == (2, 1.0)                       # 2×2/2 pooling: between its pixels
    assert R.compose([(3, 1, 0), (3, 2, 0)]) == (2, 2.5)            # unpadded: shifted right
    with pytest.raises(ValueError, match="padding"):
        R.compose([(3, 1, -1)])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 64), st.integers(8, 1024))
def test_naive_grid_is_plain_resize(n, n_out, size):
    """The plain-resize grid reproduces interpolate(align_corners=False), for any sizes."""
    v = np.random.default_rng(n * n_out).standard_normal(n)
    want = torch.nn.functional.interpolate(torch.from_numpy(v)[None, None], size=n_out, mode="linear",
                                           align_corners=False)[0, 0].numpy()
    got = R.resize(v, n_out, R.naive_grid(n, size))
    bad = np.argwhere(~np.isclose(got, want, atol=1e-12))
    assert bad.size == 0, f"first mismatch at {tuple(bad[0])}: {got[tuple(bad[0])]} vs {want[tuple(bad[0])]}"


def test_bad_grid_says_which():
    with pytest.raises(ValueError, match="grid: need finite stride > 0"):
        R.resize(np.ones(2), 4, (0, 0.5, 8))
    with pytest.raises(ValueError, match="grid: expected"):
        R.cell_centres(3, "grid", 8)


def test_cells_in_box_takes_the_cells_whose_centres_it_holds():
    grid = R.Grid(8, 0.5, 128)                                           # centres at 0.5, 8.5, ...
    got = R.cells_in_box((8.0, 16.0, 9.0, 1.0), 16, grid, 128, 128)      # x 8..17, y 16..17
    assert np.argwhere(got).tolist() == [[2, 1], [2, 2]]                 # rows 2, columns 1 and 2
    # In a frame twice the input's size every centre doubles.
    assert np.array_equal(R.cells_in_box((16.0, 32.0, 18.0, 2.0), 16, grid, 256, 256), got)
    assert not R.cells_in_box((1.0, 1.0, 6.0, 6.0), 16, grid, 128, 128).any()   # between centres
