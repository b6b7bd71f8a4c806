"""Fig. 6.8: SRS of torchvision ImageNet models (original V1 weights) against the mCE values published by
Hendrycks & Dietterich (2019), read from the cited file ``experiments/data/mce_hendrycks2019.csv``.

The mCE part needs downloads (weights) and ImageNet validation images, so it runs in the paper profile only;
other profiles report it as skipped and still give the SRS of the zoo's pretrained models (EfficientNet-Lite).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from lipexp import results

from . import ch6, plots
from .common import write_outputs

ROOT = Path(__file__).resolve().parent.parent
TABLE = "srs_mce.csv"


def read_mce(path: str | Path) -> pd.DataFrame:
    p = Path(path)
    p = p if p.is_absolute() else ROOT / p
    return pd.read_csv(p, comment="#")


def run(cfg, run_dir):
    mce = read_mce(cfg.figure.mce_file)
    rows, notes, sources = [], [], set()
    skipped = None
    if cfg.figure.use_mce[cfg.profile.name]:
        entries = [ch6.Entry(t, "imagenet", {"kind": "torchvision", "name": t, "weights": "IMAGENET1K_V1"})
                   for t in mce["torchvision"]]
        rr, nn_, src = ch6.zoo_sid_rows(cfg, entries)
        notes += nn_
        sources |= src
        for row in rr:
            m = mce[mce["torchvision"] == row["model"]].iloc[0]
            rows.append({**row, "network": m["network"], "mce": m["mce"], "relative_mce": m["relative_mce"],
                         "published_clean_error": m["clean_error"], "source": "mCE model"})
        if len(rr) < 3:
            skipped = (f"only {len(rr)} of {len(entries)} mCE models could be evaluated (at least 3 are needed; the "
                       f"reasons are in the notes)")
    else:
        skipped = (f"the mCE comparison is skipped in the {cfg.profile.name} profile: it needs torchvision's pretrained "
                   "ImageNet weights (a download) and ImageNet validation images; run profile=paper with internet "
                   "access (and figure.imagenet_val= or LIPEXP_IMAGENET_VAL for the validation folder)")
    zoo_rows, nn_, src = ch6.zoo_sid_rows(cfg, ch6.zoo_entries(cfg, keys=list(cfg.figure.zoo_models[cfg.profile.name])))
    notes += nn_
    sources |= src
    rows += [{**row, "source": "zoo (no published mCE)"} for row in zoo_rows]
    results.update_status(run_dir, data_source=", ".join(sorted(sources)) or "none")
    ch6.save_table(run_dir, TABLE, pd.DataFrame(rows))
    return {"mce_skipped": skipped, "notes": notes, "mce_models": len(mce)}


def aggregate(cfg, fig_dir, runs) -> None:
    r = ch6.first_ok(runs)
    df = ch6.load_table(r, TABLE) if r else pd.DataFrame()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    findings = []
    skipped = r.summary.get("mce_skipped") if r else None
    withm = df[df["mce"].notna()] if "mce" in df else pd.DataFrame()
    if len(withm):
        plots.labelled_scatter(axes[0], withm["srs"], withm["mce"], withm["network"])
        c = ch6.correlation(withm["srs"], withm["mce"])
        findings.append(f"SRS vs published mCE over {c['n']} torchvision models: Pearson r = {c['pearson']:.3f} "
                        f"(p = {c['pearson_p']:.2g}), Spearman rho = {c['spearman']:.3f} (p = {c['spearman_p']:.2g}); "
                        f"the thesis claims a negative relation (higher SRS, lower mCE)")
        axes[0].set_xlabel("SRS", fontsize=8)
        axes[0].set_ylabel("mCE (%), Hendrycks & Dietterich 2019", fontsize=8)
    if skipped:
        findings.append(f"mCE correlation skipped: {skipped}")
        axes[0].text(0.5, 0.5, "mCE comparison skipped:\n" + "\n".join(
            skipped[i:i + 60] for i in range(0, min(len(skipped), 300), 60)), ha="center", va="center", fontsize=7,
            transform=axes[0].transAxes)
        axes[0].set_xticks([])
        axes[0].set_yticks([])
    axes[0].set_title("(a) SRS vs published mCE", fontsize=9)
    if len(df):
        fams = ["imagenet"] * len(df)
        plots.zoo_bars(axes[1], df["model"], df["srs"], fams, "SRS")
        axes[1].set_title("(b) SRS of every evaluated ImageNet model", fontsize=9)
        for _, row in df.iterrows():
            findings.append(f"{row['model']} ({row['source']}, n = {int(row['n'])} images, top-1 {row['test_acc']:.3f}): "
                            f"SRS {row['srs']:.3f}" + (f", published mCE {row['mce']:.1f}" if pd.notna(row.get('mce')) else ""))
    fig.tight_layout()
    notes = ["mCE values: Table 1 of Hendrycks & Dietterich, ICLR 2019 (arXiv:1903.12261), transcribed in "
             "experiments/data/mce_hendrycks2019.csv; torchvision IMAGENET1K_V1 weights stand for the evaluated "
             "networks. SRS: zero absences, l_inf bands, M and samples of conf/figure/fig6_zoo.yaml (figure.sid).",
             "The quick profile evaluates EfficientNet-Lite below its training resolution (zoo image_size) on a few "
             "images of the mirror's 1,000-image ImageNet sample: its SRS values are rough."]
    if r is not None:
        notes += r.summary.get("notes", [])
    write_outputs(cfg, fig_dir, fig, df, runs, findings or ch6.skipped_findings(runs) or ["no run"], notes=notes)
