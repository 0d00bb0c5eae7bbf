"""Training phases before mining: data order, schedule, what each phase updates, learning."""
import numpy as np
import pytest
import torch

from minimal_amkp.config import ModelConfig, preset
from minimal_amkp.model import ResNetMSA
from minimal_amkp.classify import Phase, classification_epoch, lr_at, set_phase
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
