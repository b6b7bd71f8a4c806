"""The one-thread SciPy BLAS/LAPACK route of the tracker's float64 algebra (lipexp.cpu_lapack) against
torch's, and the tracker's terms on both routes (the brute-force tests of test_dynamics run on one thread,
so on this route; here the same checks with the route off, and the two routes side by side)."""
from __future__ import annotations

import pytest
import torch

from lipexp import cpu_lapack
from lipexp.dynamics import DynamicsTracker, _cholesky, _gram
from tests.test_dynamics import ce, check_model, cnn, data, mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def _spd(k, seed=0):
    w = torch.randn(k, 2 * k + 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return w, w @ w.T + 1e-3 * torch.eye(k, dtype=torch.float64)


def test_route_is_on_for_float64_cpu_and_the_gram_on_one_thread_only():
    w = torch.zeros(3, 3, dtype=torch.float64)
    assert cpu_lapack.available(w) and cpu_lapack.gram_available(w)
    assert not cpu_lapack.available(w.float()) and not cpu_lapack.gram_available(w.float())
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cpu_lapack.available(w)  # the factor: OpenBLAS on one thread beats torch's two
        assert not cpu_lapack.gram_available(w)  # the Gram: torch's parallel product is faster
    finally:
        torch.set_num_threads(old)


def test_two_thread_tracker_factors_through_scipy_and_forms_the_gram_by_torch(monkeypatch):
    calls = {"chol": 0, "gram": 0}
    real_chol, real_gram = cpu_lapack.cholesky_lower, cpu_lapack.gram
    monkeypatch.setattr(cpu_lapack, "cholesky_lower", lambda a: calls.__setitem__("chol", calls["chol"] + 1) or real_chol(a))
    monkeypatch.setattr(cpu_lapack, "gram", lambda w: calls.__setitem__("gram", calls["gram"] + 1) or real_gram(w))
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model, shape = mlp(), (6,)
        x, y = data(shape)
        check_model(model, x, y)  # the brute-force checks (1e-8) on this mixed route
    finally:
        torch.set_num_threads(old)
    assert calls["chol"] > 0 and calls["gram"] == 0


@pytest.mark.parametrize("shape", [(7, 30), (300, 700), (1, 5)])
def test_gram_matches_torch_for_row_and_column_major(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for m in (w, w.T.contiguous().T, w[:, : shape[1] - 1]):  # row-major, column-major, strided rows
        got, ref = cpu_lapack.gram(m), m @ m.T
        assert torch.equal(got, got.T)
        assert (got - ref).abs().max() <= 1e-13 * ref.abs().max()


def test_cholesky_matches_torch_and_refuses_indefinite():
    _, a = _spd(257)
    got, ok = cpu_lapack.cholesky_lower(a.clone())
    assert ok
    assert torch.equal(got, got.tril())  # the upper triangle is zero: L is usable as a full matrix
    assert (got - torch.linalg.cholesky(a)).abs().max() <= 1e-12 * a.diagonal().max().sqrt()
    b = a.clone()
    b[3, 3] = -1.0
    assert cpu_lapack.cholesky_lower(b)[1] is False
    assert _cholesky(b.clone())[1] is False


def test_blas_thread_setting_is_restored():
    lib = cpu_lapack._controller()
    old = lib.get_num_threads()
    lib.set_num_threads(2)
    try:
        w, a = _spd(64)
        cpu_lapack.gram(w)
        cpu_lapack.cholesky_lower(a)
        assert lib.get_num_threads() == 2
    finally:
        lib.set_num_threads(old)


def test_large_gram_route_used_by_dynamics(monkeypatch):
    calls = []
    real = cpu_lapack.gram
    monkeypatch.setattr(cpu_lapack, "gram", lambda w: calls.append(w.shape) or real(w))
    w = torch.randn(300, 600, dtype=torch.float64)
    assert torch.allclose(_gram(w), w @ w.T, rtol=0, atol=1e-11)
    assert calls == [(300, 600)]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_brute_force_on_torch_route(kind, monkeypatch):
    """test_dynamics' brute-force checks (1e-8) with the SciPy route off, as on more than one thread."""
    monkeypatch.setattr(cpu_lapack, "available", lambda t: False)
    torch.manual_seed(0)
    model, shape = (mlp(), (6,)) if kind == "mlp" else (cnn(), (2, 9, 9))
    x, y = data(shape)
    check_model(model, x, y)


def test_routes_agree_over_warm_started_steps(monkeypatch):
    """Three tracked SGD steps of the float64 CNN on each route: the terms agree to rounding."""
    def run():
        torch.manual_seed(0)
        model = cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        tracker = DynamicsTracker(model, 0.05, optimizer=opt)
        rows = []
        for step in range(3):
            x, y = data((2, 9, 9), m=16, seed=step)
            tracker.begin()
            opt.zero_grad()
            ce(model(x), y).mean().backward()
            opt.step()
            rows.append(tracker.end())
        tracker.close()
        return rows

    calls = []
    real = cpu_lapack.cholesky_lower
    monkeypatch.setattr(cpu_lapack, "cholesky_lower", lambda a: calls.append(1) or real(a))
    scipy_rows = run()
    assert calls, "the SciPy route was not taken"
    monkeypatch.setattr(cpu_lapack, "available", lambda t: False)
    torch_rows = run()
    for a, b in zip(scipy_rows, torch_rows):
        for name in a:
            for k, v in a[name].items():
                assert v == pytest.approx(b[name][k], rel=1e-9, abs=1e-300), (name, k)
