"""Fig. 5.5: empirical Lipschitz constant and prod sigma_1 against the low-pass cutoff (ConvNet, CIFAR-10).

One training run per cutoff. After training: the operator 2-norm of the input Jacobian of the logits,
||J(x)||_2 = max_v ||J v|| / ||v||, on ``n_lip`` test images (seeded random choice), exactly from the 10 x d
Jacobian (10 vjps; ``lipexp.bounds.input_jacobian_norms`` also has the jvp/vjp power iteration), and the bound
prod_l sigma_1(W_l). The input is the model's input (the normalised image), the
space in which the bound holds; pixel-space norms are larger by about 1/std ~ 4.

Also what fig5_4 and fig5_6 share: model reuse across the three figures (``train_or_reuse``), the
JPEG note, profile notes and correlations.
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from scipy import stats

from omegaconf import OmegaConf

from lipexp import data as D
from lipexp import results
from lipexp.bounds import input_jacobian_norms
from lipexp.data import normalize
from lipexp.layers import k_emp, top_singular_values
from lipexp.models import DATASET_STATS
from lipexp.train import resolve_device, to_pixels

from .common import build_model, collect_runs, load_data, train_job, write_outputs

log = logging.getLogger("lipexp")
TRAINING_KEYS = ("model", "data", "optim", "train", "seed")
IGNORED_DATA_KEYS = ("root", "mirror", "cache_dir", "download")


# ------------------------------------------------------------------ shared by the Chapter 5 CIFAR figures
def training_config(cfg) -> dict:
    """The parts of a (resolved) config that determine the trained weights (not where the data lives)."""
    out = {"input_stats": cfg.figure.get("input_stats", "dataset")}
    for key in TRAINING_KEYS:
        node = OmegaConf.to_container(cfg[key], resolve=True)
        if key == "data":
            node = {k: v for k, v in node.items() if k not in IGNORED_DATA_KEYS}
        out[key] = node
    return out


def load_ch5_data(cfg) -> tuple[D.Dataset, D.Dataset]:
    """``load_data(cfg)``; with ``figure.input_stats=filtered`` a filtered dataset is standardised with the
    per-channel mean/std of its own filtered training images instead of those of the unfiltered dataset.

    The stats are registered under a derived name (``cifar10:highpass0.5``) that both datasets then carry,
    because the training loop and ``normalize`` look the stats up by dataset name.
    """
    train_set, test_set = load_data(cfg)
    mode = cfg.figure.get("input_stats", "dataset")
    if mode not in ("dataset", "filtered"):
        raise ValueError(f"figure.input_stats={mode!r} is not valid; choose 'dataset' or 'filtered'")
    if mode == "dataset" or cfg.data.filter == "none":
        return train_set, test_set
    x = to_pixels(train_set.x, "cpu")
    mean = x.mean(dim=(0, 2, 3)).double()
    std = (x - mean.float().view(1, -1, 1, 1)).pow(2).mean(dim=(0, 2, 3)).double().sqrt()
    name = f"{train_set.name}:{cfg.data.filter}{float(cfg.data.cutoff):g}"
    DATASET_STATS[name] = (tuple(mean.tolist()), tuple(std.tolist()))
    info = {"input_mean": mean.tolist(), "input_std": std.tolist()}
    return tuple(D.Dataset(name, ds.split, ds.x, ds.y, ds.num_classes, ds.source, {**ds.info, **info})
                 for ds in (train_set, test_set))


def find_reusable_run(cfg) -> Path | None:
    """A completed run with a model.pt and the same training config, among the runs of the same profile of
    the figures in ``figure.reuse_from`` (fig5_4, fig5_5 and fig5_6 share their training settings)."""
    mine = training_config(cfg)
    for fid in cfg.figure.get("reuse_from") or ():
        for r in collect_runs(Path(cfg.results_dir) / fid / "runs" / cfg.profile.name):
            if r.ok and (r.path / "model.pt").exists() and training_config(r.config) == mine:
                return r.path
    return None


def train_or_reuse(cfg, run_dir: Path, after) -> dict:
    """``train_job(cfg, run_dir, after)``, unless another Chapter 5 figure already trained this exact model:
    then load its model.pt, copy its training scalars and run only ``after(model, train_set, test_set, summary)``."""
    src = find_reusable_run(cfg)
    train_set, test_set = load_ch5_data(cfg)
    if src is None:
        return {"reused_from": None, **train_job(cfg, run_dir, after=after, data=(train_set, test_set))}
    log.info("reusing the trained model of %s", src)
    results.update_status(run_dir, data_source=train_set.source, reused_model=str(src),
                          data_info={**train_set.info, "n_train": len(train_set), "n_test": len(test_set)})
    device = resolve_device(cfg.device)
    model = build_model(cfg, train_set.num_classes, in_channels=train_set.x.shape[1])
    model.load_state_dict(results.load_torch(src / "model.pt", map_location=device))
    model.to(device)
    prior = results.read_json(src / results.SUMMARY_FILE, {}) or {}
    summary = {k: v for k, v in prior.items() if k == "steps" or k == "K0" or k.startswith(("final_", "int_"))}
    summary.update({"data_source": train_set.source, **train_set.info, "reused_from": str(src)})
    summary.update(after(model, train_set, test_set, summary) or {})
    return summary


def data_notes(runs) -> list[str]:
    sources = {str(r.status.get("data_source")) for r in runs if r.status.get("data_source")}
    if any("jpeg" in s for s in sources):
        return ["Data: CIFAR-10 from the offline mirror, a JPEG re-encoding (quality ~75). JPEG quantisation removes "
                "part of the high-frequency content, so the data at high cutoffs holds less of it than the original "
                "CIFAR-10 would, which can flatten trends with the cutoff."]
    return []


def profile_notes(cfg, skip=()) -> list[str]:
    """What this profile changed against the paper profile (the thesis' settings), keys in ``skip`` left out."""
    if cfg.profile.name == "paper":
        return []
    paper, mine = cfg.figure.scales.paper, cfg.scale
    diffs = [f"{k} {mine[k]} (paper {paper[k]})" for k in paper if k in mine and mine[k] != paper[k] and k not in skip]
    return [f"profile {cfg.profile.name} changes against the thesis settings: " + "; ".join(diffs)] if diffs else []


def correlations(x, y) -> dict:
    """Pearson r and Spearman rho with two-sided p-values and n; NaN for n < 3 or a constant column.

    The Spearman p-value is a permutation p-value, exact over all n! orderings for n <= 8 and from 200,000
    seeded random orderings above ((hits + 1) / (draws + 1)): the usual t approximation is far off for a handful of sweep points (it
    gives ~1e-24 for rho = 1 at n = 5, where the exact value is 1/60).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    out = {"n": int(len(x)), "pearson": float("nan"), "pearson_p": float("nan"), "spearman": float("nan"),
           "spearman_p": float("nan")}
    if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
        out["pearson"], out["pearson_p"] = (float(v) for v in stats.pearsonr(x, y))
        out["spearman"], out["spearman_p"] = (float(v) for v in stats.spearmanr(x, y))
        rx, ry = stats.rankdata(x), stats.rankdata(y)
        if len(x) <= 8:
            orders = np.array(list(itertools.permutations(range(len(y)))))
        else:
            orders = np.argsort(np.random.default_rng(0).random((200_000, len(y))), axis=1)
        a, b = rx - rx.mean(), ry[orders] - ry.mean()
        rho = (b @ a) / (np.linalg.norm(a) * np.linalg.norm(b, axis=1))
        hits = int(np.sum(np.abs(rho) >= abs(out["spearman"]) - 1e-12))
        # exact: the share of orderings; sampled: (hits + 1) / (draws + 1), never 0
        out["spearman_p"] = hits / len(rho) if len(x) <= 8 else (hits + 1) / (len(rho) + 1)
    return out


def describe_correlation(c: dict) -> str:
    return (f"Pearson r = {c['pearson']:.3f} (p = {c['pearson_p']:.2g}), Spearman rho = {c['spearman']:.3f} "
            f"(permutation p = {c['spearman_p']:.2g}), n = {c['n']}")


def eval_pixels(ds, n: int | None, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n pixel images (in [0, 1] for unfiltered data) of ``ds`` with their labels, drawn by a seeded permutation:
    the mirror's CIFAR-10 is sorted by class, so the first n would all be one class."""
    idx = torch.arange(len(ds))
    if n is not None and int(n) < len(ds):
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[: int(n)]
    return to_pixels(ds.x[idx], device), ds.y[idx].to(device)


# ------------------------------------------------------------------ the figure
def lipschitz_scalars(cfg, run_dir: Path, model, test_set) -> dict:
    device = next(model.parameters()).device
    x, _ = eval_pixels(test_set, cfg.scale.n_lip, device)
    x = normalize(x, test_set.name)
    norms, infos = [], []
    for i in range(0, x.shape[0], 250):  # chunks bound the memory of the Jacobians
        nrm, info = input_jacobian_norms(model, x[i : i + 250], method=str(cfg.figure.lip_method),
                                         max_iter=int(cfg.scale.lip_iters), tol=float(cfg.figure.lip_tol))
        norms.append(nrm.cpu())
        infos.append(info)
    norms = torch.cat(norms).numpy()
    np.savez_compressed(run_dir / "lipschitz.npz", jac_norms=norms)
    sig = top_singular_values(model)
    return {
        "n_lip": len(norms),
        "K_emp_input": float(norms.max()),
        "K_input_median": float(np.median(norms)),
        "K_bound": k_emp(sig),
        "lip_method": infos[0]["method"],
        "lip_converged": all(i["converged"] for i in infos),
    }


def run(cfg, run_dir: Path) -> dict:
    return train_or_reuse(cfg, run_dir, after=lambda model, train_set, test_set, summary:
                     lipschitz_scalars(cfg, run_dir, model, test_set))


def aggregate(cfg, fig_dir: Path, runs) -> None:
    ok = [r for r in runs if r.ok and "K_emp_input" in r.summary]
    rows = [{
        "cutoff": float(r.get("data.cutoff")), "filter": r.get("data.filter"), "run": r.path.name,
        "test_acc": r.summary.get("final_test_acc"), "train_acc": r.summary.get("final_train_acc"),
        "K_emp_input": r.summary["K_emp_input"], "K_input_median": r.summary["K_input_median"],
        "K_bound": r.summary["K_bound"], "n_lip": r.summary["n_lip"], "lip_method": r.summary["lip_method"],
        "lip_converged": r.summary["lip_converged"], "steps": r.summary.get("steps"),
    } for r in ok]
    table = pd.DataFrame(rows).sort_values("cutoff") if rows else pd.DataFrame()
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.9))
    findings = []
    if len(table):
        c = table["cutoff"]
        axes[0].plot(c, table["K_emp_input"], "o-", label="max over test samples of ||J(x)||_2")
        axes[0].plot(c, table["K_input_median"], "s--", ms=4, label="median ||J(x)||_2")
        axes[0].set(xlabel="low-pass cutoff", ylabel="empirical Lipschitz constant", title="(a) empirical K")
        axes[1].plot(c, table["K_bound"], "o-", color="C3", label="prod_l sigma_1(W_l)")
        axes[1].set(xlabel="low-pass cutoff", ylabel="upper bound", yscale="log", title="(b) prod sigma_1")
        axes[2].plot(c, table["test_acc"], "o-", color="C2", label="test")
        axes[2].plot(c, table["train_acc"], "s--", ms=4, color="C2", alpha=0.6, label="train")
        axes[2].set(xlabel="low-pass cutoff", ylabel="accuracy", title="(c) accuracy")
        for ax in axes:
            ax.legend(fontsize=7)
        for key, label in (("K_emp_input", "empirical K (max ||J||)"), ("K_bound", "bound prod sigma_1"),
                           ("test_acc", "test accuracy")):
            findings.append(
                f"{label} vs cutoff: {describe_correlation(correlations(c, table[key]))}; from "
                f"{table[key].iloc[0]:.4g} at cutoff {c.iloc[0]:g} to {table[key].iloc[-1]:.4g} at cutoff {c.iloc[-1]:g}"
            )
        findings.append(f"empirical K vs bound across cutoffs: "
                        f"{describe_correlation(correlations(table['K_emp_input'], table['K_bound']))}; "
                        f"empirical <= bound in {int((table['K_emp_input'] <= table['K_bound']).sum())}/{len(table)} runs")
        findings.append(f"||J(x)||_2 by method {', '.join(sorted(set(table['lip_method'])))} (converged: "
                        f"{bool(table['lip_converged'].all())}); max over n = {int(table['n_lip'].iloc[0])} test images")
    fig.tight_layout()
    notes = data_notes(ok) + profile_notes(cfg) + [
        "||J(x)||_2 is the operator norm of the Jacobian of the logits with respect to the model input (the "
        "normalised image), where prod sigma_1 applies. sigma_1 of a convolution is that of its reshaped kernel "
        "(out x in*k*k, the thesis' convention); for strided 3x3 kernels the true operator norm can exceed it, while "
        "the 3x3 average pool contributes 1/3, so prod sigma_1 is the thesis' proxy rather than a strict bound.",
        "Training: " + ("SGD" if cfg.optim.name == "sgd" else cfg.optim.name) + f" lr {cfg.optim.lr}, momentum "
        f"{cfg.optim.momentum}, batch {cfg.data.batch_size}, {cfg.train.steps} steps, seeds init/sampling/data = "
        f"{cfg.seed.init}/{cfg.seed.sampling}/{cfg.seed.data}; the thesis states no epoch count (paper: 100 epochs, our choice).",
    ]
    write_outputs(cfg, fig_dir, fig, table, runs, findings or ["no completed run"], notes)
