"""Chapter 5 theory checks against closed forms (tolerances stated in each assertion)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from lipexp import fourier as F

# ---------------------------------------------------------------- multi-sine (Fig. 5.2)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_multisine_bound_and_lipschitz(seed):
    r = F.multisine_report(seed)
    assert r["x"].shape == r["f"].shape == (50_000,)
    assert r["x"][0] == -5.0 and r["x"][-1] == 5.0
    assert np.all((0.1 <= r["a"]) & (r["a"] <= 1.0)) and np.all((0.1 <= r["w"]) & (r["w"] <= 5.0))
    np.testing.assert_allclose(r["f"], F.multisine_values(r["x"], r["a"], r["w"]), rtol=0, atol=1e-12)
    bound = r["bound_analytic"]
    assert bound == pytest.approx(float(np.sum(2 * np.pi * r["w"] * r["a"])), rel=1e-15)
    # the bound is attained at x = 0, which is not a grid point
    assert r["K_f_sup"] == pytest.approx(bound, rel=1e-14)
    assert r["K_f_grid"] <= bound and r["K_f_grid"] == pytest.approx(bound, rel=1e-5)
    assert r["K_f_fd"] == pytest.approx(r["K_f_grid"], rel=1e-5)
    assert r["bound_fft"] == pytest.approx(bound, rel=1e-6)
    assert r["bound_fft_rect"] > 10 * bound  # no window: the periodic extension has a jump


def test_multisine_is_seeded():
    a, b, c = F.multisine(1), F.multisine(1), F.multisine(2)
    np.testing.assert_array_equal(a.f, b.f)
    assert not np.allclose(a.w, c.w)


def test_multisine_derivative_matches_finite_differences():
    ms = F.multisine(4, n_points=2001)
    h = 1e-6
    fd = (F.multisine_values(ms.x + h, ms.a, ms.w) - F.multisine_values(ms.x - h, ms.a, ms.w)) / (2 * h)
    np.testing.assert_allclose(F.multisine_derivative(ms.x, ms.a, ms.w), fd, rtol=0, atol=1e-6)


def test_fft_scaling_and_convention_on_gaussian_1d():
    # exp(-pi x^2) is its own transform under exp(-2 pi i zeta x)
    x = np.linspace(-8, 8, 4001)
    zeta, mag, dzeta = F.fourier_transform_1d(np.exp(-np.pi * x**2), x, window="rect", pad=2)
    assert dzeta == pytest.approx(1 / (2 * 4001 * (x[1] - x[0])))
    np.testing.assert_allclose(mag, np.exp(-np.pi * zeta**2), rtol=0, atol=1e-12)
    # its spectral bound: int 2 pi |z| e^{-pi z^2} dz = 2; the kink of |z| at 0 costs -(pi/3) f^(0) dz^2
    for pad, tol in ((8, 5e-5), (32, 3e-6)):
        est = F.spectral_bound_fft_1d(np.exp(-np.pi * x**2), x, window="rect", pad=pad)
        dz = 1 / (pad * 4001 * (x[1] - x[0]))
        assert est == pytest.approx(2.0 - math.pi / 3 * dz**2, rel=tol / 10)
        assert est == pytest.approx(2.0, rel=tol)


def test_fft_bound_converges_when_lobes_overlap():
    # window centre off 0: the lobes' phases differ, overlap biases the estimate down; it must vanish as L grows
    errs = []
    for length in (10, 50, 200):
        ms = F.multisine(1, n_points=2000 * length, x_range=(1.234 - length / 2, 1.234 + length / 2))
        est = F.spectral_bound_fft_1d(ms.f, ms.x)
        errs.append(est / F.multisine_spectral_bound(ms.a, ms.w) - 1)
    assert errs[0] < -0.05  # measured about -0.30
    assert abs(errs[1]) < abs(errs[0]) and abs(errs[2]) < abs(errs[1])
    assert abs(errs[2]) < 1e-3


def test_rect_window_diverges_with_resolution():
    coarse, fine = (F.multisine(1, n_points=n) for n in (20_000, 80_000))
    b1 = F.spectral_bound_fft_1d(coarse.f, coarse.x, window="rect")
    b2 = F.spectral_bound_fft_1d(fine.f, fine.x, window="rect")
    assert b2 > 2 * b1


def test_fft_input_errors():
    x = np.linspace(0, 1, 10)
    with pytest.raises(ValueError, match="evenly spaced"):
        F.fourier_transform_1d(np.ones(10), x**2)
    with pytest.raises(ValueError, match="window"):
        F.fourier_transform_1d(np.ones(10), x, window="hann")


# ---------------------------------------------------------------- Gaussian (Prop. 5.3.3)


def test_gaussian_table_against_closed_forms():
    rows = F.gaussian_table(alphas=(0.25, 1.0, 4.0, 16.0), fd_points=1001)
    for row in rows:
        assert row["K_f_exact"] == pytest.approx(math.sqrt(2 * row["a"] / math.e), rel=1e-15)
        assert row["bound_exact"] == pytest.approx(math.sqrt(math.pi * row["a"]), rel=1e-15)
        assert abs(row["K_f_rel_err"]) < 5e-5  # h^2 error, measured -2.4e-5 at 1001 points
        assert abs(row["bound_rel_err"]) < 5e-6  # dzeta^3 bias, measured -1.8e-6 at pad 8
        assert row["fhat_max_err"] < 1e-12  # the thesis' convention gives f^ = (pi/a) exp(-pi^2 |z|^2 / a)
        assert row["ratio_K_over_bound"] == pytest.approx(math.sqrt(2 / (math.pi * math.e)), rel=1e-12)


def test_gaussian_bound_bias_scales_like_dzeta_cubed():
    e2, e4 = (F.gaussian_spectral_bound_fft(1.0, pad=p) / math.sqrt(math.pi) - 1 for p in (2, 4))
    assert e2 < 0 and e4 < 0
    assert 7.0 < e2 / e4 < 9.0


def test_gaussian_k_zeta_integrates_to_bound():
    from scipy.integrate import quad

    for a in (0.5, 3.0):
        val, _ = quad(lambda r: F.gaussian_k_zeta(r, a) * 2 * math.pi * r, 0, np.inf)
        assert val == pytest.approx(math.sqrt(math.pi * a), rel=1e-10)


# ---------------------------------------------------------------- Lemma 5.3.4


def test_lemma_ratio_bounded_by_and_tends_to_sqrt_pi_delta():
    rows = F.lemma534_table(a=1.0, deltas=(0.001, 0.01, 0.05, 0.1), zeta_norms=(0.15, 0.225, 0.4), eps=1e-3)
    assert len(rows) == 12
    for row in rows:
        assert row["bound"] == pytest.approx(row["M_delta"] * row["eps"] * math.sqrt(math.pi) * row["delta"])
        assert row["ratio"] <= row["ratio_predicted"] * (1 + 1e-10)
    small = [r for r in rows if r["delta"] == 0.001]
    for row in small:  # first-order correction ~ delta |d log K / d|w||, at most 3.7e-3 * 1.5 here
        assert row["ratio_over_predicted"] == pytest.approx(1.0, abs=6e-3)
    peak = [r for r in rows if r["zeta_norm"] == 0.225]  # K is flat at |w| = sqrt(a/2)/pi = 0.2251
    assert peak[0]["ratio_over_predicted"] == pytest.approx(1.0, abs=1e-5)


def _brute_sup(a, zeta, delta, eps, direction, xs):
    """max over the grid xs (K x 2) of |f_B(x) - f_B(x - eps u)|, by direct quadrature."""
    nodes, weights = np.polynomial.legendre.leggauss(24)
    rho = 0.5 * delta * (nodes + 1)
    phi = 2 * np.pi * np.arange(96) / 96
    om = np.stack(
        [zeta[0] + np.outer(rho, np.cos(phi)).ravel(), zeta[1] + np.outer(rho, np.sin(phi)).ravel()], 1
    )
    wts = np.repeat(0.5 * delta * weights * rho, 96) * 2 * np.pi / 96
    g = F.gaussian_fhat(np.linalg.norm(om, axis=1), a) * (1 - np.exp(-2j * np.pi * eps * om @ direction)) * wts
    return float(np.abs(np.exp(2j * np.pi * xs @ om.T) @ g).max())


def test_lemma_sup_matches_brute_force_over_x_and_directions():
    a, zn, delta, eps = 1.0, 0.15, 0.12, 0.8  # large delta/|zeta| and eps: the hardest case for the claims
    row = F.lemma534_row(a, zn, delta, eps)
    zeta = np.array([zn, 0.0])
    g = np.linspace(-6, 6, 25)
    xs = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    best = 0.0
    for th in np.linspace(0, 2 * np.pi, 16, endpoint=False):
        u = np.array([math.cos(th), math.sin(th)])
        best = max(best, _brute_sup(a, zeta, delta, eps, u, xs + 0.5 * eps * u))
    assert best <= row["sup_diff"] * (1 + 1e-9)
    at_max = _brute_sup(a, zeta, delta, eps, np.array([1.0, 0.0]), np.array([[0.5 * eps, 0.0]]))
    assert at_max == pytest.approx(row["sup_diff"], rel=1e-9)


def test_lemma_input_errors():
    with pytest.raises(ValueError, match="delta < \\|zeta\\|"):
        F.lemma534_row(1.0, 0.1, 0.2, 1e-3)
    with pytest.raises(ValueError, match="eps"):
        F.lemma534_row(1.0, 0.5, 0.1, 2.0)


# ---------------------------------------------------------------- directional response (Fig. 5.1)


def test_directional_response_closed_form():
    n = 500
    p = torch.arange(n, dtype=torch.float64) / n  # projections on e = (0, 1, 0)
    gen = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randn(n, generator=gen, dtype=torch.float64), p, torch.randn(n, generator=gen, dtype=torch.float64)], 1)
    out = F.directional_frequency_response(torch.ones(n), x, direction=torch.tensor([0.0, 2.0, 0.0]), num_t=101)
    s = out["zeta_norm"]
    expected = torch.where(s == 0, torch.ones_like(s), (torch.sin(math.pi * s) / (n * torch.sin(math.pi * s / n))).abs())
    torch.testing.assert_close(out["fhat_abs"], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["K_zeta"], out["t"] * out["fhat_abs"], rtol=1e-14, atol=0)
    assert out["t"][0] == 0 and out["t"][-1] == pytest.approx(2 * math.pi)


def test_directional_response_matches_brute_force_and_chunking():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(300, 1, 4, 5, generator=gen)
    fx = torch.rand(300, generator=gen)
    out = F.directional_frequency_response(fx, x, num_t=37, chunk_elems=1000)  # several chunks
    zeta = out["direction"]
    assert zeta.norm() == pytest.approx(1.0, abs=1e-14)
    zt = out["zeta_norm"][:, None] * zeta[None, :]  # (T, d)
    brute = (fx.double()[None, :] * torch.exp(-2j * math.pi * (zt @ x.reshape(300, -1).double().T))).mean(1).abs()
    torch.testing.assert_close(out["fhat_abs"], brute, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["K_zeta"], 2 * math.pi * zt.norm(dim=1) * brute, rtol=1e-12, atol=1e-14)


def test_principal_direction_recovers_axis():
    gen = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    scales = torch.tensor([5.0, 2.0, 1.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    x = (torch.randn(20000, 6, generator=gen, dtype=torch.float64) * scales) @ q.T + 3.0
    v = F.principal_direction(x)
    assert abs(float(v @ q[:, 0])) == pytest.approx(1.0, abs=1e-3)
    assert v[v.abs().argmax()] > 0


def test_true_label_probability_logits_and_logsoftmax_agree():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    x, y = torch.randn(50, 5), torch.randint(0, 3, (50,))
    p_logits = F.true_label_probability(lin, x, y, batch_size=16)
    model = nn.Sequential(lin, nn.LogSoftmax(dim=1)).train()
    p_logsm = F.true_label_probability(model, x, y, batch_size=7)
    assert model.training  # mode restored
    torch.testing.assert_close(p_logits, p_logsm, rtol=1e-6, atol=1e-7)
    manual = torch.softmax(lin(x).double(), 1)[torch.arange(50), y]
    torch.testing.assert_close(p_logits, manual.detach(), rtol=1e-6, atol=1e-7)


def test_directional_response_errors():
    with pytest.raises(ValueError, match="samples"):
        F.directional_frequency_response(torch.ones(3), torch.ones(4, 2))
    with pytest.raises(ValueError, match="features"):
        F.directional_frequency_response(torch.ones(4), torch.ones(4, 2), direction=torch.ones(3))
