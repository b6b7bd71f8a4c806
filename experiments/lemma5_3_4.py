"""Lemma 5.3.4 on the Gaussian bump: exact perturbation supremum against the band bound (no training).

``lipexp.fourier.lemma534_row`` computes, by quadrature over the ball, the supremum over x of the change
that the frequency ball B_delta(zeta) produces under a shift of norm eps, and the bound M_delta eps
sqrt(mu(B)); the table runs over |zeta| and delta (delta < |zeta|).
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lipexp import fourier, results

from .common import write_outputs


def run(cfg, run_dir: Path) -> dict:
    s = cfg.scale
    rows = fourier.lemma534_table(
        a=float(cfg.figure.a), deltas=tuple(float(d) for d in s.deltas),
        zeta_norms=tuple(float(z) for z in s.zeta_norms), eps=float(cfg.figure.eps),
    )
    table = pd.DataFrame(rows)
    results.write_parquet(run_dir / "table.parquet", table)
    return {
        "n_rows": len(table),
        "max_ratio": float(table["ratio"].max()),
        "max_ratio_over_predicted": float(table["ratio_over_predicted"].max()),
        "min_ratio_over_predicted": float(table["ratio_over_predicted"].min()),
        "bound_holds": bool((table["sup_diff"] <= table["bound"]).all()),
    }


def aggregate(cfg, fig_dir: Path, runs) -> None:
    ok = [r for r in runs if r.ok and (r.path / "table.parquet").exists()]
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.0))
    if not ok:
        write_outputs(cfg, fig_dir, fig, pd.DataFrame(), runs, ["no completed run"])
        return
    run = max(ok, key=lambda r: r.status.get("finished") or "")
    table = pd.read_parquet(run.path / "table.parquet")
    d_all = np.geomspace(table["delta"].min(), table["delta"].max(), 100)
    ax = axes[0]
    for i, (z, g) in enumerate(table.groupby("zeta_norm")):
        ax.plot(g["delta"], g["ratio"], "o-", color=f"C{i}", ms=4, label=f"|zeta| = {z:g}")
    ax.plot(d_all, math.sqrt(math.pi) * d_all, "k--", lw=1, label="sqrt(pi) delta (eq. 5.79)")
    ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="delta", ylabel="sup |f(x) - f(x^(-zeta))| / (M_delta eps sqrt(mu(B)))",
           title="(a) perturbation / bound")
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, (z, g) in enumerate(table.groupby("zeta_norm")):
        ax.plot(g["delta"], g["sup_diff"], "o-", color=f"C{i}", ms=4, label=f"sup diff, |zeta| = {z:g}")
        ax.plot(g["delta"], g["bound"], "s--", color=f"C{i}", ms=3, mfc="none")
    ax.set(xscale="log", yscale="log", xlabel="delta", title="(b) sup diff (solid) and bound (dashed)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    a, eps = float(table["a"].iloc[0]), float(table["eps"].iloc[0])
    dmin = float(table["delta"].min())
    first = table[table["delta"] == dmin]
    toward_one = all(g.sort_values("delta")["ratio_over_predicted"].is_monotonic_decreasing
                     for _, g in table.groupby("zeta_norm"))
    findings = [
        f"the bound holds in all {len(table)} (|zeta|, delta) cells (a = {a:g}, eps = {eps:g}): "
        f"max sup_diff / bound = {table['ratio'].max():.4f} (at delta = {table.loc[table['ratio'].idxmax(), 'delta']:g}), "
        f"below sqrt(pi) delta in every cell (ratio / (sqrt(pi) delta) <= {table['ratio_over_predicted'].max():.4f}), "
        "because |sin t| <= |t| and K_omega <= M_delta on the ball",
        f"at the smallest delta = {dmin:g}, ratio / (sqrt(pi) delta) = "
        + ", ".join(f"{r.ratio_over_predicted:.4f} (|zeta| = {r.zeta_norm:g})" for r in first.itertuples())
        + f"; it moves toward 1 as delta shrinks for every |zeta|: {toward_one} (eq. 5.79 is the delta -> 0 limit; "
        "the gap is first order in delta times the slope of log K_omega at |zeta|, zero at the peak |zeta| = "
        f"sqrt(a/2)/pi = {math.sqrt(a / 2) / math.pi:.4f})",
    ]
    notes = [
        "Reading of the lemma (as in the thesis' own check, eqs. 5.65-5.75): the input moves by Delta x of norm eps "
        "along zeta, and only the ball's part of f's spectrum responds; the supremum over x is then attained at "
        "x = Delta x / 2 and computed exactly by quadrature (Gauss-Legendre in the radius, trapezoid in the angle).",
    ]
    write_outputs(cfg, fig_dir, fig, table, runs, findings, notes)
