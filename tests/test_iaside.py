"""I-ASIDE engine: Shapley axioms, band-sum vs per-coalition FFT, SID/SRS closed forms, validation."""
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from lipexp import iaside
from lipexp.frequency import band_masks
from lipexp.models import convnet, with_normalization

ABS = iaside.ABSENCES


class BandBlind(nn.Module):
    """Filters its input to the frequencies where ``keep`` is 1, then a small nonlinear classifier."""

    def __init__(self, keep: torch.Tensor, c=3, h=16, w=16, num_classes=5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("keep", keep.double())
        self.w1 = nn.Parameter(torch.randn(c * h * w, 32, generator=g, dtype=torch.float64) / math.sqrt(c * h * w) * 4)
        self.w2 = nn.Parameter(torch.randn(32, num_classes, generator=g, dtype=torch.float64))

    def forward(self, x):
        x = torch.fft.ifft2(torch.fft.fft2(x) * self.keep).real
        return torch.tanh(x.flatten(1) @ self.w1) @ self.w2


class BandEnergy(nn.Module):
    """Logits from the energies of the input's bands, with bands i and j entering only as a sum."""

    def __init__(self, masks: torch.Tensor, i: int, j: int, num_classes=4, seed=0):
        super().__init__()
        self.register_buffer("masks", masks.double())
        self.i, self.j = i, j
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(masks.shape[0], num_classes, generator=g, dtype=torch.float64))

    def forward(self, x):
        spec = torch.fft.fft2(x).abs().square().sum(1)  # N x H x W
        e = torch.einsum("nhw,mhw->nm", spec, self.masks) / spec[0].numel()
        e = e.clone()
        s = e[:, self.i] + e[:, self.j]
        e[:, self.i], e[:, self.j] = s, s
        return torch.log1p(e) @ self.w


def _images(n=3, c=3, h=16, w=16, seed=0, dtype=torch.float64):
    return torch.rand((n, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _labels(n, k, seed=1):
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def convnet64():
    torch.manual_seed(0)
    return with_normalization(convnet(num_classes=10), "cifar10").double().eval()


@pytest.fixture(scope="module")
def tiny64():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 15 * 15, 10)).double()


# ------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("partition", ["linf", "l2"])
@pytest.mark.parametrize("hw", [(16, 16), (15, 17), (32, 24)])
def test_band_masks_partition_and_real(partition, hw):
    h, w = hw
    m = band_masks(h, w, 4, partition)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(m.sum(0), torch.ones(h, w))
    # symmetric under (u, v) -> (-u, -v), so every band image of a real image is real
    flipped = torch.roll(torch.flip(m, dims=(1, 2)), shifts=(1, 1), dims=(1, 2))
    assert torch.equal(m, flipped)
    x = _images(2, 3, h, w)
    parts = torch.fft.ifft2(torch.fft.fft2(x).unsqueeze(1) * m.unsqueeze(1))
    assert parts.imag.abs().max() < 1e-12
    torch.testing.assert_close(parts.real.sum(1), x, atol=1e-12, rtol=0)
    assert (m[0, 0, 0] == 1) and m[0].sum() >= 1  # DC in band 0


# ----------------------------------------------------------------------------- Shapley


def test_shapley_values_match_permutation_definition():
    m = 4
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2**m, generator=g, dtype=torch.float64)
    v[0] = 0
    brute = torch.zeros(m, dtype=torch.float64)
    for order in itertools.permutations(range(m)):
        s = 0
        for p in order:
            brute[p] += v[s | (1 << p)] - v[s]
            s |= 1 << p
    brute /= math.factorial(m)
    torch.testing.assert_close(iaside.shapley_values(v), brute, atol=1e-12, rtol=0)


