"""Pieces shared by the Chapter 4 figures: run tables, K_emp-vs-K_pred panels, fits and monotonicity."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from . import plots


def run_row(run, keys: dict[str, str]) -> dict:
    """One table row: selected config values (``{column: dotted key}``), status and the run's summary."""
    row = {col: run.get(key) for col, key in keys.items()}
    row["status"] = run.status.get("status")
    if not run.ok:
        row["reason"] = (run.status.get("reason") or "")[:160]
    for k in ("steps", "max_rel_err", "final_rel_err", "max_rel_err_2nd", "final_rel_err_2nd", "K0",
              "final_K_emp", "final_K_pred", "final_EK_pred", "final_VarK_pred", "final_K_pred_2nd",
              "final_EK_pred_2nd", "final_VarK_pred_2nd", "final_train_loss", "final_train_acc", "final_test_loss",
              "final_test_acc", "int_mu_Z", "int_kappa_Z", "int_lambda2_Z", "int_mu2_Z", "int_lambda2_Z_full"):
        if k in run.summary:
            row[k] = run.summary[k]
    return row


def validation_panels(runs, title_keys: dict[str, str], inset_steps: int = 50):
    """One panel per run: K_emp and K_pred +- std(K) over t, with an inset of the first ``inset_steps`` steps."""
    fig, axes = plots.grid(len(runs), ncols=4)
    for ax, r in zip(axes, runs):
        title = ", ".join(f"{r.get(k)}" for k in title_keys.values())
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("t = step x lr", fontsize=7)
        ax.set_ylabel("K", fontsize=7)
        if not r.ok or "K_pred" not in r.metrics:
            ax.text(0.5, 0.5, f"{r.status.get('status')}\n{(r.status.get('reason') or '')[:60]}",
                    ha="center", va="center", fontsize=6, wrap=True, transform=ax.transAxes)
            continue
        df = r.metrics.dropna(subset=["K_emp"])
        plots.k_curves(ax, df, "", x="t")
        ax.legend(["K_emp", "K_pred", "K_pred ± std"], fontsize=6, loc="upper left")
        sub = plots.inset(ax)
        head = df[df["step"] < inset_steps]
        sub.plot(head["step"], head["K_emp"], lw=1)
        sub.plot(head["step"], head["K_pred"], lw=1, ls="--")
        sub.set_title(f"first {inset_steps} steps", fontsize=6)
    fig.tight_layout()
    return fig


def rel_err_findings(table: pd.DataFrame, label_cols: list[str]) -> list[str]:
    ok = table[table["status"] == "completed"]
    out = []
    if len(ok) and "max_rel_err" in ok:
        worst = ok.loc[ok["max_rel_err"].idxmax()]
        out.append(
            f"max_t |K_pred - K_emp| / K_emp over {len(ok)} completed runs: median {ok['max_rel_err'].median():.3g}, "
            f"worst {worst['max_rel_err']:.3g} ({', '.join(str(worst[c]) for c in label_cols)}), "
            f"after {int(ok['steps'].max())} steps"
        )
        out += [
            f"{', '.join(str(r[c]) for c in label_cols)}: max rel. error {r['max_rel_err']:.3g}, "
            f"K {r['K0']:.4g} -> {r['final_K_emp']:.4g} (predicted {r['final_K_pred']:.4g}), "
            f"test acc {r.get('final_test_acc', float('nan')):.3f}"
            for _, r in ok.iterrows()
        ]
    skipped = table[table["status"] != "completed"]
    for _, r in skipped.iterrows():
        out.append(f"{', '.join(str(r[c]) for c in label_cols)}: {r['status']} ({str(r.get('reason', ''))[:120]})")
    return out


def non_monotone_early(df: pd.DataFrame, steps: int = 50) -> bool:
    """Whether K_emp changes direction within the first ``steps`` steps (the thesis' inset claim)."""
    k = df[df["step"] < steps]["K_emp"].to_numpy()
    d = np.sign(np.diff(k))
    d = d[d != 0]
    return bool(len(d) > 1 and (d[1:] != d[:-1]).any())


