"""Fig. 6.2: spectral SNR of corruptions and attacks at a fixed perturbation energy.

Each perturbation dx = x* - x is rescaled per image to ``energy_fraction`` of the image's energy
(``lipexp.perturbations.scale_to_energy``), then SNR(r) = ESD_r(x) / ESD_r(dx) with the ESDs averaged over
images and channels (``lipexp.frequency.spectral_snr_db``). Attacks target a zoo model (the quick profile's
CIFAR-10 ConvNet). Images an attack leaves unchanged (dx = 0) cannot be scaled and are dropped; the slow
L0 attacks (SparseFool, Pixle) run on the first ``max_images_slow`` images.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from lipexp import frequency, results
from lipexp import perturbations as P

from . import ch6, plots
from .common import write_outputs

TABLE = "snr.csv"


def run(cfg, run_dir):
    (entry,) = ch6.zoo_entries(cfg, keys=[cfg.scale.model])
    model, info = ch6.load_model(cfg, entry)
    x, y, source = ch6.eval_images(cfg, entry, int(cfg.scale.n), seed=11)
    results.update_status(run_dir, data_source=source)
    dev = next(model.parameters()).device
    x, y = x.to(dev), y.to(dev)
    rows, summary = [], {"model": entry.key, "model_test_acc": info.get("test_acc"), "n": int(x.shape[0])}
    for name, params in OmegaConf.to_container(cfg.figure.perturbations, resolve=True).items():
        k = int(cfg.scale.max_images_slow) if name in cfg.figure.slow else x.shape[0]
        xs = P.perturb(name, x[:k], model=model, labels=y[:k], **params)
        delta = (xs - x[:k]).cpu()
        keep = delta.flatten(1).abs().sum(1) > 0
        if int(keep.sum()) == 0:
            summary[f"{name}_kept"] = 0
            continue
        xk = x[:k].cpu()[keep]
        scaled = P.scale_to_energy(delta[keep], xk, float(cfg.figure.energy_fraction))
        snr = frequency.spectral_snr_db(xk, scaled)
        summary[f"{name}_kept"] = int(keep.sum())
        rows += [{"perturbation": name, "r": i, "snr_db": float(v), "images": int(keep.sum())}
                 for i, v in enumerate(snr.tolist())]
    ch6.save_table(run_dir, TABLE, pd.DataFrame(rows))
    return summary


def _slope(d: pd.DataFrame) -> float:
    """Power-law exponent of the SNR (linear units) over r >= 1: least squares in log-log."""
    d = d[(d["r"] > 0) & np.isfinite(d["snr_db"])]
    return float(np.polyfit(np.log(d["r"]), d["snr_db"] / 10 * np.log(10), 1)[0])


def aggregate(cfg, fig_dir, runs) -> None:
    r = ch6.first_ok(runs)
    fig, axes = plots.grid(2, ncols=2, size=(5.0, 3.8))
    findings, rows = [], []
    table = pd.DataFrame()
    if r is not None:
        table = ch6.load_table(r, TABLE)
        for name, d in table.groupby("perturbation", sort=False):
            axes[0].plot(d["r"], d["snr_db"], "-o", ms=2, label=name)
            axes[1].semilogx(d["r"][d["r"] > 0], d["snr_db"][d["r"] > 0], "-", label=name)
            below = d[(d["snr_db"] < 0) & (d["r"] > 0)]
            row = {"perturbation": name, "images": int(d["images"].iloc[0]),
                   "snr_db_r1": float(d[d["r"] == 1]["snr_db"].iloc[0]),
                   "snr_db_rmax": float(d["snr_db"].iloc[-1]), "loglog_slope": _slope(d),
                   "first_r_below_0db": int(below["r"].min()) if len(below) else None,
                   "monotone_decay_share": float((np.diff(d["snr_db"].to_numpy()[1:]) < 0).mean())}
            rows.append(row)
            findings.append(f"{name}: SNR {row['snr_db_r1']:.1f} dB at r = 1 -> {row['snr_db_rmax']:.1f} dB at "
                            f"r = {int(d['r'].max())} (log-log slope {row['loglog_slope']:.2f}; below 0 dB from r = "
                            f"{row['first_r_below_0db']}; {row['monotone_decay_share']:.0%} of steps decreasing; "
                            f"{row['images']} images)")
        for ax in axes:
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xlabel("radial frequency r", fontsize=7)
            ax.set_ylabel("spectral SNR (dB)", fontsize=7)
            ax.legend(fontsize=5)
        s = r.summary
        axes[0].set_title(f"{s['n']} images, attacks on zoo '{s['model']}' (test acc {s['model_test_acc']:.2f})",
                          fontsize=7)
        axes[1].set_title("the same, log r", fontsize=7)
        decaying = sum(1 for x in rows if x["snr_db_r1"] > x["snr_db_rmax"])
        findings.insert(0, f"{decaying} of {len(rows)} perturbations have a lower SNR at the highest ring than at r = 1")
    fig.tight_layout()
    write_outputs(cfg, fig_dir, fig, pd.DataFrame(rows), runs, findings or ch6.skipped_findings(runs) or ["no run"],
                  notes=[ch6.JPEG_NOTE, "Pixle is the thesis' 'Pixel' attack (Pomponi et al., 2022); SparseFool and "
                         "Pixle come from torchattacks, FGSM/PGD from lipexp.perturbations. Attack eps values only set "
                         "the direction: every perturbation is rescaled to 10% of the image energy.",
                         "Per-ring curves are in the run's snr.csv; the table lists one row per perturbation."])
