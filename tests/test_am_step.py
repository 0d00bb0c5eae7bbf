"""kernels.am_step.am_step against reference.branch_logits (eq. 2) and reference.kp_layer_loss (eq. 4) at X.

Gradients (dx with the KP term folded in, dw, db) are checked against float64 torch autograd of
the same math; that expression's values are first checked against the reference itself.
"""
import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from kernel_testing import (DEVICE, DTYPES, SETTINGS, as64, assert_close, assert_poisoned, examples, grad64,
                            launches, masks, patched, raises_one_line, same_layout, tensor, tiles)
from kernels import am_step, compile_check, kp_distance, masked_cam
from minimal_amkp import reference as R


@contextlib.contextmanager
def tiling(name):
    """default; small: 16-wide tiles, so tiny shapes loop; split: D in 3 chunks besides."""
    meta = {} if name == "default" else dict(BLOCK_D=16, BLOCK_HW=16)
    with patched(masked_cam, SPLIT=3 if name == "split" else None), \
            tiles(masked_cam._cam_fwd_kernel, masked_cam._cam_bwd_kernel, masked_cam._combine_kernel,
                  masked_cam._dw_kernel, **meta), \
            patched(kp_distance, **(dict(MAX_BLOCK_HW=16, TILE=64) if meta else {})):
        yield


def step64(m, xa, n0, sign=1.0):
    """Float64 torch form of (logits, KP distance at X), differentiable in x, w, b. sign=-1 gives
    the bound on rounding errors: no cancellation between g(xa) and g(x)."""
    def f(x, w, b):
        z = torch.einsum("ndhw,nchw,cd->nc", x, m, w) / (x.shape[2] * x.shape[3]) + b  # (N, C)
        kp = ((xa.mean((2, 3)) - sign * x[n0:].mean((2, 3))) ** 2).sum() / xa.shape[0]
        return z, kp
    return f


@settings(SETTINGS, max_examples=examples(15))  # each example runs ~6 launches in the interpreter
@given(n=st.integers(1, 4), erased=st.integers(0, 3), d=st.integers(1, 40), h=st.integers(1, 6),
       w=st.integers(1, 6), c=st.integers(1, 32), mask=st.sampled_from(["random", "zeros", "ones"]),
       tile=st.sampled_from(["default", "small", "split"]), dtype=st.sampled_from(DTYPES),
       channels_last=st.booleans(), ups=st.sampled_from(["both", "logits", "kp"]),
       wrt=st.sampled_from(["xwb", "x", "wb"]), seed=st.integers(0, 2**32 - 1))
@example(n=1, erased=0, d=1, h=1, w=1, c=1, mask="zeros", tile="small", dtype=torch.float32,
         channels_last=False, ups="both", wrt="xwb", seed=0)
@example(n=4, erased=3, d=40, h=5, w=3, c=14, mask="random", tile="split", dtype=torch.float32,
         channels_last=True, ups="both", wrt="xwb", seed=1)
@example(n=3, erased=1, d=33, h=4, w=4, c=32, mask="ones", tile="small", dtype=torch.bfloat16,
         channels_last=True, ups="kp", wrt="x", seed=2)
def test_am_step_and_gradients_match_reference(n, erased, d, h, w, c, mask, tile, dtype, channels_last,
                                               ups, wrt, seed):
    n0 = min(erased, n - 1)
    rng = np.random.default_rng(seed)
    x = tensor(rng.normal(size=(n, d, h, w)), dtype, "x" in wrt, channels_last)
    xa = tensor(rng.normal(size=(n - n0, d, h, w)), dtype, channels_last=channels_last)
    m = tensor(masks(rng, mask, (n, c, h, w)), dtype)
    wc = tensor(rng.normal(size=(c, d)), dtype, "w" in wrt)
    b = tensor(rng.normal(size=c), dtype, "b" in wrt)
    x64, xa64, m64, w64, b64 = map(as64, (x, xa, m, wc, b))
    f = step64(torch.tensor(m64), torch.tensor(xa64), n0)
    z64, kp64 = f(*map(torch.tensor, (x64, w64, b64)))
    np.testing.assert_allclose(z64.numpy(), R.branch_logits(x64, m64, w64, b64), rtol=1e-12, atol=1e-12)
    assert float(kp64) == pytest.approx(R.kp_layer_loss(xa64, x64[n0:]), rel=1e-12, abs=1e-300)

    with tiling(tile):
        logits, l_kp = am_step.am_step(x, m, wc, b, xa, n0, poison=True)
        assert logits.dtype == l_kp.dtype == torch.float32 and logits.shape == (n, c) and l_kp.shape == ()
        assert_close("logits", as64(logits), z64.numpy(),
                     R.branch_logits(abs(x64), m64, abs(w64), abs(b64)), torch.float32)
        assert_close("l_kp", as64(l_kp), float(kp64), R.kp_layer_loss(abs(xa64), -abs(x64[n0:])),
                     torch.float32)
        dz = tensor(rng.normal(size=(n, c)), torch.float32) if ups != "kp" else None
        dk = tensor(rng.normal(), torch.float32) if ups != "logits" else None
        outs = [t for t, g in ((logits, dz), (l_kp, dk)) if g is not None]
        upstream = [g for g in (dz, dk) if g is not None]
        leaves = [t for t in (x, wc, b) if t.requires_grad]
        got = torch.autograd.grad(outs, leaves, upstream, allow_unused=True)

    def picked(f_):
        return lambda x_, w_, b_: tuple(t for t, g in zip(f_(x_, w_, b_), (dz, dk)) if g is not None)

    ups64 = [as64(g) for g in upstream]
    want = grad64(picked(f), [x64, w64, b64], ups64)
    bound = step64(torch.tensor(m64), torch.tensor(abs(xa64)), n0, sign=-1.0)
    scale = grad64(picked(bound), [abs(x64), abs(w64), abs(b64)], [abs(u) for u in ups64])
    wanted = dict(zip("xwb", zip(want, scale)))
    for name, g in zip([k for k in "xwb" if k in wrt], got):
        assert g is None or g.dtype == dtype
        assert_close(f"d{name}", as64(g), *wanted[name], dtype)
        if name == "x":
            same_layout("dx", g, x)


