"""What every launcher shares: the optional Triton import, input checks and output allocation.

`import kernels` must work on a machine without a GPU or without Triton, so Triton is imported
here once and a missing install only surfaces when a kernel is called. Kernel files use
`from __future__ import annotations`, which keeps `BLOCK: tl.constexpr` unevaluated (Triton reads
the annotation as a string), so their `def`s parse even when `tl` is None.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

# Triton picks the interpreter when a kernel is decorated, so it is fixed at import time too.
INTERPRET = triton is not None and bool(triton.knobs.runtime.interpret)
DTYPES = (torch.float32, torch.bfloat16)
# Tests set this so every output starts as NaN and an element a kernel forgot to write shows up.
POISON = False


def jit(fn):
    return triton.jit(fn) if triton is not None else fn


def empty(shape, device, dtype=torch.float32):
    """torch.empty, or NaN-filled when POISON is on; every kernel output goes through here."""
    out = torch.empty(shape, device=device, dtype=dtype)
    return out.fill_(float("nan")) if POISON else out


def next_pow2(n, lo=16):
    # tl.dot needs every block dimension >= 16, and tl.arange needs powers of two.
    return max(lo, triton.next_power_of_2(n))


def check(name, t, rank, dims):
    """Validate one tensor argument; `dims` names its axes for messages, e.g. "(N, D, H, W)"."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have shape {dims}, got {tuple(t.shape)} (rank {t.dim()})")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32 or bfloat16, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()} (call .contiguous())")


def check_same(names, tensors):
    """All tensors share one dtype and one device, and that device can run the kernels."""
    if triton is None:
        raise RuntimeError("kernels need Triton (pip install triton); use the torch ops instead")
    first = tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != first.dtype:
            raise TypeError(f"{name} is {t.dtype} but {names[0]} is {first.dtype}; pass one dtype")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {names[0]} is on {first.device}")
    if first.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{names[0]} is on {first.device}; Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 set before triton is imported)")
