"""Figures of Chapter 3 (Figs. 3.2-3.4) and of the K(0) comparison, from data only.

Each function takes the rows/arrays produced by ``lipexp.spectral`` or ``lipexp.bounds`` and returns a
``matplotlib.figure.Figure`` built without pyplot (no backend or global state; ``fig.savefig`` renders
with Agg); saving is the caller's job.
"""
from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure


def _as_image(t, shape: tuple[int, int] | None) -> np.ndarray:
    a = np.asarray(t.detach().cpu().double() if hasattr(t, "detach") else t, dtype=float)
    if a.ndim == 1:
        m, n = shape
        a = a.reshape(n, m).T  # column-major vec back to the m x n matrix
    return a


def plot_derivative_pairs(rows: list[dict], matrix_shape: tuple[int, int], title: str = "",
                          pairs_per_row: int = 3) -> Figure:
    """Figs. 3.2/3.3: per k, closed form (left) and autograd (right) in viridis, eps in the title.

    ``rows`` from ``spectral.compare_derivatives``; Jacobians (vectors) are shown as the m x n matrix
    ``u_k v_k^T``, Hessians as ``mn x mn``. Both panels of a pair share one colour scale.
    """
    n_rows = math.ceil(len(rows) / pairs_per_row)
    fig = Figure(figsize=(3.0 * 2 * pairs_per_row, 3.2 * n_rows))
    axes = fig.subplots(n_rows, 2 * pairs_per_row, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, r in enumerate(rows):
        ours, gt = _as_image(r["ours"], matrix_shape), _as_image(r["autograd"], matrix_shape)
        lo, hi = min(ours.min(), gt.min()), max(ours.max(), gt.max())
        for j, (img, label) in enumerate(((ours, "closed form"), (gt, "autograd"))):
            ax = axes[i // pairs_per_row, 2 * (i % pairs_per_row) + j]
            ax.imshow(img, cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(f"k={r['k'] + 1} {label}\n" + (f"eps={r['eps']:.1e}" if j == 0 else ""), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_error_histograms(errors: dict, bins: int = 30) -> Figure:
    """Fig. 3.4: per case (``{name: errors [r, trials]}``) unnormalised histograms of eps, one per k."""
    cases = list(errors)
    fig = Figure(figsize=(4.2 * len(cases), 3.4))
    axes = fig.subplots(1, len(cases), squeeze=False)
    for ax, case in zip(axes.flat, cases):
        err = np.asarray(errors[case].detach().cpu() if hasattr(errors[case], "detach") else errors[case])
        edges = np.linspace(0.0, max(err.max(), 1e-300), bins + 1)
        for k in range(err.shape[0]):
            ax.hist(err[k], bins=edges, histtype="step", label=f"k={k + 1}")
        ax.set_title(f"{case} (max {err.max():.1e})", fontsize=9)
        ax.set_xlabel("eps")
        ax.set_ylabel("count")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def plot_k0(results: dict[str, dict]) -> Figure:
    """Predicted vs measured initial s_1 per layer, one panel per ``{label: bounds.init_k0(...)}``."""
    fig = Figure(figsize=(4.5 * len(results), 3.4))
    axes = fig.subplots(1, len(results), squeeze=False)
    for ax, (label, res) in zip(axes.flat, results.items()):
        rows = res["layers"]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["predicted"] for r in rows], 0.4, label="(sqrt m + sqrt n) s")
        ax.bar(x + 0.2, [r["measured_mean"] for r in rows], 0.4, yerr=[r["measured_std"] for r in rows],
               label="measured")
        ax.set_xticks(x, [r["name"] for r in rows], rotation=45, fontsize=7)
        net = res["network"]
        ax.set_title(f"{label}: K(0) pred {net['predicted']:.3g}, meas {net['measured_mean']:.3g}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
