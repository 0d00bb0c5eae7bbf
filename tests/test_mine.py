"""Attention mining rounds and the three knowledge-preservation modes, on a micro ResNet-MSA."""
import numpy as np
import pytest
import torch

from minimal_amkp import reference as R
from minimal_amkp.config import MineConfig, ModelConfig, preset
from minimal_amkp import ops
from minimal_amkp.erasure import batch_masks, hole_masks, hole_rng, image_grid, minibatch
from minimal_amkp.mine import (ROUND_RECORD, attention_mining, compute_cams, leveled_off, mine_epoch, mining_batches,
                               mining_lr, movement, next_masks)
from minimal_amkp.objective import am_loss, balanced_lam, frozen_copy, mine_mode, term_norms
from minimal_amkp.model import ResNetMSA, map_grid
from minimal_amkp.classify import Phase, set_phase
from minimal_amkp.loop import optimizer
from minimal_amkp.runner import Runner

S, H = 64, 4                                     # micro input and its X side (S/16)


class Memory:
    """An in-memory stand-in for data.images.Images: batch(positions) -> (images, labels)."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 1, S, S, generator=g)
        self.labels = (torch.rand(n, 14, generator=g) < 0.5).float()

    def __len__(self):
        return len(self.images)

    def batch(self, idx):
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return self.images[idx], self.labels[idx]


def micro(kp="full"):
    cfg = preset("tiny")
    cfg.model = ModelConfig(width=4, blocks=(1, 1, 1, 1), msa_channels=(16, 8))
    cfg.data.image_size = S
    cfg.mine.kp, cfg.mine.batch_size, cfg.mine.epochs, cfg.mine.lr = kp, 8, 1, 0.05
    torch.manual_seed(0)
    return cfg, ResNetMSA(cfg.model)


def test_one_am_round_erases_the_cam_peak_of_positive_classes_only():
    cfg, model = micro()
    mining, train = Memory(6, 1), Memory(24, 2)
    m0 = torch.ones(6, 8, H, H, dtype=torch.uint8)
    opt = optimizer(mine_mode(model, cfg.mine), cfg.mine.lr, cfg.train)
    mine_epoch(model, frozen_copy(model), opt, mining, train, m0, cfg, 1, 0, Runner())
    h1 = compute_cams(model, mining, m0, 4, "CAMs", Runner())
    m1 = next_masks(h1, m0, mining.labels, 0.5)
    positive = mining.labels[:, :8].bool()
    assert positive.any() and (~positive).any()
    assert torch.all(m1[~positive] == 1), "a negative class lost part of its mask"
    for i, c in positive.nonzero().tolist():
        h, erased = h1[i, c].double().numpy(), m1[i, c].numpy() == 0
        peak = np.unravel_index(np.argmax(h), h.shape)
        assert erased[peak], f"image {i} class {c}: the CAM peak {peak} was not erased"
        hot = (h - h.min()) / (h.max() - h.min()) >= 0.5
        assert np.all(hot[erased]), f"image {i} class {c}: erased a pixel below the threshold"
        np.testing.assert_array_equal(m1[i, c].numpy(), R.update_masks(h, np.ones_like(h)))
    h2 = compute_cams(model, mining, m1, 4, "CAMs", Runner())
    assert torch.all(h2[m1 == 0] == 0), "H_2 is not zero where M_1 erased X (eq. 7)"
    m2 = next_masks(h2, m1, mining.labels, 0.5)
    assert torch.all(m2 <= m1) and torch.all(m2[~positive] == 1)


def test_mining_batches_mix_n_erased_images_with_whole_train_images():
    full = mining_batches(MineConfig(kp="full", batch_size=16, fraction=0.125), 20, 50, 0, 1, 0)
    assert [len(m) for m, _ in full] == [2] * 10 and all(len(t) == 14 for _, t in full)
    assert sorted(np.concatenate([m for m, _ in full]).tolist()) == list(range(20))
    train = np.concatenate([t for _, t in full])
    assert train.max() < 50 and len(set(train[:50].tolist())) == 50      # without replacement per lap
    vanilla = mining_batches(MineConfig(kp="vanilla", batch_size=16, fraction=0.125), 20, 50, 0, 1, 0)
    assert all(np.array_equal(a, c) and np.array_equal(b, d) for (a, b), (c, d) in zip(full, vanilla))
    none = mining_batches(MineConfig(kp="none", batch_size=8, fraction=0.125), 20, 50, 0, 1, 0)
    assert all(len(t) == 0 for _, t in none) and [len(m) for m, _ in none] == [8, 8]
    again = mining_batches(MineConfig(kp="full", batch_size=16, fraction=0.125), 20, 50, 0, 1, 0)
    assert all(np.array_equal(a, c) for (a, _), (c, _) in zip(full, again))
    other = mining_batches(MineConfig(kp="full", batch_size=16, fraction=0.125), 20, 50, 0, 1, 1)
    assert not all(np.array_equal(a, c) for (a, _), (c, _) in zip(full, other))


def kp_batch(model):
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(8, 1, S, S, generator=g), (torch.rand(8, 14, generator=g) < 0.5).float()
    m = torch.ones(8, 14, H, H)
    m[:2] = batch_masks((torch.rand(2, 8, H, H, generator=g) < 0.5).float(), 14)
    return x, y, m


@pytest.mark.parametrize("bn", ["frozen", "batch"])
def test_full_kp_is_zero_for_identical_networks_and_grows_as_n_b_drifts(bn):
    cfg, model = micro()
    cfg.mine.bn = bn
    model_a = frozen_copy(model, bn)
    opt = optimizer(mine_mode(model, cfg.mine), 0.05, cfg.train)
    x, y, m = kp_batch(model)
    loss, l_cls, l_kp = am_loss(model, model_a, x, y, m, 2, "full", 0.5)
    assert l_kp.item() < 1e-10                     # float rounding only: batches of 8 vs 6 images
    mine_epoch(model, model_a, opt, Memory(6, 1), Memory(24, 2), torch.ones(6, 8, H, H, dtype=torch.uint8),
               cfg, 1, 0, Runner())
    loss, l_cls, l_kp = am_loss(model, model_a, x, y, m, 2, "full", 0.5)
    assert l_kp.item() > 0 and loss.item() == pytest.approx(l_cls.item() + 0.5 * l_kp.item(), rel=1e-6)
    # L_KP is eq. (5) over layer3, layer4, the MSA output and the logits of the 6 whole images
    # (both networks see the whole minibatch, their batch norm in one mode).
    mine_mode(model, cfg.mine)
    with torch.no_grad():
        a, b = model_a(x), model(x)
    pairs = [(fa[2:].double().numpy(), fb[2:].double().numpy()) for fa, fb in zip(a, b)]
    assert l_kp.item() == pytest.approx(R.kp_loss(pairs), rel=1e-4)


def test_frozen_batch_norm_keeps_the_classifiers_statistics():
    cfg, model = micro()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    opt = optimizer(mine_mode(model, cfg.mine), 0.05, cfg.train)
    mine_epoch(model, frozen_copy(model), opt, Memory(6, 1), Memory(24, 2), torch.ones(6, 8, H, H, dtype=torch.uint8),
               cfg, 1, 0, Runner())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    cfg.mine.bn = "batch"
    mine_epoch(model, frozen_copy(model, "batch"), opt, Memory(6, 1), Memory(24, 2),
               torch.ones(6, 8, H, H, dtype=torch.uint8), cfg, 1, 0, Runner())
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_term_norms_split_the_loss_and_leave_batch_norm_alone():
    """The three gradient norms of loss (6): λ scales the KP one, no erased image zeroes the AM one,
    KP-Vanilla has none; the batch-norm running statistics are not moved by measuring."""
    cfg, model = micro()
    model_a = frozen_copy(model)
    opt = optimizer(mine_mode(model, cfg.mine), 0.05, cfg.train)
    mine_epoch(model, model_a, opt, Memory(6, 1), Memory(24, 2), torch.ones(6, 8, H, H, dtype=torch.uint8),
               cfg, 1, 0, Runner())
    mine_mode(model, cfg.mine)
    x, y, m = kp_batch(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    k = cfg.mine
    norms = term_norms(model, model_a, x, y, m, 2, k)
    assert all(torch.equal(v, before[key]) for key, v in model.state_dict().items())
    assert norms["am"] > 0 and norms["cls"] > 0 and norms["kp"] > 0, norms
    k.lam *= 2
    assert term_norms(model, model_a, x, y, m, 2, k)["kp"] == pytest.approx(2 * norms["kp"], rel=1e-5)
    assert term_norms(model, model_a, x, y, m, 0, k)["am"] == 0.0
    k.kp = "vanilla"
    assert term_norms(model, model_a, x, y, m, 2, k)["kp"] is None


@pytest.mark.parametrize("step, want", [(0, 0.025), (1, 0.05), (3, 0.1), (50, 0.1)])
def test_mining_warms_up_then_holds(step, want):
    assert mining_lr(MineConfig(lr=0.1, warmup=4), step) == pytest.approx(want)
    assert mining_lr(MineConfig(lr=0.1, warmup=0), step) == 0.1


@pytest.mark.parametrize("kp", ["vanilla", "none"])
def test_vanilla_and_none_have_no_kp_term(kp):
    cfg, model = micro(kp)
    model_a = frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    mine_mode(model, cfg.mine)
    x, y, m = kp_batch(model)
    n = 2 if kp == "vanilla" else 8
    if kp == "none":
        m = batch_masks((torch.rand(8, 8, H, H) < 0.5).float(), 14)
    loss, l_cls, l_kp = am_loss(model, model_a, x, y, m, n, kp, 0.5)
    assert l_kp is None and loss is l_cls


def test_none_mode_never_reads_a_train_image():
    cfg, model = micro("none")

    class NoTrain(Memory):
        def batch(self, idx):
            raise AssertionError("kp=none read a train_val image")

    opt = optimizer(mine_mode(model, cfg.mine), 0.05, cfg.train)
    mine_epoch(model, frozen_copy(model), opt, Memory(16, 1), NoTrain(24, 2),
               torch.ones(16, 8, H, H, dtype=torch.uint8), cfg, 1, 0, Runner())


def mining_run(cfg, model, state=None, save=None):
    return attention_mining(model, Memory(6, 1), Memory(24, 2), Memory(20, 3), cfg, Runner(),
                            state, save)


@pytest.mark.parametrize("erase, holes", [("feature", "none"), ("image", "matched")])
def test_attention_mining_runs_t_rounds_and_records_each(erase, holes):
    cfg, model = micro()
    cfg.mine.rounds, cfg.mine.epochs, cfg.mine.min_epochs = 3, 2, 2
    cfg.mine.erase, cfg.mine.holes = erase, holes
    out = mining_run(cfg, model)
    assert out["cams"].shape == (3, 6, 8, H, H) and out["masks"].shape == (3, 6, 8, H, H)
    assert torch.all(out["masks"][0] == 1) and torch.all(out["masks"][1:] <= out["masks"][:-1])
    assert (out["masks"][2] == 0).any(), "nothing was erased"
    assert torch.all(out["cams"][1:][out["masks"][1:] == 0] == 0), "H_t is not 0 where M_{t-1} erased X"
    rounds = out["records"]
    assert [d["t"] for d in rounds] == [1, 2, 3] and all(set(d) == set(ROUND_RECORD) for d in rounds)
    assert all(d["epochs"] == 2 for d in rounds)
    assert rounds[0]["movement"] is None and all(d["movement"] > 0 for d in rounds[1:])
    assert all(0 < d["kp_ratio"] and 0 <= d["auroc_b"] <= 1 and d["auroc_a"] == rounds[0]["auroc_a"]
               for d in rounds)


def test_without_training_the_network_does_not_move():
    cfg, model = micro()
    cfg.mine.rounds, cfg.mine.epochs = 3, 0
    out = mining_run(cfg, model)
    assert [d["movement"] for d in out["records"]] == [None, 0.0, 0.0]
    assert all(d["loss_before"] == d["loss_after"] and d["epochs"] == 0 for d in out["records"])
    h = out["cams"].numpy()
    np.testing.assert_array_equal(h[2], h[0] * out["masks"][2].numpy())   # H_3 = H_1 ⊙ M_2 exactly


def test_movement_by_hand():
    h1 = np.arange(2 * 8 * 2 * 2, dtype=float).reshape(2, 8, 2, 2) + 1
    m = np.ones_like(h1)
    m[..., 0, 0] = 0
    labels = np.zeros((2, 14))
    labels[0, 3] = labels[1, 5] = 1
    assert movement(h1 * m, h1, m, labels) == 0.0
    moved = h1 * m
    moved[0, 3] *= 2                                    # one labelled map doubles
    frozen = np.concatenate([(h1 * m)[0, 3].ravel(), (h1 * m)[1, 5].ravel()])
    assert movement(moved, h1, m, labels) == pytest.approx(np.linalg.norm((h1 * m)[0, 3]) / np.linalg.norm(frozen))
    moved[1, 0] += 100                                  # an unlabelled map does not count
    assert movement(moved, h1, m, labels) == pytest.approx(np.linalg.norm((h1 * m)[0, 3]) / np.linalg.norm(frozen))
    assert movement(h1, h1, m, np.zeros((2, 14))) is None


@pytest.mark.parametrize("losses, done", [
    ([1.0], False),                     # not trained yet
    ([1.0, 0.99], False),               # min_epochs 2 not reached
    ([1.0, 0.9, 0.8], False),           # still falling by 11%
    ([1.0, 0.9, 0.89], True),           # fell by 1.1% < 2%
    ([1.0, 0.9, 0.95], False),          # rose: no plateau, go on
    ([1.0, 1.1, 1.2, 1.3, 1.4], True),  # still rising after 4 epochs: the cap ends it
    ([1.0, 0.9, 0.9], True),            # flat
    ([1.0, 0.5, 0.25, 0.12, 0.06], True),   # at most 4 epochs
])
def test_a_round_ends_when_its_erased_loss_levels_off(losses, done):
    cfg, _ = micro()
    cfg.mine.epochs, cfg.mine.min_epochs, cfg.mine.level_off = 4, 2, 0.02
    assert leveled_off(losses, cfg.mine) is done


def test_resumed_from_any_saved_state_mining_ends_as_an_uninterrupted_run():
    import copy
    cfg, model = micro()
    cfg.mine.rounds, cfg.mine.epochs, cfg.mine.min_epochs = 2, 2, 2
    start = copy.deepcopy(model.state_dict())
    saved = []
    whole = mining_run(cfg, model, save=lambda st: saved.append((copy.deepcopy(st), copy.deepcopy(model.state_dict()))))
    assert len(saved) == 2 * 2 + 2                      # every epoch and every round
    for k in (1, 2, 4):
        state, weights = saved[k]
        _, again = micro()
        again.load_state_dict(weights)
        out = mining_run(cfg, again, copy.deepcopy(state))
        torch.testing.assert_close(out["cams"], whole["cams"], rtol=0, atol=0, msg=lambda m: f"from save {k}: {m}")
        assert torch.equal(out["masks"], whole["masks"]) and out["records"] == whole["records"], k
    assert start.keys() == model.state_dict().keys()


@pytest.mark.parametrize("norms, balance, want", [
    (dict(am=0.02, cls=0.05, kp=0.6), 0.0, 0.5),             # the paper's fixed λ
    (dict(am=0.02, cls=0.05, kp=0.6), 1.0, 0.5 * 0.02 / 0.6),  # KP's gradient brought down to the AM term's
    (dict(am=0.02, cls=0.05, kp=0.01), 1.0, 0.5),            # never above mine.lam
    (dict(am=0.02, cls=0.05, kp=0.0), 1.0, 0.5),             # round 1: N_B = N_A, nothing to measure
    (dict(am=0.02, cls=0.05, kp=None), 1.0, 0.5),            # no KP
])
def test_balanced_lam(norms, balance, want):
    assert balanced_lam(norms, MineConfig(lam=0.5, balance=balance)) == pytest.approx(want)


def test_an_oracle_m1_replaces_the_update_of_h1():
    cfg, model = micro()
    cfg.mine.rounds, cfg.mine.epochs, cfg.mine.min_epochs = 2, 1, 1
    given = torch.ones(6, 8, H, H, dtype=torch.uint8)
    given[:, :, 1:3, 0:2] = 0
    out = attention_mining(model, Memory(6, 1), Memory(24, 2), Memory(20, 3), cfg, Runner(), oracle=given)
    assert torch.equal(out["masks"][1], given)
    assert torch.all(out["cams"][1][:, :, 1:3, 0:2] == 0)


def erased_world(n_mine=7, seed=3):
    """Mining labels (n_mine, 14) and masks M (uint8 (n_mine, 8, H, H)) that erase a random
    block of every positive box class but class 2's; every image is negative for class 5."""
    g = np.random.default_rng(seed)
    labels = torch.from_numpy((g.random((n_mine, 14)) < 0.5).astype(np.float32))
    labels[:, 5] = 0
    masks = torch.ones(n_mine, 8, H, H, dtype=torch.uint8)
    for i, c in zip(*np.nonzero(labels[:, :8].numpy())):
        if c != 2:
            y, x = g.integers(0, H - 1, 2)
            masks[i, c, y:y + 2, x:x + 2] = 0
    return labels, masks


