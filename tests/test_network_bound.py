"""network_bound against the measured lower bounds of bounds.input_jacobian_norms; k_emp's warning."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lipexp.bounds import input_jacobian_norms, network_bound
from lipexp.layers import k_emp, top_singular_values
from tests.test_bounds import _small_convnet

pytestmark = pytest.mark.usefixtures("one_thread")
torchvision = pytest.importorskip("torchvision")


def lower(model, x):
    return float(input_jacobian_norms(model, x)[0].max())


def test_chain_bound_is_the_product_and_above_the_lower_bound():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4), nn.ReLU(), nn.Linear(4, 3))
    nb = network_bound(mlp, (6,))
    sig = top_singular_values(mlp)
    assert sig.not_a_bound is None and nb.reason is None
    assert nb.value == pytest.approx(k_emp(sig), rel=1e-12)  # a Linear chain: K_emp is the bound
    assert nb.value >= lower(mlp, torch.randn(8, 6))
    conv = _small_convnet(nn.ReLU, bn=True)
    nb = network_bound(conv, (2, 8, 8))
    assert [p["name"] for p in nb.parts][:2] == ["0", "1"] and "operator norm" in nb.parts[1]["note"]
    assert nb.value >= lower(conv, torch.rand(6, 2, 8, 8))


@pytest.mark.parametrize("block", ["BasicBlock", "Bottleneck"])
def test_resnet_bound_uses_residual_rule_and_exceeds_lower_bound(block):
    from torchvision.models import resnet

    torch.manual_seed(0)
    model = resnet.ResNet(getattr(resnet, block), [1, 1, 1, 1], num_classes=10)
    with torch.no_grad():  # trained-looking BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    shape = (3, 8, 8) if block == "BasicBlock" else (3, 4, 4)  # Bottleneck: wide (2048 channels), keep it small
    nb = network_bound(model, shape, tol=1e-5)
    blocks = [p for p in nb.parts if p["type"] == block]
    assert len(blocks) == 4 and all("residual" in p["note"] for p in blocks)
    assert blocks[0]["shortcut"] == [] or block == "Bottleneck"  # layer1 of BasicBlock: identity shortcut
    lo = lower(model, torch.randn(4, *shape))
    assert nb.value >= lo > 0
    with pytest.warns(UserWarning, match="not a Lipschitz bound"):
        k_emp(top_singular_values(model))


def test_attention_has_no_bound():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1)
    nb = network_bound(nn.Sequential(enc, nn.Flatten(), nn.Linear(3 * 8, 2)), (3, 8))
    assert nb.value is None and "attention" in nb.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k_emp(top_singular_values(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))))  # a bound: silent
    with pytest.raises(ValueError, match="no weights"):
        k_emp({})


@pytest.mark.parametrize("conv,shape", [(nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 5, 6)),
                                         (nn.Conv2d(4, 6, 3, padding="same", dilation=2, groups=2), (4, 5, 5)),
                                         (nn.Conv1d(2, 3, 4, stride=3, padding=2), (2, 11)),
                                         (nn.Conv3d(2, 2, 2, padding=1), (2, 3, 2, 3))])
def test_dense_conv_matrix_matches_the_convolution(conv, shape):
    from lipexp.bounds import _conv_dense

    conv = conv.double()
    x = torch.randn(3, *shape, dtype=torch.float64)
    ref = conv._conv_forward(x, conv.weight, None).reshape(3, -1)
    assert torch.allclose(x.reshape(3, -1) @ _conv_dense(conv, shape).T, ref, atol=1e-12)
