"""What every launcher shares: the guarded Triton import, layouts, checks, tuning and the one reduction.

`import kernels` must work without a GPU, without Triton, and with a Triton too old for these
kernels, so Triton is imported here once and its absence only surfaces, with the reason, when
a kernel is called. Kernel files use `from __future__ import annotations`, which keeps
`BLOCK: tl.constexpr` unevaluated (Triton reads the annotation as a string), so their `def`s
parse even when `tl` is None.

Layouts. A 4-D tensor (N, K, H, W) is accepted when its H and W axes walk the pixels with one
stride: NCHW-contiguous (stride 1) and channels-last (stride K) both do, slices along N too.
Kernels take (stride_n, stride_k, stride_hw) and never copy; outputs are allocated in their
input's layout, so channels-last activations get channels-last gradients.

Dot operands. Compiled, tl.dot runs on the tensors' own dtype: bf16 tiles use the bf16 tensor
cores with fp32 accumulation, fp32 tiles run at FP32_PRECISION ("tf32": the bench sets
torch.set_float32_matmul_precision("high") so the torch baselines use TF32 too). The
interpreter has no bf16 dot, so there (UPCAST=INTERPRET) tiles are cast to fp32 first, which is
exact.
"""
from __future__ import annotations

import os

import torch


def too_old(version):
    """Why a Triton of this version cannot run the kernels, or "" if it can."""
    # tl.dot(input_precision=...) and the autotuner's prune hook arrived in Triton 3.0.
    major = version.split(".")[0]
    return "" if major.isdigit() and int(major) >= 3 else \
        f"Triton {version} is too old; the kernels need Triton >= 3.0"


try:
    import triton
    import triton.language as tl
    UNAVAILABLE = too_old(getattr(triton, "__version__", "unknown"))
except ImportError as e:
    triton = tl = None
    UNAVAILABLE = f"Triton cannot be imported ({e})"
if UNAVAILABLE:
    triton = tl = None


