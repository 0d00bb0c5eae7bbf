"""Where a map cell looks: the input-pixel centre and the stride of each cell of X.

Coordinates are continuous: input pixel i spans [i, i + 1), so its centre is i + 0.5.

One convolution or pooling with kernel k, stride s and padding p computes output index o from
input indices s·o − p .. s·o − p + k − 1, whose middle is s·o − p + (k − 1)/2. A stack of L such
layers, each mapping its output index to the middle of its input window, composes to

    centre(o) = stride · o + offset,     stride = Π_l s_l,
                offset = 0.5 + Σ_l (Π_{l' < l} s_{l'}) · ((k_l − 1)/2 − p_l)

in input pixels (the 0.5 turns the first layer's input index into a pixel centre). ResNet's
layers all have p = k // 2 with odd k (7×7/2 conv1, 3×3/2 max-pool, 3×3/2 and 1×1/2 convs of
every stage's first block), so each term is 0 and every stage centres cell o on input pixel
stride·o: offset = 0.5. The convention of a plain resize of the map to the image
(interpolate(align_corners=False), PIL) puts the cell at stride·(o + ½) instead, stride/2 − 0.5
pixels further right and down: 3.5 px at stride 8, 7.5 px at 16, 15.5 px at 32.

MSA sums two paths: X_{k−1} at stride s and X_k at 2s, upsampled ×2. Output j of the ×2
upsampling reads X_k at index j/2 (model.MSA's phase-aligned bilinear; the 3×3/2 deconvolution's
taps also average to j/2), so X_k's path is centred at 2s·j/2 + offset_k = s·j + offset_k,
the same grid as X_{k−1}'s when offset_k = offset_{k−1}: X has one grid. (The usual
align_corners=False upsampling reads j/2 − 1/4, which would put X_k's path s/2 further up and
left than X_{k−1}'s: two grids in one map.)

A Grid (stride, offset, size) says where the cells of a map of a size × size model input
lie; an image of W × H pixels resized to that input (data.images.load_image) has cell (r, c)
centred at ((stride·c + offset)·W/size, (stride·r + offset)·H/size).
"""
from collections import namedtuple

import numpy as np

from .checks import positive_int

Grid = namedtuple("Grid", "stride offset size")


def compose(layers):
    """The formula above: layers [(k, s, p)], input side first -> (stride, offset) in pixels."""
    stride, offset = 1, 0.5
    for k, s, p in layers:
        k, s = positive_int("kernel", k), positive_int("stride", s)
        if p < 0:
            raise ValueError(f"padding must be >= 0, got {p}")
        offset += stride * ((k - 1) / 2 - p)
        stride *= s
    return stride, offset


def naive_grid(n, size):
    """The plain-resize convention: n cells tile [0, size), cell j centred at (j + ½)·size/n."""
    return Grid(size / n, size / n / 2, size)


def check_grid(grid):
    """`grid` as a Grid of finite floats with stride and size > 0."""
    try:
        stride, offset, size = (float(v) for v in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid: expected (stride, offset, size), got {grid!r}") from None
    if not (np.isfinite([stride, offset, size]).all() and stride > 0 and size > 0):
        raise ValueError(f"grid: need finite stride > 0 and size > 0, got {grid!r}")
    return Grid(stride, offset, size)


def cell_centres(j, grid, extent):
    """Centres of cells j (any shape of indices) in a frame of `extent` pixels spanning the
    model input -> floats, j's shape."""
    grid = check_grid(grid)
    return (grid.stride * np.asarray(j, dtype=np.float64) + grid.offset) * extent / grid.size


def to_cells(u, grid, extent):
    """Frame coordinates u (any shape) -> continuous cell coordinates (cell j's centre -> j)."""
    grid = check_grid(grid)
    return (np.asarray(u, dtype=np.float64) * grid.size / extent - grid.offset) / grid.stride


def resize(v, n_out, grid, axis=-1):
    """Linear resize of the cells of v along `axis` to an n_out-pixel frame spanning the model
    input: pixel X reads the cells at to_cells(X + 0.5), clamped to [0, n_in − 1] (beyond the
    outermost centres a map keeps its edge value). Written v[i0] + f·(v[i1] − v[i0]), so a
    constant map stays exactly constant. v (..., n_in, ...) -> (..., n_out, ...)."""
    v = np.moveaxis(np.asarray(v, dtype=np.float64), axis, -1)
    n_in = positive_int("n_in", v.shape[-1])
    positive_int("n_out", n_out)
    src = np.clip(to_cells(np.arange(n_out) + 0.5, grid, n_out), 0, n_in - 1)   # (n_out,)
    i0 = np.floor(src).astype(int)
    lo, hi = v[..., i0], v[..., np.minimum(i0 + 1, n_in - 1)]
    return np.moveaxis(lo + (src - i0) * (hi - lo), -1, axis)


def cells_in_box(box, n, grid, width, height):
    """The cells of an n×n map on `grid` whose centres lie in box (x, y, w, h) of a width ×
    height frame spanning the model input (edges included) -> bool (n, n), rows first."""
    x, y, w, h = (float(v) for v in box)
    cx, cy = cell_centres(np.arange(n), grid, width), cell_centres(np.arange(n), grid, height)
    return ((y <= cy) & (cy <= y + h))[:, None] & ((x <= cx) & (cx <= x + w))[None, :]


def nearest_cells(n_out, n_in, grid):
    """For each pixel of an n_out-pixel frame, the cell whose centre is nearest -> (n_out,) ints."""
    positive_int("n_out", n_out), positive_int("n_in", n_in)
    src = to_cells(np.arange(n_out) + 0.5, grid, n_out)
    return np.clip(np.floor(src + 0.5), 0, n_in - 1).astype(int)
