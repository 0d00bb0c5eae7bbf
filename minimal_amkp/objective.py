"""Loss (6) on one mining minibatch: N_A beside N_B, their batch norm, the terms and their balance.

    L = L_cls + λ L_KP                                                   eq. (6)

am_terms runs N_B (and N_A for L_KP) on a minibatch whose first n images are erased; am_loss
adds the terms; term_norms measures the gradient norm of each part of L, so that balanced_lam
can keep KP from drowning the erased positives, the signal attention mining learns from.
mine.py's rounds call these every step; the bench and the walkthrough call am_loss alone.
"""
import copy

import torch

from minimal_amkp import ops
from minimal_amkp.classes import BOX_CLASSES
from minimal_amkp.classify import Phase, set_phase

B = len(BOX_CLASSES)                                       # the erased positives are box classes


def batch_norms(model):
    return [mod for mod in model.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]


def frozen_copy(model, bn="frozen"):
    """N_A: a copy of the network taken before mining, never updated; its batch norm as N_B's
    (mine.bn), so that N_A and N_B agree until N_B's weights move (Sec. 2.2: "Initially, N_A and
    N_B are identical").

    bn "frozen": both normalise with the classifier's running statistics (eval mode).
    bn "batch": both normalise with the statistics of the minibatch they see; N_A keeps no
    running statistics, N_B updates its own.
    """
    model_a = copy.deepcopy(model).train(bn == "batch")
    for mod in batch_norms(model_a):
        mod.track_running_stats = bn != "batch"
    for p in model_a.parameters():
        p.requires_grad_(False)
    return model_a


def mine_mode(model, k):
    """set_phase(MINE), then with k.bn "frozen" every batch norm in eval mode: it normalises with
    the classifier's running statistics and never updates them (its scale and shift still learn).

    Our choice (the paper is silent). Mining batches are not the population the statistics
    describe: every mining image is abnormal and half of each batch may be mining images. With
    "batch", the running statistics drift toward those batches, and the eval-mode network that
    makes the CAMs and the erased-image loss is not the one that trained: measured on the
    default run's classifier, N_A's weights with N_B's drifted statistics raise the mining
    images' loss from 1.59 to 1.72 (study/results/mining.md).

    With k.update "heads" (ours, a rung of the ladder) only the C branches' w and b train: X
    stays N_A's, so mining can re-weigh what the classifier's features see but learn nothing
    new and memorise little. Returns the parameters to train.
    """
    params = set_phase(model, Phase.MINE)
    if k.bn == "frozen":
        for mod in batch_norms(model):
            mod.eval()
    if k.update == "heads":
        heads = {id(p) for p in model.fc.parameters()}
        for p in params:
            p.requires_grad_(id(p) in heads)
        params = [p for p in params if id(p) in heads]
    return params


def am_terms(model, model_a, x, m, n_erased, kp):
    """N_B's logits and L_KP (eqs. 4-5; None unless kp is "full" and some images are whole) on
    one minibatch whose first n_erased images carry masks m[:n_erased].

    `model` is N_B or a callable running it (DDP); x (N, 1, S, S), m (N, 14, h, w)
    -> (logits (N, 14), L_KP or None).
    """
    if kp != "full" or n_erased == x.shape[0]:
        return model(x, m).logits, None
    with torch.no_grad():
        a = model_a(x, m)       # the whole minibatch (N_B's batch-norm statistics) and masks (holes: erasure.hole_masks)
    # The logits and the KP term at X come from one op (ops.am_step), so backward writes dX once.
    out, l_kp_x = model(x, m, (a.x[n_erased:], n_erased))
    layers = [(a.penultimate, out.penultimate), (a.logits, out.logits)]
    if model_a.msa is not None:              # without MSA, X is X_k and l_kp_x is its term
        layers.insert(1, (a.last, out.last))
    l_kp = ops.kp_loss([(fa[n_erased:], fb[n_erased:]) for fa, fb in layers], [l_kp_x], backend=model_a.backend)
    return out.logits, l_kp


def am_loss(model, model_a, x, y, m, n_erased, kp, lam):
    """Eq. (6) on one minibatch (am_terms; y (N, 14)) -> (L, L_cls, L_KP or None)."""
    logits, l_kp = am_terms(model, model_a, x, m, n_erased, kp)
    l_cls = ops.classification_loss(logits, y)
    return (l_cls, l_cls, None) if l_kp is None else (ops.total_loss(l_cls, l_kp, lam), l_cls, l_kp)


def term_norms(model, model_a, x, y, m, n_erased, k):
    """‖∇_θ‖ of the three parts of loss (6) on one minibatch (am_terms' arguments, MineConfig k):
    "am", the share of L_cls from the first n_erased images' positive box classes (the erased
    positives: what attention mining learns from); "cls", the rest of L_cls; "kp", λ·L_KP (None
    without it). Their sum is L. Batch-norm running statistics are left as they were."""
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    logits, l_kp = am_terms(model, model_a, x, m, n_erased, k.kp)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y, reduction="none")  # (N, 14)
    erased = torch.zeros_like(bce, dtype=torch.bool)
    erased[:n_erased, :B] = y[:n_erased, :B] > 0
    terms = dict(am=bce[erased].sum() / bce.numel(), cls=bce[~erased].sum() / bce.numel(),
                 kp=None if l_kp is None else k.lam * l_kp)

    def norm(term):
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
    out = {name: None if t is None else norm(t) for name, t in terms.items()}
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return out


def balanced_lam(norms, k):
    """λ of one round, from term_norms on its first minibatch (measured with λ = k.lam).

    k.balance = 0 keeps the paper's fixed λ = k.lam. Otherwise λ is at most k.lam and at most
    what makes ‖∇ λ·L_KP‖ equal k.balance × ‖∇‖ of the erased positives' share of L_cls, so
    that KP holds N_B near N_A without drowning the signal attention mining learns from (our
    rule; the paper balances loss values: λ·L_KP ≈ ½ L_cls). Round 1, where N_B = N_A and
    L_KP's gradient is 0, keeps k.lam.
    """
    if not k.balance or not norms["kp"] or not norms["am"]:
        return k.lam
    return min(k.lam, k.balance * norms["am"] * k.lam / norms["kp"])
