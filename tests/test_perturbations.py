"""Perturbations, energy scaling, mPE, and the radial ESD / spectral SNR / power-law fit."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from lipexp import perturbations as P
from lipexp.frequency import power_law_fit, radial_esd, ring_index, spectral_snr_db


def _images(n=4, c=3, h=16, w=16, seed=0, lo=0.0, hi=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand((n, c, h, w), generator=g, dtype=dtype)


def _labels(n, k=5, seed=1):
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def linear64():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5)).double().eval()


@pytest.fixture(scope="module")
def small32():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 5)
    ).eval()


def _ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


# ---------------------------------------------------------------------------------- corruptions


def test_white_noise():
    x = _images(8, hi=1.0)
    out = P.white_noise(x, 0.1, seed=3)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, P.white_noise(x, 0.1, seed=3))
    raw = P.white_noise(x, 0.1, seed=3, clip=False) - x
    assert abs(raw.std().item() - 0.1) < 0.005 and abs(raw.mean().item()) < 0.005


def test_poisson_noise():
    x = torch.full((4, 3, 32, 32), 0.4, dtype=torch.float64)
    out = P.poisson_noise(x, photons=60.0, seed=0, clip=False)
    assert abs(out.mean().item() - 0.4) < 0.01  # unbiased
    assert abs(out.var().item() - 0.4 / 60.0) < 0.1 * 0.4 / 60.0  # Poisson: var = x / photons
    assert torch.allclose(out * 60, (out * 60).round())  # photon counts
    clipped = P.poisson_noise(_images(), seed=1)
    assert clipped.min() >= 0 and clipped.max() <= 1


def test_salt_and_pepper():
    x = torch.full((4, 3, 64, 64), 0.5, dtype=torch.float64)
    out = P.salt_and_pepper(x, 0.1, seed=2)
    hit = (out != 0.5).all(1)  # all channels change together
    assert ((out != 0.5).any(1) == hit).all()
    assert abs(hit.double().mean().item() - 0.1) < 0.01
    vals = out.permute(0, 2, 3, 1)[hit]
    assert set(vals.unique().tolist()) == {0.0, 1.0}
    assert abs((vals[:, 0] == 1).double().mean().item() - 0.5) < 0.05


@pytest.mark.parametrize("k", [3, 5, 7])
def test_gaussian_blur(k):
    const = torch.full((1, 3, 16, 16), 0.3, dtype=torch.float64)
    torch.testing.assert_close(P.gaussian_blur(const, k), const)
    impulse = torch.zeros((1, 1, 17, 17), dtype=torch.float64)
    impulse[..., 8, 8] = 1.0
    blurred = P.gaussian_blur(impulse, k)
    assert math.isclose(blurred.sum().item(), 1.0, rel_tol=1e-9)  # normalised kernel
    assert (blurred > 0).sum().item() == k * k  # support = kernel
    x = _images(2, 3, 32, 32)
    out = P.gaussian_blur(x, k)
    assert out.min() >= 0 and out.max() <= 1
    assert (radial_esd(out)[..., 8:] < radial_esd(x)[..., 8:]).all()  # high frequencies removed
    with pytest.raises(ValueError, match="odd"):
        P.gaussian_blur(x, 4)


# -------------------------------------------------------------------------------------- attacks


def test_fgsm_increases_loss_and_matches_torchattacks(linear64):
    x, y = _images(6, lo=0.2, hi=0.8), _labels(6)
    adv = P.fgsm(linear64, x, y, eps=0.1)
    assert (adv - x).abs().max() <= 0.1 + 1e-12
    # CE of a linear model is convex in x: L(x + d) >= L(x) + g.d = L(x) + eps |g|_1 > L(x)
    assert (_ce(linear64, adv, y) > _ce(linear64, x, y)).all()
    ref = torchattacks.FGSM(linear64, eps=0.1)(x, y)
    torch.testing.assert_close(adv, ref.double(), atol=1e-12, rtol=0)


def test_pgd(linear64):
    x, y = _images(6, lo=0.1, hi=0.9), _labels(6)
    adv = P.pgd(linear64, x, y, eps=0.1, alpha=0.02, steps=7, random_start=False)
    ref = torchattacks.PGD(linear64, eps=0.1, alpha=0.02, steps=7, random_start=False)(x, y)
    torch.testing.assert_close(adv, ref.double(), atol=1e-12, rtol=0)
    rnd = P.pgd(linear64, x, y, eps=0.1, seed=4)
    assert torch.equal(rnd, P.pgd(linear64, x, y, eps=0.1, seed=4))
    assert (rnd - x).abs().max() <= 0.1 + 1e-12 and rnd.min() >= 0 and rnd.max() <= 1
    assert (_ce(linear64, rnd, y) > _ce(linear64, x, y)).all()
    assert (_ce(linear64, adv, y) >= _ce(linear64, P.fgsm(linear64, x, y, 0.1), y) - 1e-9).all()


def test_attacks_restore_training_mode(small32):
    model = nn.Sequential(small32, nn.Dropout(0.5)).train()
    x, y = _images(2, dtype=torch.float32), _labels(2)
    P.fgsm(model, x, y, 0.05)
    P.pgd(model, x, y, 0.05, steps=2)
    assert model.training


def test_sparsefool(small32):
    x = _images(2, dtype=torch.float32)
    with torch.no_grad():
        y = small32(x).argmax(1)  # attack correctly classified inputs
    adv = P.sparsefool(small32, x, y, steps=3)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        flipped = (small32(adv).argmax(1) != y)
    assert flipped.all()
    changed = (adv != x).flatten(1).sum(1)
    assert (changed < x[0].numel() / 3).all()  # sparse: most pixel values untouched


def test_one_pixel(small32):
    x, y = _images(2, dtype=torch.float32), _labels(2)
    adv = P.one_pixel(small32, x, y, pixels=1, steps=3, popsize=10, seed=0)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    assert ((adv != x).any(1).flatten(1).sum(1) <= 1).all()  # at most one pixel location
    assert torch.equal(adv, P.one_pixel(small32, x, y, pixels=1, steps=3, popsize=10, seed=0))
    q, q_adv = P.true_class_probability(small32, x, y), P.true_class_probability(small32, adv, y)
    assert (q_adv <= q + 1e-6).all()


def test_pixle(small32):
    x, y = _images(2, dtype=torch.float32), _labels(2)
    adv = P.pixle(small32, x, y, restarts=2, max_iterations=3, seed=0)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    q, q_adv = P.true_class_probability(small32, x, y), P.true_class_probability(small32, adv, y)
    assert (q_adv <= q + 1e-6).all()
    assert not torch.equal(adv, x)


def test_perturb_dispatch(linear64):
    x, y = _images(2), _labels(2)
    torch.testing.assert_close(P.perturb("gaussian_blur", x, kernel_size=3), P.gaussian_blur(x, 3))
    torch.testing.assert_close(P.perturb("fgsm", x, model=linear64, labels=y, eps=0.1), P.fgsm(linear64, x, y, 0.1))
    with pytest.raises(ValueError, match="model="):
        P.perturb("pgd", x, eps=0.1)
    with pytest.raises(ValueError, match="unknown"):
        P.perturb("fog", x)


def test_validation():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        P.white_noise(_images() * 2, 0.1)
    with pytest.raises(ValueError, match="N x C x H x W"):
        P.gaussian_blur(_images()[0], 3)


# --------------------------------------------------------------------------- energy and mPE


def test_scale_to_energy_exact():
    x = _images(5, seed=2)
    delta = P.white_noise(x, 0.3, seed=1) - x
    for frac in (0.1, 0.5):
        s = P.scale_to_energy(delta, x, frac)
        ratio = s.flatten(1).square().sum(1) / x.flatten(1).square().sum(1)
        torch.testing.assert_close(ratio, torch.full((5,), frac, dtype=torch.float64), atol=1e-14, rtol=0)
        # direction kept
        cos = F.cosine_similarity(s.flatten(1), delta.flatten(1))
        torch.testing.assert_close(cos, torch.ones(5, dtype=torch.float64))
    delta[2] = 0
    with pytest.raises(ValueError, match=r"\[2\]"):
        P.scale_to_energy(delta, x, 0.1)


def test_mean_prediction_error(linear64):
    x, y = _images(6), _labels(6)
    assert P.mean_prediction_error(linear64, x, x, y) == 0.0
    xs = P.white_noise(x, 0.2, seed=0)
    with torch.no_grad():
        q = torch.softmax(linear64(x), 1)[torch.arange(6), y]
        qs = torch.softmax(linear64(xs), 1)[torch.arange(6), y]
    expect = (q - qs).abs().mean().item()
    assert math.isclose(P.mean_prediction_error(linear64, x, xs, y, batch_size=4), expect, rel_tol=1e-12)
    assert 0 < expect < 1
    with pytest.raises(ValueError, match="num_classes"):
        P.mean_prediction_error(linear64, x, xs, torch.full((6,), 5))


# ------------------------------------------------------------------ radial ESD, SNR, power law


def test_ring_index_matches_centred_spectrum():
    for h, w in [(8, 8), (7, 10)]:
        ring = torch.fft.fftshift(ring_index(h, w))
        cu, cv = h // 2, w // 2
        for u in range(h):
            for v in range(w):
                assert ring[u, v] == round(math.hypot(u - cu, v - cv))


def test_radial_esd_of_cosine():
    h = w = 16
    i = torch.arange(h, dtype=torch.float64).view(h, 1)
    j = torch.arange(w, dtype=torch.float64).view(1, w)
    u0, v0, a = 3, 4, 0.25
    x = a * torch.cos(2 * math.pi * (u0 * i / h + v0 * j / w))  # energy only at (+-3, +-4): radius 5
    esd = radial_esd(x)
    assert esd.shape == (h // 2 + 1,)
    ring = ring_index(h, w)
    count5 = (ring == 5).sum().item()
    expect = 2 * (a * h * w / 2) ** 2 / count5  # two peaks of |F| = a H W / 2
    assert math.isclose(esd[5].item(), expect, rel_tol=1e-12)
    others = torch.cat([esd[:5], esd[6:]])
    assert others.abs().max() < 1e-20
    z = _images(2, 3, 12, 10)  # brute force on a random non-square batch
    power = torch.fft.fftshift(torch.fft.fft2(z).abs() ** 2, dim=(-2, -1))
    for r, e in enumerate(radial_esd(z).unbind(-1)):
        on_ring = [(u, v) for u in range(12) for v in range(10) if round(math.hypot(u - 6, v - 5)) == r]
        torch.testing.assert_close(e, torch.stack([power[..., u, v] for u, v in on_ring], -1).mean(-1))


def test_white_noise_esd_is_flat():
    g = torch.Generator().manual_seed(0)
    sigma = 0.1
    noise = sigma * torch.randn((400, 32, 32), generator=g, dtype=torch.float64)
    esd = radial_esd(noise).mean(0)
    # unnormalised DFT: E |F(n)(u, v)|^2 = H W sigma^2 at every frequency
    torch.testing.assert_close(esd[2:], torch.full_like(esd[2:], 32 * 32 * sigma**2), rtol=0.1, atol=0)


def test_spectral_snr():
    x = _images(3, 3, 16, 16)
    snr = spectral_snr_db(x, 0.1 * x)
    torch.testing.assert_close(snr, torch.full_like(snr, 20.0), atol=1e-9, rtol=0)  # -20 log10(0.1)
    per = spectral_snr_db(x, 0.5 * x, reduce=False)
    assert per.shape == (3, 3, 9)
    torch.testing.assert_close(per, torch.full_like(per, 20 * math.log10(2.0)), atol=1e-9, rtol=0)
    # energy-scaled perturbation: mean SNR over all frequencies (Parseval) is 10 dB at 10 % energy
    delta = P.scale_to_energy(P.white_noise(x, 0.2, seed=0, clip=False) - x, x, 0.1)
    ratio = torch.fft.fft2(x).abs().square().sum() / torch.fft.fft2(delta).abs().square().sum()
    assert math.isclose(10 * math.log10(ratio.item()), 10.0, abs_tol=1e-9)
    with pytest.raises(ValueError, match="same shape"):
        spectral_snr_db(x, x[:1])


def test_power_law_fit():
    r = torch.arange(0, 17, dtype=torch.float64)
    esd = 5.0 * r.clamp(min=1) ** -2.3
    slope, c = power_law_fit(esd)
    assert math.isclose(slope.item(), -2.3, rel_tol=1e-12) and math.isclose(c.item(), math.log(5.0), rel_tol=1e-12)
    batch = torch.stack([esd, 2 * r.clamp(min=1) ** -1.0])
    slopes, _ = power_law_fit(batch, r_min=2, r_max=10)
    torch.testing.assert_close(slopes, torch.tensor([-2.3, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="r_min"):
        power_law_fit(esd, r_min=0)
