"""Fig. 3.4: histograms of eps = ||R_ours - R_autograd||_2 over random matrices, per singular value k.

One job: ``scale.trials`` matrices per (shape, distribution), drawn with ``seed.data``; Hessian errors
(the thesis' figure) and Jacobian errors, both by ``lipexp.spectral.error_trials`` against batched autograd.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from lipexp import results, spectral

from . import plots
from .ch3 import blank, pick_run, write_empty
from .common import write_outputs

ERRORS = "errors.npz"
ORDERS = {"hessian": 2, "jacobian": 1}


def _case(dist: str, shape) -> str:
    return f"{dist} {int(shape[0])}x{int(shape[1])}"


def min_gaps(A: torch.Tensor) -> np.ndarray:
    """Per matrix of ``A: [B, m, n]``, the distance from any singular value to the nearest other one or to 0, ``[B]``.

    The derivative formulas divide by these gaps, so rounding errors grow as they shrink.
    """
    s = torch.linalg.svdvals(A)  # descending
    return torch.minimum((s[:, :-1] - s[:, 1:]).min(1).values, s[:, -1]).numpy()


def run(cfg, run_dir):
    trials, seed = int(cfg.scale.trials), int(cfg.seed.data)
    results.update_status(run_dir, data_source=f"synthetic matrices (seed {seed})")
    out, summary = {}, {"trials": trials}
    for shape in cfg.figure.shapes:
        for dist in cfg.figure.dists:
            A = spectral.random_matrices((int(shape[0]), int(shape[1])), str(dist), trials, seed)  # as error_trials draws
            out[f"gap|{_case(dist, shape)}"] = min_gaps(A)
    for what, order in ORDERS.items():
        for shape in cfg.figure.shapes:
            for dist in cfg.figure.dists:
                err = spectral.error_trials((int(shape[0]), int(shape[1])), str(dist), trials, seed, order)
                out[f"{what}|{_case(dist, shape)}"] = err.numpy()
        summary[f"max_eps_{what}"] = float(max(v.max() for k, v in out.items() if k.startswith(f"{what}|")))
    np.savez(run_dir / ERRORS, **out)
    return summary


def aggregate(cfg, fig_dir, runs) -> None:
    r = pick_run(cfg, runs, ERRORS, ("seed.data", "scale.trials"))
    if r is None:
        return write_empty(cfg, fig_dir, runs)
    z = np.load(r.path / ERRORS)
    cases = [_case(d, s) for s in cfg.figure.shapes for d in cfg.figure.dists]
    fig, axes = plots.grid(len(ORDERS) * len(cases), ncols=len(cases), size=(3.0, 2.6))
    rows, findings = [], []
    trials = int(r.get("scale.trials"))
    thesis_shape = cases[0].split()[1]  # the first shape is the thesis' 6x10
    thesis = [c for c in cases if c.split()[1] == thesis_shape]
    for i, what in enumerate(ORDERS):
        bound = float(cfg.figure.thesis_bound[what])
        errs = {c: z[f"{what}|{c}"] for c in cases}
        for j, case in enumerate(cases):
            plots.log_error_histogram(axes[i * len(cases) + j], errs[case], bound,
                                      title=f"{what}, {case}, {trials} trials")
            for row in spectral.error_summary({case: torch.from_numpy(errs[case])}):
                rows.append({"derivative": what, **row, "k": row["k"] + 1, "trials": trials,
                             "thesis_bound": bound if case in thesis else None,  # the thesis tested 6x10 only
                             "within_thesis_bound": row["max"] <= bound if case in thesis else None})
        within = all(errs[c].max() <= bound for c in thesis)
        findings.append(
            f"{what}, the thesis' {thesis_shape} case: max eps over {trials} trials x all k: "
            + ", ".join(f"{c} {errs[c].max():.3g}" for c in thesis)
            + "; thesis: " + ("eps = 0" if bound == 0 else f"< {bound:.2g}")
            + (" -- within it" if within else " -- EXCEEDED"))
        rest = [c for c in cases if c not in thesis]
        if rest:
            above = [c for c in rest if errs[c].max() > bound]
            findings.append(
                f"{what}, shapes the thesis did not test: " + ", ".join(f"{c} {errs[c].max():.3g}" for c in rest)
                + (f"; above the thesis' {thesis_shape} figure in {', '.join(above)}" if above else ""))
        if what == "hessian":
            worst = {c: int(errs[c].max(0).argmax()) for c in cases}
            gap = {c: (float(z[f"gap|{c}"][worst[c]]), float(np.median(z[f"gap|{c}"]))) for c in cases}
            below = [c for c in cases if gap[c][0] < gap[c][1]]
            findings.append(
                "smallest singular-value gap (to another singular value or to 0; the Hessian divides by s_k^2 - s_i^2) "
                "in each case's worst trial vs its median over trials: "
                + ", ".join(f"{c} {g:.2g} vs {med:.2g}" for c, (g, med) in gap.items())
                + f" -- the worst trial has a below-median gap in {len(below)} of {len(cases)} cases")
        zeros = sum(int((errs[c] == 0).sum()) for c in cases)
        total = sum(errs[c].size for c in cases)
        findings.append(f"{what}: {zeros} of {total} errors (all shapes) are exactly 0")
    fig.suptitle("eps = ||R_ours - R_autograd||_2 per k over random matrices (dashed: the thesis' bound for "
                 f"{thesis_shape})", fontsize=9)
    fig.tight_layout()
    notes = ["Histograms on log10 bins (the thesis plots unnormalised histograms on a linear axis); exact zeros "
             "cannot sit on a log axis and are counted in each panel's title.",
             "References: batched torch.func jacfwd(jacrev(svdvals)) for Hessians, jacrev(svdvals) for Jacobians "
             "(lipexp.spectral.error_trials); matrices from lipexp.spectral.random_matrices with seed.data.",
             "The thesis' Fig. 3.4 covers 6x10 Hessians; the tall (10x6) and square (8x8) cases and the Jacobian rows "
             "extend it."]
    write_outputs(cfg, fig_dir, fig, blank(pd.DataFrame(rows)), runs, findings, notes)