def test_dx_is_written_once_by_the_dx_kernel():
    """The gradient that reaches x is the buffer the backward kernel wrote: no second dX, no sum."""
    rng = np.random.default_rng(0)
    x = tensor(rng.normal(size=(4, 24, 4, 4)), torch.float32, True, channels_last=True)
    xa = tensor(rng.normal(size=(3, 24, 4, 4)), torch.float32, channels_last=True)
    m = tensor(masks(rng, "random", (4, 5, 4, 4)), torch.float32)
    w, b = tensor(rng.normal(size=(5, 24)), torch.float32, True), tensor(rng.normal(size=5), torch.float32)
    logits, l_kp = am_step.am_step(x, m, w, b, xa, 1, poison=True)
    with launches() as seen:
        (dx,) = torch.autograd.grad(logits.sum() + l_kp, x)
    written = [args[7] for kernel, args in seen if kernel is masked_cam._cam_bwd_kernel]  # dx_ptr
    assert len(written) == 1 and written[0].data_ptr() == dx.data_ptr()
    same_layout("dx", dx, x)


@pytest.mark.parametrize("tile", ["default", "split"])
def test_poison_reaches_every_output_and_gradient(tile):
    x = tensor(np.ones((4, 24, 4, 4)), torch.float32, True, channels_last=True)
    xa = tensor(np.ones((3, 24, 4, 4)), torch.float32, channels_last=True)
    m = tensor(np.ones((4, 5, 4, 4)), torch.float32)
    w, b = tensor(np.ones((5, 24)), torch.float32, True), tensor(np.ones(5), torch.float32, True)

    def run():
        logits, l_kp = am_step.am_step(x, m, w, b, xa, 1, poison=True)
        grads = torch.autograd.grad(logits.sum() + l_kp, (x, w, b))
        return dict(zip(("logits", "l_kp", "dx", "dw", "db"), (logits, l_kp, *grads)))
    with tiling(tile):
        assert_poisoned(run)


def _valid():
    z = torch.zeros
    return dict(x=z(3, 4, 2, 5, device=DEVICE), m=z(3, 2, 2, 5, device=DEVICE), w=z(2, 4, device=DEVICE),
                b=z(2, device=DEVICE), xa=z(2, 4, 2, 5, device=DEVICE), n0=1)


@pytest.mark.parametrize("arg, bad, exc, message", [
    ("n0", lambda v: 3, ValueError, r"^n0 must be an int with 0 <= n0 < N = 3 \(at least one whole image\), got 3$"),
    ("n0", lambda v: -1, ValueError, r"^n0 must be an int with 0 <= n0 < N = 3"),
    ("n0", lambda v: 1.0, ValueError, r"^n0 must be an int .* got 1.0$"),
    ("xa", lambda t: t[:1], ValueError,
     r"^xa has shape \(1, 4, 2, 5\); expected \(N - n0, D, H, W\) = \(2, 4, 2, 5\) for x \(3, 4, 2, 5\) and n0 = 1$"),
    ("xa", lambda t: t.bfloat16(), TypeError, r"^xa is torch.bfloat16 but x is torch.float32; pass one dtype$"),
    ("xa", lambda t: t.transpose(2, 3), ValueError, r"^xa must walk H and W with one stride"),
    ("xa", lambda t: t[0], ValueError, r"^xa must have shape \(N - n0, D, H, W\), got \(4, 2, 5\) \(rank 3\)$"),
    ("m", lambda t: t[:2], ValueError, r"^m has shape \(2, 2, 2, 5\) but x is \(3, 4, 2, 5\)"),
])
def test_bad_input_gives_one_line_error(arg, bad, exc, message):
    args = _valid()
    args[arg] = bad(args[arg])
    raises_one_line(exc, message, lambda: am_step.am_step(**args, poison=True))


def test_the_am_step_compiles_for_a_gpu_without_one():
    """The compiled path the interpreter never runs (native bf16 tl.dot, channels-last, UPCAST
    off) lowers to sm_90 cubin through Triton's own compiler and ptxas; no GPU needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--quick"], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0 and out.stdout.startswith("compiled 6 variants of 5 kernels for sm_90"), \
        out.stdout + out.stderr


def test_compile_check_refuses_interpreted_kernels(capsys):
    if not compile_check.launch.INTERPRET:
        pytest.skip("the kernels are compiled here")
    with pytest.raises(SystemExit):
        compile_check.main(["--quick"])
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "TRITON_INTERPRET is set: the kernels were decorated for the interpreter; unset it")
