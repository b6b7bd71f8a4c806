"""What every figure shares: config -> data/model/TrainSpec, the job wrapper, run collection, outputs."""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lipexp import data as D
from lipexp import frequency, models, results
from lipexp.train import Diverged, Interrupted, TrainSpec, on_signals, resolve_device, train

log = logging.getLogger("lipexp")


# ---------------------------------------------------------------- config -> objects
def load_data(cfg: DictConfig) -> tuple[D.Dataset, D.Dataset]:
    """Train and test sets of ``cfg.data`` with subsets, label corruption and frequency filtering applied."""
    kw = dict(root=cfg.data.root, mirror=cfg.data.mirror, download=cfg.data.download, cache_dir=cfg.data.cache_dir)
    train_set = D.load_dataset(cfg.data.name, "train", **kw)
    test_set = D.load_dataset(cfg.data.name, "test", **kw)
    train_set = D.subset(train_set, cfg.data.train_subset, seed=cfg.seed.data)
    test_set = D.subset(test_set, cfg.data.test_subset, seed=cfg.seed.data + 1)
    if cfg.data.label_noise > 0:
        y, info = D.corrupt_labels(train_set.y, cfg.data.label_noise, train_set.num_classes, seed=cfg.seed.data)
        train_set = D.with_labels(train_set, y, info)
    if cfg.data.filter != "none":
        train_set, test_set = (filter_dataset(ds, cfg.data.filter, cfg.data.cutoff) for ds in (train_set, test_set))
    return train_set, test_set


def filter_dataset(ds: D.Dataset, kind: str, cutoff: float, chunk: int = 5000) -> D.Dataset:
    """Low/high-pass filter every image in pixel space; the result is float (high-pass leaves [0, 1])."""
    fn = frequency.lowpass if kind == "lowpass" else frequency.highpass
    x = torch.cat([fn(ds.x[i : i + chunk].float().div(255), cutoff) for i in range(0, len(ds), chunk)])
    return D.Dataset(ds.name, ds.split, x, ds.y, ds.num_classes, ds.source, {**ds.info, "filter": kind, "cutoff": cutoff})


def build_model(cfg: DictConfig, num_classes: int, in_channels: int = 3) -> torch.nn.Module:
    """The model of ``cfg.model``, initialised from ``seed.init`` alone."""
    torch.manual_seed(cfg.seed.init)
    name = cfg.model.name
    if name == "convnet":
        return models.convnet(num_classes, in_channels, dropout=cfg.model.dropout, batchnorm=cfg.model.batchnorm)
    if name == "mlp":
        return models.mlp(num_classes=num_classes)
    if name == "convnet_ch5":
        return models.convnet_ch5(num_classes, in_channels)
    if name == "mlp_ch5":
        return models.mlp_ch5(num_classes)
    raise ValueError(f"unknown model '{name}'")


def train_spec(cfg: DictConfig) -> TrainSpec:
    t = cfg.train
    return TrainSpec(
        steps=t.steps,
        lr=cfg.optim.lr,
        batch_size=cfg.data.batch_size,
        sampling=cfg.data.sampling,
        optimizer=cfg.optim.name,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        mixup_alpha=t.mixup_alpha,
        label_smoothing=t.label_smoothing,
        fgsm_eps=t.fgsm_eps,
        autoaugment=t.autoaugment,
        grad_rho=t.grad_rho,
        grad_noise=t.grad_noise,
        tracker=cfg.tracker.mode,
        split=cfg.tracker.split,
        log_every=t.log_every,
        eval_every=t.eval_every,
        eval_samples=t.eval_samples,
        checkpoint_every=t.checkpoint_every,
        snapshot_every=t.snapshot_every,
        sampling_seed=cfg.seed.sampling,
        aux_seed=cfg.seed.sampling + 7919,
        spectral_reg=t.regularizer if t.regularizer in ("spectral_gap", "alignment") else "none",
        reg_beta=t.reg.beta,
        reg_reduce=t.reg.reduce,
        reg_sign=t.reg.sign,
        reg_iters=t.reg.iters,
        progress=cfg.progress and sys.stderr.isatty(),
    )