def test_hole_masks_give_negatives_the_erasure_of_a_positive_of_the_same_class():
    labels, masks = erased_world()
    y = torch.from_numpy((np.random.default_rng(4).random((11, 14)) < 0.5).astype(np.float32))
    holes = hole_masks(y, masks, labels, np.random.default_rng(0))                     # (11, 8, H, H)
    assert holes.shape == (11, 8, H, H) and holes.dtype == torch.uint8
    for i in range(11):
        for c in range(8):
            erasing = [masks[j, c] for j in range(len(masks)) if labels[j, c] and masks[j, c].min() == 0]
            if y[i, c] or not erasing:
                assert torch.all(holes[i, c] == 1), f"image {i} class {c}: a hole where none belongs"
            else:
                assert any(torch.equal(holes[i, c], e) for e in erasing), \
                    f"image {i} class {c}: its hole is no positive's mask of class {c}"
    assert (holes[:, 2] == 1).all() and (holes[:, 5] == 1).all()   # nothing erased, no positive
    again = hole_masks(y, masks, labels, np.random.default_rng(0))
    assert torch.equal(holes, again), "the same Generator state drew other holes"


def test_no_holes_before_anything_is_erased():
    labels, _ = erased_world()
    ones = torch.ones(len(labels), 8, H, H, dtype=torch.uint8)
    y = torch.zeros(5, 14)
    assert torch.all(hole_masks(y, ones, labels, np.random.default_rng(0)) == 1)


