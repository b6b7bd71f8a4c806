"""Fig. 4.1: loss and Lipschitz landscapes over a random plane through theta_0, with two SGD paths.

One job: train from one initialisation under each sampling seed (snapshots along the way), then evaluate
the loss and K = prod sigma_1 on a grid of the plane spanned by two seeded, filter-normalised, orthogonal
random directions through theta_0, and project the trajectories onto it (with the share of each path the
plane cannot show).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from lipexp import landscape, results
from lipexp.data import normalize
from lipexp.layers import k_emp, top_singular_values
from lipexp.train import SNAPSHOTS_FILE, resolve_device, to_pixels, train

from . import plots
from .common import build_model, load_data, train_spec, write_outputs

GRID_FILE = "landscape.npz"


def run(cfg, run_dir):
    device = resolve_device(cfg.device)
    train_set, test_set = load_data(cfg)
    results.update_status(run_dir, data_source=train_set.source)
    init = build_model(cfg, train_set.num_classes, train_set.x.shape[1])
    theta0 = landscape.flat_params(init)
    out, summary = {}, {"data_source": train_set.source}
    for s in cfg.figure.sampling_seeds:
        sub = run_dir / f"sampling_seed{s}"
        c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        c.seed.sampling = int(s)
        done = results.read_json(sub / results.SUMMARY_FILE)
        if done is None:
            model = build_model(c, train_set.num_classes, train_set.x.shape[1])
            done = train(model, train_set, test_set, train_spec(c), sub, device)
            results.write_json(sub / results.SUMMARY_FILE, done)
        snaps = results.load_torch(sub / SNAPSHOTS_FILE)
        out[f"steps_{s}"] = np.array([-1] + [st for st, _ in snaps])  # -1 marks theta_0
        out[f"traj_{s}"] = torch.stack([theta0.float()] + [v for _, v in snaps]).numpy()
        summary[f"K_final_seed{s}"] = done["final_K_emp"]
        summary["K0"] = done["K0"]

    n = min(int(cfg.scale.eval_samples), len(train_set))
    x = normalize(to_pixels(train_set.x[:n], "cpu"), train_set.name)
    loss_fn = landscape.make_loss_fn([(x, train_set.y[:n])])
    k_fn = lambda m: k_emp(top_singular_values(m))  # noqa: E731
    init.to("cpu")
    trajs = {s: torch.from_numpy(out[f"traj_{s}"]).double() for s in cfg.figure.sampling_seeds}
    g = int(cfg.scale.grid)
    # (a) the plane of the thesis' figure: two random filter-normalised orthogonal directions through theta_0
    d1, d2 = landscape.random_directions(init, seed=int(cfg.figure.direction_seed))
    span = float(cfg.figure.get("span", 1.0))
    axes = np.linspace(-span, span, g)
    out.update(_plane("random", init, theta0, d1, d2, axes, axes, loss_fn, k_fn, trajs, summary))
    # (b) the plane through theta_0 and the two end points, where both paths are visible
    ends = [trajs[s][-1] - theta0 for s in cfg.figure.sampling_seeds]
    e1 = ends[0] / ends[0].norm()
    e2 = ends[-1] - (ends[-1] @ e1) * e1
    e2 = e2 / e2.norm() if e2.norm() > 0 else torch.roll(e1, 1)
    length = max(float(e.norm()) for e in ends)
    axes = np.linspace(-0.3 * length, 1.3 * length, g)
    out.update(_plane("endpoints", init, theta0, e1, e2, axes, axes, loss_fn, k_fn, trajs, summary))
    np.savez(run_dir / GRID_FILE, **out)
    return summary


def _plane(tag, model, theta0, d1, d2, alphas, betas, loss_fn, k_fn, trajs, summary) -> dict:
    """Loss and K over ``theta0 + a d1 + b d2`` and each trajectory's plane coordinates (arrays keyed by tag)."""
    out = {f"{tag}_alphas": alphas, f"{tag}_betas": betas,
           f"{tag}_loss": landscape.landscape_grid(model, loss_fn, d1, d2, alphas, betas, centre=theta0),
           f"{tag}_K": landscape.landscape_grid(model, k_fn, d1, d2, alphas, betas, centre=theta0)}
    for s, traj in trajs.items():
        coords, resid = landscape.project_trajectory(traj, d1, d2, theta0)
        out[f"{tag}_coords_{s}"] = coords
        summary[f"{tag}_in_plane_share_end_seed{s}"] = float(1.0 - resid[-1])
        summary[f"distance_end_seed{s}"] = float((traj[-1] - theta0).norm() / theta0.norm())
    summary.update({f"{tag}_loss_min": float(out[f"{tag}_loss"].min()), f"{tag}_loss_max": float(out[f"{tag}_loss"].max()),
                    f"{tag}_K_min": float(out[f"{tag}_K"].min()), f"{tag}_K_max": float(out[f"{tag}_K"].max())})
    return out