def _interpreting():
    # triton.knobs is recent (3.4); older releases read the variable itself at decoration time.
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is not None and hasattr(runtime, "interpret"):
        return bool(runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# Triton picks the interpreter when a kernel is decorated, so it is fixed at import time too.
INTERPRET = triton is not None and _interpreting()
FP32_PRECISION = "tf32"
DTYPES = (torch.float32, torch.bfloat16)


class Kernel:
    """A Triton kernel (a plain function, jitted here), autotuned over `configs` on the GPU, keyed
    on the argument names in `key` and, as Triton always does, on the tensors' dtypes; under the
    interpreter, which cannot time anything, it runs `configs[0]` alone. `prune(configs,
    named_args, **kwargs)` drops configs that cannot fit the shapes. Every launch in kernels/
    goes through __call__."""

    def __init__(self, fn, configs, key=(), prune=None):
        self.tuned = triton is not None and not INTERPRET and len(configs) > 1
        # The configs a launch may pick: callers size per-program buffers for the smallest tiles.
        self.candidates = configs if self.tuned else configs[:1]
        self.configs = configs
        if triton is None:
            self.fn = fn
        elif self.tuned:
            self.fn = triton.autotune(configs, key=list(key),
                                      prune_configs_by={"early_config_prune": prune} if prune else None)(
                triton.jit(fn))
        else:
            self.fn = triton.jit(fn)

    def __call__(self, grid, *args, **kwargs):
        """Launch on `grid` (a tuple, or a function of the meta-parameters) -> the meta-parameters used."""
        if self.tuned:
            self.fn[grid](*args, **kwargs)
            return self.fn.best_config.kwargs
        cfg = self.configs[0]
        self.fn[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return cfg.kwargs


def configs(space):
    """triton.Config list from (meta-parameters, num_warps, num_stages) triples."""
    if triton is None:
        return []
    return [triton.Config(dict(k), num_warps=w, num_stages=s) for k, w, s in space]


def kernel(space, key=(), prune=None):
    """Decorator, the kernels' @triton.jit: the function becomes a Kernel over `space`, a list of
    (meta-parameters, num_warps, num_stages) whose first entry is the one the interpreter runs."""
    return lambda fn: Kernel(fn, configs(space), key, prune)


def empty(shape, device, dtype=torch.float32, poison=False):
    """torch.empty; every kernel output goes through here. poison=True (the tests) fills it with
    NaN, so an element no program wrote shows up."""
    out = torch.empty(shape, device=device, dtype=dtype)
    return out.fill_(float("nan")) if poison else out


def empty_like(t, device=None, poison=False):
    """An output shaped and laid out like t (channels-last stays channels-last), on `device`
    (default t's; t may be a meta tensor that only remembers the layout); NaN-filled if poison."""
    out = torch.empty_like(t, device=device or t.device)
    return out.fill_(float("nan")) if poison else out


def like(t):
    """A meta tensor with t's shape, dtype and layout: what an autograd Function keeps of an input
    it only needs in order to allocate that input's gradient."""
    return torch.empty_like(t, device="meta")


def next_pow2(n, lo=16):
    # tl.dot needs every block dimension >= 16, and tl.arange needs powers of two.
    return max(lo, triton.next_power_of_2(n))


def hw_stride(t):
    """The stride that walks the H·W pixels of a 4-D tensor in row-major order, or None if none does."""
    H, W = t.shape[2:]
    sh, sw = t.stride(2), t.stride(3)
    if H == 1:
        return sw
    if W == 1:
        return sh
    return sw if sh == W * sw else None


def strides(t):
    """(stride_n, stride_k, stride_hw) of a 4-D tensor whose pixels hw_stride can walk."""
    return t.stride(0), t.stride(1), hw_stride(t)


def sm_count(device):
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs one by one)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


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
    if rank == 4 and hw_stride(t) is None:
        raise ValueError(f"{name} must walk H and W with one stride (NCHW or channels-last), "
                         f"got strides {t.stride()} (call .contiguous())")


def check_same(names, tensors):
    """All tensors share one dtype and one device, and that device can run the kernels."""
    if triton is None:
        why = f" ({UNAVAILABLE})" if UNAVAILABLE else ""
        raise RuntimeError(f"kernels need Triton >= 3.0 (pip install triton){why}; use the torch ops instead")
    first = tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != first.dtype:
            raise TypeError(f"{name} is {t.dtype} but {names[0]} is {first.dtype}; pass one dtype")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {names[0]} is on {first.device}")
    if first.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{names[0]} is on {first.device}; Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 set before triton is imported)")


@kernel([({"BLOCK_M": 128}, 4, 1)])
def _reduce_kernel(
    part_ptr,  # (B, J, M) fp32 partial sums, contiguous
    bias_ptr,  # (M,) bias, any float dtype; read only if HAS_BIAS
    out_ptr,  # (B, M) out, contiguous, its own dtype
    J, M,  # partials per output, outputs per row
    s_bias,  # bias stride
    scale,  # fp32 factor applied to each sum
    HAS_BIAS: tl.constexpr,  # add bias[i]
    BLOCK_M: tl.constexpr,  # outputs per program
):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = i < M
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j in range(J):  # fixed order: the result does not depend on how programs were scheduled
        acc += tl.load(part_ptr + (b * J + j) * M + i, mask=ok, other=0.0)
    out = acc * scale
    if HAS_BIAS:
        out += tl.load(bias_ptr + i * s_bias, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * M + i, out.to(out_ptr.dtype.element_ty), mask=ok)


def reduce_partials(part, scale, bias=None, poison=False):
    """The epilogue of every kernel with per-program partials: part (B, J, M) fp32 ->
    scale * part.sum(1) (+ bias) as (B, M) fp32, one launch, summed in a fixed order (no atomics)."""
    B, J, M = part.shape
    out = empty((B, M), part.device, poison=poison)
    _reduce_kernel(lambda meta: (B, triton.cdiv(M, meta["BLOCK_M"])), part,
                   part if bias is None else bias, out, J, M, 0 if bias is None else bias.stride(0),
                   scale, HAS_BIAS=bias is not None)
    return out
