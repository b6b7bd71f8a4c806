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


def validation_panels(runs, title_keys: dict[str, str], inset_steps: int = 50, others: list | None = None):
    """One panel per run: K_emp and K_pred +- std(K) over t, with an inset of the first ``inset_steps`` steps.

    ``others[i]`` (optional): runs whose K_emp is drawn thin in panel i (other sampling seeds, held out).
    """
    fig, axes = plots.grid(len(runs), ncols=4)
    for i, (ax, r) in enumerate(zip(axes, runs)):
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
        labels = ["K_emp", "K_pred", "K_pred ± std"]
        for o in (others[i] if others else []):
            if o.ok and "K_emp" in o.metrics:
                od = o.metrics.dropna(subset=["K_emp"])
                ax.plot(od["t"], od["K_emp"], lw=0.6, color="0.4")
                labels.append(f"K_emp, held-out seed {o.get('seed.sampling')}")
        ax.legend(labels, fontsize=6, loc="upper left")
        sub = plots.inset(ax)
        head = df[df["step"] < inset_steps]
        sub.plot(head["step"], head["K_emp"], lw=1)
        sub.plot(head["step"], head["K_pred"], lw=1, ls="--")
        sub.set_title(f"first {inset_steps} steps", fontsize=6)
    fig.tight_layout()
    return fig


# Under the SDE, a held-out run's K(T) and the source run's prediction differ by two independent draws
# (the source's realised mu carries its own sampling noise): z has std sqrt(2), and the +-1.96 std band
# covers P(|N(0, 2)| < 1.96) of the held-out values.
PAIR_Z_STD = math.sqrt(2.0)
PAIR_COVERAGE = math.erf(1.96 / 2.0)


def out_of_sample(frames: dict, sde: str = "thesis") -> dict | None:
    """Predict other sampling seeds' K(t) from one seed's SDE terms (same init, same config).

    ``frames``: {seed: metrics indexed by step with K_emp, EK_pred, VarK_pred (``_2nd`` for
    ``sde='second_order'``)}. For every ordered pair (source s, held-out j != s): the z-score of j's
    K(T) against s's predicted mean and std, and the fraction of steps at which K_j(t) lies in s's
    predicted band EK +- 1.96 std. None with fewer than two seeds.
    """
    suffix = "_2nd" if sde == "second_order" else ""
    ek_col, var_col = f"EK_pred{suffix}", f"VarK_pred{suffix}"
    seeds = [s for s, f in frames.items() if ek_col in f and var_col in f]
    if len(seeds) < 2:
        return None
    idx = frames[seeds[0]].index
    for s in seeds[1:]:
        idx = idx.intersection(frames[s].index)
    k = pd.DataFrame({s: frames[s]["K_emp"].reindex(idx) for s in seeds}).dropna()
    z_end, cover, pairs = [], [], []
    for s in seeds:
        ek = frames[s][ek_col].reindex(k.index)
        sd = np.sqrt(frames[s][var_col].reindex(k.index).clip(lower=0))
        live = sd > 0  # Var[K(0)] = 0: nothing to cover at the first step
        for j in seeds:
            if j == s:
                continue
            z = float((k[j].iloc[-1] - ek.iloc[-1]) / sd.iloc[-1])
            inside = ((k[j] - ek).abs() <= 1.96 * sd)[live]
            z_end.append(z)
            cover.append(float(inside.mean()))
            pairs.append((s, j, z, float(inside.mean())))
    z_end = np.asarray(z_end)
    return {"n_seeds": len(seeds), "n_pairs": len(pairs), "z_mean": float(z_end.mean()),
            "z_rms": float(np.sqrt((z_end**2).mean())), "z_max_abs": float(np.abs(z_end).max()),
            "coverage": float(np.mean(cover)), "pairs": pairs}


def out_of_sample_findings(res: dict, label: str) -> list[str]:
    """Lines for the summary from ``out_of_sample`` (thesis and second-order SDE)."""
    out = []
    for sde, r in res.items():
        if r is None:
            continue
        out.append(
            f"{label}out-of-sample ({'thesis SDE' if sde == 'thesis' else 'second order, full lambda2'}): each of "
            f"{r['n_seeds']} sampling seeds' terms predict the others' K(t) ({r['n_pairs']} pairs of {r['n_seeds']} "
            f"runs, so not independent): z of the held-out "
            f"K(T) mean {r['z_mean']:+.2f}, root mean square {r['z_rms']:.2f} (largest |z| {r['z_max_abs']:.2f}); "
            f"the predicted 95% band covers {r['coverage'] * 100:.0f}% of the held-out K(t) over time. If the SDE "
            f"is right: root mean square {PAIR_Z_STD:.2f} and coverage {PAIR_COVERAGE * 100:.0f}% (the source "
            "run's realised drift carries its own sampling noise, so two draws differ)")
    return out


