"""The run's one checkpoint, rewritten atomically after every epoch and every AM round.

It holds where the run stands (phase index, epochs done in it; index len(classify.plan) is
attention mining), the model N_B, the optimizer of the current classification phase, once mining has
started the state `mine.attention_mining` hands its `save` (N_A, its optimizer, the masks
M_0..M_{t-1}, CAMs H_1..H_t and round records so far), the torch RNG states (CPU, and CUDA
when the run uses it), the config and a fingerprint of the data: a SHA-256 per image list (mining, train, test) over each
image's name, labels and file CRC-32. Loading uses weights_only=True (only tensors, numbers,
strings and containers of them; torch >= 2.6, whose weights_only loader has no known bypass),
then `check` refuses, in one line, a file whose structure is not what `save` writes, or whose
data or settings are not those of the run that resumes it.
"""
import hashlib
import json
import os

import torch

from minimal_amkp.run.atomic import atomic_open
from minimal_amkp.config import RunError
from minimal_amkp.mine import B, ROUND_RECORD, STATE_KEYS

NAME = "checkpoint.pt"
VERSION = 2
KEYS = ("version", "config", "data", "phase", "epoch", "model", "optimizer", "mining", "rng", "cuda_rng")
LISTS = ("mining", "train", "test")


def path(out):
    return os.path.join(out, NAME)


def fingerprint(ds, mining, train, test):
    """{list: SHA-256 hex} over each image's name, 14 labels and file CRC-32 (ds.digests), in list order."""
    out = {}
    for key, names in zip(LISTS, (mining, train, test)):
        h = hashlib.sha256()
        for name in names:
            labels = "".join(map(str, ds.entries[name].labels.tolist()))
            h.update(f"{name}\t{labels}\t{ds.digests.get(name, -1)}\n".encode())
        out[key] = h.hexdigest()
    return out


def save(out, *, config, data, phase, epoch, model, opt, mining):
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    state = dict(version=VERSION, config=config, data=data, phase=phase, epoch=epoch,
                 model=model.state_dict(), optimizer=opt.state_dict() if opt is not None else None,
                 mining=mining, rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state() if cuda else None)
    with atomic_open(path(out), "wb") as f:
        torch.save(state, f)


def load(out, **expected):
    """The saved state, or None when the folder has no checkpoint yet; with `expected`
    (the arguments of `check` after the state), checked against the run that resumes it."""
    p = path(out)
    if not os.path.exists(p):
        return None
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(f"{p}: unreadable checkpoint ({type(e).__name__}); pass --overwrite to start over") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise RunError(f"{p}: not a checkpoint of this program (version {VERSION}); pass --overwrite to start over")
    if expected:
        check(state, p, **expected)
    return state


def _json(x):
    return json.loads(json.dumps(x))


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _state_dict(sd):
    return isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())


def _problem(state, phases, mine, n_mining, h, config, ignored, data):
    """What makes `state` unusable for this run, or None."""
    keys = sorted(state) if isinstance(state, dict) else []
    if keys != sorted(KEYS):
        return f"holds keys {keys}, expected {sorted(KEYS)}"
    phase, epoch = state["phase"], state["epoch"]
    if not (_is_int(phase) and 0 <= phase <= len(phases)):
        return f"phase {phase!r} is not one of 0..{len(phases)}"
    name, epochs = (phases[phase][0].value, phases[phase][1]) if phase < len(phases) else ("mining", 0)
    if not (_is_int(epoch) and 0 <= epoch <= epochs):
        return f"epoch {epoch!r} of phase {name} is not one of 0..{epochs}"
    stored = state["config"]
    if not (isinstance(stored, dict) and all(isinstance(v, dict) for v in stored.values())):
        return "holds no config of this program"
    stored, config = _json(stored), _json(config)
    diff = [f"{s}.{k}: {stored.get(s, {}).get(k)!r} there, {v!r} here" for s in config for k, v in config[s].items()
            if f"{s}.{k}" not in ignored and stored.get(s, {}).get(k) != v]
    if diff:
        return f"was written by a run with other settings ({'; '.join(diff[:3])})"
    if not (isinstance(state["data"], dict) and set(state["data"]) == set(LISTS)):
        return "holds no fingerprint of its data"
    changed = [k for k in LISTS if state["data"][k] != data[k]]
    if changed:
        return (f"was written for other data: the {' and '.join(changed)} image list(s) differ (names, labels, "
                "files or the images --skip-bad-images dropped); resume with the same data")
    if not _state_dict(state["model"]):
        return "model is not a state dict"
    if state["optimizer"] is not None and not (isinstance(state["optimizer"], dict) and
                                               {"state", "param_groups"} <= set(state["optimizer"])):
        return "optimizer is not an optimizer state dict"
    if state["mining"] is not None:
        if phase < len(phases):
            return f"holds a mining state in phase {name}, before mining"
        problem = mining_problem(state["mining"], mine, n_mining, h)
        if problem:
            return problem
    rng, cuda_rng = state["rng"], state["cuda_rng"]
    if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.shape == torch.get_rng_state().shape):
        return "rng is not a CPU generator state"
    if cuda_rng is not None and not (isinstance(cuda_rng, torch.Tensor) and cuda_rng.dtype == torch.uint8
                                     and cuda_rng.dim() == 1):
        return "cuda_rng is not a CUDA generator state"
    return None


