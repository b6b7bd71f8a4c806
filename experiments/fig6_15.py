"""Fig. 6.15: band layouts of the l_inf and l_2 partitions (``lipexp.frequency.band_masks``), the number of
frequencies per band against the area of the band's ideal region (square ring or annulus), and the SIDs of two
zoo models under both partitions."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from lipexp import frequency, results

from . import ch6, plots
from .common import write_outputs

PARTITIONS = ("linf", "l2")
TABLE = "sids.csv"
BANDS = "bands.csv"


def band_counts(size: int, m: int) -> list[dict]:
    """Frequencies per band of a size x size spectrum, and their density = count / ideal area of the band
    (area in frequency-index units: square ring for l_inf, annulus for l_2, of normalised radii i/M..(i+1)/M)."""
    rows = []
    half = size / 2.0
    for part in PARTITIONS:
        counts = frequency.band_masks(size, size, m, part).sum(dim=(1, 2))
        for i, c in enumerate(counts.tolist()):
            a, b = i / m * half, (i + 1) / m * half
            area = (2 * b) ** 2 - (2 * a) ** 2 if part == "linf" else math.pi * (b**2 - a**2)
            rows.append({"size": size, "partition": part, "band": i, "frequencies": int(c), "ideal_area": area,
                         "density": c / area})
    return rows


def run(cfg, run_dir):
    ss = ch6.sid_settings(cfg)
    m = int(ss.num_bands)
    entries = ch6.zoo_entries(cfg, keys=list(cfg.figure.models[cfg.profile.name]))
    rows, notes, sources = [], [], set()
    for part in PARTITIONS:
        rr, nn_, src = ch6.zoo_sid_rows(cfg, entries, partition=part, ci=True)
        rows += rr
        notes += nn_
        sources |= src
    bands = [row for s in cfg.figure.sizes for row in band_counts(int(s), m)]
    results.update_status(run_dir, data_source=", ".join(sorted(sources)))
    ch6.save_table(run_dir, TABLE, pd.DataFrame(rows))
    ch6.save_table(run_dir, BANDS, pd.DataFrame(bands))
    return {"notes": sorted(set(notes)), "num_bands": m}


def aggregate(cfg, fig_dir, runs) -> None:
    r = ch6.first_ok(runs)
    df = ch6.load_table(r, TABLE) if r else pd.DataFrame()
    findings = []
    if r is not None:
        bands = ch6.load_table(r, BANDS)
        m = int(r.summary["num_bands"])
        models = list(dict.fromkeys(df["model"])) if len(df) else []
        fig, axes = plt.subplots(2, 3 + len(models), figsize=(3.1 * (3 + len(models)), 6), squeeze=False)
        size = int(cfg.figure.sizes[0])
        for i, part in enumerate(PARTITIONS):
            idx = (frequency.band_masks(size, size, m, part) * torch.arange(m).view(-1, 1, 1)).sum(0)
            im = axes[i, 0].imshow(torch.fft.fftshift(idx).numpy(), cmap="tab10" if m <= 10 else "viridis")
            axes[i, 0].set_title(f"{part} bands, {size}x{size} (centred)", fontsize=8)
            axes[i, 0].axis("off")
            fig.colorbar(im, ax=axes[i, 0], fraction=0.046)
            for j, s in enumerate(cfg.figure.sizes[:2]):
                b = bands[(bands["partition"] == part) & (bands["size"] == int(s))]
                ax = axes[i, 1 + j]
                ax.bar(b["band"], b["density"], color="tab:purple")
                ax.axhline(1.0, color="k", lw=0.6, ls="--")
                ax.set_title(f"{part}, {s}x{s}: frequencies / ideal area", fontsize=7)
                ax.set_xlabel("band", fontsize=7)
                dens = b["density"].to_numpy()
                findings.append(f"{part}, {s}x{s}: frequencies per band " + " ".join(str(v) for v in b["frequencies"])
                                + f"; density (count / ideal area) {dens.min():.3f}..{dens.max():.3f}, coefficient of "
                                f"variation {dens.std() / dens.mean():.3f}")
            for j, mname in enumerate(models):
                d = df[(df["model"] == mname) & (df["partition"] == part)]
                plots.sid_bars(axes[i, 3 + j], ch6.sid_matrix(d)[0], f"{mname}, {part}: SRS {d['srs'].iloc[0]:.2f}",
                               color="tab:blue" if part == "linf" else "tab:orange")
        fig.tight_layout()
        for mname, d in df.groupby("model", sort=False):
            a, b = (ch6.sid_matrix(d[d["partition"] == p])[0] for p in PARTITIONS)
            sa, sb = (d[d["partition"] == p]["srs"].iloc[0] for p in PARTITIONS)
            findings.append(f"{mname} (n = {int(d['n'].iloc[0])}): L1 distance between the linf and l2 SIDs "
                            f"{np.abs(a - b).sum():.3f}; SRS linf {sa:.3f}, l2 {sb:.3f}")
        df = pd.concat([df, bands], ignore_index=True)
    else:
        fig = plt.figure()
    notes = [ch6.JPEG_NOTE, "l_2 radius sqrt(f_u^2 + f_v^2) / 0.5 is clipped to 1, so the corners of the spectrum "
             "(radius 1..sqrt 2) join the last l_2 band: that band's density exceeds 1, the others follow the discs. "
             "The table holds the SIDs (rows with a model) and the band counts (rows with a size)."]
    if r is not None:
        notes += r.summary.get("notes", [])
    write_outputs(cfg, fig_dir, fig, df, runs, findings or ch6.skipped_findings(runs) or ["no run"], notes=notes)
