"""Fig. 5.4: distributions of input-gradient norms for ConvNets trained on full / low-pass / high-pass data.

One training run per filter (cutoff 0.5; training settings inherited from fig5_5; a model that fig5_5 or
fig5_6 already trained with the same config, e.g. low-pass 0.5, is reused). After training, for
each of the first ``n_grad`` test images of the same filtered test set: ||grad_x CE(model(x), y)||_2, x the
model input (the normalised image), computed in batches (samples are independent through the model).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .common import write_outputs
from .fig5_5 import data_notes, eval_inputs, profile_notes, train_or_reuse

ORDER = ("lowpass", "none", "highpass")
LABEL = {"lowpass": "low-pass", "none": "full", "highpass": "high-pass"}


def input_gradient_norms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> np.ndarray:
    """||d CE(model(x_i), y_i) / d x_i||_2 for every sample, (N,) float64; model in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, x.shape[0], batch):
            xb = x[i : i + batch].detach().requires_grad_(True)
            loss = F.cross_entropy(model(xb), y[i : i + batch], reduction="sum")  # sum: per-sample gradients
            (g,) = torch.autograd.grad(loss, xb)
            out.append(g.flatten(1).norm(dim=1).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


def run(cfg, run_dir: Path) -> dict:
    def after(model, train_set, test_set, summary):
        x, y = eval_inputs(test_set, cfg.scale.n_grad, next(model.parameters()).device)
        norms = input_gradient_norms(model, x, y)
        np.savez_compressed(run_dir / "grad_norms.npz", grad_norms=norms)
        return {
            "n_grad": len(norms),
            "grad_median": float(np.median(norms)),
            "grad_mean": float(norms.mean()),
            "grad_p90": float(np.quantile(norms, 0.9)),
            "grad_max": float(norms.max()),
        }

    return train_or_reuse(cfg, run_dir, after=after)


def aggregate(cfg, fig_dir: Path, runs) -> None:
    ok = [r for r in runs if r.ok and (r.path / "grad_norms.npz").exists()]
    ok.sort(key=lambda r: ORDER.index(r.get("data.filter")) if r.get("data.filter") in ORDER else 9)
    rows, dists, labels = [], [], []
    for r in ok:
        kind = r.get("data.filter")
        label = "full" if kind == "none" else f"{LABEL.get(kind, kind)} {r.get('data.cutoff'):g}"
        norms = np.load(r.path / "grad_norms.npz")["grad_norms"]
        dists.append(np.log10(np.maximum(norms, 1e-30)))
        labels.append(label)
        rows.append({"data": label, "filter": kind, "cutoff": r.get("data.cutoff"), "run": r.path.name,
                     "test_acc": r.summary.get("final_test_acc"), "train_acc": r.summary.get("final_train_acc"),
                     **{k: r.summary.get(k) for k in ("n_grad", "grad_median", "grad_mean", "grad_p90", "grad_max")},
                     "K_bound": r.summary.get("final_K_emp")})
    table = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0), gridspec_kw={"width_ratios": [1.3, 1]})
    findings = []
    if dists:
        parts = axes[0].violinplot(dists, showmedians=True)
        for i, b in enumerate(parts["bodies"]):
            b.set_facecolor(f"C{i}")
        axes[0].set_xticks(range(1, len(labels) + 1), labels)
        axes[0].set(ylabel="log10 ||grad_x loss||_2", title="(a) input-gradient norms on test images")
        for i, (d, lab) in enumerate(zip(dists, labels)):
            axes[1].hist(d, bins=40, histtype="step", color=f"C{i}", label=lab, density=True)
        axes[1].set(xlabel="log10 ||grad_x loss||_2", ylabel="density", title="(b) histograms")
        axes[1].legend(fontsize=8)
        for t in table.itertuples():
            findings.append(f"{t.data}: median input-gradient norm {t.grad_median:.4g} (mean {t.grad_mean:.4g}, "
                            f"90% quantile {t.grad_p90:.4g}) over {int(t.n_grad)} test images; test accuracy {t.test_acc:.4f}")
        med = dict(zip(table["filter"], table["grad_median"]))
        if "lowpass" in med and "highpass" in med:
            findings.append(
                f"median(high-pass) / median(low-pass) = {med['highpass'] / med['lowpass']:.3g}: the thesis' ordering "
                f"(high-pass above low-pass) {'holds' if med['highpass'] > med['lowpass'] else 'does not hold'} here"
                + (f"; full data: {med['none']:.4g}, "
                   f"{'between them' if min(med['lowpass'], med['highpass']) <= med['none'] <= max(med['lowpass'], med['highpass']) else 'outside their range'}"
                   if "none" in med else "")
            )
    fig.tight_layout()
    notes = data_notes(ok) + profile_notes(cfg, skip=("cutoffs", "n_lip", "lip_iters")) + [
        "Gradient of the per-sample cross-entropy with respect to the model input (the normalised image; pixel-space "
        "norms are larger by about 1/std ~ 4), on the first n test images of the same filtered test set.",
        "High-pass data has no DC component and a small dynamic range, so its accuracy and gradient scale differ "
        "from the other two by construction; the medians compare the trained functions as they are used.",
    ]
    write_outputs(cfg, fig_dir, fig, table, runs, findings or ["no completed run"], notes)
