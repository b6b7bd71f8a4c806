"""Spectral bound of the Lipschitz constant and frequency responses (thesis Chapter 5).

Fourier convention (thesis eq. 5.23), used everywhere here:
``f^(zeta) = int f(x) exp(-2 pi i <zeta, x>) dx``, frequencies ``zeta`` in cycles per unit of x.
The spectral Lipschitz contribution is ``K_zeta = 2 pi |zeta|_2 |f^(zeta)|`` (eq. 5.21) and
Theorem 5.3.1 reads ``K_f = sup_x |grad f(x)|_2 <= int K_zeta dzeta`` (Lebesgue measure in zeta).

Numerical FTs on a uniform grid use ``f^(zeta_k) ~ dx^d * DFT(f)_k`` with ``zeta_k`` from
``fftfreq(M, dx)``, so that ``sum_k K_zeta_k * dzeta^d`` with ``dzeta = 1 / (M dx)`` is a Riemann sum
of ``int K_zeta``. Everything in the theory checks is float64 (numpy); the trained-network part is torch.

Thesis erratum: Prop. 5.3.3 states ``int K_zeta = sqrt(alpha)`` (eq. 5.35) while its proof ends with
``sqrt(pi alpha)`` (eq. 5.50); the proof is right (checked numerically in the tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# --------------------------------------------------------------------------------------------
# 1. Multi-sine (Fig. 5.2)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultiSine:
    """``f(x) = sum_n a_n sin(2 pi w_n x)`` sampled on ``x``; all arrays float64."""

    x: np.ndarray  # (P,)
    f: np.ndarray  # (P,)
    a: np.ndarray  # (n_terms,)
    w: np.ndarray  # (n_terms,)


def multisine(
    seed: int,
    n_terms: int = 10,
    n_points: int = 50_000,
    x_range: tuple[float, float] = (-5.0, 5.0),
    a_range: tuple[float, float] = (0.1, 1.0),
    w_range: tuple[float, float] = (0.1, 5.0),
) -> MultiSine:
    """Random multi-sine of thesis eq. 5.30: ``a ~ U[a_range]`` then ``w ~ U[w_range]`` from
    ``numpy.random.default_rng(seed)``, on ``n_points`` evenly spaced points of ``x_range`` (ends included)."""
    if n_terms < 1 or n_points < 2:
        raise ValueError(f"need n_terms >= 1 and n_points >= 2, got {n_terms}, {n_points}")
    if not x_range[0] < x_range[1]:
        raise ValueError(f"x_range must be increasing, got {x_range}")
    rng = np.random.default_rng(seed)
    a = rng.uniform(*a_range, size=n_terms)
    w = rng.uniform(*w_range, size=n_terms)
    x = np.linspace(x_range[0], x_range[1], n_points)
    return MultiSine(x=x, f=multisine_values(x, a, w), a=a, w=w)


def multisine_values(x: np.ndarray, a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``sum_n a_n sin(2 pi w_n x)``, shape of ``x``."""
    return np.sin(2 * np.pi * np.multiply.outer(x, w)) @ a


