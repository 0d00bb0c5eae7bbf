"""kernels.masked_cam.masked_cam_logits against reference.cam (eq. 7) and reference.branch_logits (eq. 2).

Gradients are checked against float64 torch autograd of the same math, written as one einsum;
that expression's values are first checked against the reference itself.
"""
import contextlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from kernel_testing import (DEVICE, DTYPES, SETTINGS, as64, assert_close, assert_poisoned, examples, grad64,
                            masks, launches, patched, raises_one_line, same_layout, tensor, tiles)
from kernels import launch, masked_cam
from minimal_amkp import reference as R

KERNELS = (masked_cam._cam_fwd_kernel, masked_cam._cam_bwd_kernel, masked_cam._combine_kernel,
           masked_cam._dw_kernel)
TILINGS = {"default": {}, "small": dict(BLOCK_D=16, BLOCK_HW=16),
           "split": dict(BLOCK_D=16, BLOCK_HW=16, SPLIT=3)}  # D in 3 chunks + the combine kernel


@contextlib.contextmanager
def tiling(name):
    meta = dict(TILINGS[name])
    with patched(masked_cam, SPLIT=meta.pop("SPLIT", None)), tiles(*KERNELS, **meta):
        yield


def cam_logits64(m):
    """Float64 torch form of eq. (7) and the logit of eq. (2), differentiable in x, w, b."""
    def f(x, w, b):
        h = torch.einsum("ndhw,nchw,cd->nchw", x, m, w)  # (N, C, H, W)
        return h, h.mean((2, 3)) + b  # (N, C)
    return f


@settings(SETTINGS, max_examples=examples(25))  # each example runs ~6 launches in the interpreter
@given(n=st.integers(1, 3), d=st.integers(1, 40), h=st.integers(1, 6), w=st.integers(1, 6),
       c=st.integers(1, 32), mask=st.sampled_from(["random", "zeros", "ones"]),
       tile=st.sampled_from(list(TILINGS)), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(["nchw", "channels_last"]),
       outputs=st.sampled_from(["both", "logits", "cam", "no_cam"]),
       wrt=st.sampled_from(["xwb", "x", "wb", ""]), seed=st.integers(0, 2**32 - 1))
@example(n=1, d=17, h=1, w=13, c=1, mask="zeros", tile="small", dtype=torch.float32, layout="nchw",
         outputs="both", wrt="xwb", seed=0)
@example(n=2, d=40, h=1, w=37, c=14, mask="ones", tile="split", dtype=torch.float32,
         layout="channels_last", outputs="cam", wrt="xwb", seed=1)
@example(n=3, d=5, h=7, w=1, c=8, mask="random", tile="default", dtype=torch.float32,
         layout="nchw", outputs="logits", wrt="wb", seed=2)
@example(n=2, d=33, h=5, w=4, c=32, mask="random", tile="split", dtype=torch.bfloat16,
         layout="channels_last", outputs="both", wrt="xwb", seed=3)
