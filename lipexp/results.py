"""Run directories: atomic file writes, status.json, provenance, metric logs, locks and archives.

A run directory holds ``config.yaml``, ``status.json``, ``metrics.parquet`` (per-step rows),
``summary.json`` (the run's scalars), ``ckpt.pt`` and a log. Every write goes to a temporary file
first and is renamed into place, so an interrupted run never leaves half a file behind; temporary
files a killed process left are removed when the run directory is next locked. A file that exists but
cannot be read raises ``RunFileError``, whose one-line message names the file and the remedy.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import math
import os
import platform
import shutil
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.parquet"
PARTS_DIR = "metrics_parts"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "ckpt.pt"
LOCK_FILE = ".lock"
FORCE_REMEDY = "rerun with force=true to redo the run (the old files are kept under previous-<time>/)"


class InputError(ValueError):
    """Bad input the user can fix: the message is one line that says what is wrong and how to fix it."""


class RunFileError(InputError):
    """A run file that exists but cannot be read (truncated, corrupt, or not a plain-data file)."""

    def __init__(self, path: str | os.PathLike, why: str, remedy: str = FORCE_REMEDY):
        self.path = Path(path)
        super().__init__(f"{path} is unreadable ({why}); {remedy}")


class RunLocked(InputError):
    """Another live process holds the run directory."""


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
    """The parsed file, ``default`` when it does not exist; ``RunFileError`` when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFileError(path, f"not valid JSON: {err}") from None


def read_parquet(path: str | os.PathLike) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for truncated or foreign files
        raise RunFileError(path, f"not a readable parquet file: {str(err).splitlines()[0][:200]}") from None


def load_torch(path: str | os.PathLike, map_location: Any = "cpu", remedy: str = FORCE_REMEDY) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, so a crafted file
    cannot run code; anything else (or a truncated file) is a ``RunFileError`` naming the file."""
    import pickle
    import zipfile

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0][:160]
        raise RunFileError(path, f"holds more than tensors and plain data, refused to load it: {first}",
                           remedy) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, AttributeError) as err:
        raise RunFileError(path, f"truncated or corrupt: {type(err).__name__}: {str(err).splitlines()[0][:160]}",
                           remedy) from None


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


# ---------------------------------------------------------------- locks, stale files, archives
# Locks this process holds, by run directory, with a count: the CLI's job wrapper and the library's
# ``train()`` both lock the same directory, and a second flock from one process would deadlock on itself.
_HELD: dict[str, list] = {}


@contextmanager
def lock_run_dir(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an OS lock on ``run_dir`` (``flock`` on ``run_dir/.lock``, released when the process dies).

    A second process fails at once with ``RunLocked`` naming the directory and the holder's pid. On
    taking the lock, temporary files that a killed writer left behind are removed.
    """
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        try:
            holder = path.read_text().strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise RunLocked(
            f"run directory {run_dir} is in use by another process (pid {holder}); wait for it to finish or "
            f"stop it, then rerun"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = [fd, 1]
    try:
        remove_stale_temporaries(run_dir)
        yield
    finally:
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            del _HELD[key]
            os.close(fd)  # releases the flock; the file stays (removing it would race a waiting process)


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete ``.<name>.tmp*`` files (half-written by a killed process) in ``run_dir`` and its parts folder.

    Only safe while holding the run directory's lock: then no live writer owns them."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / PARTS_DIR):
        if folder.is_dir():
            for p in folder.glob(".*.tmp*"):
                if p.is_file():
                    p.unlink()
                    removed.append(p)
    return removed


# Files an attempt leaves that describe the *current* attempt, or belong to the process itself.
ATTEMPT_FILES = frozenset({".hydra", "run.log", LOCK_FILE})


def archive_previous(run_dir: str | os.PathLike, keep: Iterable[str] = ATTEMPT_FILES) -> Path | None:
    """Move an earlier attempt's files into ``run_dir/previous-<time>/`` (results are never deleted).

    ``keep`` names entries that stay. Returns the archive folder, or None when there was nothing to move."""
    run_dir = Path(run_dir)
    keep = set(keep)
    entries = [p for p in run_dir.iterdir() if p.name not in keep and not p.name.startswith("previous-")]
    if not entries:
        return None
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = run_dir / f"previous-{stamp}"
    i = 1
    while dest.exists():
        i += 1
        dest = run_dir / f"previous-{stamp}-{i}"
    dest.mkdir()
    for p in entries:
        shutil.move(str(p), dest / p.name)
    return dest


# ---------------------------------------------------------------- metric logs
def append_metric_part(run_dir: str | os.PathLike, rows: list[dict]) -> None:
    """Flush buffered per-step rows into a new part file (parts are merged when the run ends)."""
    if not rows:
        return
    first, last = rows[0]["step"], rows[-1]["step"]
    write_parquet(Path(run_dir) / PARTS_DIR / f"part-{first:010d}-{last:010d}.parquet", pd.DataFrame(rows))


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a readable file of its kind (None if it is), checked cheaply by suffix."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        if path.suffix == ".json":
            read_json(path)
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.read_metadata(path)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            yaml.safe_load(path.read_text())
        elif path.suffix == ".pt":
            zipfile.ZipFile(path).close()  # torch.save writes a zip: its directory sits at the end
    except Exception as err:
        return f"{path.name} is unreadable ({type(err).__name__})"
    return None


def result_files(run_dir: str | os.PathLike) -> list[str]:
    """The files a finished run leaves (its results contract), to be checked before it is reused."""
    skip = {LOCK_FILE, "run.log", CHECKPOINT_FILE}
    return sorted(p.name for p in Path(run_dir).iterdir()
                  if p.is_file() and p.name not in skip and not p.name.startswith("."))


def metric_parts(run_dir: str | os.PathLike) -> list[Path]:
    parts_dir = Path(run_dir) / PARTS_DIR
    return sorted(parts_dir.glob("part-*.parquet")) if parts_dir.is_dir() else []


def missing_rows(run_dir: str | os.PathLike, before_step: int, log_every: int) -> str | None:
    """Why the logged rows of steps ``0, log_every, ... < before_step`` are not all there (None if they are).

    A resume appends to these rows, so a part file lost or deleted would otherwise leave a hole that the
    finished run carries silently."""
    df = read_metrics(run_dir)
    have = set(int(s) for s in df["step"]) if len(df) else set()
    want = set(range(0, before_step, log_every))
    lost = sorted(want - have)
    if not lost:
        return None
    return (f"{len(lost)} of the {len(want)} logged rows before the checkpoint at step {before_step} are missing "
            f"(first missing step {lost[0]})")


def read_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    """All per-step rows of a run (finished: ``metrics.parquet``; running or interrupted: the parts)."""
    run_dir = Path(run_dir)
    frames = []
    if (run_dir / METRICS_FILE).exists():
        frames.append(read_parquet(run_dir / METRICS_FILE))
    frames += [read_parquet(p) for p in metric_parts(run_dir)]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    return df.drop_duplicates(subset="step", keep="last").sort_values("step").reset_index(drop=True)


def truncate_metrics(run_dir: str | os.PathLike, before_step: int) -> None:
    """Keep only rows with ``step < before_step`` (a resume point), as a single part file."""
    run_dir = Path(run_dir)
    df = read_metrics(run_dir)
    keep = df[df["step"] < before_step] if len(df) else df
    old = metric_parts(run_dir)
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
        shutil.rmtree(parts_dir)  # the parts and any temporary file a killed writer left
    return df


