"""Prop. 5.3.3: K_f and int K_zeta of a Gaussian bump on R^2, closed forms against numerics (no training).

K_f by finite differences on a grid, int K_zeta by a Riemann sum over a zero-padded 2-D FFT; the radial
profile K_zeta(|zeta|) from the FFT is saved next to the closed form for the plot.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lipexp import fourier, results

from .common import write_outputs


def run(cfg, run_dir: Path) -> dict:
    s = cfg.scale
    alphas = [float(a) for a in s.alphas]
    rows = fourier.gaussian_table(alphas, fd_points=int(s.fd_points), fft_points=int(s.fft_points), pad=int(s.pad))
    table = pd.DataFrame(rows)
    results.write_parquet(run_dir / "table.parquet", table)
    profiles = {}
    for a in alphas:  # K_zeta along the zeta_1 axis of the FFT grid (the transform is radial)
        zeta_norm, fhat, _ = fourier.gaussian_fft(a, int(s.fft_points), pad=int(s.pad))
        z, mag = zeta_norm[: zeta_norm.shape[0] // 2, 0], fhat[: fhat.shape[0] // 2, 0]
        profiles[f"zeta_{a}"], profiles[f"K_{a}"] = z, 2 * math.pi * z * mag
    np.savez_compressed(run_dir / "profiles.npz", **profiles)
    return {
        "n_alphas": len(alphas),
        "max_abs_K_f_rel_err": float(table["K_f_rel_err"].abs().max()),
        "max_abs_bound_rel_err": float(table["bound_rel_err"].abs().max()),
        "max_fhat_err": float(table["fhat_max_err"].max()),
        "ratio_K_over_bound": float(table["ratio_K_over_bound"].mean()),
    }


def aggregate(cfg, fig_dir: Path, runs) -> None:
    ok = [r for r in runs if r.ok and (r.path / "table.parquet").exists()]
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.9))
    if not ok:
        write_outputs(cfg, fig_dir, fig, pd.DataFrame(), runs, ["no completed run"])
        return
    run = max(ok, key=lambda r: r.status.get("finished") or "")  # the latest run, if several
    table = pd.read_parquet(run.path / "table.parquet")
    prof = np.load(run.path / "profiles.npz")
    a_fine = np.geomspace(table["a"].min() / 2, table["a"].max() * 2, 200)
    ax = axes[0]
    ax.plot(a_fine, np.sqrt(2 * a_fine / math.e), "C0-", lw=1, label="K_f = sqrt(2a/e)")
    ax.plot(a_fine, np.sqrt(math.pi * a_fine), "C1-", lw=1, label="int K_zeta = sqrt(pi a)")
    ax.plot(table["a"], table["K_f_fd"], "C0o", ms=5, mfc="none", label="K_f, finite differences")
    ax.plot(table["a"], table["bound_fft"], "C1s", ms=5, mfc="none", label="int K_zeta, 2-D FFT")
    ax.set(xscale="log", yscale="log", xlabel="a", title="(a) K_f and the spectral bound")
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, a in enumerate(table["a"]):
        z, k = prof[f"zeta_{a}"], prof[f"K_{a}"]
        zf = np.geomspace(0.05 * math.sqrt(a) / math.pi, z.max(), 400)
        ax.plot(zf, fourier.gaussian_k_zeta(zf, a), color=f"C{i}", lw=1, label=f"a = {a:g}")
        ax.plot(z[1:], k[1:], ".", color=f"C{i}", ms=2)
    ax.set(xscale="log", xlabel="|zeta|", ylabel="K_zeta", title="(b) K_zeta: closed form (lines), FFT (dots)")
    ax.set_xlim(0.05 * math.sqrt(table["a"].min()) / math.pi, 4 * math.sqrt(table["a"].max()) / math.pi)
    ax.legend(fontsize=6)
    ax = axes[2]
    ax.plot(table["a"], table["K_f_rel_err"].abs(), "C0o-", label="|K_f rel. error|")
    ax.plot(table["a"], table["bound_rel_err"].abs(), "C1s-", label="|int K_zeta rel. error|")
    ax.plot(table["a"], table["fhat_max_err"], "C2^-", label="max |f^ - closed form| / f^(0)")
    ax.set(xscale="log", yscale="log", xlabel="a", title="(c) numerical errors")
    ax.legend(fontsize=7)
    fig.tight_layout()
    ratio = math.sqrt(2 / (math.pi * math.e))
    findings = [
        f"K_f by finite differences matches sqrt(2a/e) to a relative error of at most "
        f"{table['K_f_rel_err'].abs().max():.2e} over a in {{{', '.join(f'{a:g}' for a in table['a'])}}} "
        f"({int(run.config.scale.fd_points)}^2 grid)",
        f"int K_zeta by a 2-D FFT Riemann sum matches sqrt(pi a) to at most {table['bound_rel_err'].abs().max():.2e} "
        f"relative; the FFT transform matches the closed form f^ to {table['fhat_max_err'].max():.2e} of f^(0)",
        f"the bound holds for every a: measured K_f / int K_zeta between {(table['K_f_fd'] / table['bound_fft']).min():.5f} "
        f"and {(table['K_f_fd'] / table['bound_fft']).max():.5f} (closed form sqrt(2/(pi e)) = {ratio:.5f}, independent of a)",
    ]
    notes = [
        "Both grids scale with 1/sqrt(a) (extent fixed in units of the bump's width), so the discretisation "
        "errors are the same for every a, as the table shows.",
        "Thesis erratum: eq. 5.35 states int K_zeta = sqrt(a); the proof (eq. 5.50) and these numerics give sqrt(pi a).",
    ]
    write_outputs(cfg, fig_dir, fig, table, runs, findings, notes)
