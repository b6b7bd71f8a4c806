"""Fig. 6.6: the 2^M coalition images of one ImageNet image (``lipexp.iaside.coalition_images``), with the
energy each keeps and, for one pretrained zoo model, log Q(y | x ⋈ S)."""
from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F

from lipexp import iaside, results

from . import ch6, plots
from .common import write_outputs

IMAGES = "coalitions.pt"
TABLE = "coalitions.csv"


def code(k: int, m: int) -> str:
    """Coalition bitmask -> the thesis' binary code: position i is band I_i (e.g. 1001 = {I0, I3})."""
    return "".join(str((k >> i) & 1) for i in range(m))


def run(cfg, run_dir):
    m, size = int(cfg.figure.num_bands), int(cfg.scale.image_size)
    x, y, source = ch6.imagenet_eval(cfg, int(cfg.figure.image_index) + 1, size, seed=5)
    x, y = x[-1:], y[-1:]
    results.update_status(run_dir, data_source=source)
    coal = iaside.coalition_images(x, m)[:, 0]  # 2^M x C x H x W
    energy = coal.flatten(1).square().sum(1) / x.square().sum()
    rows = [{"k": k, "code": code(k, m), "bands": "{" + ", ".join(f"I{i}" for i in range(m) if (k >> i) & 1) + "}",
             "energy_fraction": float(energy[k])} for k in range(2**m)]
    summary = {"label": int(y), "size": size}
    try:
        (entry,) = ch6.zoo_entries(cfg, families=("imagenet",), keys=[cfg.figure.model])
        model, _ = ch6.load_model(cfg, entry)
        with torch.no_grad():
            logq = F.log_softmax(model(coal.to(next(model.parameters()).device)).double(), 1)[:, int(y)].cpu()
        for row, v in zip(rows, logq.tolist()):
            row[f"log_q_{entry.key}"] = v
        summary["model"] = entry.key
    except ch6.ModelUnavailable as err:
        summary["model_skipped"] = str(err)
    torch.save(coal.half(), run_dir / IMAGES)
    ch6.save_table(run_dir, TABLE, pd.DataFrame(rows))
    return summary


def aggregate(cfg, fig_dir, runs) -> None:
    r = ch6.first_ok(runs)
    m = int(cfg.figure.num_bands)
    fig, axes = plots.grid(2**m, ncols=2 ** (m // 2), size=(2.2, 2.3))
    findings, table = [], pd.DataFrame()
    if r is not None:
        coal = results.load_torch(r.path / IMAGES).float()
        table = ch6.load_table(r, TABLE, dtype={"code": str})
        qcol = next((c for c in table.columns if c.startswith("log_q_")), None)
        for ax, (k, row) in zip(axes, table.iterrows()):
            extra = f"\nlog Q = {row[qcol]:.2f}" if qcol else ""
            plots.show_image(ax, coal[k], f"{row['code']}  E = {row['energy_fraction']:.3f}{extra}", fontsize=6)
        full = table.iloc[-1]
        low = table[table["code"] == "1" + "0" * (m - 1)].iloc[0]
        findings.append(f"{2**m} coalition images of one {r.summary['size']}x{r.summary['size']} ImageNet image "
                        f"(label {r.summary['label']}); the full coalition {full['code']} reproduces the image "
                        f"(energy fraction {full['energy_fraction']:.4f})")
        findings.append(f"band I0 alone ({low['code']}) keeps {low['energy_fraction']:.3f} of the energy; the other "
                        f"{m - 1} bands together keep {table[table['code'] == '0' + '1' * (m - 1)].iloc[0]['energy_fraction']:.3f}")
        if qcol:
            findings.append(f"{qcol[6:]}: log Q(y | x ⋈ S) from {table.iloc[0][qcol]:.2f} (empty coalition) to "
                            f"{full[qcol]:.2f} (all bands); best coalition {table.loc[table[qcol].idxmax(), 'code']}")
        elif "model_skipped" in r.summary:
            findings.append(f"model skipped: {r.summary['model_skipped']}")
    fig.tight_layout()
    write_outputs(cfg, fig_dir, fig, table, runs, findings or ch6.skipped_findings(runs) or ["no run"],
                  notes=["Zero absences make coalition images zero-mean unless I0 (which holds the DC term) is present, "
                         "so they leave [0, 1]; they are shown clipped to [0, 1]. E: energy |x ⋈ S|^2 / |x|^2."])
