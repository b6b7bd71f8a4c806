"""Fig. 4.6: final K against the gradient scale rho for three injected noise types, with eq. 4.34 and the
full tracker's own prediction in every run (noisy runs included)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from . import ch4, plots
from .common import train_job, write_outputs

TARGETS = ("gradient", "loss")


def _is_clean(rho, noise) -> bool:
    return float(rho) == 1.0 and noise == "none"


def noise_target(cfg) -> str:
    target = OmegaConf.select(cfg, "noise.target", default="gradient")
    if target not in TARGETS:
        raise ValueError(f"noise.target={target!r} is not valid; choose one of {list(TARGETS)}")
    return target


def run(cfg, run_dir):
    """Every run tracks the full terms (the config sets tracker=full). ``noise.target=loss`` reads
    eq. 4.31 literally: the noise is added to the scalar loss, whose gradient it does not reach, so the
    update is sqrt(rho) * gradient alone (the run is the noise=none run of the same rho)."""
    if noise_target(cfg) == "loss" and cfg.train.grad_noise != "none":
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        cfg.train.grad_noise = "none"
    return train_job(cfg, run_dir)


def aggregate(cfg, fig_dir, runs) -> None:
    table = pd.DataFrame([ch4.run_row(r, {"rho": "train.grad_rho", "noise": "train.grad_noise",
                                          "noise_target": "noise.target"}) for r in runs])
    clean = ch4.clean_run_integrals(runs, lambda r: _is_clean(r.get("train.grad_rho"), r.get("train.grad_noise")))
    fig, (ax,) = plots.grid(1, size=(6.5, 4.5))
    findings = []
    ok = table[table["status"] == "completed"].sort_values("rho")
    names = {"none": "none (also the 'loss' reading of any noise: noise on the scalar loss has no gradient)"}
    for noise, g in ok.groupby("noise"):
        line = ax.plot(g["rho"], g["final_K_emp"], "o-", label=f"observed, noise {names.get(noise, noise)}")[0]
        if "final_EK_pred" in g:
            ax.plot(g["rho"], g["final_EK_pred"], "x", color=line.get_color(), ms=7,
                    label=f"full tracker E[K(T)], noise {noise}")
        mono, rho_s = ch4.monotone(g["rho"], g["final_K_emp"])
        reading = " (the 'gradient' reading: noise added to the gradient)" if noise != "none" else (
            " (the 'loss' reading, noise.target=loss, for every noise type)")
        findings.append(f"noise {noise}{reading}: final K {g['final_K_emp'].iloc[0]:.4g} at rho={g['rho'].iloc[0]:g} -> "
                        f"{g['final_K_emp'].iloc[-1]:.4g} at rho={g['rho'].iloc[-1]:g}; non-decreasing in rho: "
                        f"{mono}; Spearman(rho, K) = {rho_s:.3f}")
    if clean:
        grid = np.linspace(0, 1, 101)
        pred = [ch4.eq434(clean["K0"], clean["int_mu"], clean["int_kappa"], math.sqrt(r), r) for r in grid]
        ax.plot(grid, pred, "k--", label="eq. 4.34 from the clean run")
        table["predicted_EK"] = [ch4.eq434(clean["K0"], clean["int_mu"], clean["int_kappa"], math.sqrt(r), r)
                                 for r in table["rho"].astype(float)]
        findings.append(f"clean run: K(0) = {clean['K0']:.4g}, int mu_Z dt = {clean['int_mu']:.4g}, "
                        f"int kappa_Z dt = {clean['int_kappa']:.4g}")
        okp = table[table["status"] == "completed"]
        err = (okp["predicted_EK"] - okp["final_K_emp"]).abs() / okp["final_K_emp"]
        table.loc[okp.index, "eq434_rel_err"] = err
        findings.append(f"eq. 4.34 vs observed final K: median relative error {err.median():.3g}, worst {err.max():.3g}")
        for noise in ("gaussian", "uniform", "none"):
            e = err[okp["noise"] == noise]
            if len(e):
                findings.append(f"  eq. 4.34, noise {noise}: median {e.median():.3g}, worst {e.max():.3g}")
    findings += _full_tracker_findings(table, runs, clean)
    ax.set_xlabel("rho (gradient scale sqrt(rho), noise scale sqrt(1 - rho))")
    ax.set_ylabel("final K")
    ax.set_yscale("log")
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below: the curves fill the axes
    fig.set_size_inches(6.5, 5.8)
    fig.tight_layout()
    write_outputs(cfg, fig_dir, fig, table, runs, findings or ["no completed run"],
                  notes=["The thesis does not state the training length; the paper profile uses 10 epochs "
                         "(4,690 steps at batch 128).",
                         "Noise is added to the batch gradient of every parameter each step; N(0,1) has variance 1 and "
                         "U[-0.5,0.5] variance 1/12 per coordinate (the tracker adds their exact terms).",
                         "Two readings of eq. 4.31 (noise.target): 'gradient' adds the noise to the gradient "
                         "(the runs with noise gaussian/uniform); 'loss' adds it to the scalar loss, where it is a "
                         "constant in theta and never reaches the update, so every noise type gives the noise=none run "
                         "of the same rho. The thesis' monotone curve is the 'loss' reading.",
                         "Every run tracks mu, kappa, lambda2 (and mu2, the cross-layer lambda2) per step: the "
                         "x markers are each run's own E[K(T)] (in-sample, from its applied updates)."])


def _full_tracker_findings(table: pd.DataFrame, runs, clean) -> list[str]:
    """What each run's own terms say: in-sample error, the injected noise's kappa against the clean run's,
    and the predicted spread of K that eq. 4.34 neglects."""
    ok = table[table["status"] == "completed"]
    if "max_rel_err" not in ok or ok["max_rel_err"].isna().all():
        return []
    out = [f"full tracker, in-sample max_t |K_pred - K_emp| / K_emp: median {ok['max_rel_err'].median():.3g}, worst "
           f"{ok['max_rel_err'].max():.3g} over {int(ok['max_rel_err'].notna().sum())} runs"
           + (f"; second order: median {ok['max_rel_err_2nd'].median():.3g}, worst {ok['max_rel_err_2nd'].max():.3g}"
              if "max_rel_err_2nd" in ok else "")]
    if "max_rel_err_2nd" in ok and ok["max_rel_err_2nd"].notna().any():
        w = ok.loc[ok["max_rel_err_2nd"].idxmax()]
        if w["max_rel_err_2nd"] > w["max_rel_err"]:
            second = float(np.log(w["final_K_emp"] / w["K0"])) - w["int_mu_Z"]
            out.append(
                f"the second-order path is worse than the thesis' at rho = {float(w['rho']):g}, noise {w['noise']} "
                f"({w['max_rel_err_2nd']:.3g} against {w['max_rel_err']:.3g}): the measured change of Z beyond "
                f"int mu_Z is {second:.3f}, the realised int mu2_Z {w['int_mu2_Z']:.3f}, int (kappa_Z - lambda2_Z/2) "
                f"{w['int_kappa_Z'] - 0.5 * w['int_lambda2_Z']:.3f}, so the per-step expansion's third-order "
                "remainder is not negligible here (a likely reason, not measured: steps of injected noise this large "
                "are not small against the gap s1 - s2 that bounds the Taylor series of log s1); the "
                "expectation-based kappa lands closer")
    zero = ok[(ok["rho"].astype(float) == 0.0) & (ok["noise"] != "none")]
    for _, r in zero.iterrows():
        out.append(f"rho = 0, noise {r['noise']}: K {r['K0']:.4g} -> {r['final_K_emp']:.4g}, the run's own K_pred "
                   f"{r['final_K_pred']:.4g} (max rel. error {r['max_rel_err']:.3g}), eq. 4.34 "
                   f"{r.get('predicted_EK', float('nan')):.4g}")
    if clean is not None:
        base = next((r for r in runs if r.ok and _is_clean(r.get("train.grad_rho"), r.get("train.grad_noise"))), None)
        kap0 = float(base.metrics["kappa_Z"].dropna().mean()) if base is not None else float("nan")
        for r in runs:
            if not (r.ok and r.get("train.grad_noise") != "none" and "kappa_Z" in r.metrics):
                continue
            rho = float(r.get("train.grad_rho"))
            if rho not in (0.0, 0.5):
                continue
            m = r.metrics
            rel_sd = math.sqrt(max(r.summary.get("final_VarK_pred", float("nan")), 0.0)) / r.summary["final_EK_pred"]
            rel_sd2 = (math.sqrt(max(r.summary["final_VarK_pred_2nd"], 0.0)) / r.summary["final_EK_pred_2nd"]
                       if "final_VarK_pred_2nd" in r.summary else float("nan"))
            out.append(f"rho = {rho:g}, noise {r.get('train.grad_noise')}: mean kappa_Z {float(m['kappa_Z'].mean()):.3g} = "
                       f"{float(m['kappa_Z'].mean()) / kap0:.3g} x the clean run's; predicted std(K(T)) / E[K(T)] = "
                       f"{rel_sd:.3g} (second order {rel_sd2:.3g}), so the variance eq. 4.34 neglects is "
                       + ("not negligible" if rel_sd > 0.05 else "small") + " here")
    return out
