"""Knowledge preservation: equations (4)-(6). Sec. 2.2.

N_A is the network before attention mining, N_B the one being updated; both see the same
N − n un-erased images of a minibatch. A layer's outputs X_A(k), X_B(k) are (N−n, K, H, W),
or already pooled (N−n, K).
"""
import numpy as np

from . import checks
from .am import gap


def kp_layer_loss(fa, fb):
    """Eq. (4): L_k = (1/(N−n)) ‖g(X_A(k)) − g(X_B(k))‖².

    The paper writes the ℓ2-distance ‖·‖2; this project uses its square (summed over images
    and channels), the usual distillation form, whose gradient is linear in the difference
    and defined at zero. fa, fb (N−n, K, H, W) or pooled (N−n, K) -> scalar.
    """
    fa = checks.array("fa", fa, ndim=(2, 4))
    fb = checks.array("fb", fb, ndim=(2, 4))
    checks.same_shape("fa", fa, "fb", fb)
    if fa.shape[0] == 0:
        raise ValueError(f"fa: N − n must be at least 1, got shape {fa.shape}")
    ga = gap(fa) if fa.ndim == 4 else fa                                  # (N−n, K)
    gb = gap(fb) if fb.ndim == 4 else fb                                  # (N−n, K)
    return float(((ga - gb) ** 2).sum() / fa.shape[0])


def kp_loss(pairs):
    """Eq. (5): L_KP = (1/|K|) Σ_{k∈K} L_k over a list of (fa, fb) layer pairs of any widths."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs: need at least one (fa, fb) layer pair, got an empty list")
    return float(np.mean([kp_layer_loss(fa, fb) for fa, fb in pairs]))


def total_loss(l_cls, l_kp, lam=0.5):
    """Eq. (6): L = L_cls + λ L_KP, with λ = 0.5 as in the paper."""
    return float(l_cls) + lam * float(l_kp)
