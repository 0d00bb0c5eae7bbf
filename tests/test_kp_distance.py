"""kernels.kp_distance.kp_distance against reference.kp_layer_loss, eq. (4) with the squared norm.

Gradients are checked against float64 torch autograd of the same math; that expression's
value is first checked against the reference itself.
"""
import numpy as np
import pytest
import torch
from hypothesis import example, given, strategies as st

from kernel_testing import (DEVICE, DTYPES, SETTINGS, as64, assert_close, assert_poisoned, grad64, patched,
                            raises_one_line, same_layout, tensor)
from kernels import kp_distance, launch
from minimal_amkp import reference as R

SMALL = dict(MAX_BLOCK_HW=16, TILE=64)  # 4 rows x 16 pixels per program


def kp64(fa, fb):
    """Float64 torch form of eq. (4): (1/N) sum_n sum_k (g(fa) - g(fb))^2."""
    return ((fa.mean((2, 3)) - fb.mean((2, 3))) ** 2).sum() / fa.shape[0]


@SETTINGS
@given(n=st.integers(1, 4), k=st.integers(1, 40), h=st.integers(1, 7), w=st.integers(1, 7),
       maps=st.sampled_from(["random", "equal", "constant"]), small=st.booleans(),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["nchw", "channels_last", "mixed"]),
       wrt=st.sampled_from(["ab", "b", "a", ""]), seed=st.integers(0, 2**32 - 1))
@example(n=1, k=1, h=1, w=1, maps="random", small=True, dtype=torch.float32, layout="nchw", wrt="ab", seed=0)
@example(n=3, k=17, h=1, w=37, maps="random", small=True, dtype=torch.float32, layout="channels_last",
         wrt="ab", seed=1)
@example(n=2, k=5, h=3, w=3, maps="equal", small=False, dtype=torch.float32, layout="mixed", wrt="b", seed=2)
def test_kp_distance_and_gradients_match_reference(n, k, h, w, maps, small, dtype, layout, wrt, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, k, h, w))
    b = {"random": lambda: rng.normal(size=a.shape), "equal": lambda: a,
         "constant": lambda: np.full(a.shape, 0.5)}[maps]()
    if maps == "constant":
        a = np.broadcast_to(rng.normal(size=(n, k, 1, 1)), a.shape)
    fa = tensor(a, dtype, "a" in wrt, channels_last=layout == "channels_last")
    fb = tensor(b, dtype, "b" in wrt, channels_last=layout != "nchw")
    a64, b64 = as64(fa), as64(fb)
    assert float(kp64(torch.tensor(a64), torch.tensor(b64))) == pytest.approx(R.kp_layer_loss(a64, b64),
                                                                              rel=1e-12, abs=1e-300)
    # The loss's rounding error is bounded by the same sum with |fa| and -|fb|: no cancellation.
    with patched(kp_distance, **(SMALL if small else {})):
        loss = kp_distance.kp_distance(fa, fb, poison=True)
        assert loss.shape == () and loss.dtype == torch.float32
        assert_close("loss", as64(loss), R.kp_layer_loss(a64, b64),
                     R.kp_layer_loss(abs(a64), -abs(b64)), torch.float32)
        if not wrt:
            return
        dl = tensor(rng.normal(), torch.float32)
        leaves = [t for t in (fa, fb) if t.requires_grad]
        got = dict(zip([c for c in "ab" if c in wrt], torch.autograd.grad(loss, leaves, dl)))
    want = grad64(kp64, [a64, b64], [as64(dl)])
    scale = grad64(kp64, [abs(a64), -abs(b64)], [abs(as64(dl))])
    for i, (c, like) in enumerate(zip("ab", (fa, fb))):
        if c in got:
            assert got[c].dtype == dtype
            same_layout(f"df{c}", got[c], like)
            assert_close(f"df{c}", as64(got[c]), want[i], scale[i], dtype)


def test_loss_is_bitwise_reproducible():
    rng = np.random.default_rng(0)
    fa, fb = (tensor(rng.normal(size=(3, 30, 5, 5)), torch.float32, True) for _ in range(2))
    with patched(kp_distance, **SMALL):
        runs = [[kp_distance.kp_distance(fa, fb, poison=True),
                 *torch.autograd.grad(kp_distance.kp_distance(fa, fb, poison=True), (fa, fb))] for _ in range(2)]
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_poison_reaches_the_loss_and_both_gradients():
    fa = tensor(np.ones((2, 5, 3, 3)), torch.float32, True, channels_last=True)
    fb = tensor(np.ones((2, 5, 3, 3)), torch.float32, True)

    def run():
        loss = kp_distance.kp_distance(fa, fb, poison=True)
        return dict(zip(("loss", "dfa", "dfb"), (loss, *torch.autograd.grad(loss, (fa, fb)))))
    assert_poisoned(run)


def _valid():
    return dict(fa=torch.zeros(2, 4, 3, 5, device=DEVICE), fb=torch.zeros(2, 4, 3, 5, device=DEVICE))


@pytest.mark.parametrize("arg, bad, exc, message", [
    ("fa", lambda t: t.mean((2, 3)), ValueError,
     r"^fa must have shape \(N, K, H, W\), got \(2, 4\) \(rank 2\)$"),
    ("fb", lambda t: t[:1], ValueError,
     r"^fa and fb must have the same shape \(N, K, H, W\), got \(2, 4, 3, 5\) and \(1, 4, 3, 5\)$"),
    ("fb", lambda t: t[:, :3].contiguous(), ValueError, r"^fa and fb must have the same shape"),
    ("fa", lambda t: t.double(), TypeError, r"^fa must be float32 or bfloat16, got torch.float64$"),
    ("fb", lambda t: t.bfloat16(), TypeError,
     r"^fb is torch.bfloat16 but fa is torch.float32; pass one dtype$"),
    ("fb", lambda t: t.transpose(2, 3), ValueError,
     r"^fb must walk H and W with one stride \(NCHW or channels-last\), got strides"),
    ("fb", lambda t: t.to("meta"), ValueError, r"^fb is on meta but fa is on "),
    ("fa", lambda t: [1.0], TypeError, r"^fa must be a torch.Tensor \(N, K, H, W\), got list$"),
])
def test_bad_input_gives_one_line_error(arg, bad, exc, message):
    args = _valid()
    args[arg] = bad(args[arg])
    raises_one_line(exc, message, lambda: kp_distance.kp_distance(**args, poison=True))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(launch, "INTERPRET", False)
    args = {k: v.cpu() for k, v in _valid().items()}
    raises_one_line(ValueError, r"^fa is on cpu; Triton kernels need CUDA tensors",
                    lambda: kp_distance.kp_distance(**args, poison=True))
