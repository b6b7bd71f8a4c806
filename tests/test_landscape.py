"""Landscapes (Figs. 4.1, 5.6): directions, grids, projections and HVP sharpness against brute force."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lipexp import landscape as L
from lipexp.layers import k_emp, top_singular_values


def small_convnet(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 3)
    ).to(dtype)


def _filter_norms(vec, model):
    out, i = [], 0
    for p in model.parameters():
        chunk = vec[i : i + p.numel()].view(p.shape)
        i += p.numel()
        out.append(chunk.reshape(p.shape[0], -1).norm(dim=1) if p.ndim > 1 else chunk)
    return out


def test_directions_filter_normalized_orthogonal_and_seeded():
    model = small_convnet()
    d1, d2 = L.random_directions(model, seed=3)
    assert d1.dtype == torch.float64 and d1.shape == L.flat_params(model).shape
    for p, n1, n2 in zip(model.parameters(), _filter_norms(d1, model), _filter_norms(d2, model)):
        if p.ndim > 1:
            wn = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(n1, wn, rtol=1e-12, atol=0)
            torch.testing.assert_close(n2, wn, rtol=1e-12, atol=0)
        else:  # biases and BN affine parameters zeroed (ignore='biasbn')
            assert torch.all(n1 == 0) and torch.all(n2 == 0)
    assert abs(float(d1 @ d2)) / float(d1.norm() * d2.norm()) < 1e-14
    e1, e2 = L.random_directions(model, seed=3)
    assert torch.equal(d1, e1) and torch.equal(d2, e2)
    f1, _ = L.random_directions(model, seed=4)
    assert not torch.allclose(d1, f1)


def test_global_gram_schmidt_and_copy_option():
    model = small_convnet()
    d1, d2 = L.random_directions(model, seed=1, orthogonalize="global")
    assert abs(float(d1 @ d2)) / float(d1.norm() * d2.norm()) < 1e-14
    for p, n1 in zip(model.parameters(), _filter_norms(d1, model)):
        if p.ndim > 1:
            torch.testing.assert_close(n1, p.detach().reshape(p.shape[0], -1).norm(dim=1), rtol=1e-12, atol=0)
    d = L.filter_normalized_direction(model, torch.Generator().manual_seed(0), ignore=None)
    for p, n in zip(model.parameters(), _filter_norms(d, model)):
        if p.ndim <= 1:
            torch.testing.assert_close(n, p.detach())  # Li et al.'s ignore=None copies biases/BN
    with pytest.raises(ValueError, match="one-dimensional"):
        L.random_directions(model, ignore=None)
    with pytest.raises(ValueError, match="single entry"):
        L.random_directions(nn.Linear(1, 3))
    with pytest.raises(ValueError, match="orthogonalize"):
        L.random_directions(model, orthogonalize="qr")


def test_grid_values_and_restores_params_buffers_and_mode():
    model = small_convnet().train()
    model[1].eval()  # a mixed mode must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    centre = L.flat_params(model)
    d1, d2 = L.random_directions(model, seed=0)
    x = torch.randn(8, 2, 6, 6, dtype=torch.float64)

    def fn(m):
        m.train()
        m(x)  # updates BatchNorm running statistics
        return float((L.flat_params(m) ** 2).sum())

    alphas, betas = [-1.0, 0.0, 0.5], [-0.25, 0.0, 1.0]
    grid = L.landscape_grid(model, fn, d1, d2, alphas, betas)
    expected = np.array(
        [[float(((centre + a * d1 + b * d2) ** 2).sum()) for b in betas] for a in alphas]
    )
    np.testing.assert_allclose(grid, expected, rtol=1e-13)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and not model[1].training
    line = L.landscape_1d(model, fn, d1, alphas)
    np.testing.assert_allclose(line, expected[:, 1], rtol=1e-13)

    def boom(m):
        raise RuntimeError("fn failed")

    with pytest.raises(RuntimeError):
        L.landscape_grid(model, boom, d1, d2, [1.0], [1.0])
    assert torch.equal(L.flat_params(model), centre)


def test_k_landscape_centre_matches_k_emp():
    model = small_convnet(dtype=torch.float32)
    d1, d2 = L.random_directions(model, seed=0)
    k = lambda m: k_emp(top_singular_values(m))  # noqa: E731
    grid = L.landscape_grid(model, k, d1, d2, [-0.5, 0.0, 0.5], [0.0, 0.5])
    assert grid[1, 0] == pytest.approx(k(model), rel=1e-6)
    assert grid[2, 0] != pytest.approx(grid[1, 0])


def test_projection_recovers_known_coordinates():
    model = small_convnet()
    centre = L.flat_params(model)
    d1, d2 = L.random_directions(model, seed=5)
    coords = torch.tensor([[0.0, 0.0], [0.3, -1.2], [2.0, 0.7], [-0.4, 0.1]], dtype=torch.float64)
    noise = torch.randn(4, centre.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    basis = torch.stack([d1, d2], 1)
    noise = noise - (noise @ basis) @ torch.linalg.solve(basis.T @ basis, basis.T)  # out of plane
    noise[0] = 0
    snaps = [centre + c[0] * d1 + c[1] * d2 + 0.01 * n for c, n in zip(coords, noise)]
    got, resid = L.project_trajectory(snaps, d1, d2, centre)
    np.testing.assert_allclose(got, coords.numpy(), rtol=0, atol=1e-12)
    diff = torch.stack(snaps) - centre
    expected = np.array([0.0] + [float(0.01 * noise[i].norm() / diff[i].norm()) for i in range(1, 4)])
    np.testing.assert_allclose(resid, expected, rtol=1e-10, atol=1e-15)
    # also for non-orthogonal directions (least squares, not dot products)
    got2, _ = L.project_trajectory(torch.stack(snaps), d1, d1 + d2, centre)
    np.testing.assert_allclose(got2[:, 0] + 0, coords[:, 0].numpy() - coords[:, 1].numpy(), atol=1e-12)


def test_pca_directions_span_a_planar_trajectory():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=gen, dtype=torch.float64), torch.randn(50, generator=gen, dtype=torch.float64)
    t = torch.linspace(0, 1, 12, dtype=torch.float64)
    snaps = [torch.cos(3 * s) * a + s**2 * b for s in t]
    p1, p2, ratio = L.pca_directions(snaps)
    assert float(p1 @ p2) == pytest.approx(0.0, abs=1e-12)
    _, resid = L.project_trajectory(snaps, p1, p2, snaps[-1])
    assert resid.max() < 1e-10 and sum(ratio) == pytest.approx(1.0, abs=1e-12)


def tiny_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
    return model, x, y


def explicit_hessian(model, loss_of_output):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i : i + math.prod(s)].view(s)
            i += math.prod(s)
        return loss_of_output(lambda x: functional_call(model, params, (x,)))

    return torch.autograd.functional.hessian(f, L.flat_params(model))


def test_hvp_and_power_iteration_match_explicit_hessian():
    model, x, y = tiny_problem()
    h = explicit_hessian(model, lambda fwd: F.cross_entropy(fwd(x), y))
    evals = torch.linalg.eigvalsh(h)
    loss = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    v = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(L.hessian_vector_product(model, loss, v), h @ v, rtol=1e-12, atol=1e-14)
    res = L.hessian_top_eigenvalue(model, loss, iters=5000, tol=1e-13)
    assert res.converged
    assert res.value == pytest.approx(float(evals[-1]), rel=1e-8)
    torch.testing.assert_close(h @ res.vector, res.value * res.vector, rtol=0, atol=1e-5)
    # a list of closures is the Hessian of the summed loss
    halves = [lambda m: F.cross_entropy(m(x[:7]), y[:7], reduction="sum"), lambda m: F.cross_entropy(m(x[7:]), y[7:], reduction="sum")]
    res2 = L.hessian_top_eigenvalue(model, halves, iters=5000, tol=1e-13)
    assert res2.value == pytest.approx(20 * float(evals[-1]), rel=1e-8)
    # loose tolerance stops early but is close
    res3 = L.hessian_top_eigenvalue(model, loss, iters=200, tol=1e-4)
    assert res3.value == pytest.approx(float(evals[-1]), rel=1e-2)


class Quadratic(nn.Module):
    def __init__(self, eigs):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=torch.Generator().manual_seed(0), dtype=torch.float64))
        self.register_buffer("a", q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T)
        self.p = nn.Parameter(torch.ones(len(eigs), dtype=torch.float64))

    def loss(self):
        return 0.5 * self.p @ self.a @ self.p


def test_power_iteration_returns_largest_algebraic_when_a_negative_eigenvalue_dominates():
    model = Quadratic([-5.0, 3.0, 1.0, 0.5])
    res = L.hessian_top_eigenvalue(model, lambda m: m.loss(), iters=2000, tol=1e-14)
    assert res.dominant == pytest.approx(-5.0, rel=1e-10)
    assert res.value == pytest.approx(3.0, rel=1e-9)
    assert torch.equal(model.p.detach(), torch.ones(4, dtype=torch.float64))


def test_make_loss_fn_weights_batches_by_size():
    model, x, y = tiny_problem()
    fn = L.make_loss_fn([(x[:13], y[:13]), (x[13:], y[13:])])
    assert fn(model) == pytest.approx(float(F.cross_entropy(model(x), y).detach()), rel=1e-13)
    with pytest.raises(ValueError):
        L.make_loss_fn([])


def test_size_mismatch_errors():
    model = small_convnet()
    d1, d2 = L.random_directions(model)
    with pytest.raises(ValueError, match="differ in size"):
        L.landscape_grid(model, lambda m: 0.0, d1[:-1], d2, [0.0], [0.0])
    with pytest.raises(ValueError, match="flat vector"):
        L.set_flat_params(model, d1[:-1])