# ---------------------------------------------------------------- loggers
class WandbLogger:
    """One W&B run per job: group = figure, name = run; offline when no API key is configured.

    The run starts at the first logged row, so a job that fails before training leaves no W&B run. Its
    id is fixed per run directory and attempt: a resumed run continues the same W&B run (rows reach
    ``log`` once they are on disk, so no step is logged twice), while a run redone from scratch (after
    ``force=true`` or archived files) gets a new id instead of logging its steps over the old ones.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir, self.run = cfg, run_dir, None

    def _start(self):
        import wandb

        cfg, run_dir = self.cfg, self.run_dir
        mode = cfg.logger.mode
        if mode == "auto":
            mode = "online" if _wandb_has_key() else "offline"
        attempt = len(list(run_dir.glob("previous-*")))
        run_id = hashlib.sha1(f"{run_dir.resolve()}#{attempt}".encode()).hexdigest()[:16]
        self.run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=cfg.figure.id,
            job_type=cfg.profile.name,
            name=run_dir.name,
            tags=list(cfg.logger.tags) + [cfg.profile.name],
            config=OmegaConf.to_container(cfg, resolve=True),
            dir=str(run_dir),
            mode=mode,
            id=run_id,
            resume="allow",
        )

    def log(self, row: dict) -> None:
        if self.run is None:
            self._start()
            self._replay_before(int(row["step"]))
        self._send(row)

    def _send(self, row: dict) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))

    def _replay_before(self, step: int) -> None:
        """Send the rows on disk before ``step`` that W&B does not have yet.

        A resumed job logs from its checkpoint on; the rows before it were sent by the killed attempt,
        except what was still in flight when it died (W&B buffers in its own process). Online, the server
        says how far it got (``run.step``); offline, the earlier attempts' files of this run id say it."""
        df = results.read_metrics(self.run_dir)
        if not len(df):
            return
        df = df[df["step"] < step]
        if self.run.settings.mode == "offline":
            have = set()
            for f in self.run_dir.glob(f"wandb/offline-run-*-{self.run.id}/run-{self.run.id}.wandb"):
                if Path(self.run.dir).resolve().parent != f.parent.resolve():
                    have |= set(wandb_logged_steps(f))
            df = df[~df["step"].isin(have)]
        else:
            df = df[df["step"] >= self.run.step]
        for rec in df.to_dict("records"):
            self._send({k: v for k, v in rec.items() if not (isinstance(v, float) and v != v)})

    def finish(self, summary: dict | None = None, exit_code: int = 0) -> None:
        if self.run is None:
            return
        if summary:
            self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        self.run.finish(exit_code=exit_code)


