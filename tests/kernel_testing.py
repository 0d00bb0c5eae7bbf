"""What the kernel tests share: devices, dtypes, tolerances, comparison and the poison check.

Tolerances live here, in one table. Every check is |got - want| <= TOL * scale elementwise,
where `want` is the float64 reference on the very inputs the kernel saw (bf16 inputs are
rounded first, so only the kernel's own rounding counts) and `scale` is the same math on
absolute values (inputs and upstream gradients), which bounds the rounding error of a sum
of products term by term; an all-zero mask gives scale 0 and demands an exact 0. The
tolerance is that of the output's dtype: float32 logits and losses of bf16 inputs are held
to float32's (products of bf16 values are exact in fp32), so a result rounded through bf16
on the way fails. Every launch a test checks passes poison=True: its outputs start as NaN, so
an element no program wrote fails the comparison; assert_poisoned checks that the flag
reaches every output and gradient.
"""
import contextlib
import os

import numpy as np
import pytest
import torch
from hypothesis import settings

from kernels import launch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter upcasts bf16 tiles to fp32 like the compiled kernels do, so bf16 runs on CPU too.
DTYPES = [torch.float32, torch.bfloat16]
TOL = {
    # Interpreter: NumPy fp32 matmul and sums, relative rounding ~2^-24 per term.
    (torch.float32, "cpu"): 1e-5,
    # GPU: fp32 tl.dot runs in TF32 (10-bit mantissa), each product off by up to ~2^-10.
    (torch.float32, "cuda"): 2e-3,
    # Outputs rounded to bf16 (8-bit mantissa, 2^-9 relative) after fp32 accumulation.
    (torch.bfloat16, "cpu"): 1e-2,
    (torch.bfloat16, "cuda"): 1e-2,
}


def examples(n):
    """n examples for a property test, or fewer where $AMKP_TEST_EXAMPLES caps them all.

    `make test-gpu` sets the cap: compiled, every new shape autotunes its kernels, seconds each,
    so the compiled run keeps the explicit @examples and a few generated ones."""
    cap = os.environ.get("AMKP_TEST_EXAMPLES", "")
    if not cap:
        return n
    if not (cap.isascii() and cap.isdigit() and int(cap) >= 1):
        raise ValueError(f"AMKP_TEST_EXAMPLES={cap!r}: expected a whole number >= 1")
    return min(n, int(cap))


# Under the interpreter every example costs ~0.1-1 s of the shared CPU: few, fixed examples.
SETTINGS = settings(max_examples=examples(40), deadline=None, derandomize=True, print_blob=True)


@contextlib.contextmanager
def tiles(*kernels, **meta):
    """Run each launch.Kernel with these meta-parameters (those it takes) as its one config;
    tiny tiles make tiny shapes loop. Compiled on a GPU the autotuner's configs run instead."""
    with contextlib.ExitStack() as stack:
        for k in kernels:
            own = k.configs[0].kwargs
            cfg = launch.configs([({n: meta.get(n, v) for n, v in own.items()}, 4, 2)])
            stack.enter_context(patched(k, configs=cfg, candidates=cfg))
        yield


@contextlib.contextmanager
def launches():
    """Record every kernel launch as (launch.Kernel, its tensor arguments), in order."""
    seen = []
    real = launch.Kernel.__call__

    def spy(self, grid, *args, **kwargs):
        seen.append((self, [a for a in args if isinstance(a, torch.Tensor)]))
        return real(self, grid, *args, **kwargs)

    with patched(launch.Kernel, __call__=spy):
        yield seen


def assert_poisoned(run):
    """run() launches with poison=True and returns {name: output or gradient}; with every launch
    skipped, each of them must be NaN throughout, as allocated."""
    with patched(launch.Kernel, __call__=lambda self, grid, *args, **kwargs: self.configs[0].kwargs):
        named = run()
    for name, t in named.items():
        assert t is not None and torch.isnan(t.float()).all(), f"{name}: allocated without poison"


@contextlib.contextmanager
def patched(mod, **values):
    """Set module constants (block sizes) for the duration; tiny blocks make tiny shapes loop."""
    old = {k: getattr(mod, k) for k in values}
    try:
        for k, v in values.items():
            setattr(mod, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(mod, k, v)


def tensor(a, dtype, requires_grad=False, channels_last=False):
    """NumPy array -> kernel input on DEVICE in `dtype`, NCHW or (4-D only) channels-last."""
    t = torch.tensor(a, dtype=dtype, device=DEVICE)
    if channels_last:
        t = t.to(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def same_layout(name, got, like):
    """A gradient comes back in its input's layout: the same strides (along axes longer than 1,
    where strides mean something), so no copy was needed."""
    def real(t):
        return [s for s, n in zip(t.stride(), t.shape) if n > 1]
    assert real(got) == real(like), f"{name}: strides {got.stride()}, input has {like.stride()}"


def as64(t):
    """Kernel tensor (or None, meaning zero) -> float64 NumPy, what the kernel really saw."""
    return None if t is None else t.detach().double().cpu().numpy()


def masks(rng, kind, shape):
    return {"random": lambda: (rng.random(shape) < 0.6).astype(np.float64),
            "zeros": lambda: np.zeros(shape), "ones": lambda: np.ones(shape)}[kind]()


def grad64(f, inputs, upstream):
    """Gradients of float64 torch expression f at NumPy `inputs` against NumPy `upstream`."""
    leaves = [torch.tensor(a, requires_grad=True) for a in inputs]
    outs = f(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, leaves, [torch.as_tensor(u) for u in upstream],
                                allow_unused=True)
    return [np.zeros_like(a) if g is None else g.numpy() for a, g in zip(inputs, grads)]


def assert_close(name, got, want, scale, dtype):
    """Elementwise |got - want| <= TOL * scale; reports the first offending index."""
    want = np.asarray(want, dtype=np.float64)
    got = np.zeros_like(want) if got is None else np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    bound = TOL[dtype, DEVICE] * np.abs(np.asarray(scale, dtype=np.float64)) + 1e-30
    bad = ~(np.abs(got - want) <= bound)  # NaN counts as bad
    if bad.any():
        i = tuple(int(k) for k in np.argwhere(bad)[0])
        raise AssertionError(f"{name} ({dtype}): {int(bad.sum())} of {bad.size} elements off; first at "
                             f"{i}: got {got[i]!r}, want {want[i]!r}, allowed error {bound[i]:.3g}")


def raises_one_line(exc, match, call):
    with pytest.raises(exc, match=match) as info:
        call()
    assert "\n" not in str(info.value), f"message spans lines: {info.value}"
