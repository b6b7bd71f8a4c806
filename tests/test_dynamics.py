"""Chapter 4 engine against brute force (float64): vmap per-sample gradients, the explicit noise
covariance of thesis Prop. 4.4.1 and the autograd Hessian of sigma_1."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from lipexp.dynamics import (
    DynamicsTracker,
    KIntegrator,
    hessian_diagonal_dot,
    hessian_quadratic_sum,
    hessian_trace,
    integrate,
    network_sums,
    opnorm_geometry,
    step_terms,
    term_columns,
)
from lipexp import cpu_lapack
from lipexp.dynamics import _conv_geometry, conv_b_projection
from lipexp.layers import top_singular_values, weight_layers

TOL = 1e-10



pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")]


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def mlp():
    # tall (9x6), wide (5x9), square (5x5), wide (3x5)
    return nn.Sequential(
        nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)
    ).double()


def cnn(batchnorm=False):
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),  # 9x9 -> 5x5, W 3x18 (wide)
        nn.BatchNorm2d(3, track_running_stats=False) if batchnorm else nn.Identity(),
        nn.ReLU(),
        nn.Conv2d(3, 14, 2),  # -> 4x4, W 14x12 (tall)
        nn.Tanh(),
        nn.Conv2d(14, 3, 2, padding="same"),  # asymmetric 'same' padding, W 3x56
        nn.Tanh(),
        nn.Conv2d(3, 4, 3, padding=2, dilation=2, stride=2),  # -> 2x2, last padded row never reached
        nn.Flatten(),
        nn.Linear(16, 3),
    ).double()


def data(shape, m=10, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (m,), generator=g)


def per_sample_grads(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss1(p, xi, yi):
        return ce(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    return vmap(grad(loss1), in_dims=(None, 0, 0))(params, x, y)


def s1_fn(w):
    return torch.linalg.svdvals(w)[0]


def brute(w, g_ps, lr, dw=None, grad_scale=1.0, noise_var=0.0):
    """Terms from explicit Sigma (M m n x m n), J and H of sigma_1 by autograd."""
    w = w.detach().reshape(w.shape[0], -1).double()
    mb = g_ps.shape[0]
    gs = g_ps.reshape(mb, -1).double()
    size = gs.shape[1]
    s1 = float(s1_fn(w))
    jac = torch.autograd.functional.jacobian(s1_fn, w).reshape(-1)
    hess = torch.autograd.functional.hessian(s1_fn, w).reshape(size, size)
    gt = gs - gs.mean(0)
    sigma = grad_scale**2 * gt.T @ gt / (mb * (mb - 1)) + noise_var * torch.eye(size, dtype=torch.float64)
    if dw is None:
        dw = -lr * gs.mean(0)
    sd = torch.diagonal(sigma)
    return {
        "sigma1": s1,
        "mu": float(jac @ dw.reshape(-1)) / (s1 * lr),
        "lambda2": lr / s1**2 * float(jac @ sigma @ jac),
        "kappa": lr / (2 * s1) * float((hess * sigma).sum()),
        "lambda2_var": lr / s1**2 * float((jac**2 * sd).sum()),
        "kappa_var": lr / (2 * s1) * float((torch.diagonal(hess) * sd).sum()),
    }


def assert_terms(got, ref, keys=("sigma1", "mu", "kappa", "lambda2"), tol=TOL, label=""):
    for k in keys:
        assert rel(got[k], ref[k]) <= tol, f"{label} {k}: got {got[k]!r}, brute force {ref[k]!r}"


# ---------------------------------------------------------------------------------------------
# Closed forms of the operator-norm Hessian
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,rank", [((7, 4), None), ((4, 7), None), ((5, 5), None), ((6, 5), 3), ((3, 8), 2)])
def test_hessian_closed_forms_match_autograd(shape, rank):
    g = torch.Generator().manual_seed(1)
    m, n = shape
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    if rank is not None:  # rank-deficient: zero singular values on the small side as well
        left = torch.randn(m, rank, generator=g, dtype=torch.float64)
        w = left @ torch.randn(rank, n, generator=g, dtype=torch.float64)
    hess = torch.autograd.functional.hessian(s1_fn, w).reshape(m * n, m * n)
    jac = torch.autograd.functional.jacobian(s1_fn, w)
    geo = opnorm_geometry(w)
    assert rel(float(geo.s1), float(s1_fn(w))) <= 1e-14
    assert torch.allclose(torch.outer(geo.u1, geo.v1), jac, rtol=0, atol=1e-13)
    gmat = torch.randn(6, m, n, generator=g, dtype=torch.float64)
    a, b = gmat @ geo.v1, gmat.transpose(1, 2) @ geo.u1
    vec = gmat.reshape(6, -1)
    q_ref = float(torch.einsum("ia,ab,ib->", vec, hess, vec))
    assert rel(float(hessian_quadratic_sum(geo, a, b)), q_ref) <= TOL
    if m <= n:  # the Linear-layer shortcut: rows W b_i given
        assert rel(float(hessian_quadratic_sum(geo, a, b, w_b=b @ w.T)), q_ref) <= TOL
    assert rel(float(hessian_trace(geo)), float(torch.trace(hess))) <= TOL
    d = torch.rand(m, n, generator=g, dtype=torch.float64)
    ref = float((torch.diagonal(hess) * d.reshape(-1)).sum())
    assert rel(float(hessian_diagonal_dot(geo, d)), ref) <= TOL


def test_geometry_of_float32_weights_and_warm_start():
    g = torch.Generator().manual_seed(2)
    for m, n in [(30, 7), (7, 30), (12, 12)]:
        w = torch.randn(m, n, generator=g)  # float32 in, float64 out
        ref = torch.linalg.svd(w.double())
        geo = opnorm_geometry(w)
        assert rel(float(geo.s1), float(ref.S[0])) <= 1e-14
        assert torch.allclose(torch.outer(geo.u1, geo.v1), torch.outer(ref.U[:, 0], ref.Vh[0]), atol=1e-13)
        moved = w + 1e-3 * torch.randn(m, n, generator=g)  # warm start from the previous step's vector
        ref = torch.linalg.svd(moved.double())
        for start in (geo.q1, torch.linalg.svd(w.double()).Vh[-1] if m > n else ref.U[:, -1]):  # good, bad start
            warm = opnorm_geometry(moved, start=start)
            assert rel(float(warm.s1), float(ref.S[0])) <= 1e-14
            assert torch.allclose(torch.outer(warm.u1, warm.v1), torch.outer(ref.U[:, 0], ref.Vh[0]), atol=1e-13)


def test_warm_start_survives_a_large_move_without_the_spectrum(monkeypatch):
    # injected gradient noise moves the weights ~1e-2 per element per step (fig4_6): the re-shifted warm
    # start must still converge (no eigvalsh fallback, which cost 90% of begin() there) and stay exact
    import lipexp.dynamics as dyn
    g = torch.Generator().manual_seed(3)
    for m, n in [(64, 300), (300, 64), (40, 40)]:
        w = torch.randn(m, n, generator=g, dtype=torch.float64) / n**0.5
        prev = opnorm_geometry(w)
        calls = []
        monkeypatch.setattr(dyn, "_cold_top", lambda gram, name: calls.append(name) or (_ for _ in ()).throw(
            AssertionError("fell back to the spectrum")))
        for scale in (1e-4, 1e-3, 1e-2):
            moved = w + scale * torch.randn(m, n, generator=g, dtype=torch.float64)
            ref = torch.linalg.svd(moved)
            warm = opnorm_geometry(moved, start=prev.q1)
            assert rel(float(warm.s1), float(ref.S[0])) <= 1e-14
            assert torch.allclose(torch.outer(warm.u1, warm.v1), torch.outer(ref.U[:, 0], ref.Vh[0]), atol=1e-12)
        monkeypatch.undo()
        assert not calls


@pytest.mark.parametrize("route", ["torch", "cpu_lapack"])
def test_geometry_of_a_large_weight_uses_the_blocked_gram_exactly(route, monkeypatch):
    # 400 x 2100 (and its transpose): past the size where torch's Gram is formed block by block (upper
    # triangle); the one-thread CPU route (lipexp.cpu_lapack, these tests run on one thread) uses syrk
    if route == "torch":
        monkeypatch.setattr(cpu_lapack, "available", lambda t: False)
    else:
        assert cpu_lapack.available(torch.zeros(2, dtype=torch.float64)), "the SciPy route should be on here"
    g = torch.Generator().manual_seed(5)
    for w in (torch.randn(400, 2100, generator=g, dtype=torch.float64),
              torch.randn(2100, 400, generator=g, dtype=torch.float64)):
        ref = torch.linalg.svd(w)
        geo = opnorm_geometry(w)
        assert rel(float(geo.s1), float(ref.S[0])) <= 1e-14
        assert torch.allclose(torch.outer(geo.u1, geo.v1), torch.outer(ref.U[:, 0], ref.Vh[0]), atol=1e-12)
        small = w @ w.T if geo.wide else w.T @ w
        s2 = geo.s1**2
        a = s2 * torch.eye(small.shape[0], dtype=torch.float64) - small + s2 * torch.outer(geo.q1, geo.q1)
        assert torch.allclose(geo.chol @ geo.chol.T, a, rtol=0, atol=1e-11 * float(s2))


# ---------------------------------------------------------------------------------------------
# The tracker against brute force
# ---------------------------------------------------------------------------------------------
def check_model(model, x, y, lr=0.05):
    grads = per_sample_grads(model, x, y)
    got = step_terms(model, ce, x, y, lr, split=True)
    assert list(got) == [name for name, _ in weight_layers(model)]
    for name, mod in weight_layers(model):
        ref = brute(mod.weight, grads[name], lr)
        assert_terms(got[name], ref, TERMS_ALL, label=name)
        for k in ("kappa", "lambda2"):
            assert got[name][f"{k}_var"] + got[name][f"{k}_cov"] == pytest.approx(got[name][k], rel=1e-14)
    return got


TERMS_ALL = ("sigma1", "mu", "kappa", "lambda2", "kappa_var", "lambda2_var")


def test_mlp_tall_wide_square_against_brute_force():
    torch.manual_seed(0)
    x, y = data((6,))
    check_model(mlp(), x, y)


def test_cnn_padding_stride_dilation_against_brute_force():
    torch.manual_seed(0)
    x, y = data((2, 9, 9))
    check_model(cnn(), x, y)


def test_linear_on_sequences_against_brute_force():
    class SeqNet(nn.Module):  # Linear applied to M x T x n: G_i sums over the T positions
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)).mean(1))

    torch.manual_seed(0)
    x, y = data((5, 4))
    check_model(SeqNet().double(), x, y)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(5, 4, 3, stride=2, padding=1),
        nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(2, 0), dilation=(2, 1)),
        nn.Conv2d(4, 3, 2, padding="same"),
        nn.Conv2d(3, 3, 5, dilation=2, padding="same"),
    ],
)
def test_conv_b_projection_both_routes(conv):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, conv.in_channels, 9, 8, generator=g, dtype=torch.float64)
    ho, wo = conv.double()(x).shape[2:]
    du = torch.randn(5, ho, wo, generator=g, dtype=torch.float64)
    geo = _conv_geometry("c", conv)
    xp = F.pad(x, geo.pad)
    cols = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # M x n x P
    ref = torch.einsum("mnp,mp->mn", cols, du.flatten(1))
    cache = {}
    for method in ("grouped", "scatter", "scatter"):  # the second scatter reuses the cached index
        got = conv_b_projection(x, du, geo, cache, method=method)
        assert torch.allclose(got, ref, rtol=0, atol=1e-12), method
    assert len(cache) == 1


def test_later_steps_warm_started_match_brute_force():
    """From the second step on, the top vectors are warm-started from the previous step's."""
    torch.manual_seed(0)
    for model, shape in [(mlp(), (6,)), (cnn(), (2, 9, 9))]:
        lr = 0.05
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        tracker = DynamicsTracker(model, lr, optimizer=opt)
        for step in range(3):
            x, y = data(shape, seed=step)
            grads = per_sample_grads(model, x, y)
            before = {name: mod.weight.detach().clone() for name, mod in weight_layers(model)}
            tracker.begin()
            opt.zero_grad()
            ce(model(x), y).mean().backward()
            opt.step()
            got = tracker.end()
        tracker.close()
        for name, mod in weight_layers(model):
            assert_terms(got[name], brute(before[name], grads[name], lr), label=name)


