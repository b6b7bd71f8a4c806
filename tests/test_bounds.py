"""Operator norms of layers against dense matrices and FFT spectra; lower <= upper bounds; K(0)."""
import math

import pytest
import torch
from torch import nn

from lipexp.bounds import (
    bounds_table,
    chain_modules,
    circular_conv_singular_values,
    conv2d_dense_matrix,
    conv2d_fft_singular_values,
    conv2d_operator,
    conv2d_operator_norm,
    conv2d_unfold_factor,
    init_k0,
    init_std,
    input_jacobian_norms,
    jacobian_norms,
    layer_bounds,
    lipschitz_ascent,
    patch_multiplicity,
    summary_rows,
)
from lipexp.models import Normalize, convnet_ch5, mlp


pytestmark = pytest.mark.usefixtures("one_thread")


CONVS = [
    dict(padding=1),  # zero padding, stride 1
    dict(padding=1, stride=2),  # stride 2: conv_transpose2d needs output_padding on even sizes
    dict(padding=0, stride=2),
    dict(padding=2, stride=3, dilation=2),
    dict(padding=1, padding_mode="circular"),
    dict(padding=1, padding_mode="reflect", stride=2),
    dict(padding="same"),
    dict(padding=(1, 2), stride=(2, 1), padding_mode="replicate"),
]


def test_grouped_conv_operator_norm_and_unfold_bound():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=2)
    shape = (4, 7, 6)
    dense = torch.linalg.matrix_norm(conv2d_dense_matrix(conv, shape), ord=2).item()
    assert conv2d_operator_norm(conv, shape, tol=1e-10)[0] == pytest.approx(dense, rel=1e-10)
    s = torch.linalg.matrix_norm(conv.weight.detach().reshape(6, -1).double(), ord=2).item()
    assert dense <= conv2d_unfold_factor(conv, shape) * s


def _conv(seed=0, cin=3, cout=4, k=3, **kw):
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, **kw)


@pytest.mark.parametrize("kw", CONVS)
@pytest.mark.parametrize("hw", [(6, 6), (7, 5)])
def test_operator_norm_matches_dense_matrix(kw, hw):
    conv = _conv(**kw)
    shape = (3, *hw)
    dense = torch.linalg.matrix_norm(conv2d_dense_matrix(conv, shape), ord=2).item()
    value, iters = conv2d_operator_norm(conv, shape, tol=1e-10)
    assert value == pytest.approx(dense, rel=1e-10)
    assert value <= dense * (1 + 1e-12) and 0 < iters < 10_000
    s = torch.linalg.matrix_norm(conv.weight.detach().reshape(4, -1).double(), ord=2).item()
    assert dense <= conv2d_unfold_factor(conv, shape) * s * (1 + 1e-12)  # (a') is an upper bound of (b)


@pytest.mark.parametrize("kw", CONVS[:4])
def test_adjoint_identity(kw):
    conv = _conv(**kw)
    shape = (3, 7, 6)
    fwd, adj = conv2d_operator(conv, shape)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((1, *shape), generator=g, dtype=torch.float64)
    y = torch.randn(fwd(x).shape, generator=g, dtype=torch.float64)
    assert adj(y).shape == x.shape
    lhs, rhs = torch.dot(fwd(x).flatten(), y.flatten()).item(), torch.dot(x.flatten(), adj(y).flatten()).item()
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_fft_spectrum_matches_dense_and_power_iteration():
    conv = _conv(cin=3, cout=5, padding=1, padding_mode="circular")
    shape = (3, 6, 7)
    sv = torch.linalg.svdvals(conv2d_dense_matrix(conv, shape))
    fft = conv2d_fft_singular_values(conv, shape)
    assert fft.shape == sv.shape and torch.allclose(fft, sv, atol=1e-12)
    big = _conv(seed=2, cin=8, cout=8, k=5, padding=2, padding_mode="circular")
    value, _ = conv2d_operator_norm(big, (8, 16, 16), tol=1e-10)
    assert value == pytest.approx(float(conv2d_fft_singular_values(big, (8, 16, 16))[0]), rel=1e-9)
    with pytest.raises(ValueError, match="circular"):
        conv2d_fft_singular_values(_conv(padding=1), shape)
    with pytest.raises(ValueError, match="larger than the input"):
        circular_conv_singular_values(torch.randn(2, 2, 5, 5), (4, 4))


