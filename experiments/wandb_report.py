"""Build a W&B Report comparing the runs of a figure or sweep (``wandb-workspaces`` reports API).

    python -m experiments.wandb_report --figure fig4_2 --entity me            # create the report online
    python -m experiments.wandb_report --figure fig4_5 --dry-run              # print its structure, no network

Runs are those logged with ``logger=wandb`` (group = figure id). They are grouped by the figure's swept
keys (its ``hydra.sweeper.params``; ``--group-by`` overrides), with line panels K_emp vs K_pred and the
network terms, and scalar panels of the run summaries. Offline runs are uploaded first with
``wandb sync results/<figure>/runs/<profile>/*/wandb/offline-run-*``.
"""
from __future__ import annotations

import argparse
import json
import sys

import yaml

from .runner import CONF_DIR

LINE_PANELS = [
    ("Lipschitz bound: observed vs predicted", ["K_emp", "K_pred"]),
    ("log K: observed vs predicted", ["Z_emp", "Z_pred"]),
    ("Network drift, noise-curvature, diffusion", ["mu_Z", "kappa_Z", "lambda2_Z"]),
    ("Training loss", ["loss"]),
    ("Accuracy", ["train_acc", "test_acc"]),
]
SCALARS = ["max_rel_err", "final_K_emp", "final_K_pred", "final_test_acc"]


def swept_keys(figure_id: str) -> list[str]:
    path = CONF_DIR / "figure" / f"{figure_id}.yaml"
    if not path.exists():
        raise SystemExit(f"no figure config {path}; see `lipexp list`")
    doc = yaml.safe_load(path.read_text()) or {}
    return list(((doc.get("hydra") or {}).get("sweeper") or {}).get("params", {}) or {})


def report_spec(figure_id: str, project: str = "lipexp", entity: str | None = None,
                group_by: list[str] | None = None, title: str | None = None) -> dict:
    """The report as plain data: what ``build_report`` turns into wandb-workspaces objects."""
    doc = yaml.safe_load((CONF_DIR / "figure" / f"{figure_id}.yaml").read_text()) or {}
    fig = doc.get("figure", {})
    keys = group_by if group_by is not None else swept_keys(figure_id)
    return {
        "project": project,
        "entity": entity,
        "title": title or f"lipexp {figure_id}: {fig.get('title', '')}",
        "description": str(fig.get("claim", "")),
        "runset": {"name": figure_id, "filter": {"group": figure_id}, "groupby": [f"config.{k}" for k in keys]},
        "line_panels": [{"title": t, "x": "Step", "y": ys} for t, ys in LINE_PANELS],
        "scalar_panels": [{"title": s, "metric": f"summary.{s}"} for s in SCALARS],
    }


def build_report(spec: dict):
    import wandb_workspaces.reports.v2 as wr

    runset = wr.Runset(
        entity=spec["entity"] or "",
        project=spec["project"],
        name=spec["runset"]["name"],
        filters=f"Metric(\"Group\") == \"{spec['runset']['filter']['group']}\"",
        groupby=[g.removeprefix("config.") for g in spec["runset"]["groupby"]],
    )
    panels = [wr.LinePlot(title=p["title"], x=p["x"], y=p["y"]) for p in spec["line_panels"]]
    panels += [wr.ScalarChart(title=p["title"], metric=wr.SummaryMetric(p["metric"].removeprefix("summary.")))
               for p in spec["scalar_panels"]]
    return wr.Report(
        project=spec["project"],
        entity=spec["entity"] or "",
        title=spec["title"],
        description=spec["description"],
        blocks=[wr.H1(spec["title"]), wr.P(spec["description"]), wr.PanelGrid(runsets=[runset], panels=panels)],
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--figure", required=True)
    ap.add_argument("--project", default="lipexp")
    ap.add_argument("--entity", default=None)
    ap.add_argument("--group-by", nargs="*", default=None, help="config keys to group runs by")
    ap.add_argument("--title", default=None)
    ap.add_argument("--dry-run", action="store_true", help="print the report structure; no network")
    args = ap.parse_args(argv)
    spec = report_spec(args.figure, args.project, args.entity, args.group_by, args.title)
    report = build_report(spec)  # builds offline; only save() talks to W&B
    if args.dry_run:
        print(json.dumps(spec, indent=2))
        return
    try:
        report.save()
    except Exception as err:  # not logged in, no network, unknown entity
        sys.exit(f"could not save the W&B report ({err}); run `wandb login` (or set WANDB_API_KEY) and pass --entity")
    print(report.url)


if __name__ == "__main__":
    main()