def check(state, where, *, phases, mine, n_mining, h, config, ignored, data):
    """RunError (one line, naming `where`) unless `state` is a whole checkpoint of this run.

    phases: [(name, epochs)] of the run's classification plan (mining comes after); mine: its
    MineConfig; n_mining, h: the masks' image count and map side; config: the run's settings as
    a dict, compared but for the `ignored` "section.field" names; data: its `fingerprint`.
    """
    problem = _problem(state, phases, mine, n_mining, h, config, ignored, data)
    if problem:
        raise RunError(f"{where}: {problem}; pass --overwrite to start over")


def restore_model(model, sd, what):
    """load_state_dict with a one-line RunError when the checkpoint is another architecture."""
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = [line.strip() for line in str(e).splitlines() if line.strip()][1:2]
        raise RunError(f"{what}: holds another architecture ({first[0] if first else e}); "
                       "pass --overwrite to start over") from None


def restore_optimizer(opt, sd, what):
    """opt.load_state_dict with a one-line RunError when the state belongs to other parameters."""
    try:
        opt.load_state_dict(sd)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise RunError(f"{what}: its optimizer state does not fit this phase's parameters "
                       f"({type(e).__name__}); pass --overwrite to start over") from None


def restore_rng(state, device):
    """The random number generators as they were when `state` was saved: CPU, and CUDA on a CUDA device."""
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and state["cuda_rng"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def mining_problem(state, k, n, h):
    """What makes a saved `attention_mining` state unusable for a run with MineConfig k, n
    mining images and h×h maps, or None (checkpoint.check reports it in one line)."""
    def number(v):
        return isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool))

    def maps(ts, dtype):
        return isinstance(ts, list) and all(isinstance(t, torch.Tensor) and t.dtype == dtype and
                                            tuple(t.shape) == (n, B, h, h) for t in ts)
    if not isinstance(state, dict) or sorted(state) != sorted(STATE_KEYS):
        return f"its mining state holds keys {sorted(state) if isinstance(state, dict) else type(state).__name__}"
    t, e = state["round"], state["epoch"]
    if not (isinstance(t, int) and 1 <= t <= k.rounds + 1 and isinstance(e, int) and 0 <= e <= k.epochs):
        return f"mining round {t!r}, epoch {e!r} do not fit T = {k.rounds} rounds of at most {k.epochs} epochs"
    losses, ratios, records = state["losses"], state["ratios"], state["records"]
    if not (isinstance(losses, list) and len(losses) in ((e + 1,) if e else (0, 1))
            and all(number(v) for v in losses)):
        return f"mining losses {losses!r} do not fit epoch {e}"
    if not (isinstance(ratios, list) and len(ratios) == e and all(r is None or number(r) for r in ratios)):
        return f"mining KP ratios do not fit epoch {e}"
    if not (isinstance(records, list) and len(records) == t - 1 and
            all(isinstance(d, dict) and sorted(d) == sorted(ROUND_RECORD) for d in records)):
        return f"mining records do not fit round {t}"
    cams, masks = state["cams"], state["masks"]
    if not (maps(cams, torch.float32) and maps(masks, torch.uint8)):
        return f"masks and CAMs are not lists of ({n}, {B}, {h}, {h}) uint8 and float32 maps, as this data set and model need"
    if len(cams) != t - 1 or len(masks) != min(t, k.rounds):
        return f"holds {len(masks)} masks and {len(cams)} CAMs in mining round {t}"
    if any(bool(((m != 0) & (m != 1)).any()) for m in masks) or any(not bool(c.isfinite().all()) for c in cams):
        return "masks hold values other than 0 and 1, or CAMs values that are not finite"
    if not (isinstance(state["model_a"], dict) and all(isinstance(v, torch.Tensor) for v in state["model_a"].values())):
        return "model_a (N_A) is not a state dict"
    opt = state["optimizer"]
    if opt is not None and not (isinstance(opt, dict) and {"state", "param_groups"} <= set(opt)):
        return "the mining optimizer is not an optimizer state dict"
    if not number(state["auroc_a"]):
        return "auroc_a is not a number"
    if not (isinstance(state["steps"], int) and state["steps"] >= 0):
        return f"mining steps {state['steps']!r} is not a count"
    norms = state["norms"]
    if not (norms is None if not losses else isinstance(norms, dict) and all(v is None or number(v) for v in norms.values())):
        return "the round's gradient norms are not numbers"
    if not (state["lam"] is None if not losses else number(state["lam"])):
        return f"the round's λ {state['lam']!r} is not a number"
    return None