def test_patch_multiplicity_known_cases():
    assert patch_multiplicity((3, 3), (1, 1), (1, 1), (1, 1), (8, 8)) == 9
    assert patch_multiplicity((3, 3), (2, 2), (1, 1), (1, 1), (8, 8)) == 4
    assert patch_multiplicity((2, 2), (2, 2), (0, 0), (1, 1), (8, 8)) == 1
    assert patch_multiplicity((3, 1), (1, 1), (1, 0), (1, 1), (2, 5)) == 2  # input smaller than the kernel
    # a 1-channel all-ones 3x3 conv: operator norm near 9 (DC gain) though s_1 of its 1 x 9 matrix is 3
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    nn.init.ones_(conv.weight)
    value, _ = conv2d_operator_norm(conv, (1, 30, 30))
    assert 8.5 < value <= 9.0 and conv2d_unfold_factor(conv, (1, 30, 30)) * 3.0 == 9.0


def _small_convnet(act=nn.ReLU, bn=False):
    torch.manual_seed(0)
    layers = [Normalize((0.5, 0.4), (0.25, 0.3)), nn.Conv2d(2, 4, 3, padding=1), act(), nn.MaxPool2d(2),
              nn.Conv2d(4, 6, 3, stride=2, padding=1)]
    if bn:
        b = nn.BatchNorm2d(6)
        b.running_mean.uniform_(-1, 1)
        b.running_var.uniform_(0.5, 2.0)
        b.weight.data.uniform_(0.5, 1.5)
        layers.append(b)
    layers += [act(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6, 5), act(), nn.Dropout(0.3), nn.Linear(5, 3)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("act,bn", [(nn.ReLU, False), (nn.Tanh, True), (nn.GELU, False), (nn.Sigmoid, True)])
def test_lower_le_upper_small_nets(act, bn):
    net = _small_convnet(act, bn)
    x = torch.rand(6, 2, 8, 8)
    tab = bounds_table(net, x, ascent_steps=30)
    s = tab["summary"]
    assert s["lower_le_upper"] is True
    assert 0 < s["lower_jacobian"] <= s["upper_operator"] <= s["upper_unfold"] * (1 + 1e-9)
    assert s["lower_ascent"] <= s["upper_operator"]
    other = [r for r in tab["layers"] if r["kind"] == "other"]
    assert other[0]["factor"] == pytest.approx(1 / 0.25)  # Normalize
    if act is nn.Sigmoid:
        assert any(r["factor"] == 0.25 for r in other)
    assert (s["bn_factor"] != 1.0) == bn
    assert [r["quantity"] for r in summary_rows(s)][0] == "upper_operator"
    assert tab["layers"][1]["input_shape"] == (2, 8, 8) and tab["layers"][4]["input_shape"] == (4, 4, 4)


def test_bounds_are_tight_for_one_linear_layer_and_one_conv():
    torch.manual_seed(1)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 7))
    x = torch.randn(3, 12)
    s = bounds_table(lin, x, ascent_steps=5)["summary"]
    sigma = torch.linalg.matrix_norm(lin[1].weight.double(), ord=2).item()
    assert s["upper_operator"] == pytest.approx(sigma, rel=1e-12)
    assert s["lower_jacobian"] == pytest.approx(sigma, rel=1e-4)  # default tol 1e-6 on the relative change
    assert s["lower_ascent"] == pytest.approx(sigma, rel=1e-4)
    assert jacobian_norms(lin, x, tol=1e-13, max_iter=5000).max().item() == pytest.approx(sigma, rel=1e-10)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2))
    x = torch.randn(2, 2, 6, 6)
    s = bounds_table(conv, x, ascent_steps=5)["summary"]
    assert s["lower_jacobian"] == pytest.approx(s["upper_operator"], rel=1e-4)


def test_jacobian_norms_match_explicit_jacobian():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4))
    x = torch.randn(5, 6, dtype=torch.float64)
    got = jacobian_norms(net, x, tol=1e-12, max_iter=5000)
    net = net.double()
    for i in range(5):
        J = torch.autograd.functional.jacobian(lambda z: net(z[None])[0], x[i])
        assert got[i].item() == pytest.approx(torch.linalg.matrix_norm(J, ord=2).item(), rel=1e-8)
    assert lipschitz_ascent(net, x, steps=20) >= got.max().item() * (1 - 1e-3)


