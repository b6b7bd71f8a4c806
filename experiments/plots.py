"""Plot pieces shared by several figures (matplotlib, Agg backend)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def k_curves(ax, df: pd.DataFrame, label: str, color=None, band: bool = True, x: str = "step") -> None:
    """K_emp(t) solid, K_pred(t) dashed, and K_pred +- std from Var[K] as a band (when tracked)."""
    d = df.dropna(subset=["K_emp"])
    line = ax.plot(d[x], d["K_emp"], color=color, lw=1.2, label=f"{label} K_emp")[0]
    if "K_pred" in d:
        ax.plot(d[x], d["K_pred"], color=line.get_color(), lw=1.2, ls="--", label=f"{label} K_pred")
        if band and "VarK_pred" in d:
            std = np.sqrt(d["VarK_pred"].clip(lower=0))
            ax.fill_between(d[x], d["K_pred"] - std, d["K_pred"] + std, color=line.get_color(), alpha=0.15, lw=0)


def inset(ax, bounds=(0.55, 0.08, 0.4, 0.35)):
    sub = ax.inset_axes(bounds)
    sub.tick_params(labelsize=6)
    return sub


def grid(n: int, ncols: int = 4, size=(3.6, 2.9)):
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])
