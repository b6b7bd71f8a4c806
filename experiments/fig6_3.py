"""Fig. 6.3: train the same model on the full spectrum, on [0, cutoff] or on [cutoff, 1], where the removed
band is replaced by that band of another (random) image of the same split, so that it carries no label
information. Reported: train / validation accuracy on the derived sets, accuracy on the clean validation set,
accuracy and embedding shift under Gaussian noise, and a t-SNE of clean and noisy validation embeddings."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from lipexp import data as D
from lipexp import frequency, results
from lipexp.train import evaluate, resolve_device, train

from . import ch6
from .common import write_outputs

EMBED = "embeddings.npz"
BANDS = ("full", "low", "high")


def derived(ds: D.Dataset, band: str, cutoff: float, seed: int, chunk: int = 2000) -> D.Dataset:
    """The band-limited set: ``band`` of each image plus the complementary band of another image (a seeded
    derangement of the split, so no image gets its own complement). ``full`` returns the set unchanged."""
    if band == "full":
        return ds
    n = len(ds)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    other = torch.empty(n, dtype=torch.long)
    other[order] = order.roll(-1)
    keep, fill = (frequency.lowpass, frequency.highpass) if band == "low" else (frequency.highpass, frequency.lowpass)
    parts = []
    for i in range(0, n, chunk):
        x = ds.x[i:i + chunk].float() / 255
        xo = ds.x[other[i:i + chunk]].float() / 255
        parts.append(keep(x, cutoff) + fill(xo, cutoff))
    return D.Dataset(ds.name, ds.split, torch.cat(parts), ds.y, ds.num_classes, ds.source,
                     {**ds.info, "band": band, "cutoff": cutoff})


def embeddings(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Inputs of the model's last Linear layer (the penultimate features), N x D."""
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    feats = []
    hook = last.register_forward_hook(lambda mod, inp, out: feats.append(inp[0].detach().flatten(1).cpu()))
    try:
        with torch.no_grad():
            dev = next(model.parameters()).device
            for i in range(0, x.shape[0], batch_size):
                model(x[i:i + batch_size].to(dev))
    finally:
        hook.remove()
    return torch.cat(feats)


def run(cfg, run_dir):
    scale, band, cutoff = cfg.scale, str(cfg.figure.band), float(cfg.figure.cutoff)
    if band not in BANDS:
        raise ValueError(f"figure.band={band} is not one of {BANDS}")
    device = resolve_device(cfg.device)
    tr, te = ch6.dataset_sets(cfg, scale.dataset, scale.train_subset, scale.test_subset)
    results.update_status(run_dir, data_source=tr.source)
    tr_d, te_d = derived(tr, band, cutoff, seed=int(cfg.seed.data)), derived(te, band, cutoff, seed=int(cfg.seed.data) + 1)
    spec = OmegaConf.to_container(scale.model, resolve=True)
    model = ch6.build_arch(spec["arch"], tr.num_classes, spec.get("kwargs", {}), int(cfg.seed.init), tr.name)
    summary = train(model[1], tr_d, te_d, ch6.train_spec(cfg, spec, None), run_dir, device)
    model.eval()
    g = torch.Generator().manual_seed(int(cfg.seed.data) + 2)
    sigma = float(cfg.figure.noise_sigma)
    xv = te_d.x.float() / 255 if te_d.x.dtype == torch.uint8 else te_d.x
    noisy = D.Dataset(te.name, "test", xv + sigma * torch.randn(xv.shape, generator=g), te.y, te.num_classes, te.source)
    out = {"band": band, "cutoff": cutoff, "dataset": tr.name, "arch": spec["arch"], "steps": int(spec["steps"]),
           "train_acc": evaluate(model[1], tr_d, device, limit=2000)["acc"], "val_acc": evaluate(model[1], te_d, device)["acc"],
           "clean_val_acc": evaluate(model[1], te, device)["acc"],
           "noisy_val_acc": evaluate(model[1], noisy, device)["acc"]}
    out["gap"] = out["val_acc"] - out["train_acc"]
    n = min(int(scale.embed_samples), len(te))
    e_clean, e_noisy = embeddings(model, xv[:n]), embeddings(model, noisy.x[:n])
    spread = torch.cdist(e_clean, e_clean).sum() / (n * (n - 1))
    out["embed_shift_ratio"] = float((e_noisy - e_clean).norm(dim=1).mean() / spread)
    from sklearn.manifold import TSNE

    xy = TSNE(n_components=2, perplexity=min(30.0, (2 * n - 1) / 3), init="pca", random_state=0).fit_transform(
        torch.cat([e_clean, e_noisy]).numpy())
    np.savez(run_dir / EMBED, xy=xy, labels=te.y[:n].numpy(), n=n)
    out["train_wall_s"] = summary.get("wall_time_s")
    return out


