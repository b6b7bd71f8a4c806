"""Fig. 6.1: radial energy spectral density (ESD) of CIFAR-10 and ImageNet images, with a power-law fit.

ESD_r is the mean of |FFT|^2 over the ring of integer l2 radius r (``lipexp.frequency.radial_esd``),
averaged over images and colour channels; the fit is least squares of log ESD on log r for r >= 1.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from lipexp import frequency, results

from . import ch6, plots
from .common import write_outputs

TABLE = "esd.csv"


def _mean_esd(x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    total = None
    for i in range(0, x.shape[0], chunk):
        e = frequency.radial_esd(x[i:i + chunk]).sum(dim=(0, 1))
        total = e if total is None else total + e
    return total / (x.shape[0] * x.shape[1])


def run(cfg, run_dir):
    rows, summary, sources = [], {}, []
    sets = [("cifar10", lambda: ch6.cifar_eval(cfg, int(cfg.scale.n_cifar), seed=7)),
            ("imagenet", lambda: ch6.imagenet_eval(cfg, int(cfg.scale.n_imagenet), 224, seed=7))]
    for name, load in sets:
        x, _, source = load()
        sources.append(source)
        esd = _mean_esd(x)
        slope, c = frequency.power_law_fit(esd)
        r = torch.arange(1, len(esd), dtype=torch.float64)
        fit = c + slope * r.log()
        resid = esd[1:].log() - fit
        r2 = 1.0 - float(resid.var() / esd[1:].log().var())
        summary.update({f"{name}_slope": float(slope), f"{name}_r2": r2, f"{name}_n": int(x.shape[0]),
                        f"{name}_size": int(x.shape[-1])})
        rows += [{"dataset": name, "r": int(i), "r_normalised": i / (len(esd) - 1), "esd": float(e),
                  "fit": float(np.exp(float(c + slope * np.log(i)))) if i > 0 else float("nan")}
                 for i, e in enumerate(esd.tolist())]
    results.update_status(run_dir, data_source=", ".join(sources))
    ch6.save_table(run_dir, TABLE, pd.DataFrame(rows))
    return summary


def aggregate(cfg, fig_dir, runs) -> None:
    r = ch6.first_ok(runs)
    fig, axes = plots.grid(2, ncols=2, size=(4.6, 3.6))
    findings, table = [], pd.DataFrame()
    if r is not None:
        table = ch6.load_table(r, TABLE)
        s = r.summary
        m = int(cfg.figure.num_bands)
        for ax, (name, d) in zip(axes, table.groupby("dataset", sort=False)):
            d = d[d["r"] > 0]
            ax.loglog(d["r"], d["esd"], "o", ms=3, label="ESD_r (mean over images, channels)")
            ax.loglog(d["r"], d["fit"], "-", label=f"fit: slope {s[f'{name}_slope']:.2f}, R^2 {s[f'{name}_r2']:.3f}")
            rmax = int(d["r"].max())
            for i in range(1, m):  # band edges I_i: l_inf radius i/M, drawn at the l2 ring of the same radius
                ax.axvline(i / m * rmax, color="0.7", lw=0.6, ls=":")
            ax.set_xlabel("radial frequency r (ring radius, frequency-index units)", fontsize=7)
            ax.set_ylabel("ESD_r", fontsize=7)
            ax.set_title(f"{name}: {s[f'{name}_n']} images of {s[f'{name}_size']}x{s[f'{name}_size']}", fontsize=8)
            ax.legend(fontsize=6)
            findings.append(f"{name}: ESD_r ~ r^{s[f'{name}_slope']:.2f} over r = 1..{rmax} (R^2 of the log-log fit "
                            f"{s[f'{name}_r2']:.3f}; {s[f'{name}_n']} images); ESD falls by a factor "
                            f"{d['esd'].iloc[0] / d['esd'].iloc[-1]:.3g} from r = 1 to r = {rmax}")
    fig.tight_layout()
    write_outputs(cfg, fig_dir, fig, table, runs, findings or ch6.skipped_findings(runs) or ["no completed run"],
                  notes=[ch6.JPEG_NOTE + " The ImageNet sample is JPEG quality 95, centre-cropped to 224 px.",
                         "Dotted lines: the I-ASIDE band edges (M = 8) at radius i/M of the largest ring."])