def multisine_derivative(x: np.ndarray, a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``f'(x) = sum_n 2 pi w_n a_n cos(2 pi w_n x)``, shape of ``x``."""
    return np.cos(2 * np.pi * np.multiply.outer(x, w)) @ (2 * np.pi * w * a)


def multisine_spectral_bound(a: np.ndarray, w: np.ndarray) -> float:
    """Analytic ``int K_zeta = sum_n 2 pi |w_n| |a_n|``.

    ``f^ = sum_n (a_n / 2i) [delta(zeta - w_n) - delta(zeta + w_n)]`` (eq. 5.31): each sine puts mass
    ``|a_n| / 2`` at ``+-w_n``, each weighted by ``2 pi |w_n|``. The bound is attained at x = 0, where
    every cosine equals 1, so for this family ``K_f`` over R equals the bound exactly.
    """
    return float(np.sum(2 * np.pi * np.abs(w) * np.abs(a)))


def gaussian_window(x: np.ndarray, width_fraction: float = 1 / 12) -> np.ndarray:
    """Gaussian window centred on the middle of ``x``, std ``width_fraction * (x[-1] - x[0])``,
    shifted and rescaled so that it is 1 at the centre and 0 at both ends (no jump at the edges)."""
    centre = 0.5 * (x[0] + x[-1])
    s = width_fraction * (x[-1] - x[0])
    g = np.exp(-0.5 * ((x - centre) / s) ** 2)
    edge = max(g[0], g[-1])
    return (g - edge) / (1.0 - edge)


def fourier_transform_1d(
    f: np.ndarray, x: np.ndarray, window: str = "gauss", pad: int = 4, width_fraction: float = 1 / 12
) -> tuple[np.ndarray, np.ndarray, float]:
    """``|F[f w](zeta)|`` on ``zeta >= 0`` by zero-padded FFT; returns ``(zeta (K,), fhat_abs (K,), dzeta)``.

    ``F[f w](zeta_k) = int f(x) w(x) exp(-2 pi i zeta_k x) dx ~ dx * DFT_M(f w)_k`` with ``M = pad * len(x)``,
    ``zeta_k = k / (M dx)`` and ``dzeta = 1 / (M dx)``. ``window="rect"`` is ``w = 1`` on the sampled
    interval (peaks of height ``|a_n| L / 2`` for a sine); ``"gauss"`` is :func:`gaussian_window`, which
    has ``w(centre) = 1`` and a nearly positive transform of unit integral, so each sine gives a lobe of
    mass ``|a_n| / 2``. The spectrum of a real f is even: ``zeta < 0`` mirrors ``zeta > 0``.
    """
    x = np.asarray(x, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    if x.ndim != 1 or f.shape != x.shape:
        raise ValueError(f"x and f must be 1-D of equal length, got {x.shape} and {f.shape}")
    dx = np.diff(x)
    if not np.allclose(dx, dx[0], rtol=1e-9, atol=0):
        raise ValueError("x must be evenly spaced for the FFT")
    if pad < 1:
        raise ValueError(f"pad must be >= 1, got {pad}")
    if window == "gauss":
        wx = gaussian_window(x, width_fraction)
    elif window == "rect":
        wx = np.ones_like(x)
    else:
        raise ValueError(f"unknown window '{window}'; choose 'gauss' or 'rect'")
    m = pad * len(x)
    spec = np.fft.rfft(f * wx, n=m) * dx[0]
    zeta = np.fft.rfftfreq(m, d=dx[0])
    return zeta, np.abs(spec), 1.0 / (m * dx[0])


def spectral_bound_fft_1d(
    f: np.ndarray, x: np.ndarray, window: str = "gauss", pad: int = 4, width_fraction: float = 1 / 12
) -> float:
    """FFT estimate of ``int K_zeta dzeta = int 2 pi |zeta| |f^(zeta)| dzeta`` for sampled f.

    Estimator: ``E = sum_k c_k 2 pi |zeta_k| |F[f w](zeta_k)| dzeta`` over ``zeta_k >= 0``, with ``c_k = 2``
    (the mirrored half) except ``c = 1`` at ``zeta = 0`` and at Nyquist, i.e. the spectral bound of
    ``f * w`` for the window of :func:`fourier_transform_1d`.

    Bias, for a sum of sines: (i) a lobe of mass ``|a_n|/2`` centred at ``w_n`` contributes
    ``2 pi w_n |a_n| / 2`` exactly when lobes add without cancelling, because the mean of ``|zeta|``
    under a symmetric lobe is its centre; lobes of nearby frequencies with different phases at the
    window centre partly cancel (``|sum| <= sum |.|``), biasing E downwards by up to tens of percent
    when the lobe width ``1 / (2 pi s)`` (s the window std) is comparable to the frequency gaps; it
    vanishes as the window grows. At the thesis' centre x = 0 every sine has phase 0, so all lobes on
    ``zeta > 0`` share the phase ``-i`` and E is exact up to (ii) the window's truncation and (iii)
    aliasing and Riemann-sum errors, all below 1e-7 relative at 50,000 points on [-5, 5] (tests).
    The Riemann sum of the kink of ``|zeta|`` at 0 adds ``-(pi/3) |F[f w](0)| dzeta^2`` (0 for odd f).
    ``window="rect"`` (no window) diverges as the grid is refined: the periodic extension of f has a
    jump, so ``|f^|`` decays like ``1/|zeta|`` and ``int |zeta| |f^|`` grows with the Nyquist frequency.
    """
    zeta, mag, dzeta = fourier_transform_1d(f, x, window, pad, width_fraction)
    weights = np.full(zeta.shape, 2.0)
    weights[0] = 1.0
    if (pad * len(x)) % 2 == 0:
        weights[-1] = 1.0
    return float(np.sum(weights * 2 * np.pi * zeta * mag) * dzeta)


def multisine_report(seed: int, pad: int = 4, **kwargs) -> dict:
    """Everything Fig. 5.2 plots for one seed: the signal, ``|f^|`` and the K_f vs bound numbers.

    Keys: ``x, f`` (P,); ``zeta, fhat_rect`` (the plain FFT, continuous-FT scaling, peaks
    ``|a_n| L / 2``) and ``fhat_gauss`` (windowed, lobes of mass ``|a_n| / 2``) on ``zeta >= 0``;
    ``a, w``; scalars ``K_f_sup`` (sup over R of |f'|, analytic: equals the bound, at x = 0),
    ``K_f_grid`` (max |f'| over the grid, analytic f'), ``K_f_fd`` (max |np.gradient(f, x)|, second-order
    central differences), ``bound_analytic``, ``bound_fft`` (Gaussian window), ``bound_fft_rect`` (no
    window; diverges with resolution, reported to show why a window is needed).
    """
    ms = multisine(seed, **kwargs)
    deriv = multisine_derivative(ms.x, ms.a, ms.w)
    zeta, rect, _ = fourier_transform_1d(ms.f, ms.x, "rect", pad=1)
    zeta_g, gauss, _ = fourier_transform_1d(ms.f, ms.x, "gauss", pad=1)
    bound = multisine_spectral_bound(ms.a, ms.w)
    return {
        "seed": seed,
        "x": ms.x,
        "f": ms.f,
        "a": ms.a,
        "w": ms.w,
        "zeta": zeta,
        "fhat_rect": rect,
        "fhat_gauss": gauss,
        "K_f_sup": float(abs(multisine_derivative(np.zeros(1), ms.a, ms.w)[0])),
        "K_f_grid": float(np.max(np.abs(deriv))),
        "K_f_fd": float(np.max(np.abs(np.gradient(ms.f, ms.x)))),
        "bound_analytic": bound,
        "bound_fft": spectral_bound_fft_1d(ms.f, ms.x, "gauss", pad=pad),
        "bound_fft_rect": spectral_bound_fft_1d(ms.f, ms.x, "rect", pad=pad),
    }


# --------------------------------------------------------------------------------------------
# 2. Gaussian bump on R^2 (Prop. 5.3.3)
# --------------------------------------------------------------------------------------------


def gaussian_fhat(zeta_norm, a: float):
    """``f^(zeta) = (pi / a) exp(-pi^2 |zeta|^2 / a)`` for ``f(x) = exp(-a |x|^2)`` on R^2 (eq. 5.43)."""
    _check_a(a)
    return (math.pi / a) * np.exp(-(math.pi**2) * np.asarray(zeta_norm, dtype=np.float64) ** 2 / a)


def gaussian_k_zeta(zeta_norm, a: float):
    """``K_zeta = 2 pi |zeta| f^(zeta) = (2 pi^2 / a) |zeta| exp(-pi^2 |zeta|^2 / a)`` (eq. 5.45)."""
    r = np.asarray(zeta_norm, dtype=np.float64)
    return 2 * math.pi * r * gaussian_fhat(r, a)


def gaussian_closed_form(a: float) -> dict[str, float]:
    """``K_f = sqrt(2a/e)`` (at ``|x| = 1/sqrt(2a)``) and ``int K_zeta = sqrt(pi a)``."""
    _check_a(a)
    return {"K_f": math.sqrt(2 * a / math.e), "spectral_bound": math.sqrt(math.pi * a)}


def gaussian_lipschitz_fd(a: float, n: int = 2001, extent: float = 3.0) -> float:
    """``max |grad f|`` on an n x n grid of ``[-R, R]^2``, ``R = extent / sqrt(a)``, by second-order
    central differences (``np.gradient``). Errors: O(h^2) from the differences and from sampling the
    maximum on the grid (``h = 2R / (n-1)``)."""
    _check_a(a)
    r = extent / math.sqrt(a)
    x = np.linspace(-r, r, n)
    x1, x2 = np.meshgrid(x, x, indexing="ij")
    f = np.exp(-a * (x1**2 + x2**2))
    g1, g2 = np.gradient(f, x, x)
    return float(np.sqrt(g1**2 + g2**2).max())


def gaussian_fft(a: float, n: int = 64, extent: float = 7.0, pad: int = 8):
    """2-D FFT of ``exp(-a |x|^2)`` on an n x n grid of ``[-R, R)^2`` (``R = extent / sqrt(a)``), zero-
    padded to ``M = pad * n``. Returns ``(zeta_norm (M, M), fhat_abs (M, M), dzeta)``."""
    _check_a(a)
    if n < 4 or pad < 1:
        raise ValueError(f"need n >= 4 and pad >= 1, got n={n}, pad={pad}")
    r = extent / math.sqrt(a)
    x = np.linspace(-r, r, n, endpoint=False)
    dx = x[1] - x[0]
    x1, x2 = np.meshgrid(x, x, indexing="ij")
    f = np.exp(-a * (x1**2 + x2**2))
    m = pad * n
    fhat = np.abs(np.fft.fft2(f, s=(m, m))) * dx * dx
    z = np.fft.fftfreq(m, d=dx)
    zeta_norm = np.hypot(z[:, None], z[None, :])
    return zeta_norm, fhat, 1.0 / (m * dx)


def gaussian_spectral_bound_fft(a: float, n: int = 64, extent: float = 7.0, pad: int = 8) -> float:
    """Riemann sum ``sum 2 pi |zeta| |f^(zeta)| dzeta^2`` over the padded 2-D FFT grid.

    Discretisation: f is below ``exp(-extent^2)`` outside the grid and its transform below
    ``exp(-(pi n / (2 extent))^2)`` past Nyquist, so truncation and aliasing are negligible for the
    defaults; the remaining bias comes from the kink of ``|zeta|`` at 0 and scales like ``dzeta^3``
    (relative ~ -0.93e-3 at pad 1, -1.8e-6 at pad 8 with extent 7).
    """
    zeta_norm, fhat, dzeta = gaussian_fft(a, n, extent, pad)
    return float(np.sum(2 * np.pi * zeta_norm * fhat) * dzeta**2)


def gaussian_table(alphas=(0.25, 1.0, 4.0, 16.0), fd_points: int = 2001, fft_points: int = 64, pad: int = 8) -> list[dict]:
    """One row per a: closed forms, numerical values and relative errors of K_f and int K_zeta, plus
    the largest deviation of the FFT transform from ``gaussian_fhat`` (relative to ``f^(0)``), which
    checks the Fourier convention."""
    rows = []
    for a in alphas:
        exact = gaussian_closed_form(a)
        kf = gaussian_lipschitz_fd(a, fd_points)
        sb = gaussian_spectral_bound_fft(a, fft_points, pad=pad)
        zeta_norm, fhat, _ = gaussian_fft(a, fft_points, pad=1)
        fhat_err = float(np.max(np.abs(fhat - gaussian_fhat(zeta_norm, a))) / (math.pi / a))
        rows.append(
            {
                "a": a,
                "K_f_exact": exact["K_f"],
                "K_f_fd": kf,
                "K_f_rel_err": kf / exact["K_f"] - 1,
                "bound_exact": exact["spectral_bound"],
                "bound_fft": sb,
                "bound_rel_err": sb / exact["spectral_bound"] - 1,
                "fhat_max_err": fhat_err,
                "ratio_K_over_bound": exact["K_f"] / exact["spectral_bound"],  # sqrt(2 / (pi e)) for all a
            }
        )
    return rows


def _check_a(a: float) -> None:
    if not a > 0:
        raise ValueError(f"the Gaussian needs a > 0, got {a}")


# --------------------------------------------------------------------------------------------
# 3. Lemma 5.3.4 (spectral-band perturbation) on the Gaussian
# --------------------------------------------------------------------------------------------


def lemma534_row(a: float, zeta, delta: float, eps: float, n_radial: int = 48, n_angle: int = 256) -> dict:
    """Lemma 5.3.4 for ``f(x) = exp(-a |x|^2)`` on R^2, one (zeta, delta, eps).

    Reading used (the thesis' own validation, eqs. 5.65-5.75): the perturbation acts through the part
    of f's spectrum inside the ball ``B = B_delta(zeta)``, ``f_B(x) = int_B f^(w) e^{2 pi i <w, x>} dw``,
    and the input moves by ``Delta x`` with ``|Delta x| = eps``. With ``Delta x = eps * zeta / |zeta|``
    (the worst direction to first order, as in eq. 5.72),
    ``f_B(x) - f_B(x - Dx) = int_B f^(w) 2i sin(pi <w, Dx>) e^{2 pi i <w, x - Dx/2>} dw``; since f^ > 0
    and the sine keeps its sign on B (needs ``delta < |zeta|`` and ``eps (|zeta| + delta) < 1``), the
    sup over x is attained at ``x = Dx/2`` and equals ``S = int_B f^(w) 2 |sin(pi <w, Dx>)| dw`` exactly.

    Bound: ``M_delta * eps * sqrt(mu(B))`` with ``M_delta = sup_B 2 pi |w| f^(w)`` (exact: K is radial
    and unimodal in |w|, peak at ``|w| = sqrt(a/2)/pi``) and ``mu(B) = pi delta^2``. Because
    ``|sin t| <= |t|`` and ``K_w <= M_delta`` on B, ``ratio = S / bound <= sqrt(pi) delta`` always, with
    equality as ``delta, eps -> 0`` (thesis eq. 5.79). Quadrature: Gauss-Legendre in the radius of the
    ball, trapezoid (spectral for periodic integrands) in the angle.
    """
    _check_a(a)
    zeta = np.atleast_1d(np.asarray(zeta, dtype=np.float64))
    if zeta.shape == (1,):
        zeta = np.array([zeta[0], 0.0])
    if zeta.shape != (2,):
        raise ValueError(f"zeta must be a scalar norm or a 2-vector, got shape {zeta.shape}")
    zn = float(np.linalg.norm(zeta))
    if not 0 < delta < zn:
        raise ValueError(f"need 0 < delta < |zeta| (the ball must not contain 0), got delta={delta}, |zeta|={zn}")
    if not 0 < eps * (zn + delta) < 1:
        raise ValueError(f"need 0 < eps (|zeta| + delta) < 1 so the sine keeps its sign on the ball, got eps={eps}")
    u = zeta / zn
    nodes, weights = np.polynomial.legendre.leggauss(n_radial)
    rho = 0.5 * delta * (nodes + 1)  # radius within the ball
    w_rho = 0.5 * delta * weights * rho  # includes the polar Jacobian rho
    phi = 2 * np.pi * np.arange(n_angle) / n_angle
    w_phi = 2 * np.pi / n_angle
    om1 = zeta[0] + rho[:, None] * np.cos(phi)[None, :]
    om2 = zeta[1] + rho[:, None] * np.sin(phi)[None, :]
    om_norm = np.hypot(om1, om2)
    proj = om1 * u[0] + om2 * u[1]  # <w, zeta/|zeta|>
    integrand = gaussian_fhat(om_norm, a) * 2 * np.abs(np.sin(np.pi * eps * proj))
    sup_diff = float(np.sum(integrand * w_rho[:, None]) * w_phi)
    r_peak = math.sqrt(a / 2) / math.pi
    m_delta = float(gaussian_k_zeta(min(max(r_peak, zn - delta), zn + delta), a))
    mu = math.pi * delta**2
    bound = m_delta * eps * math.sqrt(mu)
    ratio = sup_diff / bound
    predicted = math.sqrt(math.pi) * delta
    return {
        "a": a,
        "zeta_norm": zn,
        "delta": delta,
        "eps": eps,
        "sup_diff": sup_diff,
        "M_delta": m_delta,
        "mu_B": mu,
        "bound": bound,
        "ratio": ratio,
        "ratio_predicted": predicted,
        "ratio_over_predicted": ratio / predicted,
    }


def lemma534_table(
    a: float = 1.0,
    deltas=(0.005, 0.01, 0.02, 0.05, 0.1),
    zeta_norms=(0.15, 0.225, 0.4, 0.8),
    eps: float = 1e-3,
) -> list[dict]:
    """:func:`lemma534_row` over every (|zeta|, delta) with ``delta < |zeta|``; zeta along x_1."""
    return [lemma534_row(a, z, d, eps) for z in zeta_norms for d in deltas if d < z]


# --------------------------------------------------------------------------------------------
# 4. Directional frequency response of a trained model (Fig. 5.1)
# --------------------------------------------------------------------------------------------


def principal_direction(x: torch.Tensor) -> torch.Tensor:
    """Unit first principal direction (d,) float64 of ``x`` (N x d, or N x ... flattened).

    Top eigenvector of the covariance (d x d, float64). Sign fixed so that its entry of largest
    magnitude is positive, to make runs comparable.
    """
    x = _flatten(x).double()
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a principal direction, got {x.shape[0]}")
    xc = x - x.mean(0, keepdim=True)
    cov = xc.T @ xc / (x.shape[0] - 1)
    _, vecs = torch.linalg.eigh(cov)
    v = vecs[:, -1]
    return v * torch.sign(v[v.abs().argmax()])


@torch.no_grad()
def true_label_probability(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """``softmax(model(x))[y]`` per sample, (N,) float64, in eval mode (the mode is restored).

    Softmax is right for logits and for LogSoftmax outputs alike (softmax(log_softmax(z)) = softmax(z)).
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, x.shape[0], batch_size):
            p = torch.softmax(model(x[i : i + batch_size]).double(), dim=1)
            out.append(p.gather(1, y[i : i + batch_size].long().view(-1, 1)).squeeze(1))
        return torch.cat(out)
    finally:
        model.train(was_training)


@torch.no_grad()
def directional_frequency_response(
    fx: torch.Tensor,
    x: torch.Tensor,
    direction: torch.Tensor | None = None,
    num_t: int = 256,
    t: torch.Tensor | None = None,
    chunk_elems: int = 1 << 22,
) -> dict[str, torch.Tensor]:
    """Empirical ``f^(zeta_t) = (1/N) sum_i f(x_i) exp(-2 pi i <zeta_t, x_i>)`` along
    ``zeta_t = (t / 2 pi) zeta``, ``t in [0, 2 pi]`` (thesis Fig. 5.1).

    ``fx``: (N,) values f(x_i) (e.g. :func:`true_label_probability`); ``x``: N x d (or N x ..., flattened);
    ``direction``: unit zeta (d,), default :func:`principal_direction` of x (normalised if not unit).
    Returns float64 ``t (T,)``, ``zeta_norm = t / 2 pi``, ``fhat_abs = |f^(zeta_t)|``, ``K_zeta = 2 pi
    |zeta_t| |f^(zeta_t)| = t |f^|`` and ``direction``. Only the projections ``<zeta, x_i>`` enter, so
    the cost is O(N d + N T); a shift of all x_i changes only the phase of f^, not |f^|.
    """
    xf = _flatten(x).double()
    fx = fx.reshape(-1).double()
    if fx.shape[0] != xf.shape[0]:
        raise ValueError(f"fx has {fx.shape[0]} values but x has {xf.shape[0]} samples")
    if direction is None:
        direction = principal_direction(xf)
    direction = direction.reshape(-1).double().to(xf.device)
    if direction.shape[0] != xf.shape[1]:
        raise ValueError(f"direction has {direction.shape[0]} entries but x has {xf.shape[1]} features")
    norm = direction.norm()
    if norm == 0:
        raise ValueError("direction is the zero vector")
    direction = direction / norm
    if t is None:
        t = torch.linspace(0, 2 * math.pi, num_t, dtype=torch.float64)
    t = t.reshape(-1).double().to(xf.device)
    proj = xf @ direction  # (N,)
    s = t / (2 * math.pi)  # |zeta_t|
    rows = max(1, chunk_elems // max(1, proj.shape[0]))
    re, im = [], []
    for i in range(0, s.shape[0], rows):
        ang = 2 * math.pi * s[i : i + rows, None] * proj[None, :]  # (chunk, N)
        re.append(torch.cos(ang) @ fx)
        im.append(-(torch.sin(ang) @ fx))
    fhat_abs = torch.hypot(torch.cat(re), torch.cat(im)) / proj.shape[0]
    return {"t": t, "zeta_norm": s, "fhat_abs": fhat_abs, "K_zeta": 2 * math.pi * s * fhat_abs, "direction": direction}


def _flatten(x: torch.Tensor) -> torch.Tensor:
    if x.ndim < 2:
        raise ValueError(f"x must be N x d (or N x ...), got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)
