"""Plots of one's own run (matplotlib; no Hydra, no backend chosen here).

``k_curves(metrics_df)`` takes the per-step table of ``lipexp.train.train`` (``metrics.parquet``,
``lipexp.results.read_metrics(run_dir)``), of ``LipschitzMonitor.dataframe()`` or of a Lightning
CSV log with its ``lipexp/`` prefix removed.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["k_curves"]


def k_curves(metrics_df: pd.DataFrame, ax=None, x: str = "step", label: str | None = None, color=None,
             band: bool = True, logy: bool = False):
    """Draw K_emp(t) against the prediction of Chapter 4; returns the Axes.

    - ``K_emp`` (solid): the product of the weights' top singular values, before each step;
    - ``K_pred`` (dashed): the path prediction exp(Z_pred), integrated from the measured terms;
    - the band: ``EK_pred +- sqrt(VarK_pred)``, the mean of K(t) under the SDE and one standard deviation
      (``band=False`` leaves it out).
    A sigma1-only run (no ``K_pred`` column) draws ``K_emp`` alone. ``x``: ``step`` or ``t`` (= sum of lr).
    ``ax=None`` makes a new figure (``ax.figure`` is it).
    """
    if "K_emp" not in metrics_df:
        raise ValueError(f"metrics_df has no K_emp column (columns: {', '.join(map(str, metrics_df.columns[:12]))}"
                         f"{' ...' if len(metrics_df.columns) > 12 else ''}); was the run made with tracker=off?")
    if x not in metrics_df:
        raise ValueError(f"metrics_df has no '{x}' column; use x='step' or x='t'")
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(5, 3.4))
    prefix = f"{label} " if label else ""
    d = metrics_df.dropna(subset=["K_emp"])
    line = ax.plot(d[x], d["K_emp"], color=color, lw=1.3, label=f"{prefix}K_emp")[0]
    if "K_pred" in metrics_df:
        p = metrics_df.dropna(subset=["K_pred"])
        ax.plot(p[x], p["K_pred"], color=line.get_color(), lw=1.3, ls="--", label=f"{prefix}K_pred")
        if band and {"EK_pred", "VarK_pred"} <= set(p.columns):
            std = np.sqrt(p["VarK_pred"].clip(lower=0).to_numpy())
            ek = p["EK_pred"].to_numpy()
            ax.fill_between(p[x].to_numpy(), ek - std, ek + std, color=line.get_color(), alpha=0.18, lw=0,
                            label=f"{prefix}E[K] \u00b1 std")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("t (sum of lr)" if x == "t" else x)
    ax.set_ylabel("K = prod sigma_1")
    ax.legend(fontsize=7)
    return ax
