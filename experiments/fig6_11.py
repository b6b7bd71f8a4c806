"""Fig. 6.11: (a) parameter count against SRS over the zoo; (b) t-SNE of the zoo's SIDs (sklearn), transformers
marked. The t-SNE picture is backed by numbers: mean L1 distance between SIDs within the transformers, within
the ConvNets and across, and the SRS of each group."""
from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lipexp import results

from . import ch6
from .common import write_outputs

TABLE = "sids.csv"


def run(cfg, run_dir):
    rows, notes, sources = ch6.zoo_sid_rows(cfg, ch6.zoo_entries(cfg))
    df = pd.DataFrame(rows)
    if len(df) >= 3:
        from sklearn.manifold import TSNE

        tsne = TSNE(n_components=2, perplexity=min(5.0, len(df) - 1.0), init="random",
                    random_state=int(cfg.figure.tsne_seed))
        xy = tsne.fit_transform(ch6.sid_matrix(df))
        df["tsne_x"], df["tsne_y"] = xy[:, 0], xy[:, 1]
    results.update_status(run_dir, data_source=", ".join(sorted(sources)))
    ch6.save_table(run_dir, TABLE, df)
    return {"notes": notes}


def _mean_l1(a: np.ndarray, b: np.ndarray | None = None) -> float:
    pairs = itertools.combinations(range(len(a)), 2) if b is None else itertools.product(range(len(a)), range(len(b)))
    b = a if b is None else b
    d = [np.abs(a[i] - b[j]).sum() for i, j in pairs]
    return float(np.mean(d)) if d else float("nan")


def aggregate(cfg, fig_dir, runs) -> None:
    r = ch6.first_ok(runs)
    df = ch6.load_table(r, TABLE) if r else pd.DataFrame()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    findings = []
    if len(df):
        for fam, marker in (("cifar", "o"), ("imagenet", "s")):
            d = df[df["family"] == fam]
            if not len(d):
                continue
            axes[0].scatter(d["params"], d["srs"], marker=marker, c=np.where(d["transformer"], "tab:red", "tab:blue"),
                            s=40, edgecolors="k", linewidths=0.5, label=f"{fam} (red: transformer)")
            for _, row in d.iterrows():
                axes[0].annotate(row["model"], (row["params"], row["srs"]), fontsize=6, xytext=(3, 3),
                                 textcoords="offset points")
            c = ch6.correlation(np.log10(d["params"].astype(float)), d["srs"])
            findings.append(f"{fam} ({c['n']} models): Spearman rho(parameter count, SRS) = {c['spearman']:.3f} "
                            f"(p = {c['spearman_p']:.2g}), Pearson r(log10 params, SRS) = {c['pearson']:.3f}; "
                            f"params {int(d['params'].min()):,}..{int(d['params'].max()):,}, SRS "
                            f"{d['srs'].min():.3f}..{d['srs'].max():.3f}")
        axes[0].set_xscale("log")
        axes[0].set_xlabel("parameters", fontsize=8)
        axes[0].set_ylabel("SRS", fontsize=8)
        axes[0].legend(fontsize=6)
        axes[0].set_title("(a) parameter count vs SRS", fontsize=9)
        if "tsne_x" in df:
            axes[1].scatter(df["tsne_x"], df["tsne_y"], s=1500 * df["srs"].clip(lower=0.01), alpha=0.5,
                            c=np.where(df["transformer"], "tab:red", "tab:blue"), edgecolors="k", linewidths=0.5)
            for _, row in df.iterrows():
                axes[1].annotate(f"{row['model']} ({row['srs']:.2f})", (row["tsne_x"], row["tsne_y"]), fontsize=6)
        axes[1].set_title("(b) t-SNE of SIDs (red: transformers; circle size ~ SRS)", fontsize=9)
        for fam, d in df.groupby("family"):
            sids, tr = ch6.sid_matrix(d), d["transformer"].to_numpy(bool)
            if tr.sum() >= 1 and (~tr).sum() >= 1:
                findings.append(
                    f"{fam}: mean L1 distance between SIDs: transformers-transformers {_mean_l1(sids[tr]):.3f} "
                    f"({int(tr.sum())} models), ConvNets-ConvNets {_mean_l1(sids[~tr]):.3f} ({int((~tr).sum())}), "
                    f"transformers-ConvNets {_mean_l1(sids[tr], sids[~tr]):.3f}; mean SRS transformers "
                    f"{d['srs'][tr].mean():.3f} vs ConvNets {d['srs'][~tr].mean():.3f}")
    fig.tight_layout()
    notes = [ch6.JPEG_NOTE, "SIDs of the trained zoo (zero absences, l_inf bands; conf/figure/fig6_zoo.yaml). The t-SNE "
             "of a dozen points depends on its seed and perplexity (min(5, n - 1)): the L1 distances are the "
             "quantitative check. CIFAR-10 and ImageNet models see different data, so their SIDs are compared "
             "within a family."]
    if r is not None:
        notes += r.summary.get("notes", [])
    write_outputs(cfg, fig_dir, fig, df, runs, findings or ch6.skipped_findings(runs) or ["no run"], notes=notes)
