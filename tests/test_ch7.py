"""Chapter 7 regularisers: gradients against a full float64 SVD, configs, and the figures end to end."""
import json
import os
import signal

import pytest
import torch
from torch import nn

from lipexp import spectral_reg as sr
from lipexp.layers import weight_matrix


def _model(seed=0):
    torch.manual_seed(seed)
    # wide Linear, tall Linear, wide Conv2d (8 x 27): every branch of the Gram choice
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 20),
                         nn.Tanh(), nn.Linear(20, 5)).double()


def _svd_gap(model, sign, reduce):
    gaps = []
    for m in (model[0], model[3], model[5]):
        s = torch.linalg.svd(weight_matrix(m.weight))[1]
        gaps.append(s[0] - s[-1])
    g = torch.stack(gaps)
    return sign * 0.3 * (g.abs().sum() if reduce == "per_layer" else g.sum().abs())


def _svd_alignment(model, loss_fn, reduce):
    loss = loss_fn()
    ws = [model[i].weight for i in (0, 3, 5)]
    grads = torch.autograd.grad(loss, ws, create_graph=True)
    terms = []
    for w, g in zip(ws, grads):
        U, S, Vh = torch.linalg.svd(weight_matrix(w))
        u1, v1 = U[:, 0].detach(), Vh[0].detach()  # J_op = u1 v1^T: detached as in eq. 7.5's J_op
        terms.append(-(u1 @ weight_matrix(g) @ v1))
    t = torch.stack(terms)
    return 0.7 * (t.abs().sum() if reduce == "per_layer" else t.sum().abs())


def _grads(value, model):
    return [g.clone() for g in torch.autograd.grad(value, [model[i].weight for i in (0, 3, 5)])]


@pytest.mark.parametrize("sign,reduce", [(1, "per_layer"), (-1, "per_layer"), (1, "sum")])
def test_gap_penalty_matches_full_svd(sign, reduce):
    model = _model()
    state = sr.SpectralState()
    for _ in range(30):  # converge the warm-started iterations
        sr.gap_terms(model, state, iters=20)
    value, log = sr.gap_penalty(model, state, 0.3, sign, reduce, iters=20)
    ref = _svd_gap(model, sign, reduce)
    assert torch.allclose(value, ref, rtol=1e-9)
    for a, b in zip(_grads(value, model), _grads(_svd_gap(model, sign, reduce), model)):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-10)
    assert len([k for k in log if k.startswith("gap/")]) == 3


@pytest.mark.parametrize("reduce", ["per_layer", "sum"])
def test_alignment_penalty_matches_full_svd(reduce):
    model = _model(1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    loss_fn = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    state = sr.SpectralState()
    for _ in range(10):  # converged top vectors
        sr.gap_terms(model, state, iters=100)
    value, log = sr.alignment_penalty(model, loss_fn(), state, 0.7, reduce, iters=50)
    ref = _svd_alignment(model, loss_fn, reduce)
    assert torch.allclose(value, ref, rtol=1e-9)
    # the penalty's gradient is a Hessian-vector product: compare with the one through the full SVD's vectors
    ga = _grads(value, model)
    for a, b in zip(ga, _grads(_svd_alignment(model, loss_fn, reduce), model)):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-12)
    # and with a central finite difference along a random direction, J_op held at its value at W
    # (the documented convention: J_op = u1 v1^T is the step's fixed principal direction)
    frozen = [(torch.linalg.svd(weight_matrix(model[i].weight.detach()))[0][:, 0],
               torch.linalg.svd(weight_matrix(model[i].weight.detach()))[2][0]) for i in (0, 3, 5)]

    def frozen_penalty():
        grads = torch.autograd.grad(loss_fn(), [model[i].weight for i in (0, 3, 5)])
        t = torch.stack([-(u @ weight_matrix(g) @ v) for (u, v), g in zip(frozen, grads)])
        return float(0.7 * (t.abs().sum() if reduce == "per_layer" else t.sum().abs()))

    d = [torch.randn(model[i].weight.shape, generator=g, dtype=torch.float64) for i in (0, 3, 5)]
    h = 1e-5
    vals = []
    for step in (h, -2 * h):
        with torch.no_grad():
            for i, di in zip((0, 3, 5), d):
                model[i].weight += step * di
        vals.append(frozen_penalty())
    with torch.no_grad():
        for i, di in zip((0, 3, 5), d):
            model[i].weight += h * di
    fd = (vals[0] - vals[1]) / (2 * h)
    an = float(sum((a * di).sum() for a, di in zip(ga, d)))
    assert abs(an - fd) <= 1e-6 * max(abs(fd), 1e-3)


def test_sigma_min_is_smallest_nonzero_and_warm_start_tracks():
    torch.manual_seed(0)
    for shape in ((7, 19), (19, 7)):
        w = torch.randn(*shape, dtype=torch.float64)
        state = sr.SpectralState()
        u, v = sr.bottom_pair("w", w, state, iters=1)
        s = torch.linalg.svdvals(w)
        assert torch.isclose(sr.rayleigh_sigma(w, u, v), s[-1], rtol=1e-6)
        w2 = w + 1e-3 * torch.randn(*shape, dtype=torch.float64)  # one small step: two iterations suffice
        u, v = sr.bottom_pair("w", w2, state, iters=2)
        assert torch.isclose(sr.rayleigh_sigma(w2, u, v), torch.linalg.svdvals(w2)[-1], rtol=1e-4)


