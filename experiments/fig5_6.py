"""Fig. 5.6: loss along filter-normalised random directions and top Hessian eigenvalue, per low-pass cutoff.

Each job needs the fig5_5 model of its cutoff: it reuses the ``model.pt`` of a completed run of the same
profile of fig5_4/5/6 (``figure.reuse_from``) whose training config (model, data, optim, train, seeds)
equals its own, and otherwise trains the model itself with the same settings. Then, on a fixed seeded sample of the (filtered) training set: the loss along two filter-
normalised orthogonal directions d1, d2 (Li et al. 2018), alpha in [-alpha_max, alpha_max], and the top
Hessian eigenvalue of the loss on ``n_hvp`` of those samples by HVP power iteration.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from lipexp import landscape
from lipexp.data import normalize
from lipexp.layers import k_emp, top_singular_values
from lipexp.train import to_pixels

from .common import write_outputs
from .fig5_5 import correlations, data_notes, describe_correlation, profile_notes, train_or_reuse


def landscape_scalars(cfg, run_dir: Path, model, train_set) -> dict:
    s = cfg.scale
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(cfg.seed.data))
    idx = torch.randperm(len(train_set), generator=gen)[: int(s.n_land)]
    x = normalize(to_pixels(train_set.x[idx], device), train_set.name)
    y = train_set.y[idx].to(device)
    batches = [(x[i : i + 500], y[i : i + 500]) for i in range(0, len(idx), 500)]
    loss_fn = landscape.make_loss_fn(batches)
    d1, d2 = landscape.random_directions(model, seed=int(cfg.figure.direction_seed))
    a_max = float(cfg.figure.alpha_max)
    alphas = np.linspace(-a_max, a_max, int(s.n_alpha))
    loss1 = landscape.landscape_1d(model, loss_fn, d1, alphas)
    loss2 = landscape.landscape_1d(model, loss_fn, d2, alphas)
    xh, yh = x[: int(s.n_hvp)], y[: int(s.n_hvp)]
    was_training = model.training
    model.eval()
    eig = landscape.hessian_top_eigenvalue(model, lambda m: F.cross_entropy(m(xh), yh), iters=int(s.hvp_iters),
                                           tol=float(cfg.figure.hvp_tol), seed=int(cfg.figure.direction_seed))
    model.train(was_training)
    np.savez_compressed(run_dir / "landscape.npz", alphas=alphas, loss_d1=loss1, loss_d2=loss2)
    centre = float(loss_fn(model))
    half = [float(np.interp(a, alphas, c)) for a in (-a_max / 2, a_max / 2) for c in (loss1, loss2)]
    ends = [float(c[0]) for c in (loss1, loss2)] + [float(c[-1]) for c in (loss1, loss2)]
    return {
        "n_land": len(idx),
        "loss_centre": centre,
        "loss_rise_half": float(np.mean(half)) - centre,  # mean over d1, d2 and both signs at |alpha| = alpha_max / 2
        "loss_rise_end": float(np.mean(ends)) - centre,
        "sharpness": eig.value,
        "sharpness_iters": eig.iterations,
        "sharpness_converged": bool(eig.converged),
        "n_hvp": int(xh.shape[0]),
        "K_bound": k_emp(top_singular_values(model)),
    }


def run(cfg, run_dir: Path) -> dict:
    return train_or_reuse(cfg, run_dir, after=lambda model, train_set, test_set, summary:
                          landscape_scalars(cfg, run_dir, model, train_set))


def aggregate(cfg, fig_dir: Path, runs) -> None:
    ok = sorted((r for r in runs if r.ok and (r.path / "landscape.npz").exists()), key=lambda r: float(r.get("data.cutoff")))
    rows = []
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    cmap = plt.get_cmap("viridis")
    for r in ok:
        c = float(r.get("data.cutoff"))
        d = np.load(r.path / "landscape.npz")
        for ax, key in zip(axes[:2], ("loss_d1", "loss_d2")):
            ax.plot(d["alphas"], d[key], color=cmap(c), lw=1.3, label=f"cutoff {c:g}")
        rows.append({"cutoff": c, "run": r.path.name,
                     **{k: r.summary.get(k) for k in ("final_test_acc", "loss_centre", "loss_rise_half", "loss_rise_end",
                                                       "sharpness", "sharpness_iters", "sharpness_converged", "n_hvp",
                                                       "n_land", "K_bound")},
                     "reused_model": bool(r.summary.get("reused_from"))})
    table = pd.DataFrame(rows)
    findings = []
    for ax, name in zip(axes[:2], ("d1", "d2")):
        ax.set(xlabel=f"alpha (theta* + alpha {name})", ylabel="training loss", title=f"(a{name[1]}) loss along {name}")
        ax.legend(fontsize=6)
    if len(table):
        axes[2].plot(table["cutoff"], table["sharpness"], "o-", color="C3")
        axes[2].set(xlabel="low-pass cutoff", ylabel="top Hessian eigenvalue", title="(b) sharpness")
        axes[3].plot(table["cutoff"], table["loss_rise_half"], "o-", label=f"|alpha| = {cfg.figure.alpha_max / 2:g}")
        axes[3].plot(table["cutoff"], table["loss_rise_end"], "s--", label=f"|alpha| = {cfg.figure.alpha_max:g}")
        axes[3].set(xlabel="low-pass cutoff", ylabel="loss(theta* + alpha d) - loss(theta*)", yscale="log",
                    title="(c) loss rise (mean of d1, d2, +-alpha)")
        axes[3].legend(fontsize=7)
        c = correlations(table["cutoff"], table["sharpness"])
        trend = "grows" if c["spearman"] > 0 else ("falls" if c["spearman"] < 0 else "shows no monotone trend")
        findings.append(f"sharpness (top Hessian eigenvalue of the loss on {int(table['n_hvp'].iloc[0])} training samples) "
                        f"vs cutoff: {describe_correlation(c)}; from {table['sharpness'].iloc[0]:.4g} at cutoff "
                        f"{table['cutoff'].iloc[0]:g} to {table['sharpness'].iloc[-1]:.4g} at {table['cutoff'].iloc[-1]:g}: "
                        f"by rank, sharpness {trend} with the cutoff here")
        for key, label in (("loss_rise_half", f"loss rise at |alpha| = {cfg.figure.alpha_max / 2:g}"),
                           ("loss_rise_end", f"loss rise at |alpha| = {cfg.figure.alpha_max:g}")):
            findings.append(f"{label} vs cutoff: {describe_correlation(correlations(table['cutoff'], table[key]))} "
                            f"({table[key].iloc[0]:.4g} -> {table[key].iloc[-1]:.4g})")
        findings.append("sharpness vs prod sigma_1 across cutoffs: "
                        + describe_correlation(correlations(table["K_bound"], table["sharpness"])))
        findings.append(f"HVP power iteration converged (relative {cfg.figure.hvp_tol:g}) in "
                        f"{int(table['sharpness_converged'].sum())}/{len(table)} runs (at most {int(table['sharpness_iters'].max())} HVPs)")
    fig.tight_layout()
    reused = int(table["reused_model"].sum()) if len(table) else 0
    notes = data_notes(ok) + profile_notes(cfg, skip=("n_lip", "lip_iters")) + [
        f"Models: {reused} of {len(table)} reused (model.pt) from completed runs of "
        f"{', '.join(cfg.figure.get('reuse_from') or []) or '(none)'} with the same training config; "
        f"{len(table) - reused} trained by this figure's own jobs with the same settings.",
        "Loss: mean cross-entropy on a fixed seeded sample of the filtered training set (n_land); directions: two "
        "filter-normalised, filter-wise orthogonal Gaussian directions with the same seed for every model (biases not "
        "moved).",
    ]
    write_outputs(cfg, fig_dir, fig, table, runs, findings or ["no completed run"], notes)
