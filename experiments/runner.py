"""The ``lipexp`` command: one Hydra main for every figure.

``lipexp figure=<id> ...`` runs one job of the figure (a training run, or a computation) in
``results/<id>/runs/<profile>/<overrides>/`` and rebuilds the figure from all saved runs of that profile;
``lipexp -m ...`` runs the figure's sweep (``hydra.sweeper.params`` in its config, or yours) and
aggregates once at the end. ``lipexp list`` prints the figures.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from . import schema

log = logging.getLogger("lipexp")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _run_name(override_dirname: str) -> str:
    """Run directory name from the job's overrides ('default' when there are none)."""
    name = override_dirname.replace("/", "_") or "default"
    return name[:200]


def _gpus_available() -> int:
    import torch

    return torch.cuda.device_count()


for _name, _fn in (("run_name", _run_name), ("gpus_available", _gpus_available)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
schema.register()
# Our launcher files keep the plugins' names (submitit_slurm, ...) and so match their schemas on purpose.
warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema with the same name")


def figure_module(figure_id: str):
    """The experiments module of a figure (``experiments/<id>.py``)."""
    try:
        return importlib.import_module(f"experiments.{figure_id}")
    except ModuleNotFoundError as err:
        if err.name != f"experiments.{figure_id}":
            raise
        raise schema.ConfigError(
            f"figure '{figure_id}' has no module experiments/{figure_id}.py; run `lipexp list` for the figures"
        ) from err


def list_figures() -> list[tuple[str, str]]:
    """(id, title) of every figure config under conf/figure/."""
    out = []
    for path in sorted((CONF_DIR / "figure").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text()) or {}
        out.append((path.stem, str(doc.get("figure", {}).get("title", ""))))
    return out


def figure_dir(cfg: DictConfig) -> Path:
    return Path(cfg.results_dir) / cfg.figure.id


def profile_runs_dir(cfg: DictConfig) -> Path:
    return figure_dir(cfg) / "runs" / cfg.profile.name


def profile_output_dir(cfg: DictConfig) -> Path:
    """Where the figure of this profile goes: one folder per profile, so that a smoke run never
    overwrites the quick or paper figure (the gallery shows the best profile there is)."""
    return figure_dir(cfg) / cfg.profile.name


def aggregate(cfg: DictConfig) -> None:
    """Rebuild the figure (figure.png/pdf, summary.csv/md) from every saved run of this profile."""
    from .common import collect_runs

    module = figure_module(cfg.figure.id)
    runs = collect_runs(profile_runs_dir(cfg))
    if not runs:
        log.warning("no runs under %s: nothing to aggregate", profile_runs_dir(cfg))
        return
    module.aggregate(cfg, profile_output_dir(cfg), runs)
    log.info("figure written to %s", profile_output_dir(cfg))


class AggregateOnMultirunEnd(Callback):
    """Hydra callback: after a sweep, aggregate the figure once over all its runs; a sweep whose every job
    was a config error (``-m ... threads=0``) exits with status 2, like the same error in a single run."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        try:
            aggregate(config)
        except Exception:  # the runs are saved; a plotting problem must not hide that
            log.exception("aggregation failed; the runs are saved, rerun with aggregate_only=true")
        reasons = invalid_sweep_reasons(profile_runs_dir(config), getattr(self, "started", None))
        if reasons:
            print(f"lipexp: no job of the sweep ran: {reasons[0]}", file=sys.stderr)
            sys.exit(2)


CONFIG_ERROR_FILE = "config_error.json"  # a sweep job's config error; a saved run in that folder is left as it is


def invalid_sweep_reasons(runs_dir: Path, since: float | None) -> list[str]:
    """The config errors recorded under ``runs_dir`` at or after ``since`` if no job started there since
    (every job of the sweep was invalid); else an empty list."""
    from lipexp import results

    if since is None or not runs_dir.is_dir():
        return []

    def recent(path: Path) -> bool:
        return path.stat().st_mtime >= since - 1.0  # file times may lag the clock by a tick

    errors = [p for p in runs_dir.glob(f"*/{CONFIG_ERROR_FILE}") if recent(p)]
    started = [p for p in runs_dir.glob(f"*/{results.STATUS_FILE}")
               if recent(p) and p.with_name(CONFIG_ERROR_FILE) not in errors]
    if not errors or started:
        return []
    out = []
    for path in errors:
        try:
            out.append(str((results.read_json(path) or {}).get("reason", "config error")))
        except results.RunFileError:
            out.append("config error")
    return out


def _record_invalid_job(cfg: DictConfig, err: Exception) -> None:
    """One invalid combination in a sweep (e.g. ``model=mlp`` with ``data=cifar10``) is saved as an
    ``invalid`` run with the reason, so that the other jobs and the figure's aggregation still happen. A
    folder that already holds a run (keys outside the run name, such as ``threads``, map a bad value onto
    a saved run) keeps its config and status: only ``config_error.json`` is written there."""
    from lipexp import results

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results.write_json(run_dir / CONFIG_ERROR_FILE, {"reason": f"config error: {err}"})
    if results.read_status(run_dir).get("status") not in (None, "invalid"):
        log.error("config error, job not run (the sweep goes on; the saved run in %s is untouched): %s", run_dir, err)
        return
    try:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    except Exception:  # the error may lie in an interpolation itself: keep the config as written
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=False)
    results.update_status(run_dir, status="invalid", reason=f"config error: {err}", profile=cfg.profile.name)
    log.error("config error, job not run (the sweep goes on): %s", err)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from .common import run_job

    try:
        schema.validate(cfg)
        module = figure_module(cfg.figure.id)
    except schema.ConfigError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            _record_invalid_job(cfg, err)
            return None
        print(f"lipexp: config error: {err}", file=sys.stderr)
        sys.exit(2)
    if cfg.aggregate_only:
        aggregate(cfg)
        return None
    if cfg.threads is not None:  # a figure's default (Chapter 3: small matrices) or threads=1 for parallel jobs
        import torch

        torch.set_num_threads(int(cfg.threads))
    from lipexp import results

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    (run_dir / CONFIG_ERROR_FILE).unlink(missing_ok=True)  # an earlier sweep's bad value, now fixed
    try:
        summary = run_job(cfg, module, run_dir)
    except results.InputError as err:  # a locked run dir, a corrupt run file: one line, nothing touched
        if multirun:
            log.error("job not run (the sweep goes on): %s", err)
            return None
        print(f"lipexp: {err}", file=sys.stderr)
        sys.exit(2)
    if not multirun:
        try:
            aggregate(cfg)
        except Exception:
            log.exception("aggregation failed; the run is saved, rerun with aggregate_only=true")
        status = results.read_status(run_dir)
        if status.get("status") != "completed":  # a diverged single run is a failed command
            print(f"lipexp: run {status.get('status')}: {status.get('reason')}", file=sys.stderr)
            sys.exit(1)
    return summary.get("max_rel_err") if summary else None


def cli() -> None:
    """Console entry point: ``lipexp list``, ``lipexp compare ...`` or the Hydra main."""
    if len(sys.argv) > 1 and sys.argv[1] == "compare":
        from .compare import main as compare_main

        compare_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "list":
        width = max(len(i) for i, _ in list_figures())
        for fid, title in list_figures():
            print(f"{fid:<{width}}  {title}")
        return
    overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    info_only = any(a in ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i") or a.startswith("--info")
                    for a in sys.argv[1:])
    try:
        schema.check_override_keys(overrides)
        if not info_only:
            _check_writable(_override_value(overrides, "results_dir", "results"))
    except schema.ConfigError as err:
        print(f"lipexp: config error: {err}", file=sys.stderr)
        sys.exit(2)
    main()


def _override_value(overrides: list[str], key: str, default: str) -> str:
    for a in reversed(overrides):
        k, _, v = a.partition("=")
        if k.lstrip("+") == key:
            return v
    return default


def _check_writable(folder: str) -> None:
    """A results folder that cannot be written is one line before Hydra tries to create run dirs in it
    (a write attempt, not permission bits: those say nothing for root or read-only mounts)."""
    import tempfile

    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".lipexp-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise schema.ConfigError(
            f"cannot write to the results folder {path} ({err.strerror or err}); choose a writable folder "
            "with results_dir=<path>"
        ) from None


if __name__ == "__main__":
    cli()
