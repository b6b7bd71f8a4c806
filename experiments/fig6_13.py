"""Fig. 6.13: coalition images {I0} and {I1..I(M-1)} under the three absence strategies, and the SIDs of two
zoo models under each strategy (psi cached per sample in the zoo; zero absences shared with Fig. 6.7)."""
from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from lipexp import iaside, results

from . import ch6, plots
from .common import write_outputs

ABSENCES = ("zero", "complex_gaussian", "replacement")
TABLE = "sids.csv"
IMAGES = "examples.pt"


def run(cfg, run_dir):
    ss = ch6.sid_settings(cfg)
    m = int(ss.num_bands)
    entries = ch6.zoo_entries(cfg, keys=list(cfg.figure.models[cfg.profile.name]))
    rows, notes, sources, examples = [], [], set(), {}
    for e in entries:
        x, _, src = ch6.eval_images(cfg, e, 4)
        sources.add(src)
        for absence in ABSENCES:
            coal = iaside.coalition_images(x, m, absence, seed=0, noise_std=float(cfg.figure.noise_std))
            examples[(e.key, absence)] = torch.stack([coal[1, 0], coal[2**m - 2, 0]]).half()  # {I0}, {I1..}
            row_list, n2, _ = ch6.zoo_sid_rows(cfg, [e], absence=absence, ci=True)
            rows += row_list
            notes += n2
    torch.save(examples, run_dir / IMAGES)
    results.update_status(run_dir, data_source=", ".join(sorted(sources)))
    ch6.save_table(run_dir, TABLE, pd.DataFrame(rows))
    return {"notes": sorted(set(notes)), "num_bands": m}


def aggregate(cfg, fig_dir, runs) -> None:
    r = ch6.first_ok(runs)
    df = ch6.load_table(r, TABLE) if r else pd.DataFrame()
    findings = []
    if r is not None:
        ex = results.load_torch(r.path / IMAGES)
        m = int(r.summary["num_bands"])
        models = list(dict.fromkeys(k for k, _ in ex))
        fig, axes = plt.subplots(len(models), 9, figsize=(16, 2.1 * len(models) + 0.4), squeeze=False)
        for i, mname in enumerate(models):
            for j, absence in enumerate(ABSENCES):
                img = ex[(mname, absence)].float()
                plots.show_image(axes[i, j], img[0], f"{mname}: {{I0}}\n{absence}", fontsize=6)
                plots.show_image(axes[i, 3 + j], img[1], f"{mname}: {{I1..I{m - 1}}}\n{absence}", fontsize=6)
                d = df[(df["model"] == mname) & (df["absence"] == absence)]
                if len(d):
                    plots.sid_bars(axes[i, 6 + j], ch6.sid_matrix(d)[0], f"{mname} SID, {absence}\n"
                                   f"SRS {d['srs'].iloc[0]:.2f}", color="tab:green")
                else:
                    axes[i, 6 + j].set_visible(False)
        fig.tight_layout()
        for mname, d in df.groupby("model", sort=False):
            sids = {a: ch6.sid_matrix(d[d["absence"] == a])[0] for a in d["absence"]}
            pairs = ", ".join(f"{a}-{b} {np.abs(sids[a] - sids[b]).sum():.3f}"
                              for a, b in itertools.combinations(sids, 2))
            findings.append(f"{mname} (n = {int(d['n'].iloc[0])}): L1 distance between SIDs {pairs} (2 = disjoint); SRS "
                            + ", ".join(f"{a} {s:.3f}" for a, s in zip(d["absence"], d["srs"]))
                            + "; argmax band " + ", ".join(f"{a} I{int(np.argmax(s))}" for a, s in sids.items()))
    else:
        fig = plt.figure()
    notes = [ch6.JPEG_NOTE, "Complex Gaussian absences are N(0, 1/2) + iN(0, 1/2) per frequency of the unnormalised "
             "FFT, i.e. pixel noise of std 1 / sqrt(2 H W) (0.022 at 32x32, 0.003 at 224x224) around a black image: "
             "close to the zero baseline. Replacement takes the absent bands from another evaluation image (seeded). "
             "Coalition images are shown clipped to [0, 1]."]
    if r is not None:
        notes += r.summary.get("notes", [])
    write_outputs(cfg, fig_dir, fig, df, runs, findings or ch6.skipped_findings(runs) or ["no run"], notes=notes)