def forward_prediction(df: pd.DataFrame, lr: float, frac: float = 0.2) -> dict | None:
    """From the first ``frac`` of a run: observe K up to that step, average mu_Z + kappa_Z (thesis) and
    mu_Z + mu2_Z + lambda2_Z_full/2 (second order) over those steps, and extrapolate E[K] to the end.
    Also the naive forecast "K stays where it is" for scale."""
    d = df.dropna(subset=["K_emp"]).set_index("step")
    terms = df.dropna(subset=["mu_Z"]).set_index("step")
    if len(terms) < 5:
        return None
    end = int(d.index.max())
    cut = int(round(frac * end))
    head = terms[terms.index < cut]
    if cut not in d.index or not len(head):
        return None
    k_cut, k_end = float(d.loc[cut, "K_emp"]), float(d.loc[end, "K_emp"])
    span = (end - cut) * lr
    out = {"fwd_from_step": cut, "fwd_K_end": k_end,
           "fwd_EK_end": k_cut * math.exp(span * float((head["mu_Z"] + head["kappa_Z"]).mean()))}
    out["fwd_rel_err"] = abs(out["fwd_EK_end"] - k_end) / k_end
    if "mu2_Z" in head and "lambda2_Z_full" in head:
        rate = float((head["mu_Z"] + head["mu2_Z"] + 0.5 * head["lambda2_Z_full"]).mean())
        out["fwd_EK_end_2nd"] = k_cut * math.exp(span * rate)
        out["fwd_rel_err_2nd"] = abs(out["fwd_EK_end_2nd"] - k_end) / k_end
    out["fwd_rel_err_constant"] = abs(k_cut - k_end) / k_end
    return out


def forward_findings(rows: list[tuple[str, dict]]) -> list[str]:
    """A line with the medians, then one line per run from ``forward_prediction``."""
    done = [f for _, f in rows if f]
    out = []
    if done:
        med = lambda k: float(np.median([f[k] for f in done if k in f]))  # noqa: E731
        second = f", second order {med('fwd_rel_err_2nd'):.3g}" if all("fwd_rel_err_2nd" in f for f in done) else ""
        out.append(f"forward prediction over {len(done)} runs (observe the first 20%, extrapolate E[K] with the terms "
                   f"averaged over it): median relative error at the end {med('fwd_rel_err'):.3g} (thesis){second}, "
                   f"against {med('fwd_rel_err_constant'):.3g} for 'K stays where it is at 20%'")
    for label, f in rows:
        if not f:
            continue
        second = (f", second order {f['fwd_rel_err_2nd']:.3g}" if "fwd_rel_err_2nd" in f else "")
        out.append(f"{label}: forward from step {f['fwd_from_step']} (terms averaged over the first 20%): "
                   f"E[K(T)] relative error {f['fwd_rel_err']:.3g} (thesis){second}; 'K stays constant' "
                   f"{f['fwd_rel_err_constant']:.3g}")
    return out


IN_SAMPLE_NOTE = ("What the small max_rel_err shows: K_pred integrates mu measured from the applied update along "
                  "the very trajectory it predicts, so it mostly tests a first-order Taylor expansion of log s1 per "
                  "step (plus kappa - lambda2/2), not that the SDE predicts a run it has not seen. The out-of-sample "
                  "lines (other sampling seeds from one seed's terms) and the forward prediction (from the first "
                  "20% of the run) are the tests that can fail.")


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
        paper = (" The thesis used the usual shuffled loader; the paper profile uses iid batches instead, because "
                 "its 39,000 steps at batch 256 end exactly on an epoch boundary (200 epochs of 195 batches), "
                 "where shuffling collapses the spread." if cfg.profile.name == "paper" else "")
        return ["Mini-batches: iid (data.sampling=iid), each step's batch drawn with replacement independently "
                "of the others, as the SDE assumes. With shuffled epochs (data.sampling=shuffle, the usual "
                "loader) each epoch's batches together cover the training set, so the first-order sampling "
                "noise cancels at every epoch's end and the spread of K across seeds shrinks there; in runs "
                "of one or two epochs that hides most of the predicted spread." + paper]
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