def test_batchnorm_with_batch_statistics_is_reported_not_bounded():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
                        nn.Flatten(), nn.Linear(3 * 5 * 5, 2))
    tab = bounds_table(net, torch.randn(4, 2, 5, 5), ascent_steps=5)
    bn = [r for r in tab["layers"] if r["kind"] == "batchnorm"][0]
    assert math.isnan(bn["factor"]) and "batch statistics" in bn["note"]
    s = tab["summary"]
    assert math.isnan(s["upper_operator"]) and s["lower_le_upper"] is None
    assert s["lower_jacobian"] > 0 and math.isfinite(s["K_operator"])


def test_unsupported_models_are_errors():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return x + self.lin(x)

    with pytest.raises(ValueError, match="not an nn.Sequential"):
        chain_modules(nn.Sequential(Res()))
    with pytest.raises(ValueError, match="no Lipschitz factor"):
        layer_bounds(nn.Sequential(nn.Linear(3, 3), nn.LogSoftmax(dim=1)), torch.randn(2, 3))
    with pytest.raises(ValueError, match="approximate"):
        layer_bounds(nn.Sequential(nn.Linear(3, 3), nn.GELU(approximate="tanh")), torch.randn(2, 3))
    with pytest.raises(ValueError, match="input_shape"):
        conv2d_operator_norm(_conv(), (2, 5, 5))


def test_init_k0_matches_random_matrix_prediction():
    state = torch.random.get_rng_state()
    out = init_k0(lambda: mlp(hidden=(256, 128)), init="default", seeds=range(3))
    assert torch.equal(state, torch.random.get_rng_state())  # caller's RNG untouched
    first = out["layers"][0]
    assert (first["m"], first["n"]) == (256, 784)
    assert first["std"] == pytest.approx(1 / math.sqrt(3 * 784))
    assert first["predicted"] == pytest.approx((16 + 28) / math.sqrt(3 * 784))
    assert 0.9 < first["ratio"] < 1.05  # Bai-Yin edge, finite-size effects below a few percent
    net = out["network"]
    assert net["predicted"] == pytest.approx(math.prod(r["predicted"] for r in out["layers"]))
    kn = init_k0(lambda: mlp(hidden=(256, 128)), init="kaiming_normal", seeds=range(2))
    assert kn["layers"][0]["std"] == pytest.approx(math.sqrt(2 / 784))
    assert 0.9 < kn["layers"][0]["ratio"] < 1.05
    with pytest.raises(ValueError, match="unknown init"):
        init_std(10, "xavier")


def test_input_jacobian_norms_exact_matches_autograd():
    torch.manual_seed(0)
    net = convnet_ch5()
    x = torch.randn(6, 3, 32, 32)
    jac = torch.func.vmap(torch.func.jacrev(lambda z: net.eval()(z[None])[0]))(x)  # 6 x 10 x 3 x 32 x 32
    exact = torch.linalg.svdvals(jac.flatten(2).double())[:, 0]
    net.train()
    est, info = input_jacobian_norms(net, x)
    assert info["method"] == "exact"
    torch.testing.assert_close(est, exact, rtol=1e-5, atol=0)
    assert net.training, "the train/eval mode must be restored"


def test_input_jacobian_norms_power_iteration_on_a_known_spectrum():
    """A ReLU layer: J_i = D_i W, D_i the mask of active units, so sigma_1(J_i) is known exactly."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(20, 5, bias=False)
    net = torch.nn.Sequential(lin, torch.nn.ReLU())
    x = torch.randn(8, 20)
    active = (lin(x) > 0).double()  # J_i = D_i W: rows of W where unit i is active
    exact = torch.stack([torch.linalg.svdvals(a[:, None] * lin.weight.detach().double())[0] for a in active])
    est, info = input_jacobian_norms(net, x, method="power", max_iter=500, tol=1e-7)
    assert info["method"] == "power" and info["converged"]
    torch.testing.assert_close(est, exact, rtol=1e-4, atol=0)
    assert (est <= exact * (1 + 1e-6)).all(), "power iteration approaches sigma_1 from below"
