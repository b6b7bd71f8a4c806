"""Generic training run (``figure=train``): K_emp(t) against the predicted K(t) for any model and data."""
from __future__ import annotations

import pandas as pd

from . import plots
from .common import train_job, write_outputs

run = train_job


def aggregate(cfg, fig_dir, runs) -> None:
    fig, axes = plots.grid(len(runs), ncols=3)
    rows = []
    for ax, r in zip(axes, runs):
        if r.ok and "K_emp" in r.metrics:
            plots.k_curves(ax, r.metrics, "")
        ax.set_title(r.path.name[:50], fontsize=7)
        ax.set_xlabel("step")
        ax.set_ylabel("K")
        ax.legend(fontsize=6)
        rows.append({"run": r.path.name, "status": r.status.get("status"), **r.summary})
    table = pd.DataFrame(rows)
    findings = []
    for _, row in table.iterrows():
        if "max_rel_err" in row and pd.notna(row.get("max_rel_err")):
            findings.append(f"`{row['run']}`: max_t |K_pred - K_emp| / K_emp = {row['max_rel_err']:.3g} "
                            f"over {int(row['steps'])} steps; final K_emp = {row['final_K_emp']:.4g}")
        elif "final_K_emp" in row and pd.notna(row.get("final_K_emp")):
            findings.append(f"`{row['run']}`: final K_emp = {row['final_K_emp']:.4g} after {int(row['steps'])} steps")
    write_outputs(cfg, fig_dir, fig, table, runs, findings or ["no completed run"])
