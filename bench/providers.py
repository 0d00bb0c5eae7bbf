"""The formulations the bench races, one `Op` per group of rows.

    numpy           the float64 reference (minimal_amkp.reference), forward only, on the CPU
    torch_naive     the paper's order of operations, written here: materialise X ⊙ M̂_c
                    (N, C, D, H, W), then GAP and the branch product; for kp the difference fa - fb
    torch           minimal_amkp.ops on the torch backend: what training runs without the kernels
    compile_*       torch.compile of that, modes "default" and "max-autotune-no-cudagraphs" (the
                    bench captures every provider in a CUDA graph itself, or none)
    triton          minimal_amkp.ops on the triton backend: the kernels exactly as training calls them
    triton_unfused  (am_step only) ops.branch_logits + ops.kp_layer_loss on the kernels: the AM step
                    without the fused backward, to show what folding the KP gradient into dX buys

Ops, and what each pass times:
    masked_cam   fwd: ops.cam under no_grad, the mining CAM pass; fwd+bwd: ops.branch_logits and
                 its backward into x, w, b, the training use (logits only, no CAM written)
    masked_gap   ops.masked_gap, g(X̂_c) alone (kernels.masked_gap on the triton backend; training
                 does not use it)
    kp_distance  ops.kp_layer_loss; backward into fb only (N_A is frozen)
    am_step      ops.am_step, the logits and the KP distance at X of one AM step (n/N = 1/8 erased
                 images), and the backward of both into x, w, b
Every provider of an op takes the same tensors, in the layout the bench was asked for (training on
a GPU runs channels-last); the ones built on minimal_amkp.ops take the backend as the keyword
`backend`, which `function` binds. `extra_bytes` says how much a provider materialises, so the
bench can skip the ones that would not fit under --max-gb.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from kernels import am_step, kp_distance, masked_cam, masked_gap
from minimal_amkp import ops
from minimal_amkp import reference as R

BACKEND = {"torch": "torch", "triton": "triton", "triton_unfused": "triton"}  # of the ops-based providers
COMPILE_MODES = {"default": None, "max-autotune": "max-autotune-no-cudagraphs"}
_compiled = {}  # (op, provider, backward) -> its torch.compile'd callable, kept from shape to shape


def cam_naive(x, m, w):
    x_hat = x[:, None] * m[:, :, None]  # (N, C, D, H, W)
    return torch.einsum("ncdhw,cd->nchw", x_hat, w)  # (N, C, H, W)


def logits_naive(x, m, w, b):
    x_hat = x[:, None] * m[:, :, None]  # (N, C, D, H, W)
    return (x_hat.mean((3, 4)) * w).sum(-1) + b  # (N, C)


def gap_naive(x, m):
    return (x[:, None] * m[:, :, None]).mean((3, 4))  # (N, C, D)


def kp_naive(fa, fb):
    return ((fa - fb).mean((2, 3)) ** 2).sum() / fa.shape[0]


def n_erased(N):
    return N // 8  # the paper's n/N = 0.125


def step_naive(x, m, w, b, xa):
    return logits_naive(x, m, w, b), kp_naive(xa, x[n_erased(x.shape[0]):])


def step_ops(x, m, w, b, xa, backend):
    return ops.am_step(x, m, w, b, xa, n_erased(x.shape[0]), backend=backend)


def step_unfused(x, m, w, b, xa, backend):
    n0 = n_erased(x.shape[0])
    return ops.branch_logits(x, m, w, b, backend=backend), ops.kp_layer_loss(xa, x[n0:], backend=backend)


def step_numpy(x, m, w, b, xa):
    return R.branch_logits(x, m, w, b), R.kp_layer_loss(xa, x[n_erased(x.shape[0]):])


@dataclass
class Op:
    name: str
    inputs: Callable  # (shape, dtype, device, generator, memory_format) -> tensors; shape = (N, C, D, H, W)
    grad_inputs: tuple  # which inputs the fwd+bwd pass differentiates
    forward: dict  # provider -> callable on the tensors (ops-based: and backend=), timed under no_grad
    train: dict  # provider -> the same, whose output `loss` turns into a scalar
    loss: Callable  # train output -> scalar to backpropagate
    bytes_moved: Callable  # (shape, itemsize, backward) -> bytes of the model
    extra_bytes: Callable  # (provider, shape, itemsize, backward) -> bytes it materialises


def _masked_inputs(shape, dtype, device, gen, fmt, with_wb, with_xa=False):
    N, C, D, H, W = shape
    x = torch.randn((N, D, H, W), generator=gen).to(device, dtype, memory_format=fmt)
    m = (torch.rand((N, C, H, W), generator=gen) < 0.7).to(device, dtype)
    if not with_wb:
        return x, m
    w = torch.randn((C, D), generator=gen).to(device, dtype)
    b = torch.randn(C, generator=gen).to(device, dtype)
    if not with_xa:
        return x, m, w, b
    xa = torch.randn((N - n_erased(N), D, H, W), generator=gen).to(device, dtype, memory_format=fmt)
    return x, m, w, b, xa


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


def _kp_inputs(s, dt, dev, g, fmt):
    return tuple(torch.randn((s[0], s[2], s[3], s[4]), generator=g).to(dev, dt, memory_format=fmt)
                 for _ in range(2))


OPS = {
    "masked_cam": Op(
        "masked_cam", lambda s, dt, dev, g, fmt: _masked_inputs(s, dt, dev, g, fmt, True), (0, 2, 3),
        dict(numpy=lambda x, m, w, b: R.cam(x, m, w), torch_naive=lambda x, m, w, b: cam_naive(x, m, w),
             torch=lambda x, m, w, b, backend: ops.cam(x, m, w, backend=backend)),
        dict(torch_naive=logits_naive, torch=ops.branch_logits),
        lambda out: out.float().sum(),
        lambda s, it, bwd: masked_cam.bytes_moved(*s, itemsize=it, backward=bwd),
        _masked_extra),
    "masked_gap": Op(
        "masked_gap", lambda s, dt, dev, g, fmt: _masked_inputs(s, dt, dev, g, fmt, False), (0,),
        dict(numpy=lambda x, m: R.gap(R.erase(x, m)), torch_naive=gap_naive, torch=ops.masked_gap),
        dict(torch_naive=gap_naive, torch=ops.masked_gap),
        lambda out: out.float().sum(),
        lambda s, it, bwd: masked_gap.bytes_moved(*s, itemsize=it, backward=bwd),
        _masked_extra),
    "kp_distance": Op(
        "kp_distance", _kp_inputs,
        (1,),  # fa comes from the frozen N_A: only fb gets a gradient in training
        dict(numpy=R.kp_layer_loss, torch_naive=kp_naive, torch=ops.kp_layer_loss),
        dict(torch_naive=kp_naive, torch=ops.kp_layer_loss),
        lambda out: out.float(),
        lambda s, it, bwd: kp_distance.bytes_moved(s[0], s[2], s[3], s[4], itemsize=it, backward=bwd, grads=1),
        _kp_extra),
    "am_step": Op(
        "am_step", lambda s, dt, dev, g, fmt: _masked_inputs(s, dt, dev, g, fmt, True, True), (0, 2, 3),
        dict(numpy=step_numpy, torch_naive=step_naive, torch=step_ops),
        dict(torch_naive=step_naive, torch=step_ops, triton_unfused=step_unfused),
        lambda out: out[0].float().sum() + out[1].float(),
        lambda s, it, bwd: am_step.bytes_moved(*s, itemsize=it, backward=bwd),
        lambda p, s, it, bwd: _masked_extra(p, s, it, bwd) + _kp_extra(p, s, it, bwd)),
}
for _op in OPS.values():  # the ops' torch entries are also what compile_* and triton run
    _op.forward.setdefault("triton", _op.forward["torch"])
    _op.train.setdefault("triton", _op.train["torch"])


def providers(op, backward):
    """Provider names of one pass, in table order."""
    fns = op.train if backward else op.forward
    names = [p for p in ("numpy", "torch_naive", "torch") if p in fns]
    names += [f"compile_{m}" for m in COMPILE_MODES]
    return names + [p for p in ("triton_unfused", "triton") if p in fns]


def _on(fn, backend):
    return lambda *tensors: fn(*tensors, backend=backend)


def function(op, provider, backward):
    """What one provider runs for one pass: a callable on the op's tensors, bound to its backend."""
    fns = op.train if backward else op.forward
    if provider.startswith("compile_"):
        key = (op.name, provider, backward)
        if key not in _compiled:
            # Every shape is a recompile (dynamic=False), and Dynamo counts them per Python function
            # across all wrappers (all of them wrap _on's lambda): room for an op's shapes, passes and
            # modes, and an error rather than a silent fall-back to eager should they not fit.
            config = torch._dynamo.config
            config.cache_size_limit = max(config.cache_size_limit, 64)  # recompile_limit's name before 2.7
            if hasattr(config, "fail_on_recompile_limit_hit"):
                config.fail_on_recompile_limit_hit = True
            _compiled[key] = torch.compile(_on(fns["torch"], "torch"), dynamic=False,
                                           mode=COMPILE_MODES[provider.removeprefix("compile_")])
        return _compiled[key]
    return _on(fns[provider], BACKEND[provider]) if provider in BACKEND else fns[provider]


def forget_compiled():
    """Drop the compiled callables and Dynamo's traces (Inductor's caches on disk stay): between
    ops, so that the recompile limit counts one op's shapes."""
    _compiled.clear()
    torch._dynamo.reset()


def as_numpy(tensors):
    return [t.detach().double().cpu().numpy() for t in tensors]
