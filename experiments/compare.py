"""``lipexp compare``: one table and one overlay plot across runs or whole sweeps.

    lipexp compare results/fig4_2/runs/quick results/fig4_8/runs/quick \
        --metrics max_rel_err final_K_emp --curves K_emp K_pred --out results/compare_reg

Each argument is a run directory (it has ``config.yaml``, or ``spec.json`` when ``lipexp.train.train``
made it) or a folder of them. The table has one row per run: its name, status, the swept config keys that
differ between runs, and the chosen summary metrics; it is printed and saved as ``compare.csv``; the
chosen per-step curves of all runs share ``compare.png``. A metric or curve that no run has is an error
naming the valid ones, closest first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from lipexp import results

from .common import IGNORED_KEYS as NOT_RESULT_KEYS
from .common import Run, collect_runs
from .schema import closest_first

DEFAULT_METRICS = ["max_rel_err", "final_K_emp", "final_K_pred", "final_test_acc"]
DEFAULT_CURVES = ["K_emp", "K_pred"]
# Paths, bookkeeping flags and the figure's prose (title, claim, per-profile scales) differ between figures
# without being settings of the runs; as columns they would bury the swept keys.
IGNORED_KEYS = ("results_dir", "progress", "force", "resume", "spec.progress", *sorted(NOT_RESULT_KEYS))
SPEC_FILE = "spec.json"  # the run file of lipexp.train.train (lipexp.train.SPEC_FILE)


def fail(msg: str) -> None:
    """One line on stderr and exit status 2 (a usage error)."""
    print(f"lipexp compare: {msg}", file=sys.stderr)
    sys.exit(2)


def spec_run(d: Path) -> Run:
    """A run made by ``lipexp.train.train`` (no config.yaml): its TrainSpec stands for the config, as ``spec.*``."""
    spec = results.read_json(d / SPEC_FILE, {}) or {}
    return Run(d, OmegaConf.create({"spec": spec}), results.read_status(d),
               results.read_json(d / results.SUMMARY_FILE, {}) or {})


def _runs_in(folder: Path) -> list[Run]:
    found = collect_runs(folder)
    have = {r.path for r in found}
    found += [spec_run(p.parent) for p in sorted(folder.glob(f"*/{SPEC_FILE}")) if p.parent not in have]
    return sorted(found, key=lambda r: r.path.name)


def find_runs(paths: list[str | Path]) -> list[Run]:
    runs: list[Run] = []
    for p in map(Path, paths):
        if (p / "config.yaml").exists():
            runs += [r for r in collect_runs(p.parent) if r.path == p]
        elif (p / SPEC_FILE).exists():
            runs.append(spec_run(p))
        elif p.is_dir():  # a sweep folder, or a figure's runs/ folder with one level of profiles
            runs += _runs_in(p) or [r for d in sorted(p.iterdir()) if d.is_dir() for r in _runs_in(d)]
        else:
            fail(f"{p} is neither a run directory (with config.yaml or spec.json) nor a folder of runs")
    if not runs:
        fail(f"no runs found under {', '.join(map(str, paths))}")
    return runs


def check_names(kind: str, asked: list[str], valid: set[str]) -> None:
    """Exit with one line when a name in ``asked`` is none of ``valid``, listing the valid ones closest first."""
    for name in asked:
        if name not in valid:
            ranked = closest_first(name, sorted(valid))
            shown = ", ".join(ranked[:10]) + (f", ... ({len(ranked)} in all)" if len(ranked) > 10 else "")
            fail(f"unknown {kind} '{name}': no run has it; valid {kind}s (closest first): {shown or 'none'}")


def choose(kind: str, asked: list[str] | None, default: list[str], valid: set[str]) -> list[str]:
    """The names asked for (each must exist in some run), or the defaults that exist."""
    if asked is None:
        return [n for n in default if n in valid]
    check_names(kind, asked, valid)
    return asked


def differing_keys(runs: list[Run]) -> list[str]:
    """Dotted config keys whose values differ between the runs (the swept ones)."""
    flat = [pd.json_normalize(OmegaConf.to_container(r.config, resolve=False)).iloc[0].to_dict() for r in runs]
    keys = sorted(set().union(*flat))
    return [k for k in keys if not k.startswith(IGNORED_KEYS) and len({str(f.get(k)) for f in flat}) > 1]


def comparison_table(runs: list[Run], metrics: list[str]) -> pd.DataFrame:
    keys = differing_keys(runs)
    rows = []
    for r in runs:
        row = {"run": str(r.path), "status": r.status.get("status")}
        row.update({k: r.get(k) for k in keys})
        row.update({m: r.summary.get(m) for m in metrics})
        rows.append(row)
    return pd.DataFrame(rows)


def overlay(runs: list[Run], curves: list[str], out: Path, x: str = "step") -> None:
    from . import plots

    fig, axes = plots.grid(len(curves), ncols=2, size=(5.5, 3.6))
    for ax, col in zip(axes, curves):
        for r in runs:
            df = r.metrics
            if col in df:
                d = df.dropna(subset=[col])
                ax.plot(d[x], d[col], lw=1, label=r.path.name[:40])
        ax.set_title(col)
        ax.set_xlabel(x)
        if ax.lines:
            ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(out, dpi=130)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(prog="lipexp compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--metrics", nargs="*", default=None,
                    help=f"summary scalars (summary.json); default: those of {' '.join(DEFAULT_METRICS)} the runs have")
    ap.add_argument("--curves", nargs="*", default=None,
                    help="per-step columns (metrics.parquet) to overlay; default: K_emp K_pred where present")
    ap.add_argument("--out", default="results/compare")
    args = ap.parse_args(argv)
    runs = find_runs(args.paths)
    args.metrics = choose("metric", args.metrics, DEFAULT_METRICS, set().union(*(r.summary for r in runs)))
    args.curves = choose("curve", args.curves, DEFAULT_CURVES, set().union(*(r.metrics.columns for r in runs)))
    table = comparison_table(runs, args.metrics)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results.write_csv(out / "compare.csv", table)
    if args.curves:
        overlay(runs, args.curves, out / "compare.png")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.to_string(index=False))
    print(f"\nsaved {out / 'compare.csv'}" + (f" and {out / 'compare.png'}" if args.curves else ""))
    return table


if __name__ == "__main__":
    main()
