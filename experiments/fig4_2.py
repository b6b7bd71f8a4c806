"""Fig. 4.2: observed vs predicted K(t) for the ConvNet on CIFAR-10/100 under four regularisers."""
from __future__ import annotations

import pandas as pd

from . import ch4
from .common import train_job, write_outputs

run = train_job
LABELS = {"dataset": "data.name", "regularizer": "train.regularizer"}


def aggregate(cfg, fig_dir, runs) -> None:
    runs = sorted(runs, key=lambda r: (str(r.get("data.name")), str(r.get("train.regularizer"))))
    table = pd.DataFrame([ch4.run_row(r, LABELS) for r in runs])
    fig = ch4.validation_panels(runs, LABELS)
    findings = ch4.rel_err_findings(table, list(LABELS))
    ok = [r for r in runs if r.ok and "K_emp" in r.metrics]
    if ok:
        flips = [r for r in ok if ch4.non_monotone_early(r.metrics)]
        findings.append(f"K_emp changes direction within the first 50 steps in {len(flips)} of {len(ok)} runs")
    notes = [
        "Steps: the thesis' text says 39,000 steps = 200 epochs (its Fig. 4.2 caption says 30,000); the paper "
        "profile uses 39,000.",
        "BatchNorm (track_running_stats=False) couples the samples of a batch; per-sample terms are defined by "
        "backpropagating the summed loss (theory.md §2). K(t) ignores BatchNorm's scaling, as the thesis does.",
    ]
    notes += ch4.scale_note(cfg)
    write_outputs(cfg, fig_dir, fig, table, runs, findings, notes)