def test_projections_equal_exact_per_sample_gradients():
    torch.manual_seed(0)
    for model, shape in [(mlp(), (6,)), (cnn(), (2, 9, 9))]:
        x, y = data(shape, m=7, seed=3)
        grads = per_sample_grads(model, x, y)
        tr = DynamicsTracker(model, lr=0.1)
        tr.begin()
        ce(model(x), y).mean().backward()
        tr.end({name: -0.1 * mod.weight.grad for name, mod in weight_layers(model)})
        for name, mod in weight_layers(model):
            g = grads[name].reshape(7, mod.weight.shape[0], -1)
            svd = torch.linalg.svd(mod.weight.detach().reshape(mod.weight.shape[0], -1))
            sign = torch.sign(svd.U[:, 0] @ tr.layers[[l.name for l in tr.layers].index(name)].geo.u1)
            u1, v1 = sign * svd.U[:, 0], sign * svd.Vh[0]
            a, b = tr.last_projections()[name]
            assert torch.allclose(a, g @ v1, rtol=0, atol=1e-12 * float(g.abs().max())), name
            assert torch.allclose(b, g.transpose(1, 2) @ u1, rtol=0, atol=1e-12 * float(g.abs().max())), name
        tr.close()
        model.zero_grad()


def test_batchnorm_uses_summed_loss_backprop_definition():
    """With batch coupling G_i := sum_p delta_{i,p} x_{i,p}^T, delta from backprop of the summed loss."""
    torch.manual_seed(0)
    model = cnn(batchnorm=True).train()
    x, y = data((2, 9, 9))
    conv = model[0]
    saved = {}
    h = conv.register_forward_hook(lambda mod, inp, out: saved.update(x=inp[0], out=out))
    out = model(x)
    h.remove()
    delta = torch.autograd.grad(ce(out, y).sum(), saved["out"])[0]  # M x 3 x 5 x 5
    cols = F.unfold(saved["x"].detach(), 3, padding=1, stride=2)  # M x 18 x 25
    g_ps = torch.einsum("mcp,mnp->mcn", delta.flatten(2), cols)
    model.zero_grad()
    got = step_terms(model, ce, x, y, 0.05, split=True)
    assert_terms(got["0.weight"], brute(conv.weight, g_ps, 0.05), TERMS_ALL)
    assert torch.allclose(g_ps.mean(0), conv.weight.grad.reshape(3, 18), atol=1e-12)


