"""Table 2.1: closed-form Lipschitz constants of activations against a numerical supremum by autograd.

One job: the rows of ``lipexp.activations.table2_1`` with the profile's search sizes (``scale.points`` grid
points of phi' by autograd in float64, then ``scale.steps`` Adam steps from the best ones; softmax: the l2
norm of its Jacobian at ``scale.softmax_samples`` random logit vectors, then Adam), plus the curves |phi'(x)|
for the figure.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from lipexp import activations, results

from . import plots
from .ch3 import pick_run, write_empty
from .common import write_outputs

ROWS = "rows.csv"
CURVES = "curves.npz"
THESIS = {"ReLU": "1", "LeakyReLU": "max(1, a)", "Sigmoid": "1/4", "Tanh": "1", "Softplus": "1",
          "ELU": "max(1, a)", "Swish/SiLU": "~1.1", "GELU": "~1.1", "Softmax": "1/2"}


def _modules(cfg) -> list[tuple[str, nn.Module]]:
    """The activations of ``activations.table2_1`` with the config's parameters, named as its rows are."""
    mods: list[tuple[str, nn.Module]] = [("ReLU", nn.ReLU())]
    mods += [(f"LeakyReLU(a={a:g})", nn.LeakyReLU(a)) for a in cfg.figure.leaky_slopes]
    mods += [("Sigmoid", nn.Sigmoid()), ("Tanh", nn.Tanh()), ("Softplus", nn.Softplus())]
    mods += [(f"ELU(a={a:g})", nn.ELU(a)) for a in cfg.figure.elu_alphas]
    return mods + [("Swish/SiLU", nn.SiLU()), ("GELU", nn.GELU())]


def _curves(cfg) -> dict[str, np.ndarray]:
    r = float(cfg.figure.curve_range)
    x = torch.linspace(-r, r, 2001, dtype=torch.float64, requires_grad=True)
    out = {"x": x.detach().numpy()}
    for name, mod in _modules(cfg):
        (d,) = torch.autograd.grad(mod(x).sum(), x)
        out[name] = d.abs().numpy()
    # softmax along one direction: logits (t, 0, -30, ..., -30), where the sup 1/2 is reached at t = 0
    dim = int(cfg.figure.softmax_dim)
    z = torch.full((x.numel(), dim), -30.0, dtype=torch.float64)
    z[:, 0], z[:, 1] = x.detach(), 0.0
    out["Softmax"] = activations.softmax_jacobian_norm(z).numpy()
    return out


def run(cfg, run_dir):
    results.update_status(run_dir, data_source="none (scalar functions)")
    sc = cfg.scale
    rows = []
    for name, mod in _modules(cfg):
        c = activations.closed_form(mod)
        v = activations.numerical_sup_derivative(mod, points=int(sc.points), steps=int(sc.steps))
        rows.append({"name": name, "closed_form": c, "numerical": v, "abs_err": abs(c - v)})
    dim = int(cfg.figure.softmax_dim)
    v = activations.numerical_softmax_lipschitz(dim, samples=int(sc.softmax_samples), steps=int(sc.softmax_steps))
    rows.append({"name": f"Softmax(d={dim})", "closed_form": 0.5, "numerical": v, "abs_err": abs(0.5 - v)})
    df = pd.DataFrame(rows)
    results.write_csv(run_dir / ROWS, df)
    np.savez(run_dir / CURVES, **_curves(cfg))
    return {"max_abs_err": float(df["abs_err"].max())}


def aggregate(cfg, fig_dir, runs) -> None:
    r = pick_run(cfg, runs, ROWS, ())
    if r is None:
        return write_empty(cfg, fig_dir, runs)
    df = pd.read_csv(r.path / ROWS)
    df.insert(1, "thesis", [THESIS.get(n.split("(")[0], "") for n in df["name"]])
    df = df.rename(columns={"name": "activation"})
    z = np.load(r.path / CURVES)
    fig, axes = plots.grid(len(df), ncols=4, size=(3.2, 2.4))
    for ax, row in zip(axes, df.itertuples(index=False)):
        key = "Softmax" if row.activation.startswith("Softmax") else row.activation
        ax.plot(z["x"], z[key], lw=1.2, label="|phi'(x)|" if key != "Softmax" else "||J(t, 0, -30, ...)||_2")
        ax.axhline(row.closed_form, color="k", ls="--", lw=0.9, label=f"closed form {row.closed_form:.6g}")
        ax.axhline(row.numerical, color="C3", ls=":", lw=1.2, label=f"numerical sup {row.numerical:.6g}")
        ax.set_title(f"{row.activation} (thesis {row.thesis})", fontsize=8)
        ax.set_xlabel("x" if key != "Softmax" else "t (logit gap)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5, loc="lower right" if key in ("Sigmoid", "Softmax", "GELU", "Swish/SiLU") else "best")
    fig.tight_layout()
    worst = df.loc[df["abs_err"].idxmax()]
    get = lambda prefix: df[df["activation"].str.startswith(prefix)].iloc[0]  # noqa: E731
    findings = [
        f"largest |closed form - numerical sup| over {len(df)} activations: {worst['abs_err']:.3g} ({worst['activation']})",
        f"Sigmoid: numerical sup {get('Sigmoid')['numerical']:.10g} (closed form 1/4); "
        f"Softmax (d={int(cfg.figure.softmax_dim)}): {get('Softmax')['numerical']:.10g} (closed form 1/2, approached "
        "from below: the sup is not attained at finite logits)",
        f"Swish: closed form {get('Swish')['closed_form']:.10g}, numerical {get('Swish')['numerical']:.10g}; "
        f"GELU: closed form {get('GELU')['closed_form']:.10g}, numerical {get('GELU')['numerical']:.10g} "
        "(the thesis gives ~1.1 for both)",
        "Leaky ReLU and ELU with a = 2: " + ", ".join(
            f"{n} numerical {v:.10g}" for n, v in zip(df["activation"], df["numerical"]) if "a=2" in n),
    ]
    sc = r.config.scale
    notes = [f"Numerical sup: autograd derivative on a float64 grid of {sc.points:,} points in [-30, 30], then "
             f"{sc.steps} Adam steps on |phi'| from the 5 best grid points (lipexp.activations.numerical_sup_derivative); "
             f"for softmax, the top eigenvalue of its (symmetric) Jacobian at {sc.softmax_samples:,} random logit "
             f"vectors, then {sc.softmax_steps} Adam steps (numerical_softmax_lipschitz).",
             "Swish: sup of s(x) + x s(x)(1 - s(x)) at the root of 2 + x(1 - 2 s(x)) = 0 (x ~ 2.3994); GELU: "
             "Phi(sqrt 2) + 1/(e sqrt(pi)) at x = sqrt 2.",
             "The plot's softmax panel follows one direction, logits (t, 0, -30, ...), where the norm peaks at t = 0."]
    write_outputs(cfg, fig_dir, fig, df, runs, findings, notes)
