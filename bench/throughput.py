"""Images per second of ResNet-MSA on the device at hand, torch vs triton backend.

Two rows per backend, the paper's model (ModelConfig defaults) at 512 px:
    train  one attention-mining step as mining runs it: N_A and N_B forward on N images (N/8
           erased, KP full), loss (6), backward, an SGD step
    cam    one CAM pass (eq. 7, the 8 box classes) under no_grad, as mine.compute_cams runs it
each with the hours a pass over all of ChestX-ray14 (112,120 images) takes at that rate. On CUDA
the model runs as the CLI runs it (channels-last, bf16 autocast, cuDNN benchmark), timed as whole
eager steps with the device synchronised (no CUDA graphs: an optimizer step is part of the row).
--quick: N = 16 on a GPU, 2 on a CPU; otherwise 64 (the paper's minibatch) and 4. On a CPU the
triton backend is not timed: the interpreter is not a speed path. A row's backend is given to
both networks (ResNetMSA.backend), as the CLI gives its --backend.

`python -m bench.throughput [--quick]` prints the rows alone (bench.gpu_check runs it so); `python
-m bench` ends with them and writes them to bench/results/.
"""
import argparse
import statistics
import time

import torch

from minimal_amkp.config import ModelConfig
from minimal_amkp.objective import am_loss, frozen_copy
from minimal_amkp.model import ResNetMSA
from minimal_amkp.loop import autocast, to_device

IMAGES = 112_120  # ChestX-ray14
SIZE = 512  # the paper's input side; X is 32×32


def _median_s(fn, device, reps):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn()  # warm-up: cuDNN algorithm search, Triton compilation and autotuning
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(device, quick):
    """Rows: dict(kind, backend, N, size, ms, images_per_s, full_pass_h, note)."""
    gpu = device.type == "cuda"
    N = (16 if quick else 64) if gpu else (2 if quick else 4)
    reps = 3 if quick else 10
    torch.manual_seed(0)
    model = ResNetMSA(ModelConfig()).to(device)
    if gpu:
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
    model_a = frozen_copy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = to_device(torch.rand(N, 1, SIZE, SIZE), device)
    y = (torch.rand(N, 14) < 0.3).float().to(device)
    m = torch.ones(N, 14, SIZE // 16, SIZE // 16, device=device)
    m[:N // 8 or 1, :8] = (torch.rand(N // 8 or 1, 8, SIZE // 16, SIZE // 16) < 0.7).float().to(device)

    def train_step():
        model.train()
        with autocast(device):
            loss, _, _ = am_loss(model, model_a, x, y, m, max(1, N // 8), "full", 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def cam_pass():
        model.eval()
        with autocast(device):
            model.cam(x, m[:, :8], 8)

    rows = []
    for backend in ("torch", "triton"):
        for kind, fn in (("train", train_step), ("cam", cam_pass)):
            row = dict(kind=kind, backend=backend, N=N, size=SIZE, ms="", images_per_s="", full_pass_h="", note="")
            if backend == "triton" and not gpu:
                rows.append(row | dict(note="skipped: needs a CUDA device; the interpreter is not a speed path"))
                continue
            model.backend = model_a.backend = backend
            try:
                t = _median_s(fn, device, reps)
            except Exception as e:  # a backend that cannot run here is a finding, not a crash
                rows.append(row | dict(note=f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"))
                continue
            rows.append(row | dict(ms=f"{t * 1e3:.1f}", images_per_s=f"{N / t:.2f}",
                                   full_pass_h=f"{IMAGES * t / N / 3600:.2f}"))
            print(f"throughput   {kind:5s} {backend:6s} N={N} {SIZE}px {t * 1e3:10.1f} ms  {N / t:8.2f} img/s  "
                  f"{IMAGES:,} images: {IMAGES * t / N / 3600:.2f} h", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="N = 16 on a GPU (2 on a CPU), 3 repetitions")
    args = p.parse_args(argv)
    for row in run(torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.quick):
        if row["note"]:  # run() prints the rows it measured
            print(f"throughput   {row['kind']:5s} {row['backend']:6s} {row['note']}", flush=True)


if __name__ == "__main__":
    main()
