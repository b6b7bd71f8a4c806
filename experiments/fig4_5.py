"""Fig. 4.5: observed and predicted Var[K(t)] against the batch size M, and the fitted exponent p."""
from __future__ import annotations

import numpy as np
import pandas as pd

from omegaconf import OmegaConf

from . import ch4, plots
from .common import train_job, write_outputs

SE_TARGET = 0.35  # the observed exponent must be this precise to tell p = -1 from its neighbours


def batch_seed(sampling_seed: int, batch_size: int) -> int:
    """The mini-batch seed of one (sampling seed, M) run. iid batches are a function of (seed, step), so with
    one seed for all M the M=32 batch would be a prefix of the M=64 one; a seed per M makes them independent."""
    return int(sampling_seed) * 100_003 + int(batch_size)


def run(cfg, run_dir):
    """Train with the batch seed of this (sampling seed, M); the summary records it."""
    seed = batch_seed(cfg.seed.sampling, cfg.data.batch_size)
    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    new.seed.sampling = seed
    return train_job(new, run_dir, after=lambda *_: {"batch_seed": seed})


def aggregate(cfg, fig_dir, runs) -> None:
    table = pd.DataFrame([ch4.run_row(r, {"batch_size": "data.batch_size", "sampling_seed": "seed.sampling"})
                          for r in runs])
    ok = table[table["status"] == "completed"]
    aggs = dict(n_seeds=("final_K_emp", "size"), mean_K=("final_K_emp", "mean"), var_K_observed=("final_K_emp", "var"),
                var_K_predicted=("final_VarK_pred", "mean"))
    if "final_VarK_pred_2nd" in ok:
        aggs["var_K_predicted_2nd"] = ("final_VarK_pred_2nd", "mean")
    per_m = ok.groupby("batch_size").agg(**aggs).reset_index()
    fig, (ax_var, ax_t) = plots.grid(2, ncols=2, size=(5, 3.8))
    findings = []
    usable = per_m[(per_m["n_seeds"] > 1) & (per_m["var_K_observed"] > 0)]
    ax_var.loglog(per_m["batch_size"], per_m["var_K_predicted"], "o-", label="predicted Var[K(T)] (thesis)")
    if "var_K_predicted_2nd" in per_m:
        ax_var.loglog(per_m["batch_size"], per_m["var_K_predicted_2nd"], "^:", label="predicted, cross-layer lambda2")
    if len(usable):
        lo, hi = ch4.variance_interval(usable["var_K_observed"], usable["n_seeds"])
        obs = usable["var_K_observed"].to_numpy()
        ax_var.errorbar(usable["batch_size"], obs, yerr=[obs - lo, hi - obs], fmt="s--", capsize=3,
                        label="observed Var[K(T)] across seeds (95% seed-noise range)")
        ax_var.set_xscale("log")
        ax_var.set_yscale("log")
    ax_var.set_xlabel("batch size M")
    ax_var.set_ylabel("Var[K] at the last step")
    ax_var.legend(fontsize=7)
    if len(per_m) >= 2:
        p_pred, r2_pred = ch4.fit_power(per_m["batch_size"], per_m["var_K_predicted"])
        findings.append(f"predicted Var[K(T)] ~ M^p: p = {p_pred:.3f} (R^2 {r2_pred:.3f}) over M = "
                        f"{', '.join(map(str, per_m['batch_size']))}; thesis: p = -1")
        per_m["p_predicted"] = p_pred
    if len(usable) >= 2:
        p_obs, r2_obs = ch4.fit_power(usable["batch_size"], usable["var_K_observed"])
        se = ch4.sample_variance_slope_se(usable["batch_size"], usable["n_seeds"])
        findings.append(f"observed Var[K(T)] across {int(usable['n_seeds'].min())}-{int(usable['n_seeds'].max())} "
                        f"sampling seeds ~ M^p: p = {p_obs:.3f} +- {se:.2f} (standard error of a sample variance "
                        f"of that many seeds; R^2 {r2_obs:.3f})")
        ratio = usable["var_K_observed"] / usable["var_K_predicted"]
        gm, lse = ch4.log_ratio_mean_se(ratio, usable["n_seeds"])
        findings.append(f"observed / predicted Var over the batch sizes: geometric mean {gm:.2f} (1 = the "
                        f"prediction; 95% range from seed noise alone {gm * np.exp(-1.96 * lse):.2f}.."
                        f"{gm * np.exp(1.96 * lse):.2f})")
        if se <= SE_TARGET:
            verdict = (f"consistent with p = -1 (within 2 standard errors)" if abs(p_obs + 1) <= 2 * se else
                       f"not consistent with p = -1 ({abs(p_obs + 1) / se:.1f} standard errors away)")
        else:
            verdict = f"the sweep cannot decide: its standard error exceeds {SE_TARGET}"
        if se <= SE_TARGET and "p_predicted" in per_m:
            d = abs(p_obs - float(per_m["p_predicted"].iloc[0])) / se
            verdict += (f"; and with the tracker's predicted p = {float(per_m['p_predicted'].iloc[0]):.2f} "
                        + ("(within 2 standard errors)" if d <= 2 else f"({d:.1f} standard errors away)"))
        findings.append(f"observed exponent vs the thesis' p = -1: {verdict} (sweep sized for a standard error "
                        f"<= {SE_TARGET}; this one {se:.2f})")
        if "var_K_predicted_2nd" in usable:
            gm2, lse2 = ch4.log_ratio_mean_se(usable["var_K_observed"] / usable["var_K_predicted_2nd"], usable["n_seeds"])
            findings.append(f"observed / predicted Var with the cross-layer lambda2 (sde=second_order): geometric "
                            f"mean {gm2:.2f} (95% range from seed noise {gm2 * np.exp(-1.96 * lse2):.2f}.."
                            f"{gm2 * np.exp(1.96 * lse2):.2f})")
        per_m["p_observed"] = p_obs
        per_m["p_observed_se"] = se
    for _, row in per_m.iterrows():
        findings.append(f"M = {int(row['batch_size'])}: observed Var {row['var_K_observed']:.3g}, predicted "
                        f"{row['var_K_predicted']:.3g} ({int(row['n_seeds'])} seeds)")
    for r in sorted(runs, key=lambda r: r.get("data.batch_size") or 0):
        if r.ok and "VarK_pred" in r.metrics and r.get("seed.sampling") == min(ok["sampling_seed"]):
            d = r.metrics.dropna(subset=["VarK_pred"])
            d = d[d["VarK_pred"] > 0]  # Var[K(0)] = 0 has no logarithm
            ax_t.semilogy(d["t"], d["VarK_pred"], lw=1, label=f"M = {r.get('data.batch_size')}")
    ax_t.set_xlabel("t")
    ax_t.set_ylabel("predicted Var[K(t)]")
    ax_t.legend(fontsize=6)
    fig.tight_layout()
    write_outputs(cfg, fig_dir, fig, per_m, runs, findings or ["no completed run"],
                  notes=["Per-run rows (one per batch size and seed) are in the runs' summary.json; the table "
                         "here aggregates over seeds at the last step.",
                         "Independent batches per M: each (sampling seed, M) run draws its mini-batches from its own "
                         "seed (sampling seed * 100003 + M, recorded as batch_seed in its summary), so runs of "
                         "different M share no batches.", *ch4.sampling_note(cfg),
                         *ch4.scale_note(cfg, batch=False)])