def wandb_logged_steps(path: Path) -> list[int]:
    """The steps of the history records in a W&B run file (``run-<id>.wandb``), in file order.

    The file is W&B's record log (what ``wandb sync`` uploads): a 7-byte header, then 32 KiB blocks of
    records (4-byte checksum, 2-byte length, 1-byte type: full, first, middle, last) holding protobuf
    ``Record`` messages. A file cut off by a kill ends at its last whole record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        return []
    steps, pos, block, buf = [], 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # too little room for a record header: the writer padded to the next block
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if len(chunk) < length:
            break
        if kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind in (1, 4):
            rec = pb.Record()
            try:
                rec.ParseFromString(buf + chunk if kind == 4 else chunk)
            except Exception:
                break
            if rec.WhichOneof("record_type") == "history":
                steps.append(int(rec.history.step.num))
    return steps


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


# ---------------------------------------------------------------- one job
def provenance(cfg: DictConfig) -> dict:
    return {
        **results.git_info(),
        **results.environment_info(),
        "figure": cfg.figure.id,
        "profile": cfg.profile.name,
        "seeds": OmegaConf.to_container(cfg.seed, resolve=True),
        "device": str(resolve_device(cfg.device)),
    }


# What determines a run's numbers (where the data lives, the logger or the wording of a claim do not).
RESULT_KEYS = ("figure", "scale", "model", "data", "optim", "train", "tracker", "noise", "seed")
IGNORED_KEYS = {"figure.title", "figure.claim", "figure.scales", "data.root", "data.mirror", "data.download",
                "data.cache_dir"}


def _flat(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: node}


def _schema_defaults() -> dict[str, Any]:
    from . import schema

    structured = OmegaConf.to_container(OmegaConf.structured(schema.Config), resolve=False)
    return {k: v for key in RESULT_KEYS if isinstance(structured.get(key), dict) for k, v in
            _flat(structured[key], key).items()}


def config_changes(old: DictConfig, new: DictConfig) -> list[str]:
    """Dotted keys whose values differ between a run's saved config and the one asked for now.

    A key the saved config lacks counts as its schema default: a run made before a setting existed ran
    with the behaviour its default keeps, so adding a setting does not make every old run stale."""
    def flat(cfg):
        out = {}
        for key in RESULT_KEYS:
            if key in cfg:
                out.update(_flat(OmegaConf.to_container(cfg[key], resolve=True), key))
        return {k: v for k, v in out.items() if not any(k == i or k.startswith(i + ".") for i in IGNORED_KEYS)}
    a, b = flat(old), flat(new)
    defaults = _schema_defaults()
    missing = object()
    return sorted(k for k in a.keys() | b.keys()
                  if a.get(k, defaults.get(k, missing)) != b.get(k, defaults.get(k, missing)))


def run_job(cfg: DictConfig, module, run_dir: Path) -> dict:
    """Run one job of a figure in ``run_dir`` with status bookkeeping; returns the run's summary.

    The run directory is locked for the whole job (a second process on it fails at once). A completed
    run is not redone while its result files are all there and readable (``force=true`` redoes it,
    keeping the old files); an unfinished one resumes from its checkpoint unless ``resume=false``. A
    diverged or crashed job records why in ``status.json``; inside a sweep the other jobs go on.
    """
    with results.lock_run_dir(run_dir), _signals_interrupt():
        return _run_job(cfg, module, run_dir)


def _reuse_check(cfg: DictConfig, run_dir: Path) -> tuple[dict, str | None]:
    """The saved status, and why the saved attempt cannot stand for this command (None if it can)."""
    status = results.read_status(run_dir)
    saved = run_dir / "config.yaml"
    if not status:
        return status, None
    if saved.exists():
        try:
            old = OmegaConf.load(saved)
        except Exception as err:
            raise results.RunFileError(saved, f"not valid YAML: {str(err).splitlines()[0][:160]}") from None
        changed = config_changes(old, cfg)
        if changed:
            # Same run directory, different settings (e.g. an edited profile): the old results no longer
            # answer this command, so they are archived, never reused or resumed.
            return status, "made with other settings (" + ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "") + ")"
    if status.get("status") == "completed":
        files = status.get("files") or ["config.yaml", results.SUMMARY_FILE]
        problems = [p for p in (results.file_problem(run_dir / f) for f in files) if p]
        if problems:
            return status, "marked completed, but " + "; ".join(problems)
    return status, None


def _run_job(cfg: DictConfig, module, run_dir: Path) -> dict:
    if cfg.force:
        results.archive_previous(run_dir)
        status = {}
    else:
        status, stale = _reuse_check(cfg, run_dir)
        if stale:
            log.warning("%s was %s; archiving it and starting afresh", run_dir, stale)
            results.archive_previous(run_dir)
            status = {}
    if status.get("status") == "completed":
        log.info("%s already completed; skipping (force=true reruns it)", run_dir)
        return results.read_json(run_dir / results.SUMMARY_FILE, {}) or {}
    if not cfg.resume and status:
        results.archive_previous(run_dir)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    results.update_status(
        run_dir, status="running", reason=None, traceback=None, started=results.now_iso(), **provenance(cfg)
    )
    job = getattr(module, "run", train_job)
    log.info("%s: %s (profile %s, seeds %s)", cfg.figure.id, run_dir, cfg.profile.name,
             OmegaConf.to_container(cfg.seed, resolve=True))
    t0 = time.time()
    try:
        summary = job(cfg, run_dir)
    except D.DataUnavailable as err:
        results.update_status(run_dir, status="skipped", reason=str(err))
        if _in_multirun():
            log.error("skipped: %s", err)
            return {}
        print(f"lipexp: {err}", file=sys.stderr)
        sys.exit(2)
    except Diverged as err:
        log.error("run diverged: %s", err)
        results.update_status(run_dir, status="failed", reason=str(err))
        return {}
    except (Interrupted, KeyboardInterrupt) as err:
        results.update_status(run_dir, status="interrupted", reason=str(err) or "KeyboardInterrupt")
        log.error("interrupted; rerun the same command to resume from the last checkpoint")
        sys.exit(130)
    except results.InputError as err:  # a file or value the user can fix: one line, no traceback
        results.update_status(run_dir, status="failed", reason=str(err))
        if _in_multirun():
            log.error("job failed (the sweep goes on): %s", err)
            return {}
        print(f"lipexp: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        results.update_status(run_dir, status="failed", reason=reason, traceback=traceback.format_exc())
        if _in_multirun():
            log.exception("job failed; the sweep goes on")
            return {}
        raise
    previous_wall = summary.pop("wall_time_s", None)
    wall = previous_wall if previous_wall is not None else time.time() - t0
    results.write_json(run_dir / results.SUMMARY_FILE, summary)
    results.update_status(run_dir, status="completed", finished=results.now_iso(), wall_time_s=wall,
                          files=results.result_files(run_dir))
    log.info("completed in %.1f s%s", wall, "".join(
        f"; {k} {summary[k]:.4g}" for k in ("max_rel_err", "final_K_emp", "final_test_acc")
        if isinstance(summary.get(k), (int, float))))
    return summary


def _signals_interrupt():
    """SIGINT/SIGTERM before the training loop (data loading, model set-up) stop the job as interrupted,
    with a reason in status.json; the loop installs its own handler, which checkpoints first."""
    def handler(signum, _frame):
        # a KeyboardInterrupt, not an Exception: data loaders catch Exception broadly and would swallow it
        raise KeyboardInterrupt(f"received {signal.Signals(signum).name} before the training loop began")

    return on_signals(handler)


def _in_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def train_job(cfg: DictConfig, run_dir: Path, after: Callable | None = None, data: tuple | None = None) -> dict:
    """The standard job: load data, build the model, train with the tracker, save the final weights.

    ``after(model, train_set, test_set, summary)`` may add figure-specific scalars to the summary;
    ``data=(train_set, test_set)`` replaces ``load_data(cfg)`` (a figure that prepares its data itself).
    """
    device = resolve_device(cfg.device)
    train_set, test_set = data if data is not None else load_data(cfg)
    results.update_status(
        run_dir,
        data_source=train_set.source,
        data_info={**train_set.info, "n_train": len(train_set), "n_test": len(test_set)},
    )
    model = build_model(cfg, train_set.num_classes, in_channels=train_set.x.shape[1])
    spec = train_spec(cfg)
    logger = WandbLogger(cfg, run_dir) if cfg.logger.wandb else None
    exit_code = 1
    try:
        summary = train(model, train_set, test_set, spec, run_dir, device, log_fn=logger.log if logger else None)
        summary.update({"data_source": train_set.source, **train_set.info})
        torch.save(model.state_dict(), run_dir / "model.pt")
        if after is not None:
            summary.update(after(model, train_set, test_set, summary) or {})
        exit_code = 0
    finally:
        if logger is not None:
            logger.finish(summary if exit_code == 0 else None, exit_code)
    if cfg.logger.csv:
        results.write_csv(run_dir / "metrics.csv", results.read_metrics(run_dir))
    return summary


# ---------------------------------------------------------------- collecting runs
@dataclass
class Run:
    """A saved run directory: its config, status, summary and (lazily) its metrics."""

    path: Path
    config: DictConfig
    status: dict
    summary: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status.get("status") == "completed"

    @cached_property
    def metrics(self) -> pd.DataFrame:
        return results.read_metrics(self.path)

    def get(self, key: str, default: Any = None) -> Any:
        """A config value by dotted key, e.g. ``run.get('data.batch_size')``; a key the saved config lacks
        (a run made before that setting existed) is its schema default, as in ``config_changes``."""
        missing = object()
        value = OmegaConf.select(self.config, key, default=missing)
        if value is missing:
            return _schema_defaults().get(key, default)
        return value


def collect_runs(runs_dir: Path) -> list[Run]:
    """Every run directory (one with a config.yaml) under ``runs_dir``, sorted by name.

    A run whose config, status or summary cannot be read is kept with status ``unreadable`` and the
    reason, so that the figure's other runs still aggregate and the summary lists it."""
    out = []
    if not runs_dir.exists():
        return out
    for cfg_path in sorted(runs_dir.glob("*/config.yaml")):
        d = cfg_path.parent
        try:
            try:
                config = OmegaConf.load(cfg_path)
            except Exception as err:
                raise results.RunFileError(cfg_path, f"not valid YAML: {str(err).splitlines()[0][:120]}") from None
            out.append(Run(d, config, results.read_status(d), results.read_json(d / results.SUMMARY_FILE, {}) or {}))
        except results.RunFileError as err:
            log.error("%s", err)
            out.append(Run(d, OmegaConf.create({}), {"status": "unreadable", "reason": str(err)}, {}))
    return out


