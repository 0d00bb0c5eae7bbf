"""One job on several processes and machines: torchrun's process group, and `TorchRun`, the runner over it.

    torchrun --nproc-per-node=K -m minimal_amkp ...        (docs/distributed.md)

torchrun starts K copies of the program and tells each its place through RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Started without them (plain `python -m minimal_amkp`)
the world is one process, no group is created and `session` yields the core's plain
`runner.Runner`, so the single-process path runs no collective at all. The method never imports
this module: it is handed a runner (minimal_amkp/runner.py says what each call means).

What makes K processes compute what one process computes:
- Training: every rank builds the same global minibatches (their order is a function of
  (seed, phase, epoch), never of K) and takes its contiguous `shard` of each. DDP averages the
  gradients over ranks; each rank scales its local mean loss by `share` = K·n_local/n_global,
  so the average is the gradient of the global mean even when the minibatch does not divide
  evenly by K.
- Batch norm normalises with the statistics of the global minibatch (`sync_batch_norm`):
  torch's SyncBatchNorm on CUDA; on CPU, where SyncBatchNorm refuses to run (torch 2.13 raises
  "SyncBatchNorm expected input tensor to be on GPU"), `GlobalBatchNorm`, the same maths with
  gloo all-reduces. So 1 and K processes differ only by float rounding of the reductions.
- CAMs, mask updates and test scores are computed by image, each rank on its `shard` of the
  list, and `gather`ed back into the global order on every rank.
- Files are written by rank 0 only (`on_main`): the others wait for it and receive its result,
  so rank 0's folder is the single source of truth and the other machines need none of it.
"""
import contextlib
import datetime
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from minimal_amkp.config import RunError
from minimal_amkp.runner import Runner

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Two timeouts. A crashed rank is not what they wait for: torchrun ends the whole group as
# soon as one process fails. They bound a HUNG rank (stopped, deadlocked, its machine frozen),
# which torchrun cannot see. Training collectives (gradients, batch-norm sums, gathers) wait
# only for the slowest rank's share of one step, so they give up after AMKP_COLLECTIVE_TIMEOUT
# seconds (default 600): the job ends with one line within minutes. Rank 0 alone may spend
# long stretches on work the others wait for in `on_main` (checking 112,120 PNGs, generating
# the phantom, writing the report): that wait goes over a second group and may last 2 hours.
TIMEOUT_VARIABLE = "AMKP_COLLECTIVE_TIMEOUT"
TIMEOUT = datetime.timedelta(seconds=600)
MAIN_TIMEOUT = datetime.timedelta(hours=2)
_main_group = [None]                                 # the gloo group of on_main, while a session runs


def timeout():
    """The training collectives' timeout: AMKP_COLLECTIVE_TIMEOUT seconds, or TIMEOUT."""
    text = os.environ.get(TIMEOUT_VARIABLE)
    if text is None:
        return TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 1 <= seconds <= MAIN_TIMEOUT.total_seconds():
        raise RunError(f"{TIMEOUT_VARIABLE} must be a number of seconds in [1, {MAIN_TIMEOUT.total_seconds():.0f}]; "
                       f"got {text!r}")
    return datetime.timedelta(seconds=seconds)


def env():
    """(rank, world size, local rank) from torchrun's variables; (0, 1, 0) without them."""
    given = {k: os.environ.get(k) for k in ENV}
    if given["WORLD_SIZE"] is None and given["RANK"] is None:
        return 0, 1, 0
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise RunError(f"{', '.join(missing)} not set: start several processes with torchrun "
                       "(torchrun --nproc-per-node=K -m minimal_amkp ...), which sets them all")
    try:
        rank, world, local = (int(given[k]) for k in ENV[:3])
    except ValueError:
        raise RunError(f"RANK={given['RANK']!r}, WORLD_SIZE={given['WORLD_SIZE']!r}, "
                       f"LOCAL_RANK={given['LOCAL_RANK']!r}: expected whole numbers") from None
    if not (world >= 1 and 0 <= rank < world and 0 <= local):
        raise RunError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: need 0 <= RANK < WORLD_SIZE")
    return rank, world, local


