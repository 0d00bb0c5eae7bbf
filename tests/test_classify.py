"""Training phases before mining: data order, schedule, what each phase updates, learning."""
import numpy as np
import pytest
import torch

from minimal_amkp.config import ModelConfig, preset
from minimal_amkp.model import ResNetMSA
from minimal_amkp.classify import Phase, classification_epoch, lr_at, set_phase, shift, translate
from minimal_amkp.loop import chunks, optimizer, order, predict
from minimal_amkp.runner import Runner

S = 64


class Learnable:
    """In-memory stand-in for data.images.Images whose labels are visible: class c < 4 is on when the
    image is bright in the c-th horizontal band; the other classes are always off."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.labels = (torch.rand(n, 14, generator=g) < 0.4).float()
        self.labels[:, 4:] = 0
        self.images = 0.2 * torch.rand(n, 1, S, S, generator=g)
        for c in range(4):
            self.images[:, :, 16 * c:16 * c + 16] += 0.7 * self.labels[:, c, None, None, None]

    def __len__(self):
        return len(self.images)

    def batch(self, idx):
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return self.images[idx], self.labels[idx]


def micro(msa="bilinear"):
    cfg = preset("tiny")
    cfg.model = ModelConfig(width=4, blocks=(1, 1, 1, 1), msa=msa, msa_channels=(16, 8))
    cfg.train.batch_size, cfg.train.optimizer, cfg.train.lr = 8, "adamw", 0.01
    cfg.train.base_epochs = cfg.train.msa_frozen_epochs = cfg.train.msa_epochs = 4
    torch.manual_seed(0)
    return cfg, ResNetMSA(cfg.model)


def test_data_order_is_a_seeded_permutation_per_epoch():
    a = order(0, "base", 3, 50)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, order(0, "base", 3, 50))
    assert not np.array_equal(a, order(0, "base", 4, 50))
    assert not np.array_equal(a, order(1, "base", 3, 50))
    assert not np.array_equal(a, order(0, "msa", 3, 50))
    assert [len(c) for c in chunks(a, 16)] == [16, 16, 16]       # the short remainder is dropped
    assert [len(c) for c in chunks(a[:5], 16)] == [5] and chunks(a[:1], 16) == []


def test_lr_warms_up_then_decays_to_zero():
    lrs = [lr_at(0.1, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1 / 5) and max(lrs) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and lrs[-1] < 1e-3


@pytest.mark.parametrize("phase, frozen, trained", [
    (Phase.BASE, ["fc.weight", "msa.reduce4.0.weight"], ["base_fc.weight", "conv1.weight", "layer4.0.conv3.weight"]),
    (Phase.MSA_FROZEN, ["conv1.weight", "layer4.0.conv3.weight", "base_fc.weight"], ["fc.weight", "msa.reduce3.0.weight"]),
    (Phase.MSA, ["base_fc.weight"], ["conv1.weight", "fc.weight", "msa.reduce4.0.weight"]),
    (Phase.MINE, ["base_fc.weight"], ["conv1.weight", "fc.weight", "msa.reduce4.0.weight"])])
def test_each_phase_updates_what_sec_3_1_says(phase, frozen, trained):
    _, model = micro()
    params = set_phase(model, phase)
    named = dict(model.named_parameters())
    ids = {id(p) for p in params}
    assert all(id(named[k]) not in ids and not named[k].requires_grad for k in frozen)
    assert all(id(named[k]) in ids for k in trained)
    bn_training = {k: m.training for k, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert bn_training["layer2.0.bn1"] == (phase is not Phase.MSA_FROZEN)    # fixed statistics below MSA
    assert bn_training["msa.reduce4.1"] == (phase is not Phase.BASE)           # MSA unused before it exists


def test_msa_initialisation_leaves_the_layers_below_untouched():
    cfg, model = micro()
    data = Learnable(24, 0)
    below = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("conv1", "bn1", "layer"))}
    head = model.fc.weight.clone()
    opt = optimizer(set_phase(model, Phase.MSA_FROZEN), cfg.train.lr, cfg.train)
    classification_epoch(model, opt, Phase.MSA_FROZEN, data, cfg, 0, Runner())
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in below.items())
    assert not torch.equal(head, model.fc.weight)


@pytest.mark.parametrize("msa", ["bilinear", "none"])
def test_classification_training_learns_a_visible_label(msa):
    cfg, model = micro(msa)
    data, runner = Learnable(48, 0), Runner()
    before = predict(model, data, 16, runner)
    opt = optimizer(set_phase(model, Phase.BASE), cfg.train.lr, cfg.train)
    losses = [classification_epoch(model, opt, Phase.BASE, data, cfg, e, runner) for e in range(4)]
    assert losses[-1] < losses[0] * 0.8, f"base loss did not fall: {losses}"
    if msa != "none":                            # a fresh MSA head on the trained backbone
        opt = optimizer(set_phase(model, Phase.MSA), cfg.train.lr, cfg.train)
        losses = [classification_epoch(model, opt, Phase.MSA, data, cfg, e, runner) for e in range(4)]
        assert losses[-1] < losses[0] * 0.8, f"msa loss did not fall: {losses}"
    scores = predict(model, data, 16, runner)
    assert scores.shape == (48, 14) and scores.min() >= 0 and scores.max() <= 1
    bce = lambda p: -np.mean(data.labels.numpy() * np.log(p + 1e-7) + (1 - data.labels.numpy()) * np.log(1 - p + 1e-7))
    assert bce(scores) < bce(before)


# ---------------------------------------------------------------- augmentation

def crops(images, dy, dx, s):
    """The per-image crops of the replicate-padded images that shift made before it was batched."""
    padded = torch.nn.functional.pad(images, (s, s, s, s), mode="replicate")
    h, w = images.shape[-2:]
    return torch.stack([p[:, s - y:s - y + h, s - x:s - x + w] for p, y, x in zip(padded, dy, dx)])


def zoomed(images, dy, dx, scale):
    """shift's zoom path as it built theta on the host in torch, before theta moved to numpy."""
    theta = torch.zeros(len(images), 2, 3, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = torch.as_tensor(1 / scale, dtype=images.dtype)
    theta[:, 0, 2] = torch.as_tensor(-2 * dx / images.shape[-1], dtype=images.dtype)
    theta[:, 1, 2] = torch.as_tensor(-2 * dy / images.shape[-2], dtype=images.dtype)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Rank(Runner):
    def __init__(self, rank, world):
        super().__init__()
        self.rank, self.world = rank, world


@pytest.mark.parametrize("h, w", [(1, 1), (7, 7), (32, 32), (33, 33), (5, 9)])
@pytest.mark.parametrize("s", [0, 1, 3, 8])
def test_translate_gives_exactly_the_crops_of_the_padded_images(h, w, s):
    rng = np.random.default_rng([h, w, s])
    images = torch.from_numpy(rng.random((6, 2, h, w), np.float32))
    dy, dx = rng.integers(-s, s + 1, size=(2, 6))
    dy[0] = dx[0] = s                                       # the largest shifts each way are drawn too
    dy[1] = dx[1] = -s
    assert torch.equal(translate(images, dy, dx), crops(images, dy, dx, s))
    assert torch.equal(translate(images, np.zeros(6, int), np.zeros(6, int)), images)


@pytest.mark.parametrize("size", [31, 64])
def test_shift_draws_whole_pixel_shifts_and_zooms_as_before(size):
    train = preset("tiny").train
    images = torch.from_numpy(np.random.default_rng(size).random((5, 1, size, size), np.float32))
    for train.shift, train.zoom in ((0.1, 0.0), (0.08, 0.15), (0.0, 0.2)):
        s = int(round(train.shift * size))
        ref = np.random.default_rng(0)
        dy, dx = ref.integers(0, 2 * s + 1, size=(2, 5)) - s
        want = crops(images, dy, dx, s) if train.zoom == 0 else \
            zoomed(images, dy, dx, ref.uniform(1 - train.zoom, 1 + train.zoom, 5))
        assert torch.equal(shift(images, np.random.default_rng(0), train, 5, Runner()), want)
    train.shift, train.zoom = 0.0, 0.0
    assert shift(images, np.random.default_rng(0), train, 5, Runner()) is images


@pytest.mark.parametrize("zoom", [0.0, 0.15])
def test_each_process_shifts_its_shard_as_one_process_shifts_the_whole_minibatch(zoom):
    train = preset("tiny").train
    train.shift, train.zoom = 0.1, zoom
    images = torch.from_numpy(np.random.default_rng(1).random((7, 1, 40, 40), np.float32))
    whole = shift(images, np.random.default_rng(3), train, 7, Runner())
    parts = [shift(r.shard(images), np.random.default_rng(3), train, 7, r) for r in (Rank(0, 3), Rank(1, 3), Rank(2, 3))]
    assert torch.equal(torch.cat(parts), whole)