def aggregate(cfg, fig_dir, runs) -> None:
    ok = {r.summary["band"]: r for r in runs if r.ok and "band" in r.summary}
    bands = [b for b in BANDS if b in ok]
    fig, axes = plt.subplots(1, max(1, len(bands)) + 1, figsize=(4.2 * (len(bands) + 1), 4.0), squeeze=False)
    axes = axes[0]
    rows, findings = [], []
    c = float(cfg.figure.cutoff)
    names = {"full": "[0, 1]", "low": f"[0, {c:g}]", "high": f"[{c:g}, 1]"}
    for ax, b in zip(axes, bands):
        z = np.load(ok[b].path / EMBED)
        n, xy, lab = int(z["n"]), z["xy"], z["labels"]
        ax.scatter(xy[:n, 0], xy[:n, 1], c=lab, cmap="tab10", s=8, marker="o", label="clean")
        ax.scatter(xy[n:, 0], xy[n:, 1], c=lab, cmap="tab10", s=10, marker="x", label=f"noise sigma {cfg.figure.noise_sigma}")
        s = ok[b].summary
        ax.set_title(f"{names[b]}: val acc {s['val_acc']:.2f}, noisy {s['noisy_val_acc']:.2f}", fontsize=8)
        ax.legend(fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
        rows.append({"train_set": names[b], **s})
    table = pd.DataFrame(rows)
    if len(table):
        cols = ["train_set", "train_acc", "val_acc", "gap", "clean_val_acc", "noisy_val_acc", "embed_shift_ratio"]
        axes[-1].axis("off")
        cell = [[row[k] if k == "train_set" else f"{row[k]:.3f}" for k in cols] for _, row in table.iterrows()]
        tab = axes[-1].table(cellText=cell, colLabels=["train\nset", "acc\ntrain", "acc\nval", "val -\ntrain",
                                                       "acc\nclean val", "acc\nnoisy val", "embed\nshift"], loc="center")
        tab.auto_set_font_size(False)
        tab.set_fontsize(7)
        tab.auto_set_column_width(list(range(len(cols))))
        tab.scale(1.0, 2.4)
        for _, row in table.iterrows():
            findings.append(f"trained on {row['train_set']}: train acc {row['train_acc']:.3f}, val acc {row['val_acc']:.3f} "
                            f"(gap {row['gap']:+.3f}), clean-val acc {row['clean_val_acc']:.3f}, val acc under noise "
                            f"sigma {cfg.figure.noise_sigma} {row['noisy_val_acc']:.3f}, embedding shift / spread "
                            f"{row['embed_shift_ratio']:.3f}")
        if {"low", "high"} <= set(ok):
            lo, hi = ok["low"].summary, ok["high"].summary
            findings.insert(0, f"low vs high: generalisation gap {lo['gap']:+.3f} vs {hi['gap']:+.3f}, accuracy drop under "
                               f"noise {lo['val_acc'] - lo['noisy_val_acc']:.3f} vs {hi['val_acc'] - hi['noisy_val_acc']:.3f}, "
                               f"embedding shift {lo['embed_shift_ratio']:.3f} vs {hi['embed_shift_ratio']:.3f} "
                               f"(the thesis expects the smaller values for low)")
    fig.tight_layout()
    write_outputs(cfg, fig_dir, fig, table, runs, findings or ch6.skipped_findings(runs) or ["no completed run"],
                  notes=[ch6.JPEG_NOTE, "Quick profile: the Chapter 4 ConvNet on 10,000 CIFAR-10 images (the thesis: "
                         "resnet18 on STL-10, which needs a download). Cut-off 0.3 of the l_inf radius; the replaced "
                         "band comes from a random other image of the same split (seeded derangement). Validation "
                         "accuracy is on the derived validation set (same construction); 'clean val' is the "
                         "unfiltered one. Noise: x + N(0, sigma^2) on the derived validation images, not clipped "
                         "(derived images already leave [0, 1]). Embedding shift: mean |e(x + noise) - e(x)| over the "
                         "mean distance between two validation embeddings."] + ch6.skipped_findings(runs))
