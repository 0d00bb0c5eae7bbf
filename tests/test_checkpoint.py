"""checkpoint.py: the data fingerprint, a whole state passes `check`, the RNG states come back."""
import numpy as np
import pytest
import torch

from minimal_amkp.run import checkpoint
from minimal_amkp.data.chestxray import ChestXray14, Entry
from minimal_amkp.config import MineConfig, RunError
from minimal_amkp.mine import ROUND_RECORD


def dataset(labels=None, digests=None):
    names = [f"{i:08d}_000.png" for i in range(6)]
    labels = labels or {}
    entries = {n: Entry(n, np.array(labels.get(n, [0] * 14), np.uint8), 0, i, 50, "M", "PA", 64, 64, (0.1, 0.1))
               for i, n in enumerate(names)}
    return ChestXray14("root", entries, {}, names[:4], names[4:], digests=dict(digests or {n: 7 for n in names}))


def test_the_fingerprint_sees_a_different_dropped_image_with_the_same_count():
    ds = dataset()
    n = sorted(ds.entries)
    base = checkpoint.fingerprint(ds, n[:1], n[1:3], n[4:])                 # n[3] dropped
    assert checkpoint.fingerprint(ds, n[:1], n[1:3], n[4:]) == base
    other = checkpoint.fingerprint(ds, n[:1], [n[1], n[3]], n[4:])            # n[2] dropped instead
    assert other["train"] != base["train"] and other["mining"] == base["mining"] and other["test"] == base["test"]
    relabelled = dataset(labels={n[0]: [1] + [0] * 13})
    assert checkpoint.fingerprint(relabelled, n[:1], n[1:3], n[4:])["mining"] != base["mining"]
    rewritten = dataset(digests={**{k: 7 for k in n}, n[5]: 8})
    assert checkpoint.fingerprint(rewritten, n[:1], n[1:3], n[4:])["test"] != base["test"]


def mining_state(model_a):
    record = {k: 0.5 for k in ROUND_RECORD} | {"t": 1, "epochs": 2, "movement": None}
    return dict(round=2, epoch=1, steps=3, norms=dict(am=0.1, cls=0.2, kp=None), lam=0.5, losses=[0.4, 0.3],
                ratios=[0.5], records=[record],
                cams=[torch.zeros(3, 8, 4, 4)], masks=[torch.ones(3, 8, 4, 4, dtype=torch.uint8)] * 2,
                optimizer=None, auroc_a=0.9, model_a=model_a.state_dict())


def small_run(tmp_path):
    model, model_a = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    expected = dict(phases=[("msa", 2)], mine=MineConfig(rounds=3, epochs=2), n_mining=3, h=4,
                    config={"train": {"lr": 0.1}, "run": {"out": "a"}}, ignored=("run.out",),
                    data={"mining": "m", "train": "t", "test": "s"})
    checkpoint.save(tmp_path, config={"train": {"lr": 0.1}, "run": {"out": "b"}}, data=expected["data"], phase=1,
                    epoch=0, model=model, opt=opt, mining=mining_state(model_a))
    return model, opt, expected


def test_a_whole_checkpoint_passes_and_its_rng_comes_back(tmp_path):
    torch.manual_seed(3)
    model, opt, expected = small_run(tmp_path)
    want = torch.rand(5)
    state = checkpoint.load(tmp_path, **expected)
    assert state["cuda_rng"] is None or torch.cuda.is_initialized()
    checkpoint.restore_rng(state, torch.device("cpu"))
    assert torch.equal(torch.rand(5), want)
    fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    checkpoint.restore_optimizer(fresh, state["optimizer"], "x")
    assert torch.equal(fresh.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    with pytest.raises(RunError, match=r"^x: its optimizer state does not fit this phase's parameters"):
        checkpoint.restore_optimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), state["optimizer"], "x")
    with pytest.raises(RunError, match=r"masks and CAMs are not lists of \(4, 8, 4, 4\) uint8 and float32 maps"):
        checkpoint.load(tmp_path, **{**expected, "n_mining": 4})
    with pytest.raises(RunError, match=r"mining round 2, epoch 1 do not fit T = 1 rounds of at most 0 epochs"):
        checkpoint.load(tmp_path, **{**expected, "mine": MineConfig(rounds=1, epochs=0)})
    with pytest.raises(RunError, match=r"phase 1 is not one of 0..0"):
        checkpoint.load(tmp_path, **{**expected, "phases": []})


@pytest.mark.parametrize("change, message", [
    (dict(steps=-1), "mining steps -1 is not a count"),
    (dict(norms=dict(am="x")), "the round's gradient norms are not numbers"),
    (dict(norms=None), "the round's gradient norms are not numbers"),
    (dict(lam="half"), "the round's λ 'half' is not a number"),
])
def test_a_bad_mining_counter_is_named(tmp_path, change, message):
    model, model_a = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    _, _, expected = small_run(tmp_path)
    checkpoint.save(tmp_path, config={"train": {"lr": 0.1}, "run": {"out": "b"}}, data=expected["data"], phase=1,
                    epoch=0, model=model, opt=None, mining=mining_state(model_a) | change)
    with pytest.raises(RunError, match=message):
        checkpoint.load(tmp_path, **expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_rng_comes_back_too(tmp_path):
    device = torch.device("cuda")
    torch.rand(3, device=device)
    _, _, expected = small_run(tmp_path)
    want = torch.rand(5, device=device)
    state = checkpoint.load(tmp_path, **expected)
    assert state["cuda_rng"] is not None
    checkpoint.restore_rng(state, device)
    assert torch.equal(torch.rand(5, device=device), want)