def definition_brute(model, x, y, lr, seed):
    """Per-sample G_i = sum_p delta_{i,p} x_{i,p}^T from autograd of the summed loss (any coupling, any
    dropout mask: the forward is replayed with the same RNG seed), then the brute-force terms."""
    saved = {}

    def keep(name):
        def hook(mod, inp, out):
            saved[name] = (inp[0], out)
            return out.clone()  # what follows (an in-place ReLU) must not overwrite the saved output

        return hook

    hooks = [mod.register_forward_hook(keep(name)) for name, mod in weight_layers(model)]
    torch.manual_seed(seed)
    out = model(x)
    for h in hooks:
        h.remove()
    names = list(saved)
    deltas = torch.autograd.grad(ce(out, y).sum(), [saved[k][1] for k in names])
    refs = {}
    for name, delta in zip(names, deltas):
        mod = dict(weight_layers(model))[name]
        xin = saved[name][0].detach()
        if isinstance(mod, nn.Conv2d):
            geo = _conv_geometry(name, mod)
            cols = F.unfold(F.pad(xin, geo.pad), mod.kernel_size, dilation=mod.dilation, stride=mod.stride)
            g_ps = torch.einsum("mcp,mnp->mcn", delta.flatten(2), cols)
        else:
            g_ps = torch.einsum("mc,mn->mcn", delta, xin)
        refs[name] = brute(mod.weight, g_ps, lr)
    return refs