def test_bad_settings_are_one_line_errors():
    for kw, msg in ((dict(kind="gap"), "unknown spectral regulariser"), (dict(beta=-1.0), "beta must be >= 0"),
                    (dict(reduce="mean"), "unknown reg reduce"), (dict(sign=0), "reg sign"),
                    (dict(iters=0), "reg iters")):
        args = dict(kind="spectral_gap", beta=0.1, reduce="per_layer", sign=1, iters=1) | kw
        with pytest.raises(ValueError, match=msg):
            sr.check(**args)


def test_config_errors_are_one_line(lipexp_cli):
    out = lipexp_cli("figure=train", "model=mlp", "data=mnist", "train=alignment", "profile=smoke", check=False)
    assert out.returncode == 2 and "tracker=sigma1" in out.stderr
    out = lipexp_cli("figure=train", "model=mlp", "data=mnist", "train=spectral_gap", "train.reg.reduce=mean",
                     "profile=smoke", check=False)
    assert out.returncode == 2 and "train.reg.reduce" in out.stderr


@pytest.mark.parametrize("fig", ["fig7_1", "fig7_2"])
def test_chapter7_figure_runs_end_to_end(lipexp_cli, fig):
    import pandas as pd

    lipexp_cli("-m", f"figure={fig}", "profile=smoke", timeout=900)
    d = lipexp_cli.results / fig / "smoke"
    for name in ("figure.png", "figure.pdf", "summary.csv", "summary.md", "provenance.json"):
        assert (d / name).stat().st_size > 0, name
    runs = list((lipexp_cli.results / fig / "runs" / "smoke").glob("*/status.json"))
    assert runs and all(json.loads(p.read_text())["status"] == "completed" for p in runs)
    table = pd.read_csv(d / "summary.csv")
    assert set(table["regularizer"]) >= {"none", "spectral_gap", "alignment", "spectral_norm"}
    for col in ("test_acc", "pgd_acc", "fgsm_acc", "srs", "K_matrix", "bound_upper", "stable_rank_mean"):
        assert table[col].notna().all(), col
    # spectral norm keeps every effective sigma_max near 1 (power iteration: one step a forward)
    assert (table.loc[table["regularizer"] == "spectral_norm", "K_matrix"] < 1.5).all()
    md = (d / "summary.md").read_text()
    assert "Claim 7.2a" in md and "Claim 7.3a" in md
    metrics = pd.read_parquet(next(p.parent for p in runs if "align" in p.parent.name) / "metrics.parquet")
    assert any(c.startswith("align/") for c in metrics.columns)
    metrics = pd.read_parquet(next(p.parent for p in runs if "gap" in p.parent.name) / "metrics.parquet")
    assert {"mu_Z", "kappa_Z", "lambda2_Z"} <= set(metrics.columns) and any(c.startswith("gap/") for c in metrics.columns)


def test_sigma_min_of_a_rank_deficient_float32_matrix_is_near_zero():
    # rewarding the gap can drive sigma_min to 0: the inverse iteration must still factorise
    torch.manual_seed(0)
    w = (torch.randn(27, 5) @ torch.randn(5, 32)).float()  # rank 5 of 27
    u, v = sr.bottom_pair("w", w, sr.SpectralState(), iters=1)
    assert torch.isfinite(u).all() and float(sr.rayleigh_sigma(w, u, v)) < 1e-3 * float(torch.linalg.svdvals(w)[0])


@pytest.mark.parametrize("kind", ["spectral_gap", "alignment"])
def test_resumed_run_with_a_penalty_repeats_every_bit(tmp_path, kind):
    # the warm-start vectors are part of the checkpoint: 3 + 3 steps == 6 steps
    from lipexp.data import Dataset
    from lipexp.models import mlp
    from lipexp import results
    from lipexp.train import Interrupted, TrainSpec, train

    g = torch.Generator().manual_seed(0)
    ds = Dataset("mnist", "train", torch.randint(0, 256, (64, 1, 28, 28), generator=g, dtype=torch.uint8),
                 torch.randint(0, 10, (64,), generator=g), 10, "synthetic", {})
    tracker = "full" if kind == "spectral_gap" else "sigma1"
    spec = TrainSpec(steps=6, lr=0.05, batch_size=16, tracker=tracker, spectral_reg=kind, reg_beta=0.1,
                     eval_samples=32, checkpoint_every=2, progress=False)
    torch.manual_seed(0)
    a = mlp()
    train(a, ds, None, spec, tmp_path / "a")

    def interrupt(row):  # Ctrl-C while the first checkpoint's rows are written: the run stops after step 2
        if row["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    torch.manual_seed(0)
    with pytest.raises(Interrupted):
        train(mlp(), ds, None, spec, tmp_path / "b", log_fn=interrupt)
    assert results.load_torch(tmp_path / "b" / results.CHECKPOINT_FILE)["step"] == 3
    torch.manual_seed(0)
    b = mlp()  # a fresh model: everything comes from the checkpoint
    train(b, ds, None, spec, tmp_path / "b")
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
