"""The torch op layer against the NumPy reference, forward and backward, and its backend choice.

Forward: ops on float64 tensors vs the reference on the same arrays, |got − want| <= 1e-9
(+ 1e-9 relative): only the summation order differs. Gradients: torch autograd vs central
finite differences of the *reference* (step 1e-6, float64), contracted with a random upstream
gradient so that one scalar function covers every output element; the ops are linear or
quadratic in their inputs (BCE is smooth), so the difference quotient is accurate to ~1e-8
and we allow 1e-6. The Triton backend (interpreter on CPU) runs in float32: 1e-4 relative.
The ops without a gradient (update_masks, fuse_heatmaps) must equal the reference exactly.
The ops run on their default backend, "auto", which is torch for these CPU tensors; the
Triton tests pass backend="triton". A training step on the Triton backend in channels-last is
checked to hand the kernels the model's own activations (data pointers and strides) and to get
dX back as the kernel wrote it.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from kernel_testing import examples
from minimal_amkp import ops
from minimal_amkp import reference as R

SHAPES = settings(max_examples=examples(25), deadline=None, derandomize=True)
# The Triton backend runs on CUDA tensors, or on CPU ones under the interpreter (conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[1]


def close(name, got, want, atol, rtol=0.0):
    """Elementwise |got − want| <= atol + rtol·|want|; names the first offending index."""
    got = np.asarray(got.detach().double().cpu() if isinstance(got, torch.Tensor) else got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    bad = ~(np.abs(got - want) <= atol + rtol * np.abs(want))
    if bad.any():
        i = tuple(int(k) for k in np.argwhere(bad)[0])
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} elements off; first at {i}: "
                             f"got {got[i]!r}, want {want[i]!r}")


def fd_grads(f, arrays, upstream, eps=1e-6):
    """Central differences of sum(f(*arrays) * upstream) with respect to each array."""
    arrays = [np.array(a, dtype=np.float64) for a in arrays]

    def scalar():
        return float(np.sum(np.asarray(f(*arrays)) * upstream))

    grads = []
    for a in arrays:
        g, flat = np.zeros_like(a), a.reshape(-1)
        for j in range(flat.size):
            old = flat[j]
            flat[j] = old + eps
            hi = scalar()
            flat[j] = old - eps
            lo = scalar()
            flat[j] = old
            g.reshape(-1)[j] = (hi - lo) / (2 * eps)
        grads.append(g)
    return grads


def autograd(f, arrays, upstream):
    leaves = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
    out = f(*leaves)
    (out * torch.as_tensor(upstream)).sum().backward()
    return out, [t.grad for t in leaves]


def check_op(name, op, ref, arrays, rng, const=()):
    """op(*tensors, *const) vs ref(*arrays, *const): values, then gradients for every array."""
    want = np.asarray(ref(*arrays, *const), dtype=np.float64)
    upstream = rng.normal(size=want.shape)
    got, grads = autograd(lambda *t: op(*t, *const), arrays, upstream)
    close(f"{name} forward", got, want, 1e-9, 1e-9)
    for i, (g, fd) in enumerate(zip(grads, fd_grads(lambda *a: ref(*a, *const), arrays, upstream))):
        close(f"{name} d/d(arg {i})", g, fd, 1e-6, 1e-6)


def masks(rng, kind, shape):
    return {"random": lambda: (rng.random(shape) < 0.6).astype(np.float64),
            "zeros": lambda: np.zeros(shape), "ones": lambda: np.ones(shape)}[kind]()


dims = dict(n=st.integers(1, 3), c=st.integers(1, 4), d=st.integers(1, 5), h=st.integers(1, 7),
            w=st.integers(1, 5), mask=st.sampled_from(["random", "zeros", "ones"]),
            constant=st.booleans(), seed=st.integers(0, 2**32 - 1))


def features(rng, n, d, h, w, constant):
    x = rng.normal(size=(n, d, h, w))
    return np.broadcast_to(x[..., :1, :1], x.shape).copy() if constant else x


@SHAPES
@given(**dims)
@example(n=1, c=1, d=1, h=1, w=1, mask="zeros", constant=False, seed=0)
@example(n=2, c=3, d=5, h=7, w=5, mask="random", constant=True, seed=1)
def test_branch_logits_and_cam_match_reference(n, c, d, h, w, mask, constant, seed):
    rng = np.random.default_rng(seed)
    x, m = features(rng, n, d, h, w, constant), masks(rng, mask, (n, c, h, w))
    wc, b = rng.normal(size=(c, d)), rng.normal(size=c)
    mt = torch.tensor(m)
    check_op("branch_logits", lambda x, w, b: ops.branch_logits(x, mt, w, b),
             lambda x, w, b: R.branch_logits(x, m, w, b), [x, wc, b], rng)
    check_op("cam", lambda x, w: ops.cam(x, mt, w), lambda x, w: R.cam(x, m, w), [x, wc], rng)
    ones = np.ones((n, c, h, w))
    check_op("branch_logits(m=None)", lambda x, w, b: ops.branch_logits(x, None, w, b),
             lambda x, w, b: R.branch_logits(x, ones, w, b), [x, wc, b], rng)
    check_op("gap", ops.gap, R.gap, [x], rng)
    check_op("erase", lambda x: ops.erase(x, mt), lambda x: R.erase(x, m), [x], rng)
    check_op("masked_gap", lambda x: ops.masked_gap(x, mt), lambda x: R.gap(R.erase(x, m)), [x], rng)


@SHAPES
@given(n=st.integers(1, 5), c=st.integers(1, 14), extreme=st.booleans(), seed=st.integers(0, 2**32 - 1))
@example(n=1, c=1, extreme=True, seed=0)
def test_losses_match_reference(n, c, extreme, seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * (30 if extreme else 2)
    y = (rng.random((n, c)) < 0.4).astype(np.float64)
    yt = torch.tensor(y)
    check_op("branch_losses", lambda z: ops.branch_losses(z, yt), lambda z: R.branch_losses(z, y), [z], rng)
    check_op("classification_loss", lambda z: ops.classification_loss(z, yt),
             lambda z: R.classification_loss(z, y), [z], rng)


@SHAPES
@given(n=st.integers(1, 3), k=st.integers(1, 6), h=st.integers(1, 5), w=st.integers(1, 4),
       pooled=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_kp_losses_match_reference(n, k, h, w, pooled, seed):
    rng = np.random.default_rng(seed)
    shape = (n, k) if pooled else (n, k, h, w)
    fa, fb = rng.normal(size=shape), rng.normal(size=shape)
    check_op("kp_layer_loss", ops.kp_layer_loss, R.kp_layer_loss, [fa, fb], rng)
    g = rng.normal(size=(n, 3))
    check_op("kp_loss", lambda fa, fb, g: ops.kp_loss([(fa, fb), (g, g * 2)]),
             lambda fa, fb, g: R.kp_loss([(fa, fb), (g, g * 2)]), [fa, fb, g], rng)
    check_op("total_loss", lambda a, b: ops.total_loss(a.sum(), b.sum(), lam=0.5),
             lambda a, b: R.total_loss(a.sum(), b.sum(), lam=0.5), [rng.normal(size=1), rng.normal(size=1)], rng)


@SHAPES
@given(n=st.integers(2, 4), n0=st.integers(0, 3), c=st.integers(1, 3), d=st.integers(1, 4),
       h=st.integers(1, 3), w=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_am_step_is_branch_logits_and_kp_at_x(n, n0, c, d, h, w, seed):
    n0 = min(n0, n - 1)
    rng = np.random.default_rng(seed)
    x, xa = rng.normal(size=(n, d, h, w)), rng.normal(size=(n - n0, d, h, w))
    m, wc, b = masks(rng, "random", (n, c, h, w)), rng.normal(size=(c, d)), rng.normal(size=c)
    mt, xat = torch.tensor(m), torch.tensor(xa)
    check_op("am_step logits", lambda x, w, b: ops.am_step(x, mt, w, b, xat, n0)[0],
             lambda x, w, b: R.branch_logits(x, m, w, b), [x, wc, b], rng)
    check_op("am_step l_kp", lambda x: ops.am_step(x, mt, torch.tensor(wc), torch.tensor(b), xat, n0)[1],
             lambda x: R.kp_layer_loss(xa, x[n0:]), [x], rng)


def test_kp_layer_loss_rejects_mismatched_layers():
    with pytest.raises(ValueError, match=r"fa and fb must share one shape .* got \(2, 3\) and \(2, 4\)"):
        ops.kp_layer_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least one"):
        ops.kp_loss([])
    assert float(ops.kp_loss([], [torch.tensor(2.0), torch.tensor(4.0)])) == 3.0


def heatmaps(rng, kind, shape):
    """CAMs: normal; "ties": few distinct values, so which maximum comes first matters; constant."""
    return {"normal": lambda: rng.normal(size=shape),
            "ties": lambda: rng.integers(-2, 3, size=shape).astype(np.float64),
            "constant": lambda: np.full(shape, 0.5)}[kind]()


def live_cells(rng, kind, shape):
    """Masks M_{t-1}: "dense" ones leave long, winding components to grow through."""
    return {"random": lambda: (rng.random(shape) < 0.6).astype(np.float64),
            "dense": lambda: (rng.random(shape) < 0.9).astype(np.float64),
            "zeros": lambda: np.zeros(shape), "ones": lambda: np.ones(shape)}[kind]()


ODD = st.sampled_from([1, 2, 3, 5, 7, 13])


@settings(SHAPES, max_examples=examples(80))
@given(n=st.integers(1, 3), c=st.integers(1, 4), h=ODD, w=ODD, cam=st.sampled_from(["normal", "ties", "constant"]),
       mask=st.sampled_from(["random", "dense", "zeros", "ones"]), threshold=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
       seed=st.integers(0, 2**32 - 1))
@example(n=1, c=1, h=1, w=1, cam="normal", mask="ones", threshold=0.5, seed=0)
@example(n=2, c=3, h=13, w=7, cam="ties", mask="dense", threshold=0.0, seed=1)
def test_update_masks_equals_reference(n, c, h, w, cam, mask, threshold, seed):
    rng = np.random.default_rng(seed)
    hm, m = heatmaps(rng, cam, (n, c, h, w)), live_cells(rng, mask, (n, c, h, w))
    got = ops.update_masks(torch.tensor(hm, requires_grad=True), torch.tensor(m), threshold)
    assert got.dtype == torch.float64 and not got.requires_grad
    np.testing.assert_array_equal(got.numpy(), R.update_masks(hm, m, threshold))
    # As mining keeps them: float32 CAMs, uint8 masks (the result keeps the masks' dtype).
    got = ops.update_masks(torch.tensor(hm, dtype=torch.float32), torch.tensor(m, dtype=torch.uint8), threshold)
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), R.update_masks(hm.astype(np.float32), m, threshold))


def test_update_masks_grows_the_peaks_component_to_its_far_end():
    """P is the peak; # cells join it through 22 steps, one of them diagonal; o is binarised but
    apart. The whole winding component is erased, o is kept."""
    rows = ["P#####.", "......#", "o.###.#", "..#.#.#", "..#.###", "..#....", "..###.."]
    hm = np.array([[{"P": 2.0, "#": 1.0, "o": 1.0, ".": 0.0}[ch] for ch in row] for row in rows])
    want = np.array([[0.0 if ch in "P#" else 1.0 for ch in row] for row in rows])
    np.testing.assert_array_equal(R.update_masks(hm, np.ones_like(hm)), want)
    got = ops.update_masks(torch.tensor(hm), torch.ones(7, 7, dtype=torch.float64))
    np.testing.assert_array_equal(got.numpy(), want)


@settings(SHAPES, max_examples=examples(50))
@given(t=st.integers(1, 4), n=st.integers(1, 2), c=st.integers(1, 3), h=ODD, w=ODD,
       cam=st.sampled_from(["normal", "ties", "constant"]), mask=st.sampled_from(["random", "zeros", "ones"]),
       seed=st.integers(0, 2**32 - 1))
@example(t=1, n=1, c=1, h=1, w=1, cam="normal", mask="ones", seed=0)
def test_fuse_heatmaps_equals_reference(t, n, c, h, w, cam, mask, seed):
    rng = np.random.default_rng(seed)
    shape = (n, c, h, w)
    cams = [heatmaps(rng, cam, shape) for _ in range(t)]
    ms = [np.ones(shape)]
    for _ in range(t - 1):                          # nested: a round only erases more
        ms.append(ms[-1] * live_cells(rng, mask, shape))
    want = R.fuse_heatmaps(cams, ms)
    got = ops.fuse_heatmaps([torch.tensor(a, requires_grad=True) for a in cams], [torch.tensor(k) for k in ms])
    assert got.dtype == torch.float64 and not got.requires_grad
    np.testing.assert_array_equal(got.numpy(), want)
    got = ops.fuse_heatmaps([torch.tensor(a) for a in cams], [torch.tensor(k, dtype=torch.uint8) for k in ms])
    np.testing.assert_array_equal(got.numpy(), want)


@settings(SHAPES, max_examples=examples(40))
@given(n=st.integers(1, 2), c=st.integers(1, 3), h=ODD, w=ODD, r=st.integers(0, 3),
       mask=st.sampled_from(["random", "dense", "zeros", "ones"]), seed=st.integers(0, 2**32 - 1))
@example(n=1, c=1, h=1, w=1, r=1, mask="ones", seed=0)
def test_dilate_erasure_equals_reference(n, c, h, w, r, mask, seed):
    rng = np.random.default_rng(seed)
    prev = live_cells(rng, mask, (n, c, h, w))
    new = prev * live_cells(rng, "dense", (n, c, h, w))                  # the update only erases
    got = ops.dilate_erasure(torch.tensor(new, dtype=torch.uint8), torch.tensor(prev, dtype=torch.uint8), r)
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), R.dilate_erasure(new, prev, r))


def test_mask_update_and_fusion_refuse_bad_input_in_one_line():
    z, one = torch.zeros(2, 3), torch.ones(2, 3)
    raises_one_line(ValueError, r"^threshold must lie in \[0, 1\], got 1.5$",
                    lambda: ops.update_masks(z, one, 1.5))
    raises_one_line(ValueError, r"^h and m must have one shape \(\.\.\., H, W\), got \(2, 3\) and \(3, 2\)$",
                    lambda: ops.update_masks(z, one.T))
    raises_one_line(ValueError, r"^cams and masks must be non-empty lists of equal length, got 1 and 2$",
                    lambda: ops.fuse_heatmaps([z], [one, one]))
    raises_one_line(ValueError, r"^r must be a whole number >= 0, got -1$", lambda: ops.dilate_erasure(z, one, -1))
    raises_one_line(ValueError, r"^m_new and m_prev must have one shape", lambda: ops.dilate_erasure(z, one.T, 1))
    raises_one_line(ValueError, r"^cams\[0\] and masks\[1\] must have the same shape, got \(2, 3\) and \(3, 2\)$",
                    lambda: ops.fuse_heatmaps([z, z], [one, one.T]))
    raises_one_line(ValueError, r"^masks\[0\] must be all ones: it is M_0, the mask of the first round$",
                    lambda: ops.fuse_heatmaps([z, z], [z, z]))


def test_the_backend_is_chosen_once_from_the_option_or_the_environment(monkeypatch):
    monkeypatch.delenv("AMKP_BACKEND", raising=False)
    assert ops.choose_backend() == "auto"
    monkeypatch.setenv("AMKP_BACKEND", "torch")
    assert ops.choose_backend() == "torch"
    assert ops.choose_backend("auto") == "auto"                 # the option wins over the variable
    monkeypatch.setenv("AMKP_BACKEND", "cuda")
    raises_one_line(ValueError, r"^AMKP_BACKEND must be one of auto, torch, triton; got 'cuda'$",
                    ops.choose_backend)
    raises_one_line(ValueError, r"^--backend must be one of auto, torch, triton; got 'fast'$",
                    lambda: ops.choose_backend("fast"))
    t = torch.zeros(1, 1, 1, 1)
    assert ops.cam(t, t, torch.zeros(1, 1)).shape == (1, 1, 1, 1)      # ops never read the variable
    raises_one_line(ValueError, r"^backend must be one of auto, torch, triton; got 'fast'$",
                    lambda: ops.cam(t, t, torch.zeros(1, 1), backend="fast"))


def test_auto_runs_the_kernels_only_on_cuda_tensors():
    require_kernels()
    from kernel_testing import launches

    x, m, w = torch.rand(2, 5, 3, 3), torch.ones(2, 4, 3, 3), torch.rand(4, 5)
    on_device = [t.to(DEVICE) for t in (x, m, w)]
    for backend, args, kernels_run in (("torch", on_device, False), ("auto", on_device, DEVICE == "cuda"),
                                       ("auto", (x, m, w), False), ("triton", on_device, True)):
        with launches() as seen:
            ops.cam(*args, backend=backend)
        assert bool(seen) == kernels_run, (backend, args[0].device)


def raises_one_line(exc, match, call):
    with pytest.raises(exc, match=match) as info:
        call()
    assert "\n" not in str(info.value), f"message spans lines: {info.value}"


def require_kernels(monkeypatch=None):
    # The kernels ship with the project, so a missing package is a failure, not a skip.
    assert ops._kernels() is not None, "the kernels package is not importable"
    if monkeypatch is not None:  # compiled fp32 dots would run in TF32; compare at fp32
        monkeypatch.setattr(ops._kernels().launch, "FP32_PRECISION", "ieee")


@pytest.mark.parametrize("mask, channels_last", [("random", False), ("zeros", False), ("random", True)])
def test_triton_backend_matches_reference(monkeypatch, mask, channels_last):
    require_kernels(monkeypatch)
    on = dict(backend="triton")
    rng = np.random.default_rng(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, m = rng.normal(size=(2, 19, 3, 5)), masks(rng, mask, (2, 14, 3, 5))
    wc, b = rng.normal(size=(14, 19)), rng.normal(size=14)
    xt, mt, wt, bt = (torch.tensor(a, dtype=torch.float32, device=DEVICE) for a in (x, m, wc, b))
    xt = xt.to(memory_format=fmt)
    close("triton branch_logits", ops.branch_logits(xt, mt, wt, bt, **on), R.branch_logits(x, m, wc, b),
          1e-4, 1e-4)
    close("triton cam", ops.cam(xt, mt, wt, **on), R.cam(x, m, wc), 1e-4, 1e-4)
    fa, fb = rng.normal(size=(3, 7, 4, 4)), rng.normal(size=(3, 7, 4, 4))
    fat, fbt = (torch.tensor(a, dtype=torch.float32, device=DEVICE) for a in (fa, fb))
    close("triton kp_layer_loss", ops.kp_layer_loss(fat.to(memory_format=fmt), fbt, **on), R.kp_layer_loss(fa, fb),
          1e-4, 1e-4)
    close("triton kp_loss", ops.kp_loss([(fat, fbt)], **on), R.kp_loss([(fa, fb)]), 1e-4, 1e-4)
    xa = rng.normal(size=(1, 19, 3, 5))
    logits, l_kp = ops.am_step(xt, mt, wt, bt, torch.tensor(xa, dtype=torch.float32, device=DEVICE), 1, **on)
    close("triton am_step logits", logits, R.branch_logits(x, m, wc, b), 1e-4, 1e-4)
    close("triton am_step l_kp", l_kp, R.kp_layer_loss(xa, x[1:]), 1e-4, 1e-4)
    xg = xt.detach().requires_grad_()
    p = ops.masked_gap(xg, mt, **on)
    close("triton masked_gap", p, R.gap(R.erase(x, m)), 1e-4, 1e-4)
    dp = rng.normal(size=p.shape)
    (dx,) = torch.autograd.grad(p, xg, torch.tensor(dp, dtype=torch.float32, device=DEVICE))
    _, (want,) = autograd(lambda x: ops.masked_gap(x, torch.tensor(m)), [x], dp)
    close("triton masked_gap dx", dx, want.numpy(), 1e-4, 1e-4)
    # A layout no single stride walks is copied by ops, not refused.
    odd = torch.tensor(x, dtype=torch.float32, device=DEVICE).transpose(2, 3).contiguous().transpose(2, 3)
    close("triton cam (odd layout)", ops.cam(odd, mt, wt, **on), R.cam(x, m, wc), 1e-4, 1e-4)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_both_backends_return_the_same_dtypes(monkeypatch, name):
    """bf16 features: CAMs and pooled maps stay bf16, logits and losses are float32, on either backend."""
    require_kernels(monkeypatch)
    on = dict(backend=name)
    x, m = torch.rand(2, 5, 3, 3, dtype=torch.bfloat16, device=DEVICE), torch.ones(2, 4, 3, 3, device=DEVICE)
    w, b = torch.rand(4, 5, device=DEVICE), torch.rand(4, device=DEVICE)
    assert ops.cam(x, m, w, **on).dtype == torch.bfloat16
    assert ops.masked_gap(x, m, **on).dtype == torch.bfloat16
    assert ops.branch_logits(x, m, w, b, **on).dtype == torch.float32
    assert ops.branch_logits(x, None, w, b, **on).dtype == torch.float32
    assert ops.kp_layer_loss(x, x * 2, **on).dtype == torch.float32
    assert [t.dtype for t in ops.am_step(x, m, w, b, x[1:], 1, **on)] == [torch.float32, torch.float32]


def test_a_broken_or_old_triton_falls_back_to_torch(tmp_path):
    """A Triton without what the kernels use (here: no triton.Config, no knobs) raises AttributeError
    while kernels/ imports; ops catches it: auto runs torch, and choosing triton names the reason."""
    fake = tmp_path / "triton"
    (fake / "language").mkdir(parents=True)
    (fake / "language" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("__version__ = '3.2.0'\n")
    code = ("import os, torch\nfrom minimal_amkp import ops\nt = torch.ones(1, 1, 1, 1)\n"
            "print(ops.choose_backend(), ops.cam(t, t, torch.ones(1, 1)).item())\n"
            "os.environ['AMKP_BACKEND'] = 'triton'\n"
            "for choose in (ops.choose_backend, lambda: ops.choose_backend('triton'),\n"
            "               lambda: ops.cam(t, t, torch.ones(1, 1), backend='triton')):\n"
            "    try:\n        choose()\n    except RuntimeError as e:\n        print(e)")
    # The fake shadows the real triton; this checkout's sources come next, before any installed copy.
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "PATH": "/usr/bin:/bin",
           "AMKP_BACKEND": "auto"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    why = ("but the kernels package or Triton cannot be imported "
           "(AttributeError: module 'triton' has no attribute 'Config')")
    assert out.returncode == 0 and out.stdout.splitlines() == [
        "auto 1.0", f"AMKP_BACKEND=triton, {why}", f"--backend=triton, {why}", f"backend=triton, {why}"], \
        out.stdout + out.stderr


def test_an_old_triton_is_named_and_the_interpreter_flag_is_read_without_knobs(monkeypatch):
    require_kernels()
    from kernels import launch

    assert launch.too_old("2.1.0") == "Triton 2.1.0 is too old; the kernels need Triton >= 3.0"
    assert launch.too_old("3.0.0") == launch.too_old("3.9.0+git") == ""
    monkeypatch.setattr(launch, "triton", object())           # a Triton without triton.knobs (< 3.4)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert launch._interpreting() is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert launch._interpreting() is False


def on_backend(monkeypatch, model, model_a, name):
    """N_B and N_A on one backend (mine.am_loss passes model_a.backend to its KP layer pairs)."""
    model.backend = model_a.backend = name


def micro_step(channels_last=False):
    """A micro ResNet-MSA with a drifted N_A and a batch of 4 images, the first 2 erased."""
    from minimal_amkp.config import ModelConfig
    from minimal_amkp.objective import frozen_copy
    from minimal_amkp.model import ResNetMSA

    torch.manual_seed(0)
    model = ResNetMSA(ModelConfig(width=4, blocks=(1, 1, 1, 1), msa_channels=(16, 8)))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(DEVICE, memory_format=fmt)
    model_a = frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y = torch.rand(4, 1, 64, 64).to(DEVICE, memory_format=fmt), (torch.rand(4, 14) < 0.5).float().to(DEVICE)
    m = torch.ones(4, 14, 4, 4)
    m[:2] = (torch.rand(2, 14, 4, 4) < 0.6).float()
    return model, model_a, x, y, m.to(DEVICE)


@pytest.mark.parametrize("channels_last", [False, True])
def test_one_training_step_is_the_same_on_both_backends(monkeypatch, channels_last):
    """Loss (6) with erased maps and a drifted N_A: loss, L_KP and every gradient."""
    require_kernels(monkeypatch)
    from minimal_amkp.objective import am_loss

    model, model_a, x, y, m = micro_step(channels_last)
    results = {}
    for name in ("torch", "triton"):
        on_backend(monkeypatch, model, model_a, name)
        model.zero_grad()
        loss, l_cls, l_kp = am_loss(model, model_a, x, y, m, 2, "full", 0.5)
        loss.backward()
        results[name] = [loss.detach(), l_kp.detach()] + [p.grad.clone() for p in model.parameters()
                                                          if p.grad is not None]
    assert results["torch"][1] > 0
    assert len(results["torch"]) == len(results["triton"])
    for i, (a, b) in enumerate(zip(results["torch"], results["triton"])):
        close(f"loss, L_KP, gradient {i}", b, a.cpu().numpy(), 1e-4 * float(a.abs().max()) + 1e-6, 1e-3)


def test_channels_last_training_step_makes_no_layout_copy(monkeypatch):
    """The Triton backend, channels-last: every feature map a kernel reads or writes is the
    model's own (same data pointer and strides) or a channels-last gradient, and the gradient
    that reaches X is the one buffer the dX kernel wrote (no second dX, no sum)."""
    require_kernels()
    from kernels import launch
    from minimal_amkp.objective import am_loss

    model, model_a, x, y, m = micro_step(channels_last=True)
    on_backend(monkeypatch, model, model_a, "triton")
    acts, grads = {}, []

    def keep(name):
        def hook(module, inputs, out):
            acts[name] = out
            if name == "x" and out.requires_grad:
                out.register_hook(grads.append)
        return hook

    model.msa.register_forward_hook(keep("x"))
    model.layer3.register_forward_hook(keep("layer3"))
    model.layer4.register_forward_hook(keep("layer4"))
    launched = []
    real = launch.Kernel.__call__
    monkeypatch.setattr(launch.Kernel, "__call__", lambda self, grid, *args, **kw: (
        launched.append([a for a in args if isinstance(a, torch.Tensor) and a.dim() == 4]),
        real(self, grid, *args, **kw))[1])
    loss, _, _ = am_loss(model, model_a, x, y, m, 2, "full", 0.5)
    loss.backward()
    X = acts["x"]
    assert X.is_contiguous(memory_format=torch.channels_last) and not X.is_contiguous()
    channels = {X.shape[1], acts["layer3"].shape[1], acts["layer4"].shape[1]}
    maps = [t for args in launched for t in args if t.shape[1] in channels]
    assert maps and all(t.stride(1) == 1 for t in maps), "a feature map reached a kernel in NCHW"
    pointers = {t.data_ptr() for t in maps}
    assert X.data_ptr() in pointers                                         # X read in place
    assert acts["layer3"][2:].data_ptr() in pointers and acts["layer4"][2:].data_ptr() in pointers
    assert len(grads) == 1 and grads[0].data_ptr() in pointers              # dX as the kernel wrote it
    assert grads[0].stride() == X.stride()


@settings(SHAPES, max_examples=examples(30))
@given(n=st.integers(1, 3), c=st.integers(1, 3), h=ODD, mask=st.sampled_from(["random", "dense", "zeros", "ones"]),
       seed=st.integers(0, 2**32 - 1))
@example(n=1, c=1, h=1, mask="zeros", seed=0)
def test_erase_image_equals_reference(n, c, h, mask, seed):
    rng = np.random.default_rng(seed)
    grid, size = (8.0, 0.5, 8 * h), 8 * h
    image = rng.random((n, 1, size, size))
    m = live_cells(rng, mask, (n, c, h, h))
    got = ops.erase_image(torch.tensor(image), torch.tensor(m, dtype=torch.uint8), grid)
    want = R.erase_image(image, m, grid)
    bad = np.argwhere(~np.isclose(got.numpy(), want, rtol=1e-12, atol=1e-12))
    assert bad.size == 0, f"first mismatch at {tuple(bad[0])}: got {got.numpy()[tuple(bad[0])]}, want {want[tuple(bad[0])]}"
    raises_one_line(ValueError, r"^image must be \(N, 1, S, S\) and m \(N, C, H, W\) with one N",
                    lambda: ops.erase_image(torch.zeros(2, 1, 8, 8), torch.ones(3, 1, 1, 1), grid))