def fit_power(x, y) -> tuple[float, float]:
    """Least-squares fit log y = p log x + c; returns (p, R^2)."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    p, c = np.polyfit(lx, ly, 1)
    resid = ly - (p * lx + c)
    r2 = 1.0 - resid.var() / ly.var() if ly.var() > 0 else float("nan")
    return float(p), float(r2)


def log_sample_variance_moments(n_samples) -> tuple[np.ndarray, np.ndarray]:
    """Bias E[log s^2 / sigma^2] = digamma(k/2) - log(k/2) and variance Var[log s^2] = trigamma(k/2),
    k = n - 1, of the log of a sample variance of n Gaussian draws (log of a scaled chi^2; at n = 4 the
    bias is -0.37 and the large-n variance 2 / k understates the true one by a third)."""
    import torch

    k = np.asarray(n_samples, float) - 1.0
    half = torch.as_tensor(k / 2, dtype=torch.float64)
    return torch.special.digamma(half).numpy() - np.log(k / 2), torch.special.polygamma(1, half).numpy()


def sample_variance_slope_se(x, n_samples) -> float:
    """Standard error of the slope of ``fit_power`` when each y is a sample variance of ``n_samples``
    Gaussian draws, propagated through the least-squares slope in log x."""
    lx = np.log(np.asarray(x, float))
    _, var_ly = log_sample_variance_moments(n_samples)
    d = lx - lx.mean()
    return float(np.sqrt((d**2 * var_ly).sum()) / (d**2).sum())


def variance_interval(s2, n_samples, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """Approximate 95% interval of the true variance behind sample variances ``s2`` of ``n_samples``
    Gaussian draws (log-normal approximation of log s^2, with its bias removed)."""
    bias, var = log_sample_variance_moments(n_samples)
    centre = np.log(np.asarray(s2, float)) - bias
    return np.exp(centre - z * np.sqrt(var)), np.exp(centre + z * np.sqrt(var))


def log_ratio_mean_se(ratio, n_samples) -> tuple[float, float]:
    """Geometric mean of observed/predicted sample variances, corrected for the bias of log s^2, and the
    standard error of its log. 1 means the observed variances agree with the predicted ones."""
    bias, var = log_sample_variance_moments(n_samples)
    lr = np.log(np.asarray(ratio, float)) - bias
    return float(np.exp(lr.mean())), float(np.sqrt(var.sum()) / len(lr))


def monotone(x, y) -> tuple[bool, float]:
    """(y non-decreasing in x, Spearman correlation of x and y)."""
    order = np.argsort(x)
    ys = np.asarray(y, float)[order]
    rho = pd.Series(np.asarray(x, float)).corr(pd.Series(np.asarray(y, float)), method="spearman")
    return bool(np.all(np.diff(ys) >= 0)), float(rho)


def clean_run_integrals(runs, select) -> dict | None:
    """K0 and the integrals of mu_Z and kappa_Z from the first completed run matching ``select(run)``."""
    for r in runs:
        if r.ok and select(r) and "int_mu_Z" in r.summary:
            return {"K0": r.summary["K0"], "int_mu": r.summary["int_mu_Z"], "int_kappa": r.summary["int_kappa_Z"],
                    "run": r.path.name}
    return None


def eq434(k0: float, int_mu: float, int_kappa: float, a: float, b: float) -> float:
    """K(0) [e^{int mu}]^a [e^{int kappa}]^b (thesis eq. 4.34 with a = sqrt(rho), b = rho)."""
    return k0 * math.exp(a * int_mu + b * int_kappa)


def with_tracker(cfg, mode: str, **train_overrides):
    """A copy of ``cfg`` with another tracker mode (and train keys), e.g. the clean run of a sweep."""
    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    new.tracker.mode = mode
    for k, v in train_overrides.items():
        new.train[k] = v
    return new


THESIS_LR = 1e-3  # the thesis' SGD learning rate for the ConvNet figures (4.2-4.5, 4.8)


def sampling_note(cfg) -> list[str]:
    """How the mini-batches were drawn (``data.sampling``) and why it matters for spreads across seeds."""
    if cfg.data.sampling == "iid":
        return ["Mini-batches: iid (data.sampling=iid), each step's batch drawn with replacement independently "
                "of the others, as the SDE assumes. With shuffled epochs (data.sampling=shuffle, the usual "
                "loader) each epoch's batches together cover the training set, so the first-order sampling "
                "noise cancels at every epoch's end and the spread of K across seeds shrinks there; in runs "
                "of one or two epochs that hides most of the predicted spread."]
    return ["Mini-batches: shuffled epochs (data.sampling=shuffle, the usual loader). The SDE assumes iid "
            "batches (data.sampling=iid); with shuffling the spread of K across seeds shrinks near each "
            "epoch's end."]


def scale_note(cfg, batch: bool = True) -> list[str]:
    """A note on how a non-paper profile scales a ConvNet figure down (nothing for ``paper``).

    ``batch=False`` leaves the batch size out (figures that sweep it).
    """
    if cfg.profile.name == "paper":
        return []
    lr = float(cfg.optim.lr)
    why = "as in the thesis" if math.isclose(lr, THESIS_LR) else (
        f"{lr / THESIS_LR:g}x the thesis' {THESIS_LR:g}, so that K moves visibly within the short run")
    size = f"batch {cfg.data.batch_size}, " if batch else ""
    return [f"Profile {cfg.profile.name}: {cfg.train.steps} steps, {size}{cfg.data.train_subset} training images, "
            f"lr {lr:g} ({why})."]
