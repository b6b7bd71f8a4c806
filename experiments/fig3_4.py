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
from .ch3 import pick_run, threads, write_empty
from .common import write_outputs

ERRORS = "errors.npz"
ORDERS = {"hessian": 2, "jacobian": 1}


def _case(dist: str, shape) -> str:
    return f"{dist} {int(shape[0])}x{int(shape[1])}"


def run(cfg, run_dir):
    trials, seed = int(cfg.scale.trials), int(cfg.seed.data)
    results.update_status(run_dir, data_source=f"synthetic matrices (seed {seed})")
    out, summary = {}, {"trials": trials}
    for what, order in ORDERS.items():
        for shape in cfg.figure.shapes:
            for dist in cfg.figure.dists:
                with threads(cfg.figure.threads):
                    err = spectral.error_trials((int(shape[0]), int(shape[1])), str(dist), trials, seed, order)
                out[f"{what}|{_case(dist, shape)}"] = err.numpy()
        summary[f"max_eps_{what}"] = float(max(v.max() for k, v in out.items() if k.startswith(what)))
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
    for i, what in enumerate(ORDERS):
        bound = float(cfg.figure.thesis_bound[what])
        errs = {c: z[f"{what}|{c}"] for c in cases}
        for j, case in enumerate(cases):
            plots.log_error_histogram(axes[i * len(cases) + j], errs[case], bound,
                                      title=f"{what}, {case}, {trials} trials")
            for row in spectral.error_summary({case: torch.from_numpy(errs[case])}):
                rows.append({"derivative": what, **row, "k": row["k"] + 1, "trials": trials, "thesis_bound": bound,
                             "within_thesis_bound": row["max"] <= bound})
        thesis_case = cases[0]
        worst = max(errs, key=lambda c: errs[c].max())
        findings.append(
            f"{what}: max eps over {trials} trials x all k: "
            + ", ".join(f"{c} {errs[c].max():.3g}" for c in cases)
            + f"; overall max {errs[worst].max():.3g} ({worst}); thesis ({thesis_case.split()[1]} only): "
            + ("eps = 0" if bound == 0 else f"< {bound:.2g}")
            + (" -- every error within it" if all(errs[c].max() <= bound for c in cases) else " -- EXCEEDED"))
        zeros = sum(int((errs[c] == 0).sum()) for c in cases)
        total = sum(errs[c].size for c in cases)
        findings.append(f"{what}: {zeros} of {total} errors are exactly 0")
    fig.suptitle("eps = ||R_ours - R_autograd||_2 per k over random matrices (dashed: the thesis' bound)", fontsize=9)
    fig.tight_layout()
    notes = ["Histograms on log10 bins (the thesis plots unnormalised histograms on a linear axis); exact zeros "
             "cannot sit on a log axis and are counted in each panel's title.",
             "References: batched torch.func jacfwd(jacrev(svdvals)) for Hessians, jacrev(svdvals) for Jacobians "
             "(lipexp.spectral.error_trials); matrices from lipexp.spectral.random_matrices with seed.data.",
             "The thesis' Fig. 3.4 covers 6x10 Hessians; the tall (10x6) and square (8x8) cases and the Jacobian rows "
             "extend it."]
    write_outputs(cfg, fig_dir, fig, pd.DataFrame(rows), runs, findings, notes)
