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


# ---------------------------------------------------------------- Chapter 3
def relabel_pairs(fig, n_pairs: int, pairs_per_row: int, prefix: str, start: int = 0) -> None:
    """Prefix the titles of pairs ``start .. start+n_pairs-1`` drawn by ``lipexp.plots_ch3.plot_derivative_pairs``."""
    axes = fig.axes
    for i in range(start, start + n_pairs):
        for j in (0, 1):
            ax = axes[(i // pairs_per_row) * 2 * pairs_per_row + 2 * (i % pairs_per_row) + j]
            ax.set_title(f"{prefix} {ax.get_title()}", fontsize=8)


def log_error_histogram(ax, err: np.ndarray, bound: float | None = None, bins: int = 30, title: str = "") -> None:
    """Step histograms of errors ``err: [r, trials]`` (one per k) on log10 bins; exact zeros are counted in the title.

    ``bound`` (the thesis' stated maximum) is drawn as a dashed vertical line when positive.
    """
    err = np.asarray(err, dtype=float)
    pos = err[err > 0]
    zeros = int((err == 0).sum())
    if pos.size:
        lo, hi = np.log10(pos.min()), np.log10(max(pos.max(), bound or 0.0))
        edges = np.logspace(lo - 0.05, hi + 0.05, bins + 1)
        for k in range(err.shape[0]):
            ax.hist(err[k][err[k] > 0], bins=edges, histtype="step", label=f"k={k + 1}")
        ax.set_xscale("log")
        ax.legend(fontsize=5, ncol=2)
    else:
        ax.text(0.5, 0.5, f"all {err.size} errors are exactly 0", ha="center", va="center", transform=ax.transAxes,
                fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if bound:
        ax.axvline(bound, color="k", ls="--", lw=1)
    ax.set_title(f"{title}\nmax {err.max():.2g}, {zeros}/{err.size} exactly 0", fontsize=7)
    ax.set_xlabel("eps", fontsize=7)
    ax.set_ylabel("count", fontsize=7)
    ax.tick_params(labelsize=6)


# ---------------------------------------------------------------- Chapter 6
FAMILY_COLORS = {"cifar": "tab:blue", "imagenet": "tab:orange"}


def zoo_bars(ax, names, values, families, ylabel: str) -> None:
    """One bar per model, coloured by family (CIFAR-10 trained here / ImageNet pretrained)."""
    names, values, families = list(names), list(values), list(families)
    ax.bar(range(len(names)), values, color=[FAMILY_COLORS.get(f, "0.5") for f in families])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    for fam, col in FAMILY_COLORS.items():
        if fam in families:
            ax.bar([], [], color=col, label=fam)
    ax.legend(fontsize=6)


def sid_bars(ax, sid, title: str = "", color=None, ylim=None) -> None:
    """A spectral importance distribution as bars over the bands I0 (lowest) .. I{M-1}, with 1/M dashed."""
    sid = np.asarray(sid, float)
    m = len(sid)
    ax.bar(range(m), sid, color=color or "tab:blue")
    ax.axhline(1.0 / m, color="0.3", ls="--", lw=0.8)
    ax.set_xticks(range(m))
    ax.set_xticklabels([f"I{i}" for i in range(m)], fontsize=6)
    ax.set_title(title, fontsize=7)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.tick_params(labelsize=6)


def labelled_scatter(ax, x, y, labels, sizes=None, colors=None, fontsize: int = 6) -> None:
    """Scatter with a text label at each point (circle sizes optional, e.g. proportional to SRS)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ax.scatter(x, y, s=sizes if sizes is not None else 30, c=colors, alpha=0.7, edgecolors="k", linewidths=0.5)
    for xi, yi, lab in zip(x, y, labels):
        ax.annotate(str(lab), (xi, yi), fontsize=fontsize, xytext=(3, 3), textcoords="offset points")


def show_image(ax, img, title: str = "", fontsize: int = 7) -> None:
    """A C x H x W image (any range; clipped to [0, 1] for display)."""
    arr = np.asarray(img, float)
    arr = np.clip(arr.transpose(1, 2, 0), 0, 1)
    ax.imshow(arr.squeeze(), cmap="gray" if arr.shape[-1] == 1 else None, interpolation="nearest")
    ax.set_title(title, fontsize=fontsize)
    ax.axis("off")