def test_dropout_batchnorm_inplace_relu_use_the_step_forward():
    """Terms come from the very forward that made the step (same dropout masks, batch statistics)."""
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Dropout(0.3),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.BatchNorm2d(6, track_running_stats=False),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 5),
        nn.ReLU(inplace=True),
        nn.Dropout(0.3),
        nn.Linear(5, 3),
    ).double()
    x, y = data((2, 7, 7))
    refs = definition_brute(model, x, y, 0.05, seed=11)
    torch.manual_seed(11)
    got = step_terms(model, ce, x, y, 0.05, split=True)
    for name in refs:
        assert_terms(got[name], refs[name], TERMS_ALL, label=name)


def test_attack_before_begin_is_not_captured_and_tracker_matches_step_terms():
    torch.manual_seed(0)
    model = cnn()
    x, y = data((2, 9, 9))
    lr = 0.05
    xa = x.clone().requires_grad_()  # an FGSM-style forward/backward before begin()
    gx = torch.autograd.grad(ce(model(xa), y).sum(), xa)[0]
    x_adv = (x + 0.03 * gx.sign()).detach()
    ref = step_terms(model, ce, x_adv, y, lr)
    model.zero_grad()
    for reduction in ("mean", "sum"):
        m2 = cnn()
        m2.load_state_dict(model.state_dict())
        tracker = DynamicsTracker(m2, lr, reduction=reduction)
        xa = x.clone().requires_grad_()
        torch.autograd.grad(ce(m2(xa), y).sum(), xa)  # not captured: tracker not armed
        tracker.begin()
        losses = ce(m2(x_adv), y)
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
        with torch.no_grad():  # a manual SGD step
            for p in m2.parameters():
                p -= (lr if reduction == "mean" else lr / len(y)) * p.grad
        got = tracker.end()
        tracker.close()
        for name in ref:
            assert_terms(got[name], ref[name], label=f"{reduction} {name}", tol=1e-9)


