"""Fused Triton kernels for attention mining and knowledge preservation, each differentiable.

    masked_cam_logits(x, m, w, b, write_cam=True) -> (cam or None, logits fp32)  eq. (7) and (2)
    masked_gap(x, m) -> P (N, C, D)                                           g(X̂_c), eq. (1)-(2)
    kp_distance(fa, fb) -> fp32 scalar                                        eq. (4)
    am_step(x, m, w, b, xa, n0) -> (logits fp32, KP distance at X fp32)        eq. (2) and (4), one dX

Feature maps may be NCHW or channels-last; gradients come back in the same layout. Importing
never needs a GPU or Triton; calling a kernel without a usable Triton raises RuntimeError with
the reason. On CPU the kernels run only under Triton's interpreter (TRITON_INTERPRET=1 before
triton is imported), which is how the tests check them; it is not a speed path.
Function names shadow their submodules (`kernels.masked_gap` is the function, and so is
`import kernels.masked_gap as G`); reach a module with importlib.import_module("kernels.masked_gap").
"""
from . import launch
from .am_step import am_step
from .kp_distance import kp_distance
from .masked_cam import masked_cam_logits
from .masked_gap import masked_gap

__all__ = ["am_step", "kp_distance", "launch", "masked_cam_logits", "masked_gap"]
