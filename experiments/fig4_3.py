"""Fig. 4.3: near-convergence dynamics, layer-wise and network terms with the variance/covariance split."""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import ch4, plots
from .common import train_job, write_outputs

run = train_job
TERMS = ("mu", "kappa", "lambda2")


def _ma(s: pd.Series, w: int) -> pd.Series:
    return s.rolling(w, min_periods=1).mean()


def kappa_phases(t: np.ndarray, k_ma: np.ndarray) -> dict:
    """Numbers behind the four-phase description of kappa_Z (on its moving average)."""
    n = len(k_ma)
    i_peak = int(np.argmax(k_ma))
    tail = k_ma[int(0.8 * n):]
    mid = k_ma[i_peak:int(0.8 * n)] if int(0.8 * n) > i_peak + 1 else k_ma[i_peak:]
    return {
        "kappa_ma_start": float(k_ma[0]),
        "kappa_ma_peak": float(k_ma[i_peak]),
        "t_peak": float(t[i_peak]),
        "kappa_ma_end": float(k_ma[-1]),
        "tail_min": float(tail.min()),
        "tail_cv": float(tail.std() / tail.mean()) if tail.mean() > 0 else float("nan"),
        "decline_slope": float(np.polyfit(np.arange(len(mid)), mid, 1)[0]) if len(mid) > 2 else float("nan"),
    }


def aggregate(cfg, fig_dir, runs) -> None:
    r = next((r for r in runs if r.ok), None)
    w, inset = int(cfg.scale.window), int(cfg.scale.inset)
    if r is None:
        fig, _ = plots.grid(1)
        write_outputs(cfg, fig_dir, fig, pd.DataFrame([ch4.run_row(x, {}) for x in runs]), runs, ["no completed run"])
        return
    df = r.metrics[r.metrics["step"] < r.summary["steps"]].dropna(subset=["mu_Z"])
    layers = [c.split("/", 1)[1] for c in df.columns if c.startswith("mu/")]
    fig, axes = plots.grid(len(layers) + 2, ncols=4, size=(4.2, 3.0))
    for ax, name in zip(axes, layers):
        for term, style in (("mu", "-"), ("kappa_var", ":"), ("kappa_cov", "--"), ("lambda2_var", ":"), ("lambda2_cov", "--")):
            col = f"{term}/{name}"
            if col in df:
                ax.plot(df["t"], _ma(df[col], w), ls=style, lw=1, label=term)
        ax.set_title(f"layer {name}", fontsize=8)
        ax.set_xlabel("t", fontsize=7)
        ax.legend(fontsize=5)
    ax = axes[len(layers)]
    for col, style in (("mu_Z", "-"), ("kappa_Z", "-"), ("kappa_Z_var", ":"), ("kappa_Z_cov", "--"),
                       ("lambda2_Z", "-"), ("lambda2_Z_var", ":"), ("lambda2_Z_cov", "--")):
        if col in df:
            ax.plot(df["t"], _ma(df[col], w), ls=style, lw=1, label=col)
    ax.set_title(f"network terms (moving average over {w} steps)", fontsize=8)
    ax.legend(fontsize=5)
    late = df[df["step"] >= df["step"].max() - inset]
    sub = plots.inset(ax)
    sub.plot(late["t"], late["kappa_Z"], lw=0.8)
    sub.set_title(f"kappa_Z, last {inset} steps", fontsize=6)
    ax = axes[len(layers) + 1]
    ax.plot(df["t"], df["K_emp"], label="K_emp")
    ax.plot(df["t"], df["K_pred"], ls="--", label="K_pred")
    ax.set_title("K(t)", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()

    mean_abs = {c: float(df[c].abs().mean()) for c in ("mu_Z", "kappa_Z", "lambda2_Z") if c in df}
    drift_share = mean_abs["mu_Z"] / (mean_abs["mu_Z"] + mean_abs["kappa_Z"] + 0.5 * mean_abs["lambda2_Z"])
    cov_kappa = float(df["kappa_Z_cov"].abs().mean() / df["kappa_Z_var"].abs().mean()) if "kappa_Z_cov" in df else float("nan")
    cov_lambda = float(df["lambda2_Z_cov"].abs().mean() / df["lambda2_Z_var"].abs().mean()) if "lambda2_Z_cov" in df else float("nan")
    ph = kappa_phases(df["t"].to_numpy(), _ma(df["kappa_Z"], w).to_numpy())
    k = r.metrics.dropna(subset=["K_emp"])
    tail = k[k["step"] >= 0.8 * k["step"].max()]
    k_slope = float(np.polyfit(tail["t"], tail["K_emp"], 1)[0]) if len(tail) > 2 else float("nan")
    s = r.summary
    findings = [
        f"drift dominates: mean |mu_Z| = {mean_abs['mu_Z']:.3g}, mean kappa_Z = {mean_abs['kappa_Z']:.3g}, "
        f"mean lambda2_Z/2 = {0.5 * mean_abs['lambda2_Z']:.3g} (drift share {drift_share:.2f})",
        f"mean |mu_Z| / mean kappa_Z = {mean_abs['mu_Z'] / mean_abs['kappa_Z']:.3g} (thesis: about one order of magnitude)",
        f"kappa_Z > 0 at {float((df['kappa_Z'] > 0).mean()) * 100:.1f}% of steps (min {df['kappa_Z'].min():.3g})",
        f"covariance vs variance part, mean |.| ratio: kappa {cov_kappa:.3g}, lambda^2 {cov_lambda:.3g} "
        "(> 1 means the covariances dominate)",
        f"kappa_Z moving average: {ph['kappa_ma_start']:.3g} at start, peak {ph['kappa_ma_peak']:.3g} at t = "
        f"{ph['t_peak']:.3g}, {ph['kappa_ma_end']:.3g} at the end; last 20%: min {ph['tail_min']:.3g}, "
        f"coefficient of variation {ph['tail_cv']:.2f}; slope after the peak {ph['decline_slope']:.3g} per step",
        f"K keeps growing: K_emp {s['K0']:.4g} -> {s['final_K_emp']:.4g}; slope over the last 20% of t = {k_slope:.3g}",
        f"end state: train loss {s.get('final_train_loss', float('nan')):.3g}, test loss "
        f"{s.get('final_test_loss', float('nan')):.3g}, train acc {s.get('final_train_acc', float('nan')):.4f}, "
        f"test acc {s.get('final_test_acc', float('nan')):.4f} (thesis: 9.75e-3, 2.22, 0.99996, 0.6854)",
        f"prediction: max_t |K_pred - K_emp| / K_emp = {s.get('max_rel_err', float('nan')):.3g}",
    ]
    table = pd.DataFrame([{**ch4.run_row(r, {}), **{f"mean_abs_{k}": v for k, v in mean_abs.items()},
                           "cov_over_var_kappa": cov_kappa, "cov_over_var_lambda2": cov_lambda,
                           "K_slope_last20pct": k_slope, **ph}])
    notes = []
    if cfg.profile.name != "paper":
        notes.append(f"Profile {cfg.profile.name}: {cfg.scale.train_subset} training images, batch "
                     f"{cfg.scale.batch_size}, lr {cfg.scale.lr}, {cfg.scale.steps} steps, so that training nearly "
                     "interpolates its subset on a CPU (the thesis: full CIFAR-10, lr 1e-3, 344,370 steps).")
    write_outputs(cfg, fig_dir, fig, table, runs, findings, notes)