def test_weight_decay_and_injected_noise_against_brute_force():
    torch.manual_seed(0)
    model = mlp()
    x, y = data((6,))
    lr, wd, gsc, nv = 0.05, 0.1, 0.7, 0.3
    grads = per_sample_grads(model, x, y)
    before = {name: mod.weight.detach().clone() for name, mod in weight_layers(model)}
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    tr = DynamicsTracker(model, lr, split=True, grad_scale=gsc, noise_var=nv, optimizer=opt)
    tr.begin()
    opt.zero_grad()
    ce(model(x), y).mean().backward()
    gen = torch.Generator().manual_seed(5)
    for p in model.parameters():  # the Fig. 4.6 update: sqrt(rho) * grad + sqrt(1 - rho) * noise
        p.grad.mul_(gsc).add_(math.sqrt(nv) * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    opt.step()
    got = tr.end()
    tr.close()
    for name, mod in weight_layers(model):
        dw = mod.weight.detach() - before[name]
        ref = brute(before[name], grads[name], lr, dw=dw, grad_scale=gsc, noise_var=nv)
        assert_terms(got[name], ref, TERMS_ALL, label=name)
    # the weight-decay part of the drift, on its own: -wd * <J, W> / s1 = -wd
    model2 = mlp()
    with torch.no_grad():
        for p in model2.parameters():
            p.grad = None
    terms0 = step_terms(model2, ce, x, y, lr)
    opt2 = torch.optim.SGD(model2.parameters(), lr=lr, weight_decay=wd)
    tr2 = DynamicsTracker(model2, lr, optimizer=opt2)
    tr2.begin()
    opt2.zero_grad()
    ce(model2(x), y).mean().backward()
    opt2.step()
    terms_wd = tr2.end()
    for name in terms0:
        assert rel(terms_wd[name]["mu"], terms0[name]["mu"] - wd) <= 1e-9


# ---------------------------------------------------------------------------------------------
# Beyond the thesis: the second-order drift mu2 and the cross-layer diffusion (docs/sde_second_order.md)
# ---------------------------------------------------------------------------------------------
TOL2 = 1e-8


def brute_mu2(w, dw, lr):
    """lr/(2 s1) vec(d)^T H vec(d) - lr/(2 s1^2) (J^T vec(d))^2, d = dW / lr, H and J by autograd."""
    w = w.detach().reshape(w.shape[0], -1).double()
    d = (dw.reshape(w.shape) / lr).double().reshape(-1)
    s1 = float(s1_fn(w))
    jac = torch.autograd.functional.jacobian(s1_fn, w).reshape(-1)
    hess = torch.autograd.functional.hessian(s1_fn, w).reshape(d.numel(), d.numel())
    return lr / (2 * s1) * float(d @ hess @ d) - lr / (2 * s1**2) * float(jac @ d) ** 2


def brute_full_lambda2(model, grads, lr, grad_scale=1.0, noise_var=0.0):
    """lr J_Z^T Sigma J_Z over all weights at once (Sigma with the cross-layer blocks), J_Z = (J_l / s1_l)_l,
    from explicit per-sample gradients; and each layer's share lr J_l^T Sigma_{l,:} J_Z / s1_l."""
    cols, jz, noise = [], [], []
    for name, mod in weight_layers(model):
        w = mod.weight.detach().reshape(mod.weight.shape[0], -1)
        s1 = float(s1_fn(w))
        cols.append(grads[name].reshape(grads[name].shape[0], -1))
        jz.append(torch.autograd.functional.jacobian(s1_fn, w).reshape(-1) / s1)
        noise.append(lr * noise_var / s1**2)
    g = torch.cat(cols, 1)
    mb = g.shape[0]
    proj = (g - g.mean(0)) @ torch.cat(jz)  # (M,): J_Z . vec(G~_i)
    c = lr * grad_scale**2 / (mb * (mb - 1))
    shares = {}
    for (name, _), col, j, nz in zip(weight_layers(model), cols, jz, noise):
        shares[name] = c * float((((col - col.mean(0)) @ j) * proj).sum()) + nz
    return c * float((proj * proj).sum()) + sum(noise), shares


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_mu2_and_full_lambda2_against_brute_force(kind):
    torch.manual_seed(0)
    model, shape = (mlp(), (6,)) if kind == "mlp" else (cnn(), (2, 9, 9))
    x, y = data(shape)
    lr = 0.05
    grads = per_sample_grads(model, x, y)
    got = step_terms(model, ce, x, y, lr, split=True)
    for name, mod in weight_layers(model):
        ref = brute_mu2(mod.weight, -lr * grads[name].mean(0), lr)
        assert rel(got[name]["mu2"], ref) <= TOL2, (name, got[name]["mu2"], ref)
    full, shares = brute_full_lambda2(model, grads, lr)
    sums = network_sums(got)
    assert rel(sums["lambda2_Z_full"], full) <= TOL2, (sums["lambda2_Z_full"], full)
    for name in shares:
        assert rel(got[name]["lambda2_full"], shares[name]) <= TOL2, name
    # the cross-layer covariances are really there (else the test could not tell the two apart)
    assert rel(sums["lambda2_Z_full"], sums["lambda2_Z"]) > 1e-3


def test_mu2_with_weight_decay_noise_and_warm_start_against_brute_force():
    """Realised update with weight decay, gradient scaling and injected noise, over three steps."""
    torch.manual_seed(0)
    model = mlp()
    lr, wd, gsc, nv = 0.05, 0.1, 0.7, 0.3
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    tr = DynamicsTracker(model, lr, grad_scale=gsc, noise_var=nv, optimizer=opt)
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        x, y = data((6,), seed=step)
        grads = per_sample_grads(model, x, y)
        before = {name: mod.weight.detach().clone() for name, mod in weight_layers(model)}
        tr.begin()
        opt.zero_grad()
        ce(model(x), y).mean().backward()
        for p in model.parameters():
            p.grad.mul_(gsc).add_(math.sqrt(nv) * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        opt.step()
        got = tr.end()
        for name, mod in weight_layers(model):
            ref = brute_mu2(before[name], mod.weight.detach() - before[name], lr)
            assert rel(got[name]["mu2"], ref) <= TOL2, (step, name, got[name]["mu2"], ref)
    tr.close()
    # the last step's weights are gone; the noise part of the full diffusion is still block-diagonal
    cur = {name: mod for name, mod in weight_layers(model)}
    with torch.no_grad():
        for mod in cur.values():
            mod.weight.copy_(before[[n for n, m in cur.items() if m is mod][0]])
    full, _ = brute_full_lambda2(model, grads, lr, grad_scale=gsc, noise_var=nv)
    assert rel(network_sums(got)["lambda2_Z_full"], full) <= TOL2


def test_mu2_is_the_second_order_change_of_log_sigma1():
    """lr * mu2 is log s1(W + dW) - log s1(W) - lr * mu up to O(lr^3): the formula, not only its code."""
    torch.manual_seed(0)
    model = mlp()
    x, y = data((6,))
    for lr in (1e-3, 1e-4):
        got = step_terms(model, ce, x, y, lr)
        for name, mod in weight_layers(model):
            w = mod.weight.detach()
            dz = math.log(float(s1_fn(w - lr * mod.weight.grad))) - math.log(float(s1_fn(w)))
            second = dz - lr * got[name]["mu"]
            assert abs(second / (lr * got[name]["mu2"]) - 1) < 50 * lr, (lr, name, second, lr * got[name]["mu2"])
        model.zero_grad()


def test_full_lambda2_with_sum_reduction_and_unused_layer():
    torch.manual_seed(0)

    class TwoHeads(nn.Module):  # the second head is not used: it has no per-sample gradients
        def __init__(self):
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(5, 7), nn.Linear(7, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = TwoHeads().double()
    x, y = data((5,))
    grads = per_sample_grads(model, x, y)
    lr = 0.02
    tr = DynamicsTracker(model, lr, reduction="sum", noise_var=0.2)
    tr.begin()
    ce(model(x), y).sum().backward()
    got = tr.end({n: -lr / len(y) * mod.weight.grad if mod.weight.grad is not None else torch.zeros_like(mod.weight)
                  for n, mod in weight_layers(model)})
    tr.close()
    grads["unused.weight"] = torch.zeros(len(y), 3, 3, dtype=torch.float64)
    full, shares = brute_full_lambda2(model, grads, lr, noise_var=0.2)
    assert rel(network_sums(got)["lambda2_Z_full"], full) <= TOL2
    for name in shares:
        assert rel(got[name]["lambda2_full"], shares[name]) <= TOL2, name


def test_step_terms_leaves_parameters_unchanged_and_removes_hooks():
    torch.manual_seed(0)
    model = cnn()
    x, y = data((2, 9, 9))
    before = [p.detach().clone() for p in model.parameters()]
    terms = step_terms(model, ce, x, y, 0.01)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(not m._forward_hooks for m in model.modules())
    assert set(terms["0.weight"]) == {"sigma1", "mu", "kappa", "lambda2", "mu2", "lambda2_full"}
    exact = top_singular_values(model)
    assert all(rel(terms[k]["sigma1"], exact[k]) <= 1e-13 for k in exact)
    cols = term_columns(terms)
    assert cols["sigma1/0.weight"] == terms["0.weight"]["sigma1"]
    assert len(cols) == 6 * len(terms)


def test_float32_model_close_to_float64():
    torch.manual_seed(0)
    m64 = cnn()
    x, y = data((2, 9, 9), m=32)
    m32 = cnn().float()
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    m64.load_state_dict({k: v.double() for k, v in m32.state_dict().items()})
    t64 = step_terms(m64, ce, x, y, 0.01, split=True)
    t32 = step_terms(m32, ce, x.float(), y, 0.01, split=True)
    for name in t64:
        for k, v in t64[name].items():
            assert t32[name][k] == pytest.approx(v, rel=1e-4, abs=1e-5 * abs(t64[name]["kappa"])), (name, k)


# ---------------------------------------------------------------------------------------------
# Integrator
# ---------------------------------------------------------------------------------------------
def test_integrator_against_hand_computation():
    lr = 0.1
    def t(s1, mu, kappa, lam2):
        return {"sigma1": s1, "mu": mu, "kappa": kappa, "lambda2": lam2}

    steps = [
        {"a": t(2.0, 0.3, 0.05, 0.2), "b": t(3.0, -0.1, 0.01, 0.1)},
        {"a": t(2.1, 0.2, 0.04, 0.3), "b": t(2.9, 0.0, 0.02, 0.0)},
        {"a": t(2.2, 0.1, 0.03, 0.1), "b": t(2.8, 0.1, 0.00, 0.1)},
    ]
    integ = KIntegrator(lr)
    rows = [integ.update(t) for t in steps]
    z0 = math.log(6.0)
    # hand: Z_pred(1) = z0 + 0.1*(0.2 + 0.06 - 0.15) ; Z_pred(2) = Z_pred(1) + 0.1*(0.2 + 0.06 - 0.15)
    z1 = z0 + 0.1 * (0.2 + 0.06 - 0.5 * 0.3)
    z2 = z1 + 0.1 * (0.2 + 0.06 - 0.5 * 0.3)
    assert rows[0]["K_pred"] == pytest.approx(6.0) and rows[0]["K_emp"] == pytest.approx(6.0)
    assert rows[1]["Z_pred"] == pytest.approx(z1, rel=1e-14)
    assert rows[2]["Z_pred"] == pytest.approx(z2, rel=1e-14)
    assert rows[2]["K_emp"] == pytest.approx(2.2 * 2.8)
    ek2 = 6.0 * math.exp(0.1 * (0.2 + 0.06) + 0.1 * (0.2 + 0.06))
    assert rows[2]["EK_pred"] == pytest.approx(ek2, rel=1e-14)
    assert rows[2]["VarK_pred"] == pytest.approx(ek2**2 * (math.exp(0.1 * 0.3 + 0.1 * 0.3) - 1), rel=1e-12)
    assert rows[1]["mu_Z"] == pytest.approx(0.2) and rows[1]["lambda2_Z"] == pytest.approx(0.3)
    vec = integrate(lr, z0, *[[r[k] for r in rows] for k in ("mu_Z", "kappa_Z", "lambda2_Z")])
    for k in ("Z_pred", "K_pred", "EK_pred", "VarK_pred"):
        assert np.allclose(vec[k], [r[k] for r in rows], rtol=1e-14), k
    with_k0 = KIntegrator(lr, k0=5.0).update(steps[0])
    assert with_k0["K_pred"] == pytest.approx(5.0)
    split = {"a": {**steps[0]["a"], "kappa_var": 0.01, "kappa_cov": 0.04, "lambda2_var": 0.05, "lambda2_cov": 0.15}}
    assert network_sums(split)["kappa_Z_cov"] == pytest.approx(0.04)


@pytest.mark.parametrize("lr,batch,tol2", [(1e-3, 8, 0.25), (1e-2, 4, 0.1)])
def test_k_pred_tracks_k_emp_over_small_lr_steps(lr, batch, tol2):
    """50 SGD steps; random labels and small batches make the noise terms visible.

    Beyond ``K_pred ~ K_emp`` (which the drift alone nearly gives at small lr), the part of the change
    of Z that the realised first-order drift does not explain must be predicted by kappa - lambda2/2.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(400, 8, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 3, (400,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = DynamicsTracker(model, lr, optimizer=opt)
    integ = KIntegrator(lr)
    rows = []
    for _ in range(51):
        idx = torch.randint(0, 400, (batch,), generator=g)
        tracker.begin()
        opt.zero_grad()
        ce(model(xs[idx]), ys[idx]).mean().backward()
        opt.step()
        rows.append(integ.update(tracker.end()))
    tracker.close()
    assert max(abs(r["K_pred"] - r["K_emp"]) / r["K_emp"] for r in rows) < 1e-3
    second_emp = rows[-1]["Z_emp"] - rows[0]["Z_emp"] - lr * sum(r["mu_Z"] for r in rows[:-1])
    second_pred = lr * sum(r["kappa_Z"] - 0.5 * r["lambda2_Z"] for r in rows[:-1])
    assert second_emp > 0 and abs(second_pred - second_emp) < tol2 * second_emp, (second_pred, second_emp)


# ---------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layer,match",
    [
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode"),
        (nn.Conv1d(4, 4, 3, padding=1, padding_mode="circular"), "padding_mode"),
    ],
)
def test_unsupported_conv_is_error_naming_layer(layer, match):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), layer)
    with pytest.raises(ValueError, match=match) as err:
        DynamicsTracker(model, 0.1)
    assert "'1.weight'" in str(err.value)


def test_other_weights_and_custom_forward_are_errors():
    model = nn.Sequential(nn.Bilinear(3, 3, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="'0.weight'.*strict=False"):
        DynamicsTracker(model, 0.1)
    tr = DynamicsTracker(model, 0.1, strict=False)  # the option the message names exists
    assert [layer.name for layer in tr.layers] == ["1.weight"]
    assert [name for name, _ in tr.skipped] == ["0.weight", "0.bias", "1.bias"]
    tr.close()

    class MyLinear(nn.Linear):
        def forward(self, x):
            return F.linear(x, self.weight.T[: self.out_features, : self.in_features])

    with pytest.raises(ValueError, match="overrides"):
        DynamicsTracker(nn.Sequential(MyLinear(3, 3)), 0.1)


def test_optimiser_checks():
    model = mlp()
    for opt in (torch.optim.Adam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)):
        with pytest.raises(ValueError, match="plain SGD"):
            DynamicsTracker(model, 0.1, optimizer=opt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = DynamicsTracker(model, 0.1, optimizer=opt, sigma1_only=True)
    x, y = data((6,))
    tracker.begin()
    exact = top_singular_values(model)
    opt.zero_grad()
    ce(model(x), y).mean().backward()
    opt.step()
    terms = tracker.end()
    assert set(terms["0.weight"]) == {"sigma1"}
    assert all(rel(terms[k]["sigma1"], exact[k]) <= 1e-13 for k in exact)
    with pytest.raises(ValueError, match="sigma1_only"):
        KIntegrator(0.1).update(terms)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = DynamicsTracker(model, 0.1, optimizer=sgd)
    tracker.begin()
    sgd.param_groups[0]["lr"] = 0.05
    sgd.zero_grad()
    ce(model(x), y).mean().backward()
    with pytest.raises(ValueError, match="tracker.lr"):
        tracker.end()


def test_misuse_is_error():
    model = mlp()
    x, y = data((6,))
    tracker = DynamicsTracker(model, 0.1)
    tracker.begin()
    ce(model(x), y).mean().backward()
    with pytest.raises(RuntimeError, match="called twice"):
        model(x)  # a second forward with grad inside the step
    tracker.abort()
    with torch.no_grad():  # forwards without grad are ignored
        tracker.begin()
        model(x)
    with pytest.raises(RuntimeError, match="begin\\(\\) called twice"):
        tracker.begin()
    tracker.abort()
    tracker.begin()
    model(x)
    with pytest.raises(RuntimeError, match="no gradient"):
        tracker.end()
    tracker.close()


    class Tied(nn.Module):  # the decoder reuses the encoder weight functionally
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(5, 3)

        def forward(self, x):
            return F.linear(torch.tanh(self.enc(x)), self.enc.weight.T)

    tied = Tied().double()
    with DynamicsTracker(tied, 0.1) as tr, pytest.raises(RuntimeError, match="differs"):
        tr.begin()
        tied(torch.randn(4, 5, dtype=torch.float64)).pow(2).sum(1).mean().backward()
        tr.end()
    tied.zero_grad()
    with DynamicsTracker(tied, 0.1, check_grad=False) as tr:  # deliberately off: no error
        tr.begin()
        tied(torch.randn(4, 5, dtype=torch.float64)).pow(2).sum(1).mean().backward()
        tr.end({"enc.weight": -0.1 * tied.enc.weight.grad})
    model = mlp()  # gradients not zeroed: caught
    ce(model(x), y).mean().backward()
    with DynamicsTracker(model, 0.1) as tr, pytest.raises(RuntimeError, match="not zeroed"):
        tr.begin()
        ce(model(x), y).mean().backward()
        tr.end()

    ortho = nn.Sequential(nn.Linear(4, 4)).double()
    nn.init.orthogonal_(ortho[0].weight)
    with pytest.raises(ValueError, match="repeated top singular value"):
        step_terms(ortho, lambda o, t: o.pow(2).sum(1), torch.randn(3, 4, dtype=torch.float64), None, 0.1)


def test_frozen_weight_has_no_noise_and_autocast_is_refused():
    torch.manual_seed(0)
    model = mlp()
    model[2].weight.requires_grad_(False)
    x, y = data((6,))
    grads = per_sample_grads(model, x, y)
    got = step_terms(model, ce, x, y, 0.05)
    assert got["2.weight"]["mu"] == 0 and got["2.weight"]["kappa"] == 0 and got["2.weight"]["lambda2"] == 0
    assert_terms(got["4.weight"], brute(model[4].weight, grads["4.weight"], 0.05))
    model = cnn().float()
    with DynamicsTracker(model, 0.1) as tr, pytest.raises(ValueError, match="autocast"):
        tr.begin()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(4, 2, 9, 9))


def test_integrator_state_round_trip_continues_exactly():
    from lipexp.dynamics import KIntegrator

    terms = [{"a": {"sigma1": 2.0 + 0.01 * k, "mu": 0.1 * k, "kappa": 0.01, "lambda2": 0.002}} for k in range(6)]
    ref = KIntegrator(0.1)
    ref_rows = [ref.update(t) for t in terms]
    first = KIntegrator(0.1)
    rows = [first.update(t) for t in terms[:3]]
    resumed = KIntegrator(0.1)
    resumed.load_state_dict(first.state_dict())
    rows += [resumed.update(t) for t in terms[3:]]
    assert rows == ref_rows
    assert resumed.prediction() == ref.prediction()


def test_second_order_integrator_against_hand_computation_and_vectorised():
    lr = 0.1

    def t(s1, mu, kappa, lam2, mu2, full):
        return {"sigma1": s1, "mu": mu, "kappa": kappa, "lambda2": lam2, "mu2": mu2, "lambda2_full": full}

    steps = [
        {"a": t(2.0, 0.3, 0.05, 0.2, 0.07, 0.25), "b": t(3.0, -0.1, 0.01, 0.1, 0.02, 0.12)},
        {"a": t(2.1, 0.2, 0.04, 0.3, 0.01, 0.20), "b": t(2.9, 0.0, 0.02, 0.0, -0.03, 0.05)},
        {"a": t(2.2, 0.1, 0.03, 0.1, 0.00, 0.10), "b": t(2.8, 0.1, 0.00, 0.1, 0.04, 0.10)},
    ]
    z0 = math.log(6.0)
    for sde, main, other in (("thesis", "", "_2nd"), ("second_order", "_2nd", "")):
        integ = KIntegrator(lr, sde=sde)
        rows = [integ.update(s) for s in steps]
        suffix = {"": "_thesis" if sde == "second_order" else "", "_2nd": "_2nd" if sde == "thesis" else ""}
        z2 = z0 + 0.1 * (0.2 + 0.09) + 0.1 * (0.2 - 0.02)  # mu_Z + mu2_Z of steps 0 and 1
        v = 0.1 * 0.37 + 0.1 * 0.25  # lambda2_Z_full of steps 0 and 1
        ek2 = math.exp(z2 + v / 2)
        assert rows[2]["Z_pred" + suffix["_2nd"]] == pytest.approx(z2, rel=1e-14)
        assert rows[2]["K_pred" + suffix["_2nd"]] == pytest.approx(math.exp(z2), rel=1e-14)
        assert rows[2]["EK_pred" + suffix["_2nd"]] == pytest.approx(ek2, rel=1e-14)
        assert rows[2]["VarK_pred" + suffix["_2nd"]] == pytest.approx(ek2**2 * math.expm1(v), rel=1e-12)
        z1 = z0 + 2 * 0.1 * (0.2 + 0.06 - 0.5 * 0.3)  # the thesis' path is unchanged by the new terms
        assert rows[2]["Z_pred" + suffix[""]] == pytest.approx(z1, rel=1e-14)
        assert rows[1]["mu2_Z"] == pytest.approx(-0.02) and rows[1]["lambda2_Z_full"] == pytest.approx(0.25)
        cols = {k: [r[k] for r in rows] for k in ("mu_Z", "kappa_Z", "lambda2_Z", "mu2_Z", "lambda2_Z_full")}
        vec = integrate(lr, z0, cols["mu_Z"], cols["kappa_Z"], cols["lambda2_Z"], cols["mu2_Z"],
                        cols["lambda2_Z_full"], sde=sde)
        for k in ("Z_pred", "K_pred", "EK_pred", "VarK_pred"):
            assert np.allclose(vec[k], [r[k] for r in rows], rtol=1e-14), (sde, k)
    with pytest.raises(ValueError, match="mu2"):
        KIntegrator(lr, sde="second_order").update({"a": {"sigma1": 1.0, "mu": 0.0, "kappa": 0.0, "lambda2": 0.0}})
    with pytest.raises(ValueError, match="unknown sde"):
        KIntegrator(lr, sde="ito")
    with pytest.raises(ValueError, match="mu2_z"):
        integrate(lr, 0.0, [0.0], [0.0], [0.0], sde="second_order")
    # resume mid-run repeats every bit, second-order accumulators included (plain floats: weights_only safe)
    ref = KIntegrator(lr)
    ref_rows = [ref.update(s) for s in steps]
    first = KIntegrator(lr)
    got = [first.update(s) for s in steps[:2]]
    state = first.state_dict()
    assert all(isinstance(v, (float, str)) for v in state.values())
    resumed = KIntegrator(lr)
    resumed.load_state_dict(state)
    got += [resumed.update(s) for s in steps[2:]]
    assert got == ref_rows and resumed.prediction() == ref.prediction()
    assert "K_pred_2nd" in ref.prediction()


def test_second_order_path_closes_the_gap_of_the_thesis_path():
    """On 60 steps at a large lr the thesis' path misses K_emp by the dropped second-order drift;
    K_pred_2nd (mu + mu2) is exact to third order, so its error is far smaller."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(400, 8, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 3, (400,), generator=g)
    lr = 0.2
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=1e-3)
    tracker = DynamicsTracker(model, lr, optimizer=opt)
    integ = KIntegrator(lr)
    rows = []
    for _ in range(61):
        idx = torch.randint(0, 400, (16,), generator=g)
        tracker.begin()
        opt.zero_grad()
        ce(model(xs[idx]), ys[idx]).mean().backward()
        opt.step()
        rows.append(integ.update(tracker.end()))
    tracker.close()
    err1 = max(abs(r["Z_pred"] - r["Z_emp"]) for r in rows)
    err2 = max(abs(r["Z_pred_2nd"] - r["Z_emp"]) for r in rows)
    second = abs(rows[-1]["Z_emp"] - rows[0]["Z_emp"] - lr * sum(r["mu_Z"] for r in rows[:-1]))
    assert second > 1e-3 and err2 < 0.1 * err1, (err1, err2, second)
    assert all(r["lambda2_Z_full"] >= 0 and r["VarK_pred_2nd"] >= 0 for r in rows)
