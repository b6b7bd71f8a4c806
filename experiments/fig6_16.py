"""Fig. 6.16: SID estimation error against the number of samples K.

Per-sample Shapley values of a pool of images are computed once (cached in the zoo); the SID of a K-sample set
is that of the mean of its samples' psi (Shapley values are linear in v, and v is a sample mean). For each K,
random pairs of disjoint K-sample sets give independent estimates Psi^(i), Psi^(i+1); the error is
(1/M) |Psi^(i+1) - Psi^(i)|_1, averaged over the pairs, and a log-log fit gives its rate in K."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lipexp import results

from . import ch6
from .common import write_outputs

TABLE = "convergence.csv"


def run(cfg, run_dir):
    ss = ch6.sid_settings(cfg)
    rows, sources = [], set()
    rng = np.random.default_rng(0)
    for e in ch6.zoo_entries(cfg, keys=list(cfg.scale.models)):
        psi = ch6.zoo_psi(cfg, e, n=int(cfg.scale.pool))
        sources.add(ch6.dataset_source(cfg, e.family))
        m, pool = psi.shape[1], psi.shape[0]
        for k in cfg.scale.ks:
            k = int(k)
            if 2 * k > pool:
                continue
            errs = []
            for _ in range(int(cfg.figure.repeats)):
                perm = rng.permutation(pool)
                try:
                    a, b = (ch6.sid_stats(psi[perm[s:s + k]])["sid"] for s in (0, k))
                except ValueError:  # a set whose psi are all equal has no SID
                    continue
                errs.append(np.abs(a - b).sum() / m)
            rows.append({"model": e.key, "family": e.family, "K": k, "error_mean": float(np.mean(errs)),
                         "error_std": float(np.std(errs)), "pairs": len(errs), "pool": pool, "M": m})
    results.update_status(run_dir, data_source=", ".join(sorted(sources)))
    ch6.save_table(run_dir, TABLE, pd.DataFrame(rows))
    return {"M": int(ss.num_bands)}


def aggregate(cfg, fig_dir, runs) -> None:
    r = ch6.first_ok(runs)
    df = ch6.load_table(r, TABLE) if r else pd.DataFrame()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    findings = []
    for mname, d in df.groupby("model", sort=False) if len(df) else []:
        ax.errorbar(d["K"], d["error_mean"], yerr=d["error_std"], fmt="-o", ms=3, capsize=2, label=mname)
        slope = float(np.polyfit(np.log(d["K"]), np.log(d["error_mean"]), 1)[0]) if len(d) > 1 else float("nan")
        findings.append(f"{mname} (pool of {int(d['pool'].iloc[0])} samples, M = {int(d['M'].iloc[0])}): error "
                        + ", ".join(f"K={int(k)}: {e:.4f}" for k, e in zip(d["K"], d["error_mean"]))
                        + f"; log-log slope {slope:.2f} (1/sqrt(K) gives -0.5)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("samples K", fontsize=8)
    ax.set_ylabel("(1/M) |Psi^(i+1) - Psi^(i)|_1", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_outputs(cfg, fig_dir, fig, df, runs, findings or ch6.skipped_findings(runs) or ["no run"],
                  notes=[ch6.JPEG_NOTE, "Errors between two independent estimates from disjoint sample sets of one "
                         "pool (so K is at most half the pool); error bars: std over the random pairs. Zero "
                         "absences, l_inf bands. The thesis uses resnet18 on CIFAR-10, CIFAR-100 and ImageNet; the "
                         "quick profile uses the zoo's ConvNet on CIFAR-10 to afford a pool of 128 samples."])