def test_cam_logits_and_gradients_match_reference(n, d, h, w, c, mask, tile, dtype, layout, outputs,
                                                  wrt, seed):
    rng = np.random.default_rng(seed)
    cl = layout == "channels_last"
    x = tensor(rng.normal(size=(n, d, h, w)), dtype, "x" in wrt, channels_last=cl)
    m = tensor(masks(rng, mask, (n, c, h, w)), dtype, channels_last=cl and seed % 2 == 0)
    wc = tensor(rng.normal(size=(c, d)), dtype, "w" in wrt)
    b = tensor(rng.normal(size=c), dtype, "b" in wrt)
    x64, m64, w64, b64 = map(as64, (x, m, wc, b))
    f = cam_logits64(torch.tensor(m64))
    h64, z64 = f(*map(torch.tensor, (x64, w64, b64)))
    np.testing.assert_allclose(h64.numpy(), R.cam(x64, m64, w64), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(z64.numpy(), R.branch_logits(x64, m64, w64, b64), rtol=1e-12, atol=1e-12)

    with tiling(tile):
        cam, logits = masked_cam.masked_cam_logits(x, m, wc, b, write_cam=outputs != "no_cam", poison=True)
        assert logits.dtype == torch.float32 and logits.shape == (n, c)
        if outputs == "no_cam":
            assert cam is None
        else:
            assert cam.dtype == dtype
            assert_close("cam", as64(cam), R.cam(x64, m64, w64), R.cam(abs(x64), m64, abs(w64)), dtype)
        assert_close("logits", as64(logits), R.branch_logits(x64, m64, w64, b64),
                     R.branch_logits(abs(x64), m64, abs(w64), abs(b64)), torch.float32)
        if not wrt:
            return
        dcam = tensor(rng.normal(size=(n, c, h, w)), dtype, channels_last=cl) \
            if outputs in ("both", "cam") else None
        dz = tensor(rng.normal(size=(n, c)), torch.float32) if outputs != "cam" else None
        outs = [t for t, g in ((cam, dcam), (logits, dz)) if g is not None]
        ups = [g for g in (dcam, dz) if g is not None]
        leaves = [t for t in (x, wc, b) if t.requires_grad]
        got = torch.autograd.grad(outs, leaves, ups, allow_unused=True)  # b is unused by cam alone

    def picked(x_, w_, b_):  # the outputs that received a gradient, in `ups` order
        h_, z_ = f(x_, w_, b_)
        return tuple(t for t, g in ((h_, dcam), (z_, dz)) if g is not None)

    ups64 = [as64(g) for g in ups]
    want = grad64(picked, [x64, w64, b64], ups64)
    scale = grad64(picked, [abs(x64), abs(w64), abs(b64)], [abs(u) for u in ups64])
    wanted = dict(zip("xwb", zip(want, scale)))
    for name, g in zip([k for k in "xwb" if k in wrt], got):
        assert g is None or g.dtype == dtype
        assert_close(f"d{name}", as64(g), *wanted[name], dtype)
        if name == "x":
            same_layout("dx", g, x)


def test_results_are_bitwise_reproducible():
    rng = np.random.default_rng(0)
    x = tensor(rng.normal(size=(2, 20, 5, 7)), torch.float32, True)
    m = tensor(masks(rng, "random", (2, 3, 5, 7)), torch.float32)
    w = tensor(rng.normal(size=(3, 20)), torch.float32, True)
    b = tensor(rng.normal(size=3), torch.float32, True)
    with tiling("split"):
        runs = []
        for _ in range(2):
            cam, z = masked_cam.masked_cam_logits(x, m, w, b, poison=True)
            runs.append([cam, z, *torch.autograd.grad((cam.sum(), z.sum()), (x, w, b))])
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


def test_channels_last_x_is_read_in_place_and_dx_keeps_its_layout():
    """The kernel gets x itself (its data pointer and strides, not a contiguous copy's)."""
    rng = np.random.default_rng(1)
    x = tensor(rng.normal(size=(2, 20, 5, 7)), torch.float32, True, channels_last=True)
    m = tensor(masks(rng, "random", (2, 3, 5, 7)), torch.float32)
    w, b = tensor(rng.normal(size=(3, 20)), torch.float32), tensor(rng.normal(size=3), torch.float32)
    with launches() as seen:
        _, z = masked_cam.masked_cam_logits(x, m, w, b, write_cam=False, poison=True)
    kernel, args = seen[0]
    assert kernel is masked_cam._cam_fwd_kernel
    assert args[0].data_ptr() == x.data_ptr() and args[0].stride() == x.stride()
    (dx,) = torch.autograd.grad(z.sum(), x)
    same_layout("dx", dx, x)


@pytest.mark.parametrize("tile, write_cam", [("default", True), ("default", False), ("split", True)])
def test_poison_reaches_every_output_and_gradient(tile, write_cam):
    """dw from x (the CAM has a gradient) or from the forward's P partials (logits alone)."""
    x = tensor(np.ones((2, 20, 5, 7)), torch.float32, True, channels_last=True)
    m = tensor(np.ones((2, 3, 5, 7)), torch.float32)
    w, b = tensor(np.ones((3, 20)), torch.float32, True), tensor(np.ones(3), torch.float32, True)

    def run():
        cam, z = masked_cam.masked_cam_logits(x, m, w, b, write_cam=write_cam, poison=True)
        outs = {"logits": z} | ({"cam": cam} if write_cam else {})
        grads = torch.autograd.grad(list(outs.values()), (x, w, b), [torch.ones_like(t) for t in outs.values()])
        return outs | dict(zip(("dx", "dw", "db"), grads))
    with tiling(tile):
        assert_poisoned(run)


def _valid():
    z = torch.zeros
    return dict(x=z(2, 4, 3, 5, device=DEVICE), m=z(2, 3, 3, 5, device=DEVICE),
                w=z(3, 4, device=DEVICE), b=z(3, device=DEVICE))


@pytest.mark.parametrize("arg, bad, exc, message", [
    ("x", lambda t: t[0], ValueError, r"^x must have shape \(N, D, H, W\), got \(4, 3, 5\) \(rank 3\)$"),
    ("m", lambda t: t[:1], ValueError, r"^m has shape \(1, 3, 3, 5\) but x is \(2, 4, 3, 5\); expected"),
    ("m", lambda t: t[..., :4].contiguous(), ValueError, r"^m has shape \(2, 3, 3, 4\) but x is"),
    ("w", lambda t: t[:, :3].contiguous(), ValueError,
     r"^w has shape \(3, 3\); expected \(C, D\) = \(3, 4\)"),
    ("w", lambda t: torch.zeros(2, 4, device=t.device), ValueError, r"^w has shape \(2, 4\); expected"),
    ("b", lambda t: t[:2], ValueError, r"^b has shape \(2,\); expected \(C,\) = \(3,\)$"),
    ("x", lambda t: t.long(), TypeError, r"^x must be float32 or bfloat16, got torch.int64$"),
    ("w", lambda t: t.bfloat16(), TypeError, r"^w is torch.bfloat16 but x is torch.float32; pass one dtype$"),
    ("x", lambda t: t.transpose(2, 3), ValueError,
     r"^x must walk H and W with one stride \(NCHW or channels-last\), got strides \(60, 15, 1, 5\)"),
    ("b", lambda t: t.to("meta"), ValueError, r"^b is on meta but x is on "),
    ("x", lambda t: t.cpu().numpy(), TypeError, r"^x must be a torch.Tensor \(N, D, H, W\), got ndarray$"),
    ("x", lambda t: t[:0], ValueError, r"^x must be non-empty, got shape \(0, 4, 3, 5\)$"),
])
def test_bad_input_gives_one_line_error(arg, bad, exc, message):
    args = _valid()
    args[arg] = bad(args[arg])
    raises_one_line(exc, message, lambda: masked_cam.masked_cam_logits(**args, poison=True))


def test_too_many_classes_is_refused():
    args = _valid()
    args.update(m=torch.zeros(2, 129, 3, 5, device=DEVICE), w=torch.zeros(129, 4, device=DEVICE),
                b=torch.zeros(129, device=DEVICE))
    raises_one_line(ValueError, r"^m has C = 129 classes; the kernel supports at most 128$",
                    lambda: masked_cam.masked_cam_logits(**args, poison=True))


def test_cpu_tensors_without_interpreter_and_missing_triton_are_explained(monkeypatch):
    args = {k: v.cpu() for k, v in _valid().items()}
    monkeypatch.setattr(launch, "INTERPRET", False)
    raises_one_line(ValueError, r"^x is on cpu; Triton kernels need CUDA tensors \(or TRITON_INTERPRET=1",
                    lambda: masked_cam.masked_cam_logits(**args, poison=True))
    monkeypatch.setattr(launch, "triton", None)
    raises_one_line(RuntimeError, r"^kernels need Triton",
                    lambda: masked_cam.masked_cam_logits(**args, poison=True))


def test_import_works_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import kernels, torch; z = torch.zeros\n"
            "try:\n    kernels.masked_gap.masked_gap(z(1, 1, 1, 1), z(1, 1, 1, 1))\n"
            "except RuntimeError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("kernels need Triton"), out.stdout + out.stderr
