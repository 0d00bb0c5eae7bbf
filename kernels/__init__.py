"""Fused Triton kernels for attention mining and knowledge preservation, each differentiable.

    masked_cam_logits(x, m, w, b, write_cam=True) -> (cam or None, logits)   eq. (7) and (2)
    masked_gap(x, m) -> P (N, C, D)                                           g(X̂_c), eq. (1)-(2)
    kp_distance(fa, fb) -> scalar                                             eq. (4)

Importing never needs a GPU or Triton; calling a kernel without Triton raises RuntimeError. On
CPU the kernels run only under Triton's interpreter (TRITON_INTERPRET=1 before triton is
imported), which is how the tests check them; it is not a speed path.
Two function names shadow their submodules (`kernels.masked_gap` is the function, and so is
`import kernels.masked_gap as G`); reach a module with importlib.import_module("kernels.masked_gap").
"""
from .kp_distance import kp_distance
from .masked_cam import masked_cam_logits
from .masked_gap import masked_gap

__all__ = ["kp_distance", "masked_cam_logits", "masked_gap"]