def aggregate(cfg, fig_dir, runs) -> None:
    r = next((r for r in runs if r.ok and (r.path / GRID_FILE).exists()), None)
    fig, axes = plots.grid(6, ncols=3, size=(4.6, 4.0))
    findings, rows = [], []
    if r is not None:
        z = np.load(r.path / GRID_FILE)
        sd = r.summary
        seeds = [int(k.rsplit("_", 1)[1]) for k in z.files if k.startswith("random_coords_")]
        planes = (("random", "random filter-normalised plane"), ("endpoints", "plane through theta_0, theta_A, theta_B"))
        for row, (tag, name) in enumerate(planes):
            for col, (key, what) in enumerate((("loss", "loss"), ("K", "K = prod sigma1"))):
                ax = axes[3 * row + col]
                cs = ax.contourf(z[f"{tag}_alphas"], z[f"{tag}_betas"], z[f"{tag}_{key}"].T, levels=20, cmap="viridis")
                fig.colorbar(cs, ax=ax, fraction=0.046)
                for s in seeds:
                    c = z[f"{tag}_coords_{s}"]
                    ax.plot(c[:, 0], c[:, 1], "-", lw=1.2, label=f"sampling seed {s}")
                    ax.plot(c[-1, 0], c[-1, 1], "o", ms=4)
                ax.plot(0, 0, "w*", ms=8, label="theta_0")
                ax.set_title(f"{what}: {name}", fontsize=7)
                ax.set_xlabel("alpha", fontsize=7)
                ax.set_ylabel("beta", fontsize=7)
            axes[3 * row].legend(fontsize=5)
            findings.append(
                f"{name}: loss {sd[f'{tag}_loss_min']:.3g}..{sd[f'{tag}_loss_max']:.3g}, K {sd[f'{tag}_K_min']:.4g}.."
                f"{sd[f'{tag}_K_max']:.4g}; share of each path's displacement in the plane: "
                + ", ".join(f"seed {s}: {sd[f'{tag}_in_plane_share_end_seed{s}']:.3g}" for s in seeds))
        for s in seeds:
            m = results.read_metrics(r.path / f"sampling_seed{s}").dropna(subset=["K_emp"])
            axes[2].plot(m["t"], m["K_emp"], label=f"seed {s}")
            axes[5].plot(m["t"], m["loss"].rolling(5, min_periods=1).mean(), label=f"seed {s}")
            rows.append({"sampling_seed": s, "K0": sd["K0"], "K_final": sd[f"K_final_seed{s}"],
                         "relative_distance_from_theta0": sd[f"distance_end_seed{s}"],
                         "in_random_plane_share": sd[f"random_in_plane_share_end_seed{s}"],
                         "in_endpoint_plane_share": sd[f"endpoints_in_plane_share_end_seed{s}"]})
        axes[2].set_title("K along each trajectory", fontsize=8)
        axes[5].set_title("training loss along each trajectory", fontsize=8)
        for ax in (axes[2], axes[5]):
            ax.set_xlabel("t")
            ax.legend(fontsize=6)
        findings.insert(0, f"K_0 = {sd['K0']:.4g}; after training " + ", ".join(
            f"K = {x['K_final']:.4g} (seed {x['sampling_seed']}, moved {x['relative_distance_from_theta0']:.3g} of "
            f"|theta_0|)" for x in rows))
    fig.tight_layout()
    write_outputs(cfg, fig_dir, fig, pd.DataFrame(rows), runs, findings or ["no completed run"],
                  notes=["Random directions: Li et al. (2018) filter normalisation, biases and norm parameters not "
                         "moved, orthogonalised filter by filter (lipexp.landscape.random_directions). Such directions "
                         "are nearly orthogonal to an SGD path, so the paths project close to theta_0 there; the second "
                         "row uses the plane through theta_0 and both end points, which contains them.",
                         "The thesis' Fig. 4.1 is an illustration without stated settings; lr 0.01 makes the paths "
                         "long enough to see in the quick profile."])
