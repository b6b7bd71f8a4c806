"""Shared fixtures: the offline data mirror and a way to call the ``lipexp`` command."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _mirror() -> Path | None:
    env = os.environ.get("LIPEXP_DATA_MIRROR")
    for cand in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data"]:
        if (cand / "mnist.npz").exists():
            return cand.resolve()
    return None


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The offline mirror folder; in CI (LIPEXP_REQUIRE_DATA=1) its absence fails instead of skipping."""
    path = _mirror()
    if path is None:
        msg = "offline data mirror not found: set LIPEXP_DATA_MIRROR to the folder with mnist.npz"
        if os.environ.get("LIPEXP_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    """One data root for the whole session, so the decoded mirror is cached once."""
    root = ROOT / "data"
    root.mkdir(exist_ok=True)
    return root


def run_lipexp(args: list[str], results_dir: Path, mirror: Path | None, data_root: Path | None = None,
               timeout: int = 600, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """``lipexp <args>`` in a subprocess with results under ``results_dir``."""
    cmd = [sys.executable, "-m", "experiments.runner", *args, f"results_dir={results_dir}"]
    if mirror is not None:
        cmd.append(f"data.mirror={mirror}")
    if data_root is not None:
        cmd.append(f"data.root={data_root}")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None removes a variable
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"lipexp {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def lipexp_cli(tmp_path, mirror, data_root):
    def call(*args, check=True, env=None, timeout=600):
        return run_lipexp(list(args), tmp_path / "results", mirror, data_root, timeout=timeout, check=check, env=env)

    call.results = tmp_path / "results"
    return call


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny (often float64) problems: more threads only add
    synchronisation, and on a busy shared CPU they stall (measured 15 s vs 270 s for test_activations)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
