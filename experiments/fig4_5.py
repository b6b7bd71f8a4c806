"""Fig. 4.5: observed and predicted Var[K(t)] against the batch size M, and the fitted exponent p."""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import ch4, plots
from .common import train_job, write_outputs

run = train_job


def aggregate(cfg, fig_dir, runs) -> None:
    table = pd.DataFrame([ch4.run_row(r, {"batch_size": "data.batch_size", "sampling_seed": "seed.sampling"})
                          for r in runs])
    ok = table[table["status"] == "completed"]
    per_m = ok.groupby("batch_size").agg(
        n_seeds=("final_K_emp", "size"), mean_K=("final_K_emp", "mean"), var_K_observed=("final_K_emp", "var"),
        var_K_predicted=("final_VarK_pred", "mean"),
    ).reset_index()
    fig, (ax_var, ax_t) = plots.grid(2, ncols=2, size=(5, 3.8))
    findings = []
    usable = per_m[(per_m["n_seeds"] > 1) & (per_m["var_K_observed"] > 0)]
    ax_var.loglog(per_m["batch_size"], per_m["var_K_predicted"], "o-", label="predicted Var[K(T)]")
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
                         "here aggregates over seeds at the last step.", *ch4.sampling_note(cfg),
                         *ch4.scale_note(cfg, batch=False)])