def rank():
    if dist.is_initialized():
        return dist.get_rank()
    given = os.environ.get("RANK", "0")              # env() reports a broken value; this only reads
    return int(given) if given.isdigit() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    """True in the one process that prints progress and writes files."""
    return rank() == 0


def _comm_device():
    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


@contextlib.contextmanager
def session(device, progress):
    """Join torchrun's process group for the run and leave it after; yields this process's runner.

    NCCL when `device` is CUDA (each process takes GPU LOCAL_RANK of its machine), gloo on CPU.
    One process (no torchrun) gets the plain runner.Runner; progress(label, total) draws the
    progress lines of rank 0.
    """
    rank_, world_, local = env()
    if world_ == 1:
        yield Runner(device, progress)
        return
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RunError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} CUDA "
                           "device(s): start at most that many processes per machine (--nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    # torchrun's store outlives an elastic restart, and a rank reads a peer's address from it as
    # soon as the key exists: a restarted rank could read the address of the process it replaces
    # and fail to connect (seen with torch 2.13 and gloo). Each start gets keys of its own.
    store, _, _ = next(dist.rendezvous("env://", rank=rank_, world_size=world_, timeout=timeout()))
    store = dist.PrefixStore(f"minimal_amkp/start{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank_, world_size=world_,
                            timeout=timeout(), device_id=device if device.type == "cuda" else None)
    # on_main's objects travel on the CPU, over gloo whatever the training backend.
    _main_group[0] = dist.new_group(backend="gloo", timeout=MAIN_TIMEOUT)
    try:
        yield TorchRun(device, progress)
    finally:
        _main_group[0] = None
        dist.destroy_process_group()


def lost_peer(error):
    """Whether `error` says that talking to the other processes failed (a peer died or hung).

    Timeouts arrive as DistError; a peer that died mid-collective as gloo's or NCCL's RuntimeError.
    """
    text = str(error)
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and ("gloo/transport" in text or "NCCL" in text))


class _Method(nn.Module):
    """`model.<name>` as a module's forward: DDP all-reduces gradients only for graphs that its
    own forward built, and training calls more than one method of the model."""

    def __init__(self, model, name):
        super().__init__()
        self.model, self.name = model, name

    def forward(self, *args):
        return getattr(self.model, self.name)(*args)