def test_coalition_matrix_and_weights():
    c = iaside.coalition_matrix(3)
    assert c.shape == (8, 3) and c[5].tolist() == [1.0, 0.0, 1.0]
    for m in (1, 4, 8):
        w = iaside.shapley_weights(m)
        assert math.isclose(sum(math.comb(m - 1, s) * w[s].item() for s in range(m)), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("absence", ABS)
def test_efficiency(convnet64, absence):
    x, y = _images(4, 3, 32, 32), _labels(4, 10)
    v = iaside.coalition_values(convnet64, x, y, num_bands=4, absence=absence)
    psi = iaside.spectral_importance(convnet64, x, y, num_bands=4, absence=absence)
    assert v[0] == 0
    torch.testing.assert_close(psi.sum(), v[-1], atol=1e-12, rtol=0)
    if absence == "zero":  # v(all) from the model directly: all bands = x, no band = black image
        with torch.no_grad():
            lq = lambda z: torch.log_softmax(convnet64(z), 1).gather(1, y.view(-1, 1)).mean()
            torch.testing.assert_close(v[-1], (lq(x) - lq(torch.zeros_like(x))).double(), atol=1e-10, rtol=0)


@pytest.mark.parametrize("absence", ABS)
def test_dummy_player(absence):
    m, blind = 4, 2
    masks = band_masks(16, 16, m)
    model = BandBlind(1.0 - masks[blind])
    x, y = _images(5), _labels(5, 5)
    psi = iaside.spectral_importance(model, x, y, num_bands=m, absence=absence)
    assert abs(psi[blind]) < 1e-10
    others = [i for i in range(m) if i != blind]
    assert psi[others].abs().max() > 1e-3  # the test is not vacuous


def test_low_pass_model_gives_zero_to_high_bands():
    m = 4
    masks = band_masks(16, 16, m)
    model = BandBlind(masks[:2].sum(0))  # sees bands 0 and 1 only
    x, y = _images(5), _labels(5, 5)
    psi = iaside.spectral_importance(model, x, y, num_bands=m)
    assert psi[2:].abs().max() < 1e-10 and psi[:2].abs().min() > 1e-4


def test_symmetry():
    m, i, j = 4, 1, 3
    masks = band_masks(16, 16, m)
    g = torch.Generator().manual_seed(3)
    z = torch.randn((4, 3, 16, 16), generator=g, dtype=torch.float64)
    bands = torch.fft.ifft2(torch.fft.fft2(z).unsqueeze(1) * masks.unsqueeze(1)).real
    unit = bands / bands.flatten(2).norm(dim=2).view(4, m, 1, 1, 1)
    # bands i and j carry equal energy in every image, so swapping them changes nothing for the model
    x = 0.5 + 0.8 * (unit[:, i] + unit[:, j]) + 0.3 * unit[:, 2]
    assert 0 <= x.min() and x.max() <= 1
    y = _labels(4, 4)
    psi = iaside.spectral_importance(BandEnergy(masks, i, j), x, y, num_bands=m)
    assert abs(psi[i] - psi[j]) < 1e-10
    assert abs(psi[i]) > 1e-4 and abs(psi[i] - psi[2]) > 1e-4


# --------------------------------------------------------------- band-sum vs FFT reference


@pytest.mark.parametrize("partition", ["linf", "l2"])
@pytest.mark.parametrize("absence", ABS)
def test_bandsum_matches_fft_reference(tiny64, absence, partition, monkeypatch):
    x, y = _images(3, 3, 32, 32), _labels(3, 10)
    kw = dict(num_bands=4, absence=absence, partition=partition, seed=5)
    v_ref = iaside.coalition_values(tiny64, x, y, method="fft", batch_size=20, **kw)
    v_fast = iaside.coalition_values(tiny64, x, y, batch_size=7, **kw)  # all images in one block
    torch.testing.assert_close(v_fast, v_ref, atol=1e-11, rtol=0)
    monkeypatch.setattr(iaside, "BLOCK_ELEMENTS", 1)  # one image per block, batches split coalitions
    v_fast1 = iaside.coalition_values(tiny64, x, y, batch_size=7, **kw)
    torch.testing.assert_close(v_fast1, v_ref, atol=1e-11, rtol=0)
    monkeypatch.undo()
    psi_ref = iaside.spectral_importance_reference(tiny64, x, y, **kw)
    torch.testing.assert_close(iaside.spectral_importance(tiny64, x, y, **kw), psi_ref, atol=1e-11, rtol=0)


def test_bandsum_matches_fft_reference_float32_m8():
    torch.manual_seed(0)
    model = with_normalization(convnet(num_classes=10), "cifar10").eval()
    x, y = _images(2, 3, 32, 32, dtype=torch.float32), _labels(2, 10)
    fast = iaside.spectral_importance(model, x, y, num_bands=8, batch_size=512)  # two images per block
    ref = iaside.spectral_importance_reference(model, x, y, num_bands=8, batch_size=256)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("hw", [(16, 16), (15, 17)])
@pytest.mark.parametrize("absence", ABS)
def test_coalition_images_match_filter(absence, hw):
    x = _images(3, 3, *hw)
    imgs = iaside.coalition_images(x, num_bands=3, absence=absence, seed=2)
    b = iaside.absence_spectrum(x, absence, seed=2)
    assert imgs.shape == (8, 3, 3, *hw)
    for k in range(8):
        torch.testing.assert_close(imgs[k], iaside.coalition_filter(x, k, 3, "linf", b), atol=1e-12, rtol=0)
    torch.testing.assert_close(imgs[-1], x, atol=1e-12, rtol=0)  # all bands present: the image itself
    if absence == "zero":
        assert imgs[0].abs().max() < 1e-15


def test_replacement_and_noise_baselines_are_seeded():
    x = _images(6, 3, 16, 16)
    b1 = iaside.absence_spectrum(x, "replacement", seed=4)
    assert torch.equal(b1, iaside.absence_spectrum(x, "replacement", seed=4))
    # each image is replaced by another image of the set, never by itself
    spec = torch.fft.fft2(x)
    src = [int(torch.argmin((spec - b1[n]).abs().flatten(1).sum(1))) for n in range(6)]
    assert sorted(src) == list(range(6)) and all(s != n for n, s in enumerate(src))
    g1 = iaside.absence_spectrum(x, "complex_gaussian", seed=4)
    assert torch.equal(g1, iaside.absence_spectrum(x, "complex_gaussian", seed=4))
    assert not torch.equal(g1, iaside.absence_spectrum(x, "complex_gaussian", seed=5))
    assert abs(g1.real.var().item() - 0.5) < 0.05 and abs(g1.imag.var().item() - 0.5) < 0.05
    pool = _images(2, 3, 16, 16, seed=9)
    b2 = iaside.absence_spectrum(x, "replacement", replacement_images=pool)
    spec_pool = torch.fft.fft2(pool)
    assert all(((spec_pool - b2[n]).abs().flatten(1).max(1).values < 1e-9).any() for n in range(6))


def test_batchnorm_model_mode_restored_and_batch_independent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    model(torch.rand(4, 3, 32, 32))  # non-trivial running statistics
    model = model.double().train()
    x, y = _images(2, 3, 32, 32), _labels(2, 10)
    p1 = iaside.spectral_importance(model, x, y, num_bands=3, batch_size=3)
    assert model.training
    p2 = iaside.spectral_importance(model, x, y, num_bands=3, batch_size=64)
    torch.testing.assert_close(p1, p2, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="running statistics"):
        iaside.spectral_importance(convnet(num_classes=10, batchnorm=True).double(), x, y, num_bands=2)


# ------------------------------------------------------------------------------ SID, SRS


def test_sid_closed_form():
    psi = torch.tensor([3.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    sid = iaside.spectral_importance_distribution(psi)
    torch.testing.assert_close(sid, torch.tensor([2 / 3, 0, 1 / 3, 0], dtype=torch.float64))
    torch.testing.assert_close(iaside.spectral_importance_distribution(2.5 * psi - 7), sid)
    batch = iaside.spectral_importance_distribution(torch.stack([psi, -psi]))
    torch.testing.assert_close(batch[1], torch.tensor([0, 1, 0.5, 1], dtype=torch.float64) / 2.5)
    with pytest.raises(ValueError, match="equal"):
        iaside.spectral_importance_distribution(torch.ones(8))


def test_srs_closed_form():
    m, beta = 8, 0.75
    b = beta ** np.arange(m)
    b2, eta = np.linalg.norm(b), b.sum() / (m * np.linalg.norm(b))
    uniform = torch.full((m,), 1 / m, dtype=torch.float64)
    assert abs(iaside.spectral_robustness_score(uniform).item()) < 1e-12
    e0, e7 = torch.eye(m, dtype=torch.float64)[0], torch.eye(m, dtype=torch.float64)[7]
    assert math.isclose(iaside.spectral_robustness_score(e0).item(), (1 / b2 - eta) / (1 - eta), rel_tol=1e-12)
    assert math.isclose(iaside.spectral_robustness_score(e0).item(), 0.5217173452898, rel_tol=1e-10)
    assert math.isclose(iaside.spectral_robustness_score(e7).item(), 0.3001555371968, rel_tol=1e-10)
    sid = torch.tensor([0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05, 0.0], dtype=torch.float64)
    expect = abs(float(b @ sid.numpy()) / b2 - eta) / (1 - eta)
    assert math.isclose(iaside.spectral_robustness_score(sid).item(), expect, rel_tol=1e-12)
    two = iaside.spectral_robustness_score(torch.stack([uniform, e0]))
    assert two.shape == (2,)
    # beta -> the weights change the score; M = 4
    assert math.isclose(iaside.spectral_robustness_score(torch.eye(4)[0].double()).item(), 0.4215430457990, rel_tol=1e-10)
    with pytest.raises(ValueError, match="distribution"):
        iaside.spectral_robustness_score(torch.tensor([0.3, -0.1, 0.2]))
    with pytest.raises(ValueError, match="beta"):
        iaside.spectral_robustness_score(uniform, beta=1.0)


# ---------------------------------------------------------------------------- validation


def test_input_validation(convnet64):
    x, y = _images(2, 3, 32, 32), _labels(2, 10)
    f = iaside.spectral_importance
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        f(convnet64, x * 255, y, num_bands=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        f(convnet64, x - 0.5, y, num_bands=2)
    with pytest.raises(ValueError, match="N x C x H x W"):
        f(convnet64, x[0], y, num_bands=2)
    with pytest.raises(ValueError, match="float"):
        f(convnet64, (x * 255).to(torch.uint8), y, num_bands=2)
    with pytest.raises(ValueError, match="number of logits"):
        f(convnet64, x, torch.tensor([3, 10]), num_bands=2)
    with pytest.raises(ValueError, match=">= 0"):
        f(convnet64, x, torch.tensor([-1, 0]), num_bands=2)
    with pytest.raises(ValueError, match="shape"):
        f(convnet64, x, torch.tensor([1, 2, 3]), num_bands=2)
    with pytest.raises(ValueError, match="absence"):
        f(convnet64, x, y, num_bands=2, absence="mean")
    with pytest.raises(ValueError, match="partition"):
        f(convnet64, x, y, num_bands=2, partition="l1")
    with pytest.raises(ValueError, match="two images"):
        f(convnet64, x[:1], y[:1], num_bands=2, absence="replacement")
    with pytest.raises(ValueError, match="no frequency"):
        iaside.coalition_images(_images(1, 1, 8, 8), num_bands=8)
    with pytest.raises(ValueError, match="num_bands"):
        f(convnet64, x, y, num_bands=0)
    with pytest.raises(ValueError, match="batch_size"):
        f(convnet64, x, y, num_bands=2, batch_size=0)
