"""Run directories: atomic file writes, status.json, provenance and metric logs.

A run directory holds ``config.yaml``, ``status.json``, ``metrics.parquet`` (per-step rows),
``summary.json`` (the run's scalars), ``ckpt.pt`` and a log. Every write goes to a temporary file
first and is renamed into place, so an interrupted run never leaves half a file behind.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.parquet"
PARTS_DIR = "metrics_parts"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "ckpt.pt"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default


def write_parquet(path: str | os.PathLike, df: pd.DataFrame) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def write_csv(path: str | os.PathLike, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_info(cwd: str | os.PathLike | None = None) -> dict:
    """Commit of the code that ran (``unknown`` outside a git checkout) and whether it had local edits."""
    cwd = cwd or Path(__file__).resolve().parent

    def _git(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)

    try:
        commit = _git("rev-parse", "HEAD")
        if commit.returncode != 0:
            return {"git_commit": "unknown", "git_dirty": None}
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": None}


def environment_info() -> dict:
    import torch

    return {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def update_status(run_dir: str | os.PathLike, **fields: Any) -> dict:
    """Merge ``fields`` into ``status.json`` (created if missing) and return the new status."""
    path = Path(run_dir) / STATUS_FILE
    status = read_json(path, {}) or {}
    status.update(fields)
    status["updated"] = now_iso()
    write_json(path, status)
    return status


def read_status(run_dir: str | os.PathLike) -> dict:
    return read_json(Path(run_dir) / STATUS_FILE, {}) or {}


# ---------------------------------------------------------------- metric logs
def append_metric_part(run_dir: str | os.PathLike, rows: list[dict]) -> None:
    """Flush buffered per-step rows into a new part file (parts are merged when the run ends)."""
    if not rows:
        return
    first, last = rows[0]["step"], rows[-1]["step"]
    write_parquet(Path(run_dir) / PARTS_DIR / f"part-{first:010d}-{last:010d}.parquet", pd.DataFrame(rows))


def read_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    """All per-step rows of a run (finished: ``metrics.parquet``; running or interrupted: the parts)."""
    run_dir = Path(run_dir)
    frames = []
    if (run_dir / METRICS_FILE).exists():
        frames.append(pd.read_parquet(run_dir / METRICS_FILE))
    parts = sorted((run_dir / PARTS_DIR).glob("part-*.parquet")) if (run_dir / PARTS_DIR).exists() else []
    frames += [pd.read_parquet(p) for p in parts]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    return df.drop_duplicates(subset="step", keep="last").sort_values("step").reset_index(drop=True)


def truncate_metrics(run_dir: str | os.PathLike, before_step: int) -> None:
    """Keep only rows with ``step < before_step`` (a resume point), as a single part file."""
    run_dir = Path(run_dir)
    df = read_metrics(run_dir)
    keep = df[df["step"] < before_step] if len(df) else df
    parts_dir = run_dir / PARTS_DIR
    old = sorted(parts_dir.glob("part-*.parquet")) if parts_dir.exists() else []
    if len(keep):
        append_metric_part(run_dir, keep.to_dict("records"))
    new_name = (
        f"part-{int(keep['step'].iloc[0]):010d}-{int(keep['step'].iloc[-1]):010d}.parquet" if len(keep) else None
    )
    for p in old:
        if p.name != new_name:
            p.unlink()
    if (run_dir / METRICS_FILE).exists():
        (run_dir / METRICS_FILE).unlink()


def finalize_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Merge the parts into ``metrics.parquet`` and remove them."""
    run_dir = Path(run_dir)
    df = read_metrics(run_dir)
    write_parquet(run_dir / METRICS_FILE, df)
    parts_dir = run_dir / PARTS_DIR
    if parts_dir.exists():
        for p in parts_dir.glob("part-*.parquet"):
            p.unlink()
        parts_dir.rmdir()
    return df


def archive_previous(run_dir: str | os.PathLike, keep: tuple[str, ...] = (".hydra", "run.log")) -> Path | None:
    """Move an earlier attempt's files into ``run_dir/previous-<time>/`` (results are never deleted).

    ``keep`` names entries left in place (Hydra's own folder, the log being written); earlier archives stay
    where they are. Returns the archive folder, or None when there was nothing to move. The one rule for
    a reused run directory, used by the ``lipexp`` command and by ``lipexp.train.train``.
    """
    run_dir = Path(run_dir)
    entries = [p for p in run_dir.iterdir() if p.name not in keep and not p.name.startswith("previous-")]
    if not entries:
        return None
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest, i = run_dir / f"previous-{stamp}", 1
    while dest.exists():  # two archives within a second
        i += 1
        dest = run_dir / f"previous-{stamp}-{i}"
    dest.mkdir()
    for p in entries:
        shutil.move(str(p), dest / p.name)
    return dest