class TorchRun(Runner):
    """The runner of one of torchrun's K processes (see runner.Runner for what each call means)."""

    def __init__(self, device, progress):
        super().__init__(device, progress)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def average(self, loss):
        """The mean of a scalar over ranks as a float: with `share`-scaled losses, the global loss."""
        value = loss.detach().double().reshape(1).to(_comm_device())
        dist.all_reduce(value)
        return (value / self.world).item()

    def gather(self, rows):
        """Concatenate every rank's `rows` (n_r, ...) in rank order, on every rank.

        Each rank passes its results for its `shard` of a list, so the result is in the list's order.
        The n_r may differ (one more on the first ranks, zero for some); trailing shape and dtype may
        not. A tensor comes back as a CPU tensor, an ndarray as an ndarray.
        """
        local = torch.as_tensor(rows)
        dev = _comm_device()
        shape = torch.zeros(9, dtype=torch.int64, device=dev)            # ndim, then up to 8 sizes
        if local.dim() > 8:
            raise ValueError(f"gather takes arrays of at most 8 dimensions, got shape {tuple(local.shape)}")
        shape[0], shape[1:1 + local.dim()] = local.dim(), torch.tensor(local.shape)
        shapes = [torch.empty_like(shape) for _ in range(self.world)]
        dist.all_gather(shapes, shape)
        shapes = [tuple(s[1:1 + s[0]].tolist()) for s in shapes]
        if any(s[1:] != shapes[0][1:] or len(s) != len(shapes[0]) for s in shapes):
            raise ValueError(f"gather: ranks hold rows of different shapes {shapes}; only the first dimension may differ")
        longest = max(s[0] for s in shapes)
        padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=dev)
        padded[:len(local)] = local
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded)
        whole = torch.cat([o[:s[0]] for o, s in zip(out, shapes)]).cpu()
        return whole.numpy() if isinstance(rows, np.ndarray) else whole

    def on_main(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on rank 0 alone; every rank returns its result or raises its error.

        The others wait meanwhile (up to MAIN_TIMEOUT), so this is also the barrier behind every
        file rank 0 writes.
        A RunError (a DataError is one) reaches every rank as itself, marked `shared` (every rank raises it,
        rank 0 alone reports it); any other failure of rank 0 reaches the others as a RuntimeError.
        """
        box, failure = [None], None
        if self.is_main:
            try:
                box[0] = ("ok", fn(*args, **kwargs))
            except RunError as e:
                box[0] = ("error", e)
            except Exception as e:
                box[0], failure = ("crash", f"{type(e).__name__}: {e}"), e
        dist.broadcast_object_list(box, src=0, group=_main_group[0], device=torch.device("cpu"))
        kind, value = box[0]
        if failure is not None:
            raise failure
        if kind == "crash":
            raise RuntimeError(f"rank 0 failed: {value}")
        if kind == "error":
            value.shared = True
            raise value
        return value

    def broadcast_module(self, module):
        """Overwrite parameters and buffers with rank 0's: one model on every rank, bit for bit."""
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t, src=0)
        return module

    def replicate(self, model, name="__call__"):
        """`model.<name>` as a callable whose gradients are averaged over ranks (DDP).

        Build it after deciding which parameters train (DDP registers those that require grad then):
        building also copies rank 0's parameters and buffers to every rank.
        """
        return DistributedDataParallel(_Method(model, name), gradient_as_bucket_view=True)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward sums the gradients too: every rank's loss depends on the total."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global minibatch over all ranks.

    The CPU stand-in for SyncBatchNorm: mean μ = Σx / M, then the biased variance σ² = Σ(x − μ)² / M
    about it (two passes, as BatchNorm2d computes them), with sums over the N, H, W axes of every
    rank and M their total count; y = (x − μ)/√(σ² + eps)·γ + β; the running variance takes the
    unbiased σ²·M/(M − 1). Eval mode, or one process, is plain BatchNorm2d.
    """

    def forward(self, x):                                            # x (N, C, H, W)
        if not self.training or world() == 1:
            return super().forward(x)
        per = lambda t: t[None, :, None, None]
        count = x.new_full((1,), x.numel() / x.shape[1])
        s = _SumOverRanks.apply(torch.cat([x.sum((0, 2, 3)), count]))   # (C + 1,)
        m = s[-1].detach()
        mean = s[:-1] / m                                             # (C,)
        var = _SumOverRanks.apply(((x - per(mean)) ** 2).sum((0, 2, 3))) / m
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            f = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
            with torch.no_grad():
                self.running_mean.lerp_(mean, f)
                self.running_var.lerp_(var * m / (m - 1), f)
        y = (x - per(mean)) * per(torch.rsqrt(var + self.eps))
        return y * per(self.weight) + per(self.bias) if self.affine else y


def sync_batch_norm(model, device):
    """Make every BatchNorm2d of `model` normalise over the global minibatch when several ranks train.

    SyncBatchNorm on CUDA (new modules holding the same parameters and buffers); on CPU the
    modules become GlobalBatchNorm in place, which changes forward only. Returns the model.
    """
    if world() == 1:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for mod in model.modules():
        if type(mod) is nn.BatchNorm2d:
            mod.__class__ = GlobalBatchNorm
    return model
