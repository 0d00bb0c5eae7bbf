"""The formulations the bench races, one `Op` per kernel.

    numpy        the float64 reference (minimal_amkp.reference), forward only
    torch_naive  the paper's order of operations: materialise X ⊙ M̂_c (N, C, D, H, W), then GAP
                 and the branch product; for kp the full-size difference fa - fb
    torch_fused  the same math without the erased copies (one matmul / bmm over x)
    compile_*    torch.compile of torch_fused, modes "default" and "max-autotune"
    triton       kernels.* (CUDA only: the interpreter is a correctness tool, not a speed path)
Every provider takes the same tensors; `extra_bytes` says how much a provider materialises,
so the bench can skip the ones that would not fit under --max-gb.
"""
import importlib
from dataclasses import dataclass
from typing import Callable

import torch

import kernels
from minimal_amkp import reference as R


# The package attribute `kernels.masked_gap` is the function; the bytes models live in the modules.
_MODEL = {name: importlib.import_module(f"kernels.{name}").bytes_moved
          for name in ("masked_cam", "masked_gap", "kp_distance")}


def cam_naive(x, m, w, b):
    x_hat = x[:, None] * m[:, :, None]  # (N, C, D, H, W)
    h = torch.einsum("ncdhw,cd->nchw", x_hat, w)  # (N, C, H, W)
    return h, (x_hat.mean((3, 4)) * w).sum(-1) + b  # (N, C)


def cam_fused(x, m, w, b):
    N, D, H, W = x.shape
    h = torch.matmul(w, x.reshape(N, D, H * W)).reshape(m.shape) * m  # (N, C, H, W)
    return h, h.mean((2, 3)) + b  # (N, C)


def cam_numpy(x, m, w, b):
    return R.cam(x, m, w), R.branch_logits(x, m, w, b)


def gap_naive(x, m):
    return (x[:, None] * m[:, :, None]).mean((3, 4))  # (N, C, D)


def gap_fused(x, m):
    N, D, H, W = x.shape
    return torch.bmm(m.reshape(N, -1, H * W), x.reshape(N, D, H * W).transpose(1, 2)) / (H * W)


def gap_numpy(x, m):
    return R.gap(R.erase(x, m))


def kp_naive(fa, fb):
    return ((fa - fb).mean((2, 3)) ** 2).sum() / fa.shape[0]


def kp_fused(fa, fb):
    return ((fa.mean((2, 3)) - fb.mean((2, 3))) ** 2).sum() / fa.shape[0]


@dataclass
class Op:
    name: str
    inputs: Callable  # (shape, dtype, device, generator) -> tensors; shape = (N, C, D, H, W)
    grad_inputs: tuple  # which inputs the fwd+bwd pass differentiates
    providers: dict  # provider -> callable on the tensors
    loss: Callable  # provider output -> scalar to backpropagate
    bytes_moved: Callable  # (shape, itemsize, backward) -> bytes of the model
    extra_bytes: Callable  # (provider, shape, itemsize, backward) -> bytes it materialises


def _masked_inputs(shape, dtype, device, gen, with_wb):
    N, C, D, H, W = shape
    x = torch.randn((N, D, H, W), generator=gen).to(device, dtype)
    m = (torch.rand((N, C, H, W), generator=gen) < 0.7).to(device, dtype)
    if not with_wb:
        return x, m
    w = torch.randn((C, D), generator=gen).to(device, dtype)
    return x, m, w, torch.randn(C, generator=gen).to(device, dtype)


def _materialised(shape, itemsize, backward):
    N, C, D, H, W = shape
    return N * C * D * H * W * itemsize * (2 if backward else 1)  # x_hat, and its grad


def _masked_extra(provider, shape, itemsize, backward):
    if provider == "numpy":
        return _materialised(shape, 8, False) * 2  # x_hat and its product in float64
    return _materialised(shape, itemsize, backward) if provider == "torch_naive" else 0


def _kp_extra(provider, shape, itemsize, backward):
    N, _, K, H, W = shape
    return {"numpy": 2 * N * K * H * W * 8, "torch_naive": N * K * H * W * itemsize}.get(provider, 0)


OPS = {
    "masked_cam": Op(
        "masked_cam", lambda s, dt, dev, g: _masked_inputs(s, dt, dev, g, True), (0, 2, 3),
        dict(numpy=cam_numpy, torch_naive=cam_naive, torch_fused=cam_fused,
             triton=kernels.masked_cam_logits),
        # Training backpropagates the logits; the CAM only feeds the (non-differentiable) mask update.
        lambda out: out[1].float().sum(),
        lambda s, it, bwd: _MODEL["masked_cam"](*s, itemsize=it, backward=bwd),
        _masked_extra),
    "masked_gap": Op(
        "masked_gap", lambda s, dt, dev, g: _masked_inputs(s, dt, dev, g, False), (0,),
        dict(numpy=gap_numpy, torch_naive=gap_naive, torch_fused=gap_fused, triton=kernels.masked_gap),
        lambda out: out.float().sum(),
        lambda s, it, bwd: _MODEL["masked_gap"](*s, itemsize=it, backward=bwd),
        _masked_extra),
    "kp_distance": Op(
        "kp_distance",
        lambda s, dt, dev, g: tuple(torch.randn((s[0], s[2], s[3], s[4]), generator=g).to(dev, dt)
                                    for _ in range(2)),
        (1,),  # fa comes from the frozen N_A: only fb gets a gradient in training
        dict(numpy=R.kp_layer_loss, torch_naive=kp_naive, torch_fused=kp_fused, triton=kernels.kp_distance),
        lambda out: out.float(),
        lambda s, it, bwd: _MODEL["kp_distance"](s[0], s[2], s[3], s[4], itemsize=it, backward=bwd,
                                                 grads=1),
        _kp_extra),
}


def as_numpy(tensors):
    return [t.detach().double().cpu().numpy() for t in tensors]


def compiled(op, mode):
    """torch.compile of the fused formulation; mode "default" or "max-autotune"."""
    # Dynamo's recompile limit counts per Python function across all wrappers; start afresh.
    torch._dynamo.reset()
    return torch.compile(op.providers["torch_fused"], mode=None if mode == "default" else mode,
                         dynamic=False)

