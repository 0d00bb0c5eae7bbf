"""Attention mining (Sec. 2.1, 3.2) with knowledge preservation (Sec. 2.2): the method's T rounds.

`attention_mining` is the whole method after classification training, in one place:

    N_A = a frozen copy of the classifier;  M_0 = 1 for every mining image and box class
    for t = 1..T:
        fine-tune N_B on the mining images erased by M_{t-1}, loss (6), until the erased
            images' loss levels off (below)
        H_t = CAMs of every mining image under M_{t-1} (eq. 7), all 8 box classes
        M_t = update_masks(H_t, M_{t-1}) for the classes an image is labelled with; the classes
            it is negative for keep all-ones masks (nothing there to mine)
    H_f = eq. (8) over H_1..H_T (harvest.fused, when the report is written)

Round 1 erases nothing: its H_1 is the CAM baseline of Table 2 ("the 1st time step of AM ...
fine-tuned until it is converged on the bbox images", Sec. 3.2). Only the mining images' labels
are used. Each round leaves a record (ROUND_RECORD) so a report can show what mining learnt.

Our choices where the paper is silent:
- A round ends when an epoch lowers the erased-image loss (`erased_loss`: −log σ(z_c) of every
  mining image's labelled box classes under M_{t-1}, eval mode) by less than `mine.level_off`
  of its value, after at least `mine.min_epochs` and at most `mine.epochs` epochs; an epoch that
  raises it is no plateau (leveled_off).
- Each round records the gradient norm of each part of loss (6) on its first minibatch
  (term_norms): the erased positives, the rest of L_cls and λ·L_KP, so a report shows whether
  the attention-mining signal is swamped.
- Where M_{t-1} erases (`mine.erase`, erasure.py): in X, eq. (1) (feature, the paper's), or
  in the input's pixels (image: the erased cells' pixels filled with the image's mean), so that
  nothing the receptive field carries across the region's edge is left. With `mine.holes`
  matched, the negatives get holes of the positives' shapes (erasure.hole_masks).
- One optimizer serves all T rounds: a linear warm-up over the first `mine.warmup` steps of
  mining, then the constant rate `mine.lr`; its moments carry over from round to round and no
  round restarts a warm-up or a decay. A round's length is decided by the criterion above, so
  a schedule tied to a fixed length would not fit. The warm-up is there because a fresh
  optimizer's first steps at full rate shake a converged classifier (a new AdamW moves every
  weight by about lr per step, whatever its gradient).

KP modes, our reading of Sec. 2.2 (the paper does not spell out the batch recipe):
    full     each minibatch of N holds n = N·fraction mining images with erased maps and
             N − n train_val images left whole; L = L_cls (all N) + λ L_KP, L_KP over the
             N − n whole images between N_A (frozen before mining) and N_B at the
             last two stages (layer3 and layer4 of ResNet-50), the MSA output X and the
             logits (K of Sec. 3.2)
    vanilla  the same minibatches, L = L_cls
    none     minibatches of N mining images only, all erased, L = L_cls
The mining images are never augmented: a moved pixel would leave its mask behind.
"""
import numpy as np
import torch

from minimal_amkp import ops
from minimal_amkp import reference as R
from minimal_amkp.classes import BOX_CLASSES
from minimal_amkp.config import RunError
from minimal_amkp.erasure import batch_masks, erase, hole_rng, image_grid, minibatch
from minimal_amkp.loop import autocast, chunks, infer, optimizer, order, predict, run_epoch
from minimal_amkp.model import map_size
from minimal_amkp.objective import am_loss, balanced_lam, frozen_copy, mine_mode, term_norms

B = len(BOX_CLASSES)                                       # masks and CAMs cover the 8 box classes