@pytest.mark.parametrize("holes", ["none", "matched"])
def test_sharded_minibatches_put_together_are_the_whole_minibatch(holes):
    """K processes each take their slice of a global minibatch: the holes are drawn for the
    whole of it, so the slices stacked are the minibatch one process would build."""
    labels, masks = erased_world()
    mining, train = Memory(7, 1), Memory(20, 2)
    mining.labels = labels
    k = MineConfig(holes=holes)
    idx = (np.array([0, 3, 5, 6]), np.array([2, 9, 11, 4, 7, 1]))
    whole = minibatch(idx, mining, train, masks, Runner(), shard=False, rng=hole_rng(k, 0, 2, 1, 3))
    parts = []
    for rank in range(3):
        runner = Runner()
        runner.rank, runner.world = rank, 3
        parts.append(minibatch(idx, mining, train, masks, runner, rng=hole_rng(k, 0, 2, 1, 3)))
    for name, a, b in zip(("x", "y", "m"), whole[:3], zip(*[p[:3] for p in parts])):
        n = whole[3]
        stacked = torch.cat([p[:p_n] for p, p_n in zip(b, [q[3] for q in parts])] +
                            [p[p_n:] for p, p_n in zip(b, [q[3] for q in parts])])
        assert torch.equal(a, stacked), f"{name}: the slices differ from the whole minibatch"
    assert sum(p[3] for p in parts) == whole[3] == 4
    m, positive = whole[2], labels[idx[0], :8].bool()
    assert torch.all(m[:, 8:] == 1), "an unboxed class was erased"
    assert torch.equal(m[:4, :8][positive], masks[idx[0]][positive].float()), "a mining image lost its M_{t-1}"
    if holes == "none":
        assert torch.all(m[4:] == 1), "a whole train image got a hole without --mine.holes"
    else:
        assert (m[4:, :8] == 0).any(), "no train image got a hole"


