"""Figs. 3.2 (Jacobian, ``figure.order: 1``) and 3.3 (Hessian, ``order: 2``): closed form against autograd.

One job: for every shape in ``figure.shapes`` and distribution in ``figure.dists``, one matrix drawn with
``seed.data`` (the thesis: 6x10, seed 1), and per singular value k the closed form of ``lipexp.spectral``,
autograd's derivative of ``svdvals`` and eps = ||R_ours - R_autograd||_2 (thesis eq. 3.280; the spectral
norm for Hessians). The figure shows the first shape (the thesis' 6x10) for both distributions; the table
has every case. ``experiments.fig3_3`` reuses this module with order 2.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from lipexp import plots_ch3, results, spectral

from . import plots
from .ch3 import blank, pick_run, write_empty
from .common import write_outputs

ARRAYS = "derivatives.npz"
ROWS = "rows.csv"
DIST_LABEL = {"normal": "N(0,1)", "uniform": "U(0,1)"}
WHAT = {1: "Jacobian", 2: "Hessian"}


def _shape_name(shape) -> str:
    return f"{int(shape[0])}x{int(shape[1])}"


def run(cfg, run_dir):
    order = int(cfg.figure.order)
    seed = int(cfg.seed.data)
    results.update_status(run_dir, data_source=f"synthetic matrices (seed {seed})")
    rows, arrays = [], {}
    for shape in cfg.figure.shapes:
        m, n = int(shape[0]), int(shape[1])
        for dist in cfg.figure.dists:
            A = spectral.random_matrices((m, n), str(dist), seed=seed)
            compared = spectral.compare_derivatives(A, order)
            for r in compared:
                rows.append({"dist": str(dist), "shape": _shape_name(shape), "k": r["k"] + 1, "sigma_k": r["sigma"],
                             "eps": r["eps"]})
                key = f"{dist}_{_shape_name(shape)}_k{r['k']}"
                arrays[f"ours_{key}"] = r["ours"].numpy()
                arrays[f"autograd_{key}"] = r["autograd"].numpy()
    np.savez(run_dir / ARRAYS, **arrays)
    df = pd.DataFrame(rows)
    results.write_csv(run_dir / ROWS, df)
    return {"order": order, "max_eps": float(df["eps"].max()), "cases": int(len(df))}


def aggregate(cfg, fig_dir, runs) -> None:
    order = int(cfg.figure.order)
    what = WHAT[order]
    bound = float(cfg.figure.thesis_bound)
    r = pick_run(cfg, runs, ROWS)
    if r is None:
        return write_empty(cfg, fig_dir, runs)
    df = pd.read_csv(r.path / ROWS)
    z = np.load(r.path / ARRAYS)
    seed = r.get("seed.data")
    first = _shape_name(cfg.figure.shapes[0])
    m, n = (int(v) for v in cfg.figure.shapes[0])
    pair_rows, counts = [], []
    for dist in cfg.figure.dists:
        sub = df[(df["dist"] == dist) & (df["shape"] == first)]
        for k, eps in zip(sub["k"], sub["eps"]):
            key = f"{dist}_{first}_k{k - 1}"
            pair_rows.append({"k": k - 1, "eps": eps, "ours": z[f"ours_{key}"], "autograd": z[f"autograd_{key}"]})
        counts.append((dist, len(sub)))
    per_row = 3
    fig = plots_ch3.plot_derivative_pairs(
        pair_rows, (m, n), pairs_per_row=per_row,
        title=f"Singular-value {what} of {first} matrices (seed {seed}): closed form (left) vs autograd (right)")
    start = 0
    for dist, c in counts:
        plots.relabel_pairs(fig, c, per_row, DIST_LABEL.get(dist, dist), start)
        start += c

    thesis = df["shape"] == first  # the thesis tested its first shape (6x10) only
    df["thesis_bound"] = np.where(thesis, bound, np.nan)
    df["within_thesis_bound"] = pd.Series(df["eps"] <= bound, dtype=object).where(thesis, None)
    findings = []
    for dist in cfg.figure.dists:
        sub = df[(df["dist"] == dist) & (df["shape"] == first)]
        findings.append(f"{DIST_LABEL.get(dist, dist)} {first} (the thesis' case), seed {seed}: eps per k = "
                        + ", ".join(f"{e:.2g}" for e in sub["eps"]) + f"; max {sub['eps'].max():.3g}")
    others = df[df["shape"] != first]
    if len(others):
        findings.append("shapes the thesis did not test: " + "; ".join(
            f"{s} {DIST_LABEL.get(d, d)} max eps {g['eps'].max():.3g}" for (s, d), g in others.groupby(
                ["shape", "dist"], sort=False)))
    worst = df.loc[df["eps"].idxmax()]
    verdict = "within" if (df.loc[thesis, "eps"] <= bound).all() else "ABOVE"
    findings.append(
        f"{first}: {verdict} the thesis' " + ("eps = 0" if bound == 0 else f"bound {bound:.2g}")
        + f"; max eps over all {len(df)} (case, k) pairs: {worst['eps']:.3g} ({worst['dist']} {worst['shape']}, "
        f"k={worst['k']})")
    notes = [f"eps = ||R_ours - R_autograd||_2 (thesis eq. 3.280): the 2-norm of the {m * n}-vector for Jacobians, "
             "the spectral norm of the mn x mn matrix for Hessians; float64; k = 1 is the largest singular value.",
             "Closed forms: lipexp.spectral.singular_value_jacobian / singular_value_hessian (column-major vec); "
             "autograd: torch.autograd.functional.jacobian / hessian of torch.linalg.svdvals.",
             "Matrices: lipexp.spectral.random_matrices (a torch.Generator seeded with seed.data); the thesis' "
             "seed 1 refers to its own generator, so the matrices differ from the thesis' ones."]
    write_outputs(cfg, fig_dir, fig, blank(df), runs, findings, notes)