def mining_batches(k, n_mine, n_train, seed, round_, epoch):
    """One epoch of round `round_` under MineConfig k: [(mining positions, train_val positions)],
    a pass over the n_mine mining images.

    KP full/vanilla take n = round(N·fraction) (at least 1) mining images per batch of N and
    fill it up with train_val images drawn without replacement, reshuffled when they run out.
    """
    tag, batch_size = f"mine{round_}", k.batch_size
    if k.kp == "none":
        return [(b, np.zeros(0, np.int64)) for b in chunks(order(seed, tag, epoch, n_mine), batch_size)]
    n = max(1, round(batch_size * k.fraction))
    mine = order(seed, tag, epoch, n_mine)
    mine_batches = [mine[i:i + n] for i in range(0, n_mine, n)]
    need = (batch_size - n) * len(mine_batches)
    laps = -(-need // max(n_train, 1))
    stream = np.concatenate([order(seed, f"{tag}-train{lap}", epoch, n_train) for lap in range(laps)]) \
        if n_train and laps else np.zeros(0, np.int64)
    step = batch_size - n if n_train else 0
    return [(mb, stream[i * step:(i + 1) * step]) for i, mb in enumerate(mine_batches)]


def mining_lr(k, step):
    """The rate of mining's step `step` (0-based, counted over all rounds): a linear warm-up over
    k.warmup steps to k.lr, then constant (our choice; module docstring)."""
    return k.lr * min(1.0, (step + 1) / max(k.warmup, 1))


def mine_epoch(model, model_a, opt, mining, train, masks, cfg, round_, epoch, runner, step=0, lam=None):
    """One fine-tuning epoch of round `round_` (1-based); masks (n_mine, 8, h, w) = M_{t-1};
    step: mining steps taken before this epoch (the warm-up, mining_lr); lam: λ of the round
    (balanced_lam; None: mine.lam).

    -> (mean loss, mean λ·L_KP / L_cls over its steps (None without KP), steps taken)."""
    k, device = cfg.mine, runner.device
    lam = k.lam if lam is None else lam
    mine_mode(model, k)
    net = runner.replicate(model)
    batches = mining_batches(k, len(mining), len(train), cfg.run.seed, round_, epoch)
    if k.kp == "full":                  # KP needs whole images in every process's slice
        runner.check_split([len(t) for _, t in batches], "--mine.batch-size (its N − n whole images)")
    else:
        runner.check_split([len(m) + len(t) for m, t in batches], "--mine.batch-size")
    terms, grid = [], image_grid(model, cfg)

    def loss_fn(payload):
        i, idx = payload
        x, y, m, n = minibatch(idx, mining, train, masks, runner, rng=hole_rng(k, cfg.run.seed, round_, epoch, i),
                               grid=grid)
        with autocast(device):
            _, l_cls, l_kp = am_loss(net, model_a, x, y, m, n, k.kp, lam)
        # L_cls is a mean over all N images, L_KP over the N − n whole ones (eq. 4).
        l_cls = runner.share(len(x), sum(map(len, idx))) * l_cls
        if l_kp is None:
            return l_cls
        l_kp = runner.share(len(x) - n, len(idx[1])) * l_kp
        terms.append((lam * l_kp.detach(), l_cls.detach()))      # read after the epoch: no wait per step
        return ops.total_loss(l_cls, l_kp, lam)

    loss = run_epoch(model, opt, [(len(mi) + len(ti), (i, (mi, ti))) for i, (mi, ti) in enumerate(batches)], loss_fn,
                     lambda i: mining_lr(k, step + i), f"AM round {round_}/{k.rounds} epoch {epoch + 1}", runner)
    ratios = [runner.average(kp) / runner.average(cls) for kp, cls in terms]
    return loss, (float(np.mean(ratios)) if ratios else None), len(batches)


def round_norms(model, model_a, mining, train, masks, cfg, round_, runner):
    """term_norms on the whole first minibatch of round `round_` under M_{t-1} (its training
    mode): every process measures the same numbers, so λ (balanced_lam) is the same on all."""
    k = cfg.mine
    first = mining_batches(k, len(mining), len(train), cfg.run.seed, round_, 0)[:1]
    if not first:
        return dict(am=None, cls=None, kp=None)
    mine_mode(model, k)
    x, y, m, n = minibatch(first[0], mining, train, masks, runner, shard=False, rng=hole_rng(k, cfg.run.seed, round_, 0, 0),
                           grid=image_grid(model, cfg))
    with autocast(runner.device):
        return term_norms(model, model_a, x, y, m, n, k)


def compute_cams(model, mining, masks, batch_size, label, runner, grid=None):
    """H_t: eq. (7) under masks M_{t-1} (n, 8, h, w) for this process's shard of the mining
    images -> float32 (len(shard), 8, h, w). With grid (--mine.erase image) N_B sees the erased
    image, and H_t is still 0 on the erased cells, as eq. (7) has it."""
    device = runner.device

    def cams(x, idx):
        m8 = masks[torch.as_tensor(idx)].to(device)
        return model.cam(erase(x, m8, grid)[0], m8.to(torch.float32), B)
    h = infer(model, mining, batch_size, label, runner.rows(len(mining)), cams, runner)
    return h if h is not None else torch.zeros(0, B, *masks.shape[2:])


def next_masks(h, m, labels, threshold, dilate=0):
    """M_t from H_t (n, 8, h, w) and M_{t-1} (uint8, same shape), each new region grown by
    `dilate` cells (ops.dilate_erasure); only positive classes change."""
    updated = ops.dilate_erasure(ops.update_masks(h, m, threshold), m, dilate)      # (n, 8, h, w)
    positive = labels[:, :B].bool()[:, :, None, None]                                # (n, 8, 1, 1)
    return torch.where(positive, updated, m)


def erased_loss(model, mining, masks, batch_size, runner, grid=None):
    """The loss a round drives down: the mean binary cross-entropy −log σ(z_c) over every mining
    image and box class c it is labelled with, its branch c seeing X erased by M_{t-1} (eval
    mode). The classes an image is negative for are left out: their masks are all ones and
    nothing is erased for them. masks (n, 8, h, w); grid: --mine.erase image (erase); this
    process scores its shard."""
    device = runner.device

    def logits_of(x, idx):
        x, m8 = erase(x, masks[torch.as_tensor(idx)].to(device), grid)
        return model(x, batch_masks(m8, mining.labels.shape[1]).to(torch.float32)).logits[:, :B]
    logits = infer(model, mining, batch_size, "erased-image loss", runner.rows(len(mining)), logits_of, runner)
    logits = runner.gather(logits if logits is not None else torch.zeros(0, B)).double()
    positive = mining.labels[:, :B].bool()
    return float(torch.nn.functional.softplus(-logits[positive]).mean()) if positive.any() else 0.0


def box_auroc(model, test, batch_size, runner):
    """Mean test AUROC over the 8 box classes (the test split's images are never mined)."""
    if len(test) == 0:
        return float("nan")
    p = predict(model, test, batch_size, runner, "scoring the test split")
    labels = test.labels.numpy()
    return float(np.nanmean([R.auroc(p[:, c], labels[:, c]) for c in range(B)]))


def movement(h_t, h_1, m_prev, labels):
    """How far the network moved by round t: ‖H_t − H_1 ⊙ M_{t-1}‖ / ‖H_1 ⊙ M_{t-1}‖ over the
    labelled maps (image × positive box class). A frozen network gives 0: eq. (7) makes its
    H_t exactly H_1 ⊙ M_{t-1}. Arrays (n, 8, h, w), labels (n, 14); None without such maps."""
    positive = np.asarray(labels[:, :B], dtype=bool)                                    # (n, 8)
    frozen = (np.asarray(h_1, np.float64) * np.asarray(m_prev))[positive]               # (p, h, w)
    moved = np.asarray(h_t, np.float64)[positive] - frozen
    norm = np.linalg.norm(frozen)
    return float(np.linalg.norm(moved) / norm) if norm > 0 else None


# What each round records (report.json "rounds", report.md's table).
ROUND_RECORD = {
    "t": "the round",
    "epochs": "epochs the round trained",
    "loss_before": "−log σ(z_c) of the mining images' labelled box classes erased by M_{t-1}, before the round",
    "loss_after": "the same after the round",
    "kp_ratio": "mean λ·L_KP / L_cls over the round's steps (the paper wants about 1/2)",
    "grad_am": "‖∇θ‖ of the erased positives' share of L_cls, on the round's first minibatch before it trains",
    "grad_cls": "‖∇θ‖ of the rest of L_cls, the same minibatch",
    "grad_kp": "‖∇θ‖ of λ·L_KP with the round's λ, the same minibatch (none without KP)",
    "lam": "λ of the round (mine.lam, or lower by --mine.balance)",
    "auroc_b": "box-class test AUROC of N_B after the round",
    "auroc_a": "box-class test AUROC of N_A, the classifier before mining",
    "movement": "‖H_t − H_1 ⊙ M_{t-1}‖ / ‖H_1 ⊙ M_{t-1}‖ over the labelled maps (0: frozen)",
}


def attention_mining(model, mining, train, test, cfg, runner, state=None, save=None, oracle=None):
    """The method after classification training: T rounds of AM with KP (module docstring).

    model: the trained classifier, fine-tuned in place into N_B; mining, train, test: Images
    (mining images with their labels, train_val images for KP, the test split for AUROC);
    runner: where it runs (runner.Runner, or the shell's TorchRun for several processes).
    state: what `save` was last given, to resume an interrupted run, or None to start.
    save(state) is called after every epoch and every round; state is a dict of tensors,
    numbers and lists (a checkpoint can hold it). oracle: M_1 given (uint8 (n, 8, h, w), the
    positive control's lesions A erased: --mine.oracle) instead of the update of H_1,
    so that round 2 trains on the erasure a perfect H_1 would make.
    -> dict(cams, masks (T, n, 8, h, w) tensors; records: one dict per round, ROUND_RECORD keys)
    """
    k, grid = cfg.mine, image_grid(model, cfg)
    rows = runner.rows(len(mining))                           # the mining images this process maps
    batch = 2 * k.batch_size
    model_a = frozen_copy(model, k.bn)
    if state is None:
        h = map_size(cfg.data.image_size, cfg.model.msa, len(cfg.model.blocks))
        state = dict(round=1, epoch=0, steps=0, norms=None, lam=None, losses=[], ratios=[], records=[], cams=[], optimizer=None,
                     masks=[torch.ones(len(mining), B, h, h, dtype=torch.uint8)],
                     auroc_a=box_auroc(model, test, batch, runner), model_a=None)
        runner.broadcast_module(model_a)
    else:
        try:
            model_a.load_state_dict(state["model_a"])
        except RuntimeError:
            raise RunError("the saved N_A holds another architecture; pass --overwrite to start over") from None
    state["model_a"] = model_a.state_dict()
    opt = optimizer(mine_mode(model, k), k.lr, cfg.train)
    if state["optimizer"] is not None:
        try:
            opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise RunError(f"the saved mining optimizer does not fit this model ({type(e).__name__}); "
                           "pass --overwrite to start over") from None
    while state["round"] <= k.rounds:
        t, masks = state["round"], state["masks"][-1]
        if not state["losses"]:
            state["losses"].append(erased_loss(model, mining, masks, batch, runner, grid))
            state["norms"] = round_norms(model, model_a, mining, train, masks, cfg, t, runner)
            state["lam"] = balanced_lam(state["norms"], k)
            if state["norms"]["kp"] is not None:
                state["norms"]["kp"] *= state["lam"] / k.lam
        while not leveled_off(state["losses"], k):
            _, ratio, steps = mine_epoch(model, model_a, opt, mining, train, masks, cfg, t, state["epoch"], runner,
                                         state["steps"], state["lam"])
            state["epoch"] += 1
            state["steps"] += steps
            state["ratios"].append(ratio)
            state["losses"].append(erased_loss(model, mining, masks, batch, runner, grid))
            state["optimizer"] = opt.state_dict()
            if save:
                save(state)
        h_t = compute_cams(model, mining, masks, batch, f"CAMs H_{t}", runner, grid)
        state["cams"].append(runner.gather(h_t))
        labels = mining.labels.numpy()
        ratios = [r for r in state["ratios"] if r is not None]
        state["records"].append(dict(
            t=t, epochs=state["epoch"], loss_before=state["losses"][0], loss_after=state["losses"][-1],
            kp_ratio=float(np.mean(ratios)) if ratios else None,
            **{f"grad_{name}": v for name, v in state["norms"].items()}, lam=state["lam"],
            auroc_b=box_auroc(model, test, batch, runner), auroc_a=state["auroc_a"],
            movement=movement(state["cams"][-1].numpy(), state["cams"][0].numpy(), masks.numpy(), labels)
            if t > 1 else None))
        if t < k.rounds:
            state["masks"].append(oracle if t == 1 and oracle is not None else
                                  runner.gather(next_masks(h_t, masks[rows], mining.labels[rows], k.threshold, k.dilate)))
        state.update(round=t + 1, epoch=0, losses=[], ratios=[], norms=None, lam=None)
        if save:
            save(state)
    return dict(cams=torch.stack(state["cams"]), masks=torch.stack(state["masks"]), records=state["records"])


def leveled_off(losses, k):
    """Whether a round is done: losses[0] before it, losses[e] after its epoch e. Done after
    k.epochs epochs, or once k.min_epochs are done and the last epoch lowered the loss, but by
    less than k.level_off of its previous value. A rise is not a plateau: the round goes on
    (up to the cap), since the first steps of a round may well undo some of the last round's
    fit before they fit the new masks."""
    epochs = len(losses) - 1
    if epochs >= k.epochs:
        return True
    if epochs < max(k.min_epochs, 1):
        return False
    before, after = losses[-2], losses[-1]
    return 0 <= before - after < k.level_off * abs(before)


STATE_KEYS = ("round", "epoch", "steps", "norms", "lam", "losses", "ratios", "records", "cams", "masks", "optimizer", "auroc_a",
              "model_a")