def test_image_erasure_fills_pixels_and_leaves_x_whole():
    """--mine.erase image: the minibatch's images are erased in pixels (ops.erase_image on the
    maps' grid) and the network gets all-ones masks; the CAMs of an erased image are 0 on the
    erased cells (eq. 7's form) and equal the CAMs of the pixel-erased image elsewhere."""
    cfg, model = micro()
    cfg.mine.erase = "image"
    labels, masks = erased_world(6)
    mining, train = Memory(6, 1), Memory(8, 2)
    mining.labels = labels
    grid = image_grid(model, cfg)
    assert grid == tuple(map_grid(model, S))
    x, _, m, n = minibatch((np.arange(4), np.arange(3)), mining, train, masks, Runner(), grid=grid)
    want = ops.erase_image(torch.cat([mining.images[:4], train.images[:3]]),
                           torch.cat([masks[:4], torch.ones(3, 8, H, H, dtype=torch.uint8)]), grid)
    assert n == 4 and torch.equal(x, want) and torch.all(m == 1)
    assert not torch.equal(x[:4], mining.images[:4]), "nothing was erased"
    h = compute_cams(model, mining, masks, 4, "CAMs", Runner(), grid)
    model.eval()
    with torch.no_grad():
        plain = model.cam(ops.erase_image(mining.images, masks, grid), torch.ones(6, 8, H, H), 8)
    assert torch.all(h[masks == 0] == 0)
    torch.testing.assert_close(h[masks == 1], plain[masks == 1])


def test_updating_the_heads_only_moves_w_and_b_and_nothing_else():
    """--mine.update heads: one mining epoch changes the branches' w and b and no other weight
    or batch-norm statistic, so X, and with it L_KP at every layer but the logits, stays N_A's."""
    cfg, model = micro()
    cfg.mine.update = "heads"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = mine_mode(model, cfg.mine)
    assert [id(p) for p in params] == [id(p) for p in model.fc.parameters()]
    opt = optimizer(params, cfg.mine.lr, cfg.train)
    m0 = torch.ones(6, 8, H, H, dtype=torch.uint8)
    mine_epoch(model, frozen_copy(model), opt, Memory(6, 1), Memory(24, 2), m0, cfg, 1, 0, Runner())
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert moved and set(moved) <= {"fc.weight", "fc.bias"}, f"moved: {moved}"
