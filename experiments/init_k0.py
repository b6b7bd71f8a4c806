"""Section 4.8.2: predicted K(0) = prod (sqrt m + sqrt n) s_l against measured K(0) over init seeds.

One job: ``lipexp.bounds.init_k0`` for every model in ``figure.models`` (the Chapter 4 ConvNet for CIFAR-10
and MLP for MNIST) and init in ``figure.inits`` (PyTorch's default U(+-1/sqrt n), s = 1/sqrt(3n); Kaiming
normal, s = sqrt(2/n)), with init seeds 0 .. ``scale.seeds``-1. No data is needed.
"""
from __future__ import annotations

import pandas as pd

from lipexp import bounds, models, plots_ch3, results

from .ch3 import pick_run, write_empty
from .common import write_outputs

RESULT = "init_k0.json"
BUILDERS = {"convnet": lambda: models.convnet(10, 3), "mlp": lambda: models.mlp(num_classes=10)}


def run(cfg, run_dir):
    results.update_status(run_dir, data_source="none (weights at initialisation)")
    out, summary = {}, {}
    for name in cfg.figure.models:
        if name not in BUILDERS:
            raise ValueError(f"figure.models: unknown model '{name}'; choose from {sorted(BUILDERS)}")
        for init in cfg.figure.inits:
            res = bounds.init_k0(BUILDERS[name], str(init), seeds=range(int(cfg.scale.seeds)))
            out[f"{name} {init}"] = res
            summary[f"ratio_{name}_{init}"] = res["network"]["ratio"]
    results.write_json(run_dir / RESULT, out)
    return summary


def aggregate(cfg, fig_dir, runs) -> None:
    r = pick_run(cfg, runs, RESULT, ("scale.seeds",))
    if r is None:
        return write_empty(cfg, fig_dir, runs)
    res = results.read_json(r.path / RESULT)
    fig = plots_ch3.plot_k0(res)
    rows, findings = [], []
    for label, v in res.items():
        model, init = label.split()
        for row in v["layers"]:
            rows.append({"model": model, "init": init, "layer": row["name"], "m": row["m"], "n": row["n"],
                         "std": row["std"], "predicted": row["predicted"], "measured_mean": row["measured_mean"],
                         "measured_std": row["measured_std"], "ratio": row["ratio"]})
        net = v["network"]
        rows.append({"model": model, "init": init, "layer": "K(0) = product", "predicted": net["predicted"],
                     "measured_mean": net["measured_mean"], "measured_std": net["measured_std"],
                     "ratio": net["ratio"]})
        ratios = [row["ratio"] for row in v["layers"]]
        findings.append(
            f"{model}, {init} init: K(0) predicted {net['predicted']:.4g}, measured {net['measured_mean']:.4g} "
            f"+- {net['measured_std']:.2g} over {net['seeds']} seeds (ratio {net['ratio']:.3f}); per-layer "
            f"measured/predicted sigma_1 {min(ratios):.3f}..{max(ratios):.3f}")
    notes = ["m x n is the weight matrix (Linear: out x in; Conv2d: out x in*kh*kw, the theory's reshaping); "
             "PyTorch's default init draws U(-1/sqrt n, 1/sqrt n), std s = 1/sqrt(3n); Kaiming normal "
             "(fan_in, ReLU gain) redraws every weight with std sqrt(2/n). Biases do not enter K.",
             "The limit (sqrt m + sqrt n) s holds for any i.i.d. entries with finite fourth moment (Bai-Yin), so it "
             "applies to the uniform default init too; for finite m, n the mean of sigma_1 lies slightly below it.",
             "K(0) here is the product of reshaped-weight sigma_1 (the theory's K), not the network's operator norm."]
    write_outputs(cfg, fig_dir, fig, pd.DataFrame(rows), runs, findings, notes)
