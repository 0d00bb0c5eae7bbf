"""Compile the kernel variants the ops reach, for a GPU architecture, on a machine without a GPU.

    python -m kernels.compile_check [--arch 90] [--all-configs | --quick]

Triton's front end and the ptxas it ships need no device, so the compiled paths the interpreter
never takes (native bf16 tl.dot, TF32 fp32 dots, constexpr branches with UPCAST off, the
autotuner's other tiles) are type-checked and lowered to cubin here. The ops are driven with
small CPU tensors in both dtypes and both layouts, with and without the D split, and every
launch compiles its kernel instead of running it: the first and the last config of its space
(all of them with --all-configs). This shows that the kernels compile for that GPU, not that
they are right or fast: the tests check values (interpreter or GPU), the bench speed.
Run it without TRITON_INTERPRET (the kernels must be decorated for compilation).
"""
import argparse
import itertools
import sys
import time

import torch

from . import am_step, kp_distance, launch, masked_cam, masked_gap

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _signature(fn, args, constexprs):
    """Triton's signature of a launch; like the JIT, an int argument equal to 1 (a unit stride)
    becomes a constant, which is how the compiler learns which axis is contiguous."""
    sig = {}
    for name, a in zip(fn.arg_names, args):
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + DTYPES[a.dtype]
        elif isinstance(a, int) and a == 1:
            sig[name], constexprs[name] = "constexpr", 1
        elif isinstance(a, int):
            sig[name] = "i64" if abs(a) >= 2**31 else "i32"
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} is {type(a).__name__}")
    return sig | {name: "constexpr" for name in constexprs}


def compiler(arch, configs, seen):
    """A replacement for launch.Kernel.__call__ that compiles instead of launching, for the
    "all", "first" or first and last ("ends") configs of each kernel's space."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)

    def compile_launch(self, grid, *args, **kwargs):
        fn = self.fn.fn if self.tuned else self.fn  # the autotuner wraps the JITFunction
        picked = {"all": self.configs, "first": self.configs[:1], "ends": [self.configs[0], self.configs[-1]]}
        for cfg in picked[configs]:
            constexprs = kwargs | cfg.kwargs
            if "UPCAST" in constexprs:  # the launchers saw INTERPRET (below); compiled code does not upcast
                constexprs["UPCAST"] = False
            sig = _signature(fn, args, constexprs)
            key = (fn.__name__, repr(sorted(sig.items())), repr(sorted(constexprs.items())), cfg.num_warps,
                   cfg.num_stages)
            if key in seen:
                continue
            t0 = time.perf_counter()
            launch.triton.compile(ASTSource(fn, sig, dict(constexprs)), target=target,
                                  options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            seen[key] = time.perf_counter() - t0
        return self.configs[0].kwargs

    return compile_launch


def drive(quick):
    """Every op, forward and backward, on tiny CPU tensors in each dtype and layout (quick: the
    AM step alone, in bf16 and channels-last, as training on a GPU runs it)."""
    layouts = (torch.channels_last, torch.contiguous_format)
    cases = [(torch.bfloat16, torch.channels_last, None)] if quick else itertools.product(DTYPES, layouts, (None, 3))
    for dtype, fmt, split in cases:
        saved, masked_cam.SPLIT = masked_cam.SPLIT, split
        try:
            x = torch.randn(4, 96, 6, 6, dtype=dtype).to(memory_format=fmt).requires_grad_()
            xa = torch.randn(3, 96, 6, 6, dtype=dtype).to(memory_format=fmt)
            m = torch.ones(4, 14, 6, 6, dtype=dtype)
            w, b = (torch.randn(s, dtype=dtype, requires_grad=True) for s in ((14, 96), (14,)))
            logits, l_kp = am_step.am_step(x, m, w, b, xa, 1)
            torch.autograd.grad(logits.sum() + l_kp, (x, w, b))
            if quick:
                continue
            cam, logits = masked_cam.masked_cam_logits(x, m, w, b)
            torch.autograd.grad((cam.float().sum(), logits.sum()), (x, w, b))
            if split is None:
                torch.autograd.grad(masked_gap.masked_gap(x, m).float().sum(), x)
                fa = xa.requires_grad_()
                torch.autograd.grad(kp_distance.kp_distance(fa, x[1:]), (fa, x))
        finally:
            masked_cam.SPLIT = saved


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m kernels.compile_check", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability × 10 (80 A100, 90 H100/H200)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--all-configs", action="store_true", help="every autotuner config, not the first and last")
    how.add_argument("--quick", action="store_true", help="the AM step in bf16 channels-last, first config only")
    args = p.parse_args(argv)
    if launch.triton is None:
        p.error(f"needs Triton: {launch.UNAVAILABLE}")
    if launch.INTERPRET:
        p.error("TRITON_INTERPRET is set: the kernels were decorated for the interpreter; unset it")
    seen = {}
    configs = "all" if args.all_configs else "first" if args.quick else "ends"
    call, launch.Kernel.__call__ = launch.Kernel.__call__, compiler(args.arch, configs, seen)
    interpret, launch.INTERPRET = launch.INTERPRET, True  # CPU tensors pass the launchers' device check
    try:
        drive(args.quick)
    finally:
        launch.Kernel.__call__, launch.INTERPRET = call, interpret
    names = sorted({k[0] for k in seen})
    print(f"compiled {len(seen)} variants of {len(names)} kernels for sm_{args.arch} in "
          f"{sum(seen.values()):.1f} s: {', '.join(names)}")


if __name__ == "__main__":
    sys.exit(main())
