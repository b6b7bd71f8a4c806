"""Fig. 4.4: K(t) from one initialisation under several mini-batch sampling seeds."""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import ch4, plots
from .common import train_job, write_outputs

run = train_job


def aggregate(cfg, fig_dir, runs) -> None:
    ok = [r for r in runs if r.ok and "K_emp" in r.metrics]
    table = pd.DataFrame([ch4.run_row(r, {"sampling_seed": "seed.sampling", "init_seed": "seed.init"}) for r in runs])
    fig, (ax,) = plots.grid(1, size=(7, 4.5))
    findings = []
    if ok:
        frames = {r.get("seed.sampling"): r.metrics.dropna(subset=["K_emp"]).set_index("step") for r in ok}
        k = pd.DataFrame({s: f["K_emp"] for s, f in frames.items()}).dropna()
        for s in k.columns:
            ax.plot(frames[s]["t"].reindex(k.index), k[s], lw=1, label=f"sampling seed {s}")
        pred = pd.DataFrame({s: f["K_pred"] for s, f in frames.items()}).reindex(k.index)
        std = np.sqrt(pd.DataFrame({s: f["VarK_pred"] for s, f in frames.items()}).reindex(k.index).mean(axis=1))
        t = frames[k.columns[0]]["t"].reindex(k.index)
        ax.fill_between(t, pred.mean(axis=1) - std, pred.mean(axis=1) + std, alpha=0.2, color="k", lw=0,
                        label="mean K_pred ± predicted std")
        ax.set_xlabel("t = step x lr")
        ax.set_ylabel("K_emp")
        ax.legend(fontsize=7, loc="lower right")  # K rises left to right: the upper left is free for the inset
        at = int(cfg.scale.inset_at)
        win = k[(k.index >= at) & (k.index < at + 50)]
        if len(win):
            sub = plots.inset(ax, (0.08, 0.52, 0.4, 0.38))
            for s in win.columns:
                sub.plot(win.index, win[s], lw=0.8)
            sub.set_title(f"steps {at}-{at + 49}", fontsize=6)
        end = k.iloc[-1]
        obs_std = float(end.std(ddof=1)) if len(end) > 1 else float("nan")
        findings = [
            f"{len(ok)} sampling seeds from init seed {ok[0].get('seed.init')}: final K_emp mean {end.mean():.5g}, "
            f"std across seeds {obs_std:.3g} ({obs_std / end.mean() * 100:.3f}% of the mean)",
            f"predicted std sqrt(Var[K]) at the end (mean over seeds) = {float(std.iloc[-1]):.3g}; "
            f"observed / predicted = {obs_std / float(std.iloc[-1]):.3g}",
            f"largest spread across seeds over the run: {float((k.max(axis=1) - k.min(axis=1)).max()):.3g} "
            f"(relative {float(((k.max(axis=1) - k.min(axis=1)) / k.mean(axis=1)).max()) * 100:.3f}%)",
        ]
        table["final_K_emp_std_across_seeds"] = obs_std
        table["predicted_std_end"] = float(std.iloc[-1])
        if "VarK_pred_2nd" in frames[k.columns[0]]:
            std2 = np.sqrt(pd.DataFrame({s: f["VarK_pred_2nd"] for s, f in frames.items()}).reindex(k.index).mean(axis=1))
            findings.append(f"second order (cross-layer lambda2): predicted std at the end {float(std2.iloc[-1]):.3g}; "
                            f"observed / predicted = {obs_std / float(std2.iloc[-1]):.3g} (the observed std of {len(end)} "
                            f"seeds is itself uncertain by about {100 / np.sqrt(2 * (len(end) - 1)):.0f}%)")
            table["predicted_std_end_2nd"] = float(std2.iloc[-1])
        # out of sample: one seed's terms predict the other seeds' K(t)
        src = k.columns[0]
        ek, sd = frames[src]["EK_pred"].reindex(k.index), np.sqrt(frames[src]["VarK_pred"].reindex(k.index))
        ax.plot(t, ek + 1.96 * sd, color="C3", lw=0.7, ls=":", label=f"95% band from seed {src}'s terms alone")
        ax.plot(t, ek - 1.96 * sd, color="C3", lw=0.7, ls=":")
        ax.legend(fontsize=7, loc="lower right")
        oos = {sde: ch4.out_of_sample(frames, sde) for sde in ("thesis", "second_order")}
        findings += ch4.out_of_sample_findings(oos, "")
        for sde, res in oos.items():
            if res is not None:
                sfx = "" if sde == "thesis" else "_2nd"
                table[f"oos_z_rms{sfx}"], table[f"oos_coverage{sfx}"] = res["z_rms"], res["coverage"]
                table[f"oos_z_mean{sfx}"] = res["z_mean"]
        fwd = [(f"sampling seed {r.get('seed.sampling')}", ch4.forward_prediction(r.metrics, float(cfg.optim.lr)))
               for r in ok]
        findings += ch4.forward_findings(fwd)
        for (label, f), r in zip(fwd, ok):
            for key, val in (f or {}).items():
                table.loc[table["sampling_seed"] == r.get("seed.sampling"), key] = val
    notes = [ch4.IN_SAMPLE_NOTE, *ch4.sampling_note(cfg), *ch4.scale_note(cfg)]
    write_outputs(cfg, fig_dir, fig, table, runs, findings or ["no completed run"], notes=notes)
