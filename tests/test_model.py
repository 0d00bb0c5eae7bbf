"""ResNet-MSA: torchvision's resnet50 layout, MSA shapes, the branches of eq. (2), its backend, --init."""
import numpy as np
import pytest
import torch

from minimal_amkp import ops
from minimal_amkp import reference as R
from minimal_amkp.config import ModelConfig, RunError
from minimal_amkp.model import ResNetMSA, load_init, map_size

TINY = dict(width=4, blocks=(1, 1, 1, 1), msa_channels=(16, 8))


def torchvision_resnet50_shapes():
    """Every state-dict entry of torchvision.models.resnet50(), written out from its structure."""
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, c):
        shapes.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                       f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    bn("bn1", 64)
    inplanes = 64
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), 1):
        for j in range(blocks):
            p = f"layer{i}.{j}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if j == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    shapes.update({"fc.weight": (1000, 2048), "fc.bias": (1000,)})
    return shapes


def meta_model(**kw):
    with torch.device("meta"):
        return ResNetMSA(ModelConfig(**kw))


def test_resnet50_keys_and_shapes_are_torchvisions():
    want = torchvision_resnet50_shapes()
    assert len(want) == 320
    assert want["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert want["layer4.2.bn3.running_var"] == (2048,)
    got = {k: tuple(v.shape) for k, v in meta_model(msa="none").state_dict().items()}
    assert sorted(got) == sorted(want), f"keys differ: {sorted(set(got) ^ set(want))[:5]}"
    diff = [(k, got[k], want[k]) for k in want if not k.startswith("fc.") and got[k] != want[k]]
    assert not diff, f"first shape mismatches (ours, torchvision): {diff[:3]}"
    assert got["fc.weight"] == (14, 2048) and got["fc.bias"] == (14,)
    msa = {k: tuple(v.shape) for k, v in meta_model(msa="bilinear").state_dict().items()}
    assert msa["fc.weight"] == (14, 768) and msa["base_fc.weight"] == (14, 2048)
    assert msa["msa.reduce4.0.weight"] == (512, 2048, 1, 1) and msa["msa.reduce3.0.weight"] == (256, 1024, 1, 1)


@pytest.mark.parametrize("msa, size, channels, side", [
    ("bilinear", 64, 24, 4), ("deconv", 64, 24, 4), ("none", 64, 128, 2),
    ("bilinear", 72, 24, 5), ("deconv", 72, 24, 5), ("none", 72, 128, 3)])
def test_msa_output_shapes(msa, size, channels, side):
    torch.manual_seed(0)
    model = ResNetMSA(ModelConfig(msa=msa, **TINY)).eval()
    out = model(torch.rand(2, 1, size, size))
    assert tuple(out.penultimate.shape) == (2, 64, -(-size // 16), -(-size // 16))
    assert tuple(out.last.shape) == (2, 128, -(-size // 32), -(-size // 32))
    assert tuple(out.x.shape) == (2, channels, side, side)
    assert tuple(out.logits.shape) == (2, 14)
    assert map_size(size, msa) == side
    assert tuple(model.base_logits(torch.rand(2, 1, size, size)).shape) == (2, 14)


@pytest.mark.parametrize("msa, side", [("bilinear", 16), ("none", 8)])
def test_three_stages_put_msa_on_layer2_and_layer3(msa, side):
    torch.manual_seed(0)
    model = ResNetMSA(ModelConfig(msa=msa, width=4, blocks=(1, 1, 1), msa_channels=(16, 8))).eval()
    assert not hasattr(model, "layer4") and model.stages[-1] is model.layer3
    out = model(torch.rand(2, 1, 128, 128))
    assert tuple(out.penultimate.shape) == (2, 32, 16, 16) and tuple(out.last.shape) == (2, 64, 8, 8)
    assert tuple(out.x.shape) == (2, 24 if msa != "none" else 64, side, side)
    assert map_size(128, msa, stages=3) == side
    assert model.below_msa()[-1] is model.layer3


def test_branches_are_eq2_and_cam_is_eq7_on_x():
    torch.manual_seed(0)
    model = ResNetMSA(ModelConfig(**TINY)).double().eval()
    image = torch.rand(3, 1, 64, 64, dtype=torch.float64)
    m = (torch.rand(3, 14, 4, 4) < 0.5).double()
    out = model(image, m)
    x, w, b = (t.detach().numpy() for t in (out.x, model.fc.weight, model.fc.bias))
    np.testing.assert_allclose(out.logits.detach().numpy(), R.branch_logits(x, m.numpy(), w, b), atol=1e-10)
    np.testing.assert_allclose(model(image).logits.detach().numpy(), R.branch_logits(x, np.ones((3, 14, 4, 4)), w, b),
                               atol=1e-10)
    cam = model.cam(image, m[:, :8], 8).detach().numpy()
    np.testing.assert_allclose(cam, R.cam(x, m[:, :8].numpy(), w[:8]), atol=1e-10)
    with pytest.raises(ValueError, match=r"m must be \(N, C, h, w\) = \(3, 14, 4, 4\) .* got \(3, 14, 2, 2\)"):
        model(image, torch.ones(3, 14, 2, 2, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_backend_given_to_the_model_reaches_every_op_it_calls(monkeypatch, backend):
    calls = []

    def spy(name, real):
        def op(*args, **kwargs):
            calls.append((name, kwargs.get("backend")))
            return real(*args, **kwargs)
        return op

    for name in ("branch_logits", "am_step", "cam"):
        monkeypatch.setattr(ops, name, spy(name, getattr(ops, name)))
    assert ResNetMSA(ModelConfig(**TINY)).backend == "auto"
    torch.manual_seed(0)
    model = ResNetMSA(ModelConfig(**TINY), backend=backend).eval()
    image, m = torch.rand(2, 1, 64, 64), torch.ones(2, 14, 4, 4)
    with torch.no_grad():
        model(image)
        x = model(image, m).x
        model(image, m, (x[1:], 1))
        model.cam(image, m[:, :8], 8)
    # The torch forms call each other too (am_step is branch_logits and the KP term), on torch.
    assert {name for name, _ in calls} == {"branch_logits", "am_step", "cam"}
    assert {used for _, used in calls} == {backend}


def test_init_loads_a_torchvision_layout_state_dict(tmp_path):
    torch.manual_seed(0)
    source = ResNetMSA(ModelConfig(msa="none", **TINY))
    sd = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 128), torch.randn(1000)   # ImageNet's head
    torch.save(sd, tmp_path / "resnet.pth")
    torch.manual_seed(1)
    model = ResNetMSA(ModelConfig(msa="bilinear", **TINY))
    fresh_msa = model.msa.reduce4[0].weight.clone()
    load_init(model, str(tmp_path / "resnet.pth"))
    for k, v in model.state_dict().items():
        if k in sd and not k.startswith("fc."):
            assert torch.equal(v, sd[k]), k
    assert torch.equal(model.msa.reduce4[0].weight, fresh_msa)
    assert model.fc.weight.shape == (14, 24)


def test_init_rejects_another_architecture_in_one_line(tmp_path):
    other = ResNetMSA(ModelConfig(msa="none", width=4, blocks=(2, 1, 1, 1)))
    torch.save(other.state_dict(), tmp_path / "deeper.pth")
    wider = ResNetMSA(ModelConfig(msa="none", width=8, blocks=(1, 1, 1, 1)))
    torch.save(wider.state_dict(), tmp_path / "wider.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    torch.save([1, 2], tmp_path / "list.pth")
    model = ResNetMSA(ModelConfig(**TINY))
    cases = [("deeper.pth", r"unexpected: layer1\.1\.conv1\.weight"),
             ("wider.pth", r"shape \(file vs model\): conv1\.weight \(8, 3, 7, 7\) vs \(4, 3, 7, 7\)"),
             ("junk.pth", r"cannot read a PyTorch state dict"),
             ("list.pth", r"expected a state dict \(name -> tensor\), got list"),
             ("missing.pth", r"cannot read a PyTorch state dict \(FileNotFoundError")]
    for name, message in cases:
        with pytest.raises(RunError, match=message) as info:
            load_init(model, str(tmp_path / name))
        assert "\n" not in str(info.value)
