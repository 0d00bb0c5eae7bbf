"""Fused Triton kernels for attention mining and knowledge preservation, each differentiable.

    masked_cam.masked_cam_logits(x, m, w, b, write_cam=True) -> (cam or None, logits fp32)  eq. (7), (2)
    masked_gap.masked_gap(x, m) -> P (N, C, D)                                g(X̂_c), eq. (1)-(2)
    kp_distance.kp_distance(fa, fb) -> fp32 scalar                            eq. (4)
    am_step.am_step(x, m, w, b, xa, n0) -> (logits fp32, KP distance at X fp32)  eq. (2) and (4), one dX

The package holds the modules only; each launcher lives in the module of the same concept and
takes poison=False (True: every output and gradient starts as NaN, which is how the tests
catch an element no program wrote). Feature maps may be NCHW or channels-last; gradients come
back in the same layout. Importing never needs a GPU or Triton; calling a kernel without a
usable Triton raises RuntimeError with the reason. On CPU the kernels run only under Triton's
interpreter (TRITON_INTERPRET=1 before triton is imported), which is how the tests check them;
it is not a speed path. Training reaches the kernels through minimal_amkp.ops on the Triton backend.
"""
from . import am_step, kp_distance, launch, masked_cam, masked_gap

__all__ = ["am_step", "kp_distance", "launch", "masked_cam", "masked_gap"]
