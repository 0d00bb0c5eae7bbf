"""Input checks shared by the reference functions (and, for whole numbers, by the rest of the package).

Bad input must fail at the door with a ValueError naming the argument and its shape, not as
an IndexError or a silent broadcast deep inside NumPy.
"""
import numpy as np


def array(name, a, ndim=None, min_ndim=None):
    """`a` as a float64 array, checking its rank and finiteness."""
    try:
        a = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: not a numeric array ({e})") from None
    if ndim is not None and a.ndim not in np.atleast_1d(ndim):
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    if min_ndim is not None and a.ndim < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or infinity (shape {a.shape})")
    return a


def binary(name, m):
    """Check that a mask holds only 0 and 1."""
    bad = (m != 0) & (m != 1)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: masks must hold only 0 and 1, got {m[idx]} at index {idx}")
    return m


def same_shape(name_a, a, name_b, b):
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")


def positive_int(name, value):
    """`value` as an int, unless it is not a whole number >= 1 (bools and floats are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)
