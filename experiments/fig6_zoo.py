"""The Chapter 6 model zoo: train (or load) every model of the profile once and tabulate them.

Other Chapter 6 figures train a missing model themselves, so this figure is optional; running it first
makes their wall times comparable (and `make reproduce-chapter6` runs it first).
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd

from lipexp import results

from . import ch6, plots
from .common import write_outputs

TABLE = "zoo.csv"


def run(cfg, run_dir):
    rows, sources = [], set()
    for e in ch6.zoo_entries(cfg):
        t0 = time.time()
        try:
            _, info = ch6.load_model(cfg, e)
        except ch6.ModelUnavailable as err:
            rows.append({"model": e.key, "family": e.family, "arch": e.arch, "status": f"unavailable: {err}"})
            continue
        sources.add(info.get("data_source"))
        rows.append({"model": e.key, "family": e.family, "status": "ok", **{k: v for k, v in info.items() if k != "key"},
                     "load_or_train_s": time.time() - t0})
    results.update_status(run_dir, data_source=", ".join(sorted(s for s in sources if s)) or "none")
    df = pd.DataFrame(rows)
    ch6.save_table(run_dir, TABLE, df)
    ok = df[df["status"] == "ok"] if len(df) else df
    return {"models": len(df), "available": int(len(ok))}


def aggregate(cfg, fig_dir, runs) -> None:
    r = ch6.first_ok(runs)
    df = ch6.load_table(r, TABLE) if r else pd.DataFrame()
    fig, axes = plots.grid(2, ncols=2, size=(5.5, 3.6))
    findings = []
    if len(df):
        ok = df[df["status"] == "ok"]
        plots.zoo_bars(axes[0], ok["model"], ok["test_acc"], ok["family"], "accuracy (test / ImageNet sample)")
        plots.zoo_bars(axes[1], ok["model"], np.log10(ok["params"].astype(float)), ok["family"], "log10(parameters)")
        for _, row in ok.iterrows():
            if row["family"] == "cifar":
                findings.append(f"{row['model']} ({row['arch']} {row.get('kwargs', '')}, {int(row['params']):,} "
                                f"params): {int(row['steps'])} steps of batch {int(row['batch_size'])} "
                                f"({row['optimizer']}, lr {row['lr']}) on {int(row['train_subset'] or 50000)} CIFAR-10 "
                                f"images -> train acc {row['train_acc']:.3f}, test acc {row['test_acc']:.3f} "
                                f"(on {int(row['eval_samples'] or 10000)} test images)")
            else:
                findings.append(f"{row['model']} ({row['arch']}, {int(row['params']):,} params, pretrained): top-1 "
                                f"{row['test_acc']:.3f} on {int(row['eval_samples'])} ImageNet images at "
                                f"{int(row['image_size'])}x{int(row['image_size'])}")
        for _, row in df[df["status"] != "ok"].iterrows():
            findings.append(f"{row['model']}: {row['status']}")
    fig.tight_layout()
    write_outputs(cfg, fig_dir, fig, df, runs, findings or ["no completed run"] + ch6.skipped_findings(runs),
                  notes=[ch6.JPEG_NOTE,
                         "The quick profile's CIFAR models are narrowed (resnet18 width 16, vgg11_bn width 16, "
                         "mobilenet_v2 width 0.5 with total stride 16, two small ViTs) and trained for a few hundred "
                         "steps, so that the whole chapter fits a 2-core CPU; their accuracies are far below "
                         "converged ones. EfficientNet-Lite runs below its 224 px training resolution in quick "
                         "(image_size), which lowers its top-1."])
