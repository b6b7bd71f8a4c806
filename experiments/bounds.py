"""Upper and lower Lipschitz bounds of a trained Chapter 4 ConvNet (``lipexp.bounds.bounds_table``).

One job: train the ConvNet of Table 4.1 on CIFAR-10 (``run_dir/train``, resumable), then on the first
``scale.samples`` test images compute per layer (a) sigma_1 of the reshaped weight, (a') the unfold bound,
(b) the operator norm on the layer's real input size, padding and stride (power iteration, tolerance
``scale.tol``), (c) an FFT bound, and for the network prod (a) = the theory's K, prod (b), the other layers'
factors, and lower bounds (max input-Jacobian norm over the images, gradient ascent of eq. 2.45).

Input space. The training loop standardises images before the model (``lipexp.data.normalize``), so the
model, and K, see normalised inputs: every bound of ``bounds_table`` is for that space. For pixel images in
[0, 1] the map is ``model o normalize`` with normalize = diag(1/std): upper bounds scale by 1/min(std)
exactly, and a lower bound L in normalised space gives L / max(std) in pixel space (the unit direction
D^-1 v / ||D^-1 v|| has gain >= L / max std). Both are reported.

(c) For a stride-1 circular convolution FFT gives its exact spectrum (Sedghi et al., 2019). The ConvNet
pads with zeros, so we use the FFT on the (H + 2p) x (W + 2p) grid instead: the zero-padded (and strided)
convolution is that circular convolution applied to the zero-embedded image, read at a subset of positions,
so its norm is at most the circular one's; (c) is an upper bound of (b), computed without iteration.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from lipexp import bounds, results
from lipexp.data import normalize
from lipexp.layers import weight_layers
from lipexp.models import DATASET_STATS
from lipexp.train import resolve_device, to_pixels, train

from . import plots
from .ch3 import blank, pick_run, write_empty
from .common import build_model, load_data, train_spec, write_outputs

LAYERS = "layers.csv"
NETWORK = "network.json"


def fft_bound(conv: nn.Conv2d, input_shape: tuple[int, int, int]) -> float:
    """(c): an FFT upper bound of the conv's operator norm on ``input_shape`` (exact for circular, stride 1).

    NaN where it does not apply (groups, dilation, string padding, reflect/replicate padding, strided
    circular padding).
    """
    if conv.groups != 1 or conv.dilation != (1, 1) or isinstance(conv.padding, str):
        return math.nan
    _, h, w = input_shape
    ph, pw = conv.padding
    if conv.padding_mode == "zeros":
        grid = (h + 2 * ph, w + 2 * pw)
    elif conv.padding_mode == "circular" and conv.stride == (1, 1) and all(
            2 * p == k - 1 for p, k in zip(conv.padding, conv.kernel_size)):
        grid = (h, w)
    else:
        return math.nan
    return float(bounds.circular_conv_singular_values(conv.weight, grid)[0])


def run(cfg, run_dir):
    device = resolve_device(cfg.device)
    train_set, test_set = load_data(cfg)
    results.update_status(run_dir, data_source=train_set.source)
    model = build_model(cfg, train_set.num_classes, train_set.x.shape[1])
    sub = run_dir / "train"
    # train() writes its summary before the weights are saved here: both must be there to reuse the run
    trained = results.read_json(sub / results.SUMMARY_FILE) if (sub / "model.pt").exists() else None
    if trained is None:
        trained = train(model, train_set, test_set, train_spec(cfg), sub, device)
        trained.pop("wall_time_s", None)
        torch.save(model.state_dict(), sub / "model.pt")
        results.write_json(sub / results.SUMMARY_FILE, trained)
    else:
        model.load_state_dict(results.load_torch(sub / "model.pt"))
    model = model.cpu().eval()

    n = min(int(cfg.scale.samples), len(test_set))
    x = normalize(to_pixels(test_set.x[:n], "cpu"), train_set.name)  # the model's own input space
    tab = bounds.bounds_table(model, x, tol=float(cfg.scale.tol), ascent_steps=int(cfg.scale.ascent_steps),
                              ascent_starts=int(cfg.scale.ascent_starts), seed=int(cfg.seed.sampling))
    convs = dict(weight_layers(model))
    rows = []
    for r in tab["layers"]:
        row = {k: (str(tuple(v)) if k == "input_shape" else v) for k, v in r.items()}
        if r["kind"] == "weight":
            m = convs[r["name"]]
            row["fft_bound"] = fft_bound(m, r["input_shape"]) if isinstance(m, nn.Conv2d) else r["op_norm"]
        rows.append(row)
    results.write_csv(run_dir / LAYERS, pd.DataFrame(rows))
    std = DATASET_STATS[train_set.name][1]
    s = dict(tab["summary"])
    s["K_fft"] = math.prod(r["fft_bound"] for r in rows if r["kind"] == "weight")
    s["upper_fft"] = s["K_fft"] * s["bn_factor"] * s["other_factor"]
    s.update(samples=n, tol=float(cfg.scale.tol), pixel_upper_scale=1.0 / min(std), pixel_lower_scale=1.0 / max(std),
             **{f"train_{k}": v for k, v in trained.items()})
    results.write_json(run_dir / NETWORK, s)
    return {k: v for k, v in s.items() if isinstance(v, (int, float, bool)) and not k.startswith("train_")}


# ---------------------------------------------------------------- table and figure
COLS = {"name": "layer", "kind": "kind", "type": "type", "input_shape": "input_shape", "sigma_matrix": "a_reshaped_sigma1",
        "unfold_factor": "unfold_factor", "unfold_bound": "a1_unfold_bound", "op_norm": "b_operator_norm",
        "b_over_a": "b_over_a", "fft_bound": "c_fft_bound", "iterations": "b_iterations", "factor": "factor",
        "lower_bound": "lower_bound", "note": "note"}


def _table(layers: pd.DataFrame, s: dict) -> pd.DataFrame:
    lay = layers[layers["type"] != "Identity"].copy()
    w = lay["kind"] == "weight"
    lay.loc[w, "unfold_factor"] = lay.loc[w, "unfold_bound"] / lay.loc[w, "sigma_matrix"]
    lay.loc[w, "b_over_a"] = lay.loc[w, "op_norm"] / lay.loc[w, "sigma_matrix"]
    up, lo = s["pixel_upper_scale"], s["pixel_lower_scale"]
    others = s["bn_factor"] * s["other_factor"]
    net = [
        {"name": "network: product over weights", "sigma_matrix": s["K_matrix"], "unfold_bound": s["K_unfold"],
         "op_norm": s["K_operator"], "fft_bound": s["K_fft"], "factor": others,
         "note": "prod (a) is the theory's K; factor = activations, pools, BatchNorm"},
        {"name": "network upper bound, normalised input", "sigma_matrix": s["upper_matrix"],
         "unfold_bound": s["upper_unfold"], "op_norm": s["upper_operator"], "fft_bound": s["upper_fft"],
         "note": "weights x factor; the (a) column is not a bound for convolutions"},
        {"name": "network upper bound, pixel input", "sigma_matrix": s["upper_matrix"] * up,
         "unfold_bound": s["upper_unfold"] * up, "op_norm": s["upper_operator"] * up, "fft_bound": s["upper_fft"] * up,
         "factor": up, "note": "x 1/min(std), the normalisation's Lipschitz constant"},
        {"name": "lower bound max Jacobian, normalised input", "lower_bound": s["lower_jacobian"],
         "note": f"max over {s['samples']} test images of ||J(x)||_2"},
        {"name": "lower bound ascent (eq 2.45), normalised input", "lower_bound": s["lower_ascent"],
         "note": "max ||f(a)-f(b)|| / ||a-b|| found by Adam"},
        {"name": "lower bound, pixel input", "lower_bound": s["lower"] * lo, "factor": lo,
         "note": "normalised-input lower bound x 1/max(std)"},
    ]
    df = pd.concat([lay, pd.DataFrame(net)], ignore_index=True)
    df["kind"] = df["kind"].fillna("network")
    return blank(df[[c for c in COLS if c in df.columns]].rename(columns=COLS))


def _figure(layers: pd.DataFrame, s: dict, metrics: pd.DataFrame | None):
    from matplotlib.ticker import NullFormatter

    fig, axes = plots.grid(3, ncols=3, size=(4.6, 3.6))
    w = layers[layers["kind"] == "weight"]
    x = np.arange(len(w))
    series = (("sigma_matrix", "(a) reshaped sigma_1"), ("unfold_bound", "(a') unfold bound"),
              ("op_norm", "(b) operator norm"), ("fft_bound", "(c) FFT bound"))
    for i, (col, label) in enumerate(series):
        axes[0].bar(x + (i - 1.5) * 0.2, w[col], 0.2, label=label)
    axes[0].set_xticks(x, w["name"], fontsize=7)
    axes[0].tick_params(labelsize=7)
    axes[0].set_title("per weight layer, on its input size", fontsize=8)
    axes[0].legend(fontsize=6)

    items = [("K = prod (a) x factors", s["upper_matrix"], "C0"), ("prod (a') x factors", s["upper_unfold"], "C1"),
             ("prod (b) x factors", s["upper_operator"], "C2"), ("prod (c) x factors", s["upper_fft"], "C3"),
             ("lower: max Jacobian", s["lower_jacobian"], "C4"), ("lower: ascent", s["lower_ascent"], "C5")]
    ax = axes[1]
    for i, (_, v, c) in enumerate(items):
        ax.plot([v], [i], "o", color=c, ms=7)
        ax.annotate(f"{v:.3g}", (v, i), xytext=(6, -3), textcoords="offset points", fontsize=7)
    ax.set_yticks(range(len(items)), [n for n, *_ in items], fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", labelsize=7)
    lo_, hi_ = min(v for _, v, _ in items), max(v for _, v, _ in items)
    ax.set_xlim(lo_ / 2, hi_ * 3)
    ax.axvspan(lo_ / 2, s["lower"], color="0.85", zorder=0)
    ax.set_title("network, normalised input (grey: at or below the best lower bound)", fontsize=8)

    ax = axes[2]
    if metrics is not None and "K_emp" in metrics:
        d = metrics.dropna(subset=["K_emp"])
        ax.plot(d["step"], d["K_emp"], label="K(t) = prod sigma_1 (reshaped)")
    last = s.get("train_steps", 0)
    for v, name, c in ((s["upper_operator"], "upper bound (b)", "C2"), (s["lower"], "lower bound", "C4")):
        ax.plot([last], [v], "o", color=c, label=f"{name} at the end")
    ax.set_yscale("log")
    ax.set_xlabel("step", fontsize=7)
    ax.tick_params(labelsize=7)
    ax.set_title("training: K(t), and the bounds at the end", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


MATCH = ("model.name", "data.name", "data.train_subset", "data.batch_size", "optim.lr", "optim.momentum",
         "train.steps", "seed.init", "seed.sampling", "scale.samples")


def aggregate(cfg, fig_dir, runs) -> None:
    r = pick_run(cfg, runs, NETWORK, MATCH)
    if r is None:
        return write_empty(cfg, fig_dir, runs)
    layers = pd.read_csv(r.path / LAYERS)
    s = results.read_json(r.path / NETWORK)
    metrics = results.read_metrics(r.path / "train")
    fig = _figure(layers, s, metrics if len(metrics) else None)
    table = _table(layers, s)
    w = layers[layers["kind"] == "weight"]
    conv = w[w["type"] == "Conv2d"]
    up, lo = s["pixel_upper_scale"], s["pixel_lower_scale"]
    ok = s["lower"] <= s["upper_operator"] * (1 + 1e-6) if not math.isnan(s["upper_operator"]) else None
    K, lower = s["K_matrix"], s["lower"]
    findings = [
        f"ConvNet trained {s['train_steps']} steps (SGD lr {r.get('optim.lr')}, momentum {r.get('optim.momentum')}, "
        f"batch {r.get('data.batch_size')}) on {r.get('data.train_subset') or 'all'} CIFAR-10 images: test accuracy "
        f"{s.get('train_final_test_acc', float('nan')):.3f}, K = prod sigma_1 {s.get('train_K0', float('nan')):.4g} -> "
        f"{s.get('train_final_K_emp', float('nan')):.4g}",
        "convolutions, (b) true operator norm / (a) reshaped sigma_1: " + ", ".join(
            f"{n} {b / a:.3g}" for n, a, b in zip(conv["name"], conv["sigma_matrix"], conv["op_norm"]))
        + " -- the reshaped sigma_1 " + ("underestimates" if (conv["op_norm"] > conv["sigma_matrix"]).any()
                                          else "does not underestimate") + " the layer's norm",
        "checks per convolution, (b) <= (a') and (b) <= (c): " + ", ".join(
            f"{n} (a')/(b) {a1 / b:.3g}, (c)/(b) {c / b:.6g}" for n, a1, b, c in zip(
                conv["name"], conv["unfold_bound"], conv["op_norm"], conv["fft_bound"]))
        + (" -- both hold" if ((conv["unfold_bound"] >= conv["op_norm"]) & (conv["fft_bound"] >= conv["op_norm"])).all()
           else " -- VIOLATED"),
        f"network, normalised input (the space the model and K see): K = prod (a) = {K:.4g}; upper bounds "
        f"prod (b) x factors = {s['upper_operator']:.4g}, prod (c) x factors = {s['upper_fft']:.4g}, "
        f"prod (a') x factors = {s['upper_unfold']:.4g} (factors {s['other_factor'] * s['bn_factor']:.3g}); "
        f"lower bounds: max Jacobian norm over {s['samples']} test images {s['lower_jacobian']:.4g}, ascent "
        f"{s['lower_ascent']:.4g}; lower <= upper: {ok}",
        f"the theory's K = {K:.4g} is {'BELOW' if K < lower else 'above'} the measured lower bound {lower:.4g} "
        f"(K / lower = {K / lower:.3g}): " + (
            "here K is not an upper bound of the network's Lipschitz constant" if K < lower else
            "on this run K stays above the lower bound, but for conv nets K is no guaranteed upper bound: "
            f"(b)/(a) > 1 per convolution, prod (b) / prod (a) = {s['K_operator'] / K:.3g} here, so a network whose "
            "Lipschitz constant came within that factor of prod (b) would have K below its measured lower bounds"),
        f"pixel input in [0, 1]: K x 1/min(std) = {K * up:.4g}, upper (b) = {s['upper_operator'] * up:.4g}, "
        f"lower bound >= {lower * lo:.4g} (normalised lower x 1/max(std) = {lo:.3f})",
    ]
    notes = [
        "Columns: (a) sigma_1 of the weight reshaped to out x in*kh*kw (theory.md §1); unfold_factor sqrt(c) with c "
        "the most patch entries reading one pixel, (a') = sqrt(c) (a) >= (b); (b) operator norm of the layer as a "
        f"linear map on its input shape, padding and stride (block power iteration, relative residual tol "
        f"{s['tol']:g}; it never overestimates); (c) FFT bound (module docstring): exact for circular stride-1 "
        "convolutions, an upper bound of (b) for zero padding; Linear layers: (a) = (b) = (c).",
        "Factors: ReLU 1, MaxPool2d(2, 2) 1 (disjoint windows); the table leaves out Identity rows (switched-off "
        "Dropout/BatchNorm). Bounds are l2, in eval mode; biases do not change a Lipschitz constant.",
        "Lower bounds: lipexp.bounds.jacobian_norms (power iteration with jvp/vjp, float64) at the test images, and "
        "lipexp.bounds.lipschitz_ascent (pairs at distance 1e-3, Adam, unconstrained in normalised space) from the "
        f"{r.get('scale.ascent_starts')} images of largest Jacobian norm, {r.get('scale.ascent_steps')} steps.",
        "CIFAR-10 from the offline mirror is a JPEG re-encoding (quality ~75) when the data source says so.",
    ]
    write_outputs(cfg, fig_dir, fig, table, runs, findings, notes)
