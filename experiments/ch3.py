"""Pieces shared by the Chapter 3 figures (and init_k0): picking the run to plot, empty outputs."""
from __future__ import annotations

import pandas as pd

from .common import write_outputs


def pick_run(cfg, runs, needed: str, keys: tuple[str, ...] = ("seed.data",)):
    """The completed run that has the file ``needed`` and matches ``cfg`` on ``keys``, else any completed one."""
    from omegaconf import OmegaConf

    ok = [r for r in runs if r.ok and (r.path / needed).exists()]
    same = [r for r in ok if all(r.get(k) == OmegaConf.select(cfg, k) for k in keys)]
    return (same or ok or [None])[0]


def blank(df: pd.DataFrame) -> pd.DataFrame:
    """Empty cells, not "nan"/"None", where a quantity does not apply (summary.csv then reads back as NaN)."""
    return df.astype(object).where(df.notna(), "")


def write_empty(cfg, fig_dir, runs) -> None:
    """Outputs that say no run completed (the failed runs are listed by ``write_outputs``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 2))
    fig.text(0.5, 0.5, "no completed run", ha="center", va="center")
    write_outputs(cfg, fig_dir, fig, pd.DataFrame(), runs, ["no completed run"])
