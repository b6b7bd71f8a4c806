"""Fig. 6.7: SIDs of the trained zoo and of Kaiming-initialised copies of the same architectures.

Uniformity is measured by the total-variation distance of the SID to the uniform SID (0 = uniform,
1 - 1/M at most) with a bootstrap interval over the samples, and by the normalised entropy (1 = uniform).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lipexp import results

from . import ch6, plots
from .common import write_outputs

TABLE = "sids.csv"


def run(cfg, run_dir):
    entries = ch6.zoo_entries(cfg)
    trained, notes, sources = ch6.zoo_sid_rows(cfg, entries, ci=True)
    rand_keys = set(cfg.figure.random_imagenet[cfg.profile.name] or [])
    rand_entries = [e for e in entries if e.family == "cifar" or e.key in rand_keys]
    rand, notes2, _ = ch6.zoo_sid_rows(cfg, rand_entries, random_init=True, ci=True)
    results.update_status(run_dir, data_source=", ".join(sorted(sources)))
    ch6.save_table(run_dir, TABLE, pd.DataFrame(trained + rand))
    return {"notes": notes + notes2}


def aggregate(cfg, fig_dir, runs) -> None:
    r = ch6.first_ok(runs)
    table = ch6.load_table(r, TABLE) if r else pd.DataFrame()
    findings = []
    if len(table):
        models = list(dict.fromkeys(table["model"]))
        fig, axes = plt.subplots(2, len(models), figsize=(1.9 * len(models), 4.2), squeeze=False)
        top = float(ch6.sid_matrix(table).max()) * 1.05
        for j, mname in enumerate(models):
            for i, init in enumerate(("trained", "kaiming")):
                ax = axes[i, j]
                d = table[(table["model"] == mname) & (table["init"] == init)]
                if not len(d):
                    ax.set_visible(False)
                    continue
                row = d.iloc[0]
                plots.sid_bars(ax, ch6.sid_matrix(d)[0], f"{mname} ({init})\nTV {row['tv_uniform']:.2f}, "
                               f"SRS {row['srs']:.2f}", color="tab:blue" if init == "trained" else "tab:gray",
                               ylim=(0, top))
        fig.tight_layout()
        t, k = table[table["init"] == "trained"], table[table["init"] == "kaiming"]
        findings.append(f"distance of the SID to uniform (total variation, 0 = uniform): trained models median "
                        f"{t['tv_uniform'].median():.3f} (range {t['tv_uniform'].min():.3f}..{t['tv_uniform'].max():.3f}, "
                        f"{len(t)} models); Kaiming-initialised median {k['tv_uniform'].median():.3f} "
                        f"(range {k['tv_uniform'].min():.3f}..{k['tv_uniform'].max():.3f}, {len(k)} models)")
        pairs = t.merge(k, on="model", suffixes=("_t", "_k"))
        closer = int((pairs["tv_uniform_k"] < pairs["tv_uniform_t"]).sum())
        findings.append(f"{closer} of {len(pairs)} architectures are closer to uniform at random init than trained; "
                        f"normalised entropy trained median {t['entropy'].median():.3f}, random "
                        f"{k['entropy'].median():.3f} (1 = uniform)")
        findings.append(f"share of importance in the lower half of the bands: trained median {t['low_half'].median():.3f}, "
                        f"random median {k['low_half'].median():.3f} (0.5 = no preference)")
        for _, row in table.iterrows():
            findings.append(f"{row['model']} ({row['init']}, n = {int(row['n'])}): TV to uniform "
                            f"{row['tv_uniform']:.3f} [95% bootstrap {row['tv_uniform_lo']:.3f}, {row['tv_uniform_hi']:.3f}], "
                            f"SRS {row['srs']:.3f}, SID " + " ".join(f"{v:.2f}" for v in ch6.sid_matrix(table.loc[[_]])[0]))
    else:
        fig = plt.figure()
    notes = [ch6.JPEG_NOTE, "Zero absences, l_inf bands, M and the sample counts of conf/figure/fig6_zoo.yaml (figure.sid); "
             "the same samples for every coalition. Random init: lipexp.zoo.kaiming_init_ (seed 0) on the same "
             "architecture. The SID's min-max normalisation sets its smallest band to 0, so even a model without any "
             "spectral preference has TV > 0 at finite n: the bootstrap interval shows the sampling spread."]
    if r is not None:
        notes += r.summary.get("notes", [])
    write_outputs(cfg, fig_dir, fig, table, runs, findings or ch6.skipped_findings(runs) or ["no run"], notes=notes)
