"""Pieces shared by the Chapter 3 figures (and init_k0): CPU threads, picking the run to plot, empty outputs."""
from __future__ import annotations

from contextlib import contextmanager

import pandas as pd
import torch

from .common import write_outputs


@contextmanager
def threads(n: int | None):
    """Run the block with ``n`` torch CPU threads (None: leave torch's setting), restoring it afterwards.

    These jobs multiply small matrices (SVDs of weights, power iteration on batches of 4, Hessians of 60 x 60),
    where extra threads only add synchronisation; on a shared 2-core machine one thread was 3x (training steps
    at batch 64) to 30x (init_k0's SVDs) faster than two.
    """
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


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
