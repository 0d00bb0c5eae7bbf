"""kernels.masked_gap.masked_gap against reference.gap(reference.erase(x, m)), g(X̂_c) of eq. (1)-(2).

Gradients are checked against float64 torch autograd of the same math, written as one einsum;
that expression's values are first checked against the reference itself.
"""
import numpy as np
import pytest
import torch
from hypothesis import example, given, strategies as st

from kernel_testing import (DEVICE, DTYPES, SETTINGS, as64, assert_close, assert_poisoned, grad64, masks,
                            raises_one_line, same_layout, tensor, tiles)
from kernels import launch, masked_gap
from minimal_amkp import reference as R


def gap64(m):
    """Float64 torch form of g(x ⊙ m_c), differentiable in x."""
    return lambda x: torch.einsum("ndhw,nchw->ncd", x, m) / (x.shape[2] * x.shape[3])  # (N, C, D)


@SETTINGS
@given(n=st.integers(1, 3), d=st.integers(1, 40), h=st.integers(1, 6), w=st.integers(1, 6),
       c=st.integers(1, 32), mask=st.sampled_from(["random", "zeros", "ones"]), small=st.booleans(),
       dtype=st.sampled_from(DTYPES), channels_last=st.booleans(), grad=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
@example(n=1, d=17, h=1, w=13, c=1, mask="zeros", small=True, dtype=torch.float32, channels_last=False,
         grad=True, seed=0)
@example(n=2, d=40, h=1, w=37, c=14, mask="ones", small=True, dtype=torch.float32, channels_last=True,
         grad=True, seed=1)
@example(n=2, d=33, h=3, w=5, c=32, mask="random", small=True, dtype=torch.bfloat16, channels_last=True,
         grad=True, seed=2)
def test_masked_gap_and_gradient_match_reference(n, d, h, w, c, mask, small, dtype, channels_last, grad, seed):
    rng = np.random.default_rng(seed)
    x = tensor(rng.normal(size=(n, d, h, w)), dtype, grad, channels_last)
    m = tensor(masks(rng, mask, (n, c, h, w)), dtype)
    x64, m64 = as64(x), as64(m)
    f = gap64(torch.tensor(m64))
    np.testing.assert_allclose(f(torch.tensor(x64)).numpy(), R.gap(R.erase(x64, m64)), rtol=1e-12, atol=1e-12)

    with tiles(masked_gap._gap_fwd_kernel, masked_gap._gap_bwd_kernel,
               **(dict(BLOCK_D=16, BLOCK_HW=16) if small else {})):
        p = masked_gap.masked_gap(x, m, poison=True)
        assert p.dtype == dtype and p.shape == (n, c, d)
        assert_close("P", as64(p), R.gap(R.erase(x64, m64)), R.gap(R.erase(abs(x64), m64)), dtype)
        if not grad:
            return
        dp = tensor(rng.normal(size=(n, c, d)), dtype)
        (dx,) = torch.autograd.grad(p, x, dp)
    assert dx.dtype == dtype
    same_layout("dx", dx, x)
    (want,) = grad64(f, [x64], [as64(dp)])
    (scale,) = grad64(f, [abs(x64)], [abs(as64(dp))])
    assert_close("dx", as64(dx), want, scale, dtype)


def test_non_contiguous_upstream_gradient_is_accepted():
    rng = np.random.default_rng(0)
    x = tensor(rng.normal(size=(2, 5, 3, 3)), torch.float32, True)
    m = tensor(masks(rng, "random", (2, 4, 3, 3)), torch.float32)
    dp = tensor(rng.normal(size=(2, 5, 4)), torch.float32).transpose(1, 2)  # (2, 4, 5), strided
    (dx,) = torch.autograd.grad(masked_gap.masked_gap(x, m, poison=True), x, dp)
    (dx_dense,) = torch.autograd.grad(masked_gap.masked_gap(x, m, poison=True), x, dp.contiguous())
    assert torch.equal(dx, dx_dense)


def test_poison_reaches_p_and_dx():
    x = tensor(np.ones((2, 5, 3, 3)), torch.float32, True, channels_last=True)
    m = tensor(np.ones((2, 4, 3, 3)), torch.float32)

    def run():
        p = masked_gap.masked_gap(x, m, poison=True)
        return {"P": p, "dx": torch.autograd.grad(p, x, torch.ones_like(p))[0]}
    assert_poisoned(run)


def _valid():
    return dict(x=torch.zeros(2, 4, 3, 5, device=DEVICE), m=torch.zeros(2, 3, 3, 5, device=DEVICE))


@pytest.mark.parametrize("arg, bad, exc, message", [
    ("x", lambda t: t[None], ValueError,
     r"^x must have shape \(N, D, H, W\), got \(1, 2, 4, 3, 5\) \(rank 5\)$"),
    ("m", lambda t: t[0], ValueError, r"^m must have shape \(N, C, H, W\), got \(3, 3, 5\) \(rank 3\)$"),
    ("m", lambda t: t[:1], ValueError, r"^m has shape \(1, 3, 3, 5\) but x is \(2, 4, 3, 5\); expected m"),
    ("m", lambda t: t[:, :, :2].contiguous(), ValueError, r"^m has shape \(2, 3, 2, 5\) but x is"),
    ("m", lambda t: t.int(), TypeError, r"^m must be float32 or bfloat16, got torch.int32$"),
    ("m", lambda t: t.bfloat16(), TypeError, r"^m is torch.bfloat16 but x is torch.float32; pass one dtype$"),
    ("x", lambda t: t.permute(0, 1, 3, 2), ValueError,
     r"^x must walk H and W with one stride \(NCHW or channels-last\), got strides \(60, 15, 1, 5\)"),
    ("m", lambda t: t.to("meta"), ValueError, r"^m is on meta but x is on "),
    ("m", lambda t: t[:, :0], ValueError, r"^m must be non-empty, got shape \(2, 0, 3, 5\)$"),
])
def test_bad_input_gives_one_line_error(arg, bad, exc, message):
    args = _valid()
    args[arg] = bad(args[arg])
    raises_one_line(exc, message, lambda: masked_gap.masked_gap(**args, poison=True))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(launch, "INTERPRET", False)
    args = {k: v.cpu() for k, v in _valid().items()}
    raises_one_line(ValueError, r"^x is on cpu; Triton kernels need CUDA tensors",
                    lambda: masked_gap.masked_gap(**args, poison=True))
