"""The run's one checkpoint, rewritten atomically after every epoch and every AM round.

It holds where the run stands (phase index, epochs done in it; index len(cli.plan) is attention
mining), the model N_B, the optimizer of the current classification phase, once mining has
started the state `mine.attention_mining` hands its `save` (N_A, its optimizer, the masks
M_0..M_{t-1}, CAMs H_1..H_t and round records so far), and the torch RNG state. Loading uses weights_only=True: only tensors,
numbers, strings and containers of them.
"""
import os

import torch

from minimal_amkp.atomic import atomic_open
from minimal_amkp.config import RunError

NAME = "checkpoint.pt"
VERSION = 2


def path(out):
    return os.path.join(out, NAME)


def save(out, *, config, phase, epoch, model, opt, mining):
    state = dict(version=VERSION, config=config, phase=phase, epoch=epoch,
                 model=model.state_dict(), optimizer=opt.state_dict() if opt is not None else None,
                 mining=mining, rng=torch.get_rng_state())
    with atomic_open(path(out), "wb") as f:
        torch.save(state, f)


def load(out):
    """The saved state dict, or None when the folder has no checkpoint yet."""
    p = path(out)
    if not os.path.exists(p):
        return None
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(f"{p}: unreadable checkpoint ({type(e).__name__}); pass --overwrite to start over") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise RunError(f"{p}: not a checkpoint of this program (version {VERSION}); pass --overwrite to start over")
    return state


def restore_model(model, sd, what):
    """load_state_dict with a one-line RunError when the checkpoint is another architecture."""
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = [line.strip() for line in str(e).splitlines() if line.strip()][1:2]
        raise RunError(f"{what}: holds another architecture ({first[0] if first else e}); "
                       "pass --overwrite to start over") from None
