"""Closed-form singular-value derivatives against autograd and finite differences."""
import pytest
import torch

from lipexp.spectral import (
    autograd_hessian,
    autograd_hessians_batched,
    autograd_jacobian,
    compare_derivatives,
    error_summary,
    error_trials,
    fig3_4_errors,
    random_matrices,
    singular_value_hessian,
    singular_value_jacobian,
    vec,
)


pytestmark = pytest.mark.usefixtures("one_thread")


SHAPES = [(6, 10), (10, 6), (7, 7), (1, 4), (4, 1), (3, 5)]
TOL = 1e-12  # absolute, float64, entries O(1); measured errors are ~1e-15


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dist", ["normal", "uniform"])
def test_against_autograd_all_k(shape, dist):
    A = random_matrices(shape, dist, seed=3)
    for k in range(min(shape)):
        J, H = singular_value_jacobian(A, k), singular_value_hessian(A, k)
        assert J.shape == (A.numel(),) and H.shape == (A.numel(), A.numel())
        assert torch.allclose(J, autograd_jacobian(A, k), atol=TOL, rtol=0)
        assert torch.allclose(H, autograd_hessian(A, k), atol=TOL, rtol=0)
        assert torch.allclose(H, H.T, atol=1e-14)


def test_vec_is_column_major_and_jacobian_is_v_kron_u():
    A = random_matrices((3, 4), seed=0)
    assert torch.equal(vec(A)[: 3], A[:, 0])  # first column first
    U, s, Vh = torch.linalg.svd(A)
    assert torch.allclose(singular_value_jacobian(A, 1), torch.kron(Vh[1], U[:, 1]), atol=1e-15)


def test_quadratic_form_matches_second_difference():
    # s_k(A + tG) = s_k + t J.g + t^2/2 g^T H g + O(t^3): central second difference
    A = random_matrices((5, 8), seed=5)
    G = random_matrices((5, 8), seed=6)
    g, t = vec(G), 1e-4
    for k in range(5):
        sv = lambda B: torch.linalg.svdvals(B)[k]  # noqa: E731
        fd = (sv(A + t * G) - 2 * sv(A) + sv(A - t * G)) / t**2
        q = g @ singular_value_hessian(A, k) @ g
        assert abs(float(fd - q)) < 1e-5 * max(1.0, abs(float(q)))


def test_top_hessian_psd_and_lower_ones_indefinite():
    A = random_matrices((6, 10), seed=2)
    ev0 = torch.linalg.eigvalsh(singular_value_hessian(A, 0))
    assert ev0.min() > -1e-12
    ev2 = torch.linalg.eigvalsh(singular_value_hessian(A, 2))
    assert ev2.min() < -1e-3 and ev2.max() > 1e-3


def test_left_sum_must_cover_all_m_for_tall_matrices():
    # theory.md §5 erratum: dropping the i >= n terms of the left sum is visibly wrong for m > n
    m, n, k = 9, 4, 1
    A = random_matrices((m, n), seed=4)
    U, s, Vh = torch.linalg.svd(A)
    H = singular_value_hessian(A, k)
    missing = sum((1 / s[k]) * torch.outer(torch.kron(Vh[k], U[:, i]), torch.kron(Vh[k], U[:, i]))
                  for i in range(n, m))
    assert torch.allclose(H, autograd_hessian(A, k), atol=TOL)
    assert (H - missing - autograd_hessian(A, k)).abs().max() > 1e-2


def test_rank_deficient_top_value_by_finite_differences():
    # repeated zero singular values do not matter for a simple non-zero s_0 (autograd gives nan here)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 5, generator=g, dtype=torch.float64)
    G = torch.randn(6, 5, generator=g, dtype=torch.float64)
    h = 1e-6
    for k in range(2):
        fd = (singular_value_jacobian(A + h * G, k) - singular_value_jacobian(A - h * G, k)) / (2 * h)
        assert torch.allclose(singular_value_hessian(A, k) @ vec(G), fd, atol=1e-7)
    with pytest.raises(ValueError, match="not simple"):
        singular_value_hessian(A, 2)


def test_repeated_singular_value_is_a_clear_error():
    Q1, _ = torch.linalg.qr(random_matrices((5, 5), seed=7))
    Q2, _ = torch.linalg.qr(random_matrices((7, 7), seed=8))
    S = torch.zeros(5, 7, dtype=torch.float64)
    S[range(5), range(5)] = torch.tensor([3.0, 2.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    A = Q1 @ S @ Q2.T
    for k in (1, 2):
        with pytest.raises(ValueError, match="not simple"):
            singular_value_hessian(A, k)
        with pytest.raises(ValueError, match="not simple"):
            singular_value_jacobian(A, k)
    assert torch.isfinite(singular_value_hessian(A, 0)).all()
    assert torch.isfinite(singular_value_hessian(A, 3)).all()


def test_bad_input_errors():
    A = random_matrices((3, 4))
    with pytest.raises(ValueError, match="out of range"):
        singular_value_hessian(A, 3)
    with pytest.raises(ValueError, match="2-D"):
        singular_value_jacobian(A[None], 0)
    with pytest.raises(ValueError, match="floating"):
        singular_value_jacobian(torch.ones(2, 3, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="zero matrix"):
        singular_value_jacobian(torch.zeros(2, 3), 0)


def test_dtype_preserved_float32():
    A = random_matrices((4, 6), dtype=torch.float32, seed=9)
    H, J = singular_value_hessian(A, 1), singular_value_jacobian(A, 1)
    assert H.dtype == J.dtype == torch.float32
    assert torch.allclose(H.double(), singular_value_hessian(A.double(), 1), atol=1e-4)


def test_figure_data_and_batched_reference():
    A = random_matrices((6, 10), "uniform", seed=1)
    rows = compare_derivatives(A, order=2)
    assert [r["k"] for r in rows] == list(range(6))
    assert max(r["eps"] for r in rows) < TOL
    assert max(r["eps"] for r in compare_derivatives(A, order=1)) < TOL
    B = random_matrices((4, 3), trials=3, seed=2)
    Hb = autograd_hessians_batched(B)
    assert Hb.shape == (3, 3, 12, 12)
    assert torch.allclose(Hb[1, 2], autograd_hessian(B[1], 2), atol=1e-13)
    err = error_trials((4, 3), "normal", trials=20, seed=1)
    assert err.shape == (3, 20) and err.max() < TOL
    assert error_trials((4, 3), "normal", trials=5, order=1).max() < TOL
    assert len(error_summary({"n": err})) == 3


def test_fig3_4_cases_and_plots():
    from lipexp.plots_ch3 import plot_derivative_pairs, plot_error_histograms

    errs = fig3_4_errors(trials=4, shapes=((3, 5), (5, 3), (4, 4)))
    assert list(errs) == ["normal 3x5", "uniform 3x5", "normal 5x3", "uniform 5x3", "normal 4x4", "uniform 4x4"]
    assert errs["normal 4x4"].shape == (4, 4) and max(float(e.max()) for e in errs.values()) < TOL
    A = random_matrices((3, 5), seed=1)
    fig = plot_derivative_pairs(compare_derivatives(A, order=1), (3, 5), "Jacobian")
    assert len([ax for ax in fig.axes if ax.images]) == 6  # 3 k x (closed form, autograd)
    assert len(plot_error_histograms(errs).axes) == 6
