"""Fig. 6.12: label noise and SIDs. One job per (architecture, noise level): train on labels of which a
fraction ``data.label_noise`` is redrawn uniformly (``lipexp.data.corrupt_labels``), then measure the SID on clean
test images with their true labels. The figure shows one heat map (noise level x band) per architecture."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from lipexp import data as D
from lipexp import results
from lipexp.train import resolve_device, train

from . import ch6
from .common import write_outputs


def run(cfg, run_dir):
    scale = cfg.scale
    arch = str(cfg.figure.arch)
    if arch not in scale.archs:
        raise ValueError(f"figure.arch={arch} is not one of this profile's architectures {list(scale.archs)}")
    spec = OmegaConf.to_container(scale.archs[arch], resolve=True)
    train_set, test_set = ch6.dataset_sets(cfg, scale.dataset, scale.train_subset, scale.test_subset)
    y_noisy, info = D.corrupt_labels(train_set.y, float(cfg.data.label_noise), train_set.num_classes,
                                     seed=int(cfg.seed.data))
    train_set = D.with_labels(train_set, y_noisy, info)
    results.update_status(run_dir, data_source=train_set.source)
    model = ch6.build_arch(spec["arch"], train_set.num_classes, spec.get("kwargs", {}), int(cfg.seed.init),
                           train_set.name)
    summary = train(model[1], train_set, test_set, ch6.train_spec(cfg, spec, scale.test_subset), run_dir,
                    resolve_device(cfg.device))
    model.eval()
    sub = D.subset(test_set, int(cfg.figure.sid_samples), seed=1234)
    psi = ch6.per_sample_psi(model, sub.x.float() / 255, sub.y, int(cfg.figure.num_bands))
    st = ch6.sid_stats(psi)
    ent_lo, ent_hi = ch6.bootstrap_ci(psi.numpy(), "entropy")
    out = {"arch": arch, "label_noise": float(cfg.data.label_noise), "changed_fraction": info["changed_fraction"],
           "dataset": train_set.name, "steps": int(spec["steps"]), "train_acc_noisy_labels": summary.get("final_train_acc"),
           "test_acc": summary.get("final_test_acc"), "srs": st["srs"], "tv_uniform": st["tv_uniform"],
           "entropy": st["entropy"], "entropy_lo": ent_lo, "entropy_hi": ent_hi, "low_half": st["low_half"], "n_sid": int(psi.shape[0]),
           **ch6.sid_columns(st["sid"]), "train_wall_s": summary.get("wall_time_s")}
    return out


def aggregate(cfg, fig_dir, runs) -> None:
    ok = [r for r in runs if r.ok and "srs" in r.summary]
    df = pd.DataFrame([r.summary for r in ok])
    findings = []
    if len(df):
        archs = list(dict.fromkeys(df.sort_values("arch")["arch"]))
        fig, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 3.6), squeeze=False)
        for ax, arch in zip(axes[0], archs):
            d = df[df["arch"] == arch].sort_values("label_noise")
            mat = ch6.sid_matrix(d)
            im = ax.imshow(mat, aspect="auto", cmap="viridis", origin="lower")
            ax.set_yticks(range(len(d)))
            ax.set_yticklabels([f"{v:.1f}" for v in d["label_noise"]], fontsize=7)
            ax.set_xticks(range(mat.shape[1]))
            ax.set_xticklabels([f"I{i}" for i in range(mat.shape[1])], fontsize=7)
            ax.set_ylabel("label noise", fontsize=8)
            ax.set_title(f"{arch}: SID per noise level", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046)
            c_ent = ch6.correlation(d["label_noise"], d["entropy"])
            c_tv = ch6.correlation(d["label_noise"], d["tv_uniform"])
            findings.append(
                f"{arch}: normalised SID entropy (1 = uniform) [95% bootstrap] " + ", ".join(
                    f"{a:.1f}: {e:.3f} [{lo:.2f}, {hi:.2f}]"
                    for a, e, lo, hi in zip(d["label_noise"], d["entropy"], d["entropy_lo"], d["entropy_hi"]))
                + f"; Spearman rho(noise, entropy) = {c_ent['spearman']:.3f}, rho(noise, TV to uniform) = "
                f"{c_tv['spearman']:.3f}; test accuracy {d['test_acc'].iloc[0]:.3f} at noise "
                f"{d['label_noise'].iloc[0]:.1f} -> {d['test_acc'].iloc[-1]:.3f} at {d['label_noise'].iloc[-1]:.1f}")
        agree = sum(ch6.correlation(g["label_noise"], g["entropy"])["spearman"] > 0 for _, g in df.groupby("arch"))
        findings.insert(0, f"SIDs flatten (entropy rises with the noise level, Spearman > 0) for {agree} of "
                           f"{len(archs)} architectures")
        fig.tight_layout()
        df = df.sort_values(["arch", "label_noise"])
    else:
        fig = plt.figure()
    findings += ch6.skipped_findings(runs)
    write_outputs(cfg, fig_dir, fig, df, runs, findings or ["no completed run"],
                  notes=[ch6.JPEG_NOTE, "Quick profile: CIFAR-10 (the thesis' Caltech-101 needs a download), small "
                         "models trained for a few hundred steps from scratch, so they are far from memorising the "
                         "noisy labels as 120-epoch training does; label noise 1.0 makes labels independent of the "
                         "images. SIDs use clean test images with their true labels (zero absences, l_inf bands)."])
