"""Fig. 4.2: observed vs predicted K(t) for the ConvNet on CIFAR-10/100 under four regularisers, with an
out-of-sample check (other sampling seeds predicted from one seed's terms) and a forward prediction."""
from __future__ import annotations

import pandas as pd

from . import ch4
from .common import train_job, write_outputs

run = train_job
LABELS = {"dataset": "data.name", "regularizer": "train.regularizer"}


def aggregate(cfg, fig_dir, runs) -> None:
    key = lambda r: (str(r.get("data.name")), str(r.get("train.regularizer")))  # noqa: E731
    runs = sorted(runs, key=lambda r: (*key(r), r.get("seed.sampling") or 0))
    table = pd.DataFrame([ch4.run_row(r, {**LABELS, "sampling_seed": "seed.sampling"}) for r in runs])
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    primary = [g[0] for g in groups.values()]  # the lowest sampling seed of each configuration
    fig = ch4.validation_panels(primary, LABELS, others=[g[1:] for g in groups.values()])
    findings = ch4.rel_err_findings(table[table["sampling_seed"] == table["sampling_seed"].min()], list(LABELS))
    ok = [r for r in primary if r.ok and "K_emp" in r.metrics]
    if ok:
        flips = [r for r in ok if ch4.non_monotone_early(r.metrics)]
        findings.append(f"K_emp changes direction within the first 50 steps in {len(flips)} of {len(ok)} runs")
    if "max_rel_err_2nd" in table:
        done = table[table["status"] == "completed"]
        findings.append(f"second-order path (mu + mu2): max rel. error median {done['max_rel_err_2nd'].median():.3g}, "
                        f"worst {done['max_rel_err_2nd'].max():.3g} over {len(done)} runs")
    for (ds, reg), g in groups.items():
        frames = {r.get("seed.sampling"): r.metrics.dropna(subset=["K_emp"]).set_index("step")
                  for r in g if r.ok and "K_emp" in r.metrics}
        oos = {sde: ch4.out_of_sample(frames, sde) for sde in ("thesis", "second_order")}
        findings += ch4.out_of_sample_findings(oos, f"{ds}, {reg}: ")
        sel = (table["dataset"] == ds) & (table["regularizer"] == reg)
        for sde, res in oos.items():
            if res is not None:
                sfx = "" if sde == "thesis" else "_2nd"
                table.loc[sel, f"oos_z_rms{sfx}"] = res["z_rms"]
                table.loc[sel, f"oos_coverage{sfx}"] = res["coverage"]
    if "oos_z_rms" in table and table["oos_z_rms"].notna().any():
        zr = table.groupby("regularizer")["oos_z_rms"].first().dropna()
        if cfg.data.sampling == "shuffle":
            per_epoch = int(cfg.data.train_subset or 50000) // int(cfg.data.batch_size)
            findings.append(
                f"reading the out-of-sample lines: these runs use shuffled epochs ({per_epoch} batches each; "
                f"{int(cfg.train.steps)} steps = {int(cfg.train.steps) / per_epoch:.1f} epochs), whose batches "
                "cover the training set once per epoch, so the first-order sampling noise cancels at each epoch's "
                "end; the held-out seeds then stay well inside the SDE's band wherever z rms << 1.41, which does "
                "not confirm the predicted spread (fig4_4 tests it with iid batches)")
        for reg, z in zr.items():
            if z > 3:
                why = (" Mixup draws one mixing coefficient per batch (and a random partner permutation): "
                       "batch-level noise that the within-batch covariance of the per-sample gradients does not "
                       "see, so the SDE's Var[K] leaves it out." if reg == "mixup" else "")
                findings.append(f"{reg}: the held-out seeds fall outside the predicted band (z rms {z:.2f} against "
                                f"1.41): the prediction fails out of sample.{why}")
    fwd = [(f"{r.get('data.name')}, {r.get('train.regularizer')}, seed {r.get('seed.sampling')}",
            ch4.forward_prediction(r.metrics, float(cfg.optim.lr)) if r.ok and "mu_Z" in r.metrics else None)
           for r in runs]
    findings += ch4.forward_findings(fwd)
    for (_, f), i in zip(fwd, table.index):
        for k, v in (f or {}).items():
            table.loc[i, k] = v
    notes = [
        ch4.IN_SAMPLE_NOTE,
        "Steps: the thesis' text says 39,000 steps = 200 epochs (its Fig. 4.2 caption says 30,000); the paper "
        "profile uses 39,000.",
        "BatchNorm (track_running_stats=False) couples the samples of a batch; per-sample terms are defined by "
        "backpropagating the summed loss (theory.md §2). K(t) ignores BatchNorm's scaling, as the thesis does.",
    ]
    if any(len(g) > 1 for g in groups.values()):
        notes.append("Panels show the lowest sampling seed of each configuration with its prediction; grey lines are "
                     "the held-out seeds (same init) that the out-of-sample lines predict from each other.")
    else:
        notes.append("One sampling seed per configuration here, so of the two checks only the forward prediction "
                     "applies (fig4_2 and fig4_4 run several seeds for the out-of-sample one).")
    notes += ch4.sampling_note(cfg) + ch4.scale_note(cfg)
    write_outputs(cfg, fig_dir, fig, table, runs, findings, notes)