# ---------------------------------------------------------------- figure outputs
def write_outputs(
    cfg: DictConfig,
    fig_dir: Path,
    fig,
    table: pd.DataFrame,
    runs: list[Run],
    findings: list[str],
    notes: list[str] | None = None,
) -> None:
    """Write figure.png/pdf, summary.csv and summary.md (claim, measured findings, provenance, table)."""
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    prov = figure_provenance(cfg, runs)
    fig.text(  # below the axes (bbox_inches="tight" keeps it), so it never covers an x label
        0.995, -0.005,
        f"lipexp {cfg.figure.id} | profile {prov['profile']} | data {prov['data_source']} | commit {prov['commit'][:10]}",
        ha="right", va="top", fontsize=6, color="0.4",
    )
    for ext in ("png", "pdf"):
        tmp = fig_dir / f".figure.tmp.{ext}"
        fig.savefig(tmp, dpi=130 if ext == "png" else None, bbox_inches="tight")
        os.replace(tmp, fig_dir / f"figure.{ext}")
    plt.close(fig)
    results.write_csv(fig_dir / "summary.csv", table)
    failed = [r for r in runs if not r.ok]
    lines = [
        f"# {cfg.figure.id}: {cfg.figure.title}",
        "",
        f"**Thesis claim.** {cfg.figure.claim}",
        "",
        "**Measured.**",
        "",
        *[f"- {f}" for f in findings],
        "",
    ]
    if notes:
        lines += ["**Notes.**", "", *[f"- {n}" for n in notes], ""]
    lines += [
        "**Provenance.**",
        "",
        "| profile | data source | commit | seeds | runs (completed/total) | wall time (s) | made |",
        "|---|---|---|---|---|---|---|",
        f"| {prov['profile']} | {prov['data_source']} | {prov['commit']} | {prov['seeds']} | "
        f"{prov['completed']}/{prov['total']} | {prov['wall_time_s']:.1f} | {prov['date']} |",
        "",
    ]
    if failed:
        lines += ["**Runs that did not complete.**", ""]
        lines += [f"- `{r.path.name}`: {r.status.get('status', 'unknown')}: {r.status.get('reason')}" for r in failed]
        lines.append("")
    lines += ["**Table** (`summary.csv`).", "", _markdown_table(table), ""]
    results.atomic_write_text(fig_dir / "summary.md", "\n".join(lines))
    results.write_json(
        fig_dir / "provenance.json",
        {**prov, "title": str(cfg.figure.title), "claim": str(cfg.figure.claim), "findings": list(findings)},
    )


def figure_provenance(cfg: DictConfig, runs: list[Run]) -> dict:
    commits = sorted({r.status.get("git_commit", "unknown") for r in runs}) or [results.git_info()["git_commit"]]
    sources = sorted({str(r.status.get("data_source")) for r in runs if r.status.get("data_source")}) or ["none"]
    seeds = sorted({tuple(sorted((r.status.get("seeds") or {}).items())) for r in runs})
    return {
        "figure": cfg.figure.id,
        "profile": cfg.profile.name,
        "data_source": ", ".join(sources),
        "commit": ", ".join(c[:12] for c in commits) if len(commits) > 1 else commits[0],
        "seeds": "; ".join(",".join(f"{k}={v}" for k, v in s) for s in seeds[:6]) + (" ..." if len(seeds) > 6 else ""),
        "completed": sum(r.ok for r in runs),
        "total": len(runs),
        "wall_time_s": float(sum(r.status.get("wall_time_s") or 0.0 for r in runs)),
        "date": results.now_iso(),
    }


def _markdown_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "(empty)"

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])
