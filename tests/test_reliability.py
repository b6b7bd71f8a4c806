"""Reliability: what a kill, a corrupt or missing file, a second process or bad input does to a run.

Each promise of the README's "Reliability" section has a test here; where the promise is about a
process being killed, a real process is killed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lipexp import data as D
from lipexp import results
from lipexp.train import TrainSpec, train

from .conftest import ROOT, run_lipexp

MNIST = ["figure=train", "profile=smoke", "model=mlp", "data=mnist", "progress=false"]
# Small problems: one thread each is faster, and steady when several test processes share the CPU.
ENV = {"OMP_NUM_THREADS": "1"}


def _cmd(args, results_dir, mirror, data_root):
    return [sys.executable, "-m", "experiments.runner", *args, f"results_dir={results_dir}",
            f"data.mirror={mirror}", f"data.root={data_root}"]


def _start(args, results_dir, mirror, data_root, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **ENV, **kw.pop("env", {})}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.Popen(_cmd(args, results_dir, mirror, data_root), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **kw)


def _wait_for(pred, proc, timeout=300.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _run_dir(results_dir, args):
    (d,) = [p for p in (results_dir / "train" / "runs" / "smoke").iterdir() if p.is_dir()]
    return d


def _kill_after_checkpoints(args, results_dir, mirror, data_root, n_parts=2, env=None):
    """Start ``lipexp args``, SIGKILL it once ``n_parts`` metric parts and a checkpoint are on disk; returns
    the run dir. (A part is written before its checkpoint: waiting for the part alone, a kill between the two
    left no ckpt.pt at n_parts=1, once in a CI run.)"""
    proc = _start(args, results_dir, mirror, data_root, env=env or {})
    runs = results_dir / "train" / "runs" / "smoke"

    def parts():
        return (len(list(runs.glob(f"*/{results.PARTS_DIR}/part-*.parquet"))) >= n_parts
                and any(runs.glob(f"*/{results.CHECKPOINT_FILE}")))

    try:
        _wait_for(parts, proc, what=f"{n_parts} checkpoints")
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (d,) = [p for p in runs.iterdir() if p.is_dir()]
    assert results.read_status(d)["status"] == "running"  # killed: nothing recorded the end
    return d


LONG = MNIST + ["tracker=off", "train.steps=1000", "train.checkpoint_every=20", "train.log_every=2",
                "optim.lr=0.01", "data.batch_size=16"]


def _with(args, key, value):
    return [a for a in args if not a.startswith(f"{key}=")] + [f"{key}={value}"]


ENDLESS = _with(LONG, "train.steps", 1_000_000)  # a run that outlives the test unless stopped


def _lipexp(args, res, mirror, data_root, **kw):
    return run_lipexp(args, res, mirror, data_root, env={**ENV, **kw.pop("env", {})}, **kw)


# ---------------------------------------------------------------- data loss after a kill
def test_kill_then_lost_part_and_stale_temp_file_redo_the_run_and_lose_nothing(tmp_path, mirror, data_root):
    res = tmp_path / "res"
    run_dir = _kill_after_checkpoints(LONG, res, mirror, data_root, n_parts=3)
    parts_dir = run_dir / results.PARTS_DIR
    # what a SIGKILL during a part write leaves: a temporary file next to the parts
    (parts_dir / f".part-0000000040-0000000058.parquet.tmp{os.getpid()}").write_bytes(b"PAR1 half a file")
    lost = sorted(parts_dir.glob("part-*.parquet"))[1]
    lost.unlink()
    proc = _lipexp(LONG, res, mirror, data_root)
    log = proc.stdout + proc.stderr
    assert "redoing the run from step 0" in log and "logged rows before the checkpoint" in log, log[-3000:]
    assert results.read_status(run_dir)["status"] == "completed"
    df = pd.read_parquet(run_dir / results.METRICS_FILE)
    assert list(df["step"]) == list(range(0, 1000, 2)) + [1000]
    (old,) = run_dir.glob("previous-*")  # the old attempt is kept, not deleted
    assert (old / results.CHECKPOINT_FILE).exists()
    # the redone run equals an uninterrupted one, row for row
    _lipexp(LONG, tmp_path / "fresh", mirror, data_root)
    fresh = pd.read_parquet(_run_dir(tmp_path / "fresh", LONG) / results.METRICS_FILE)
    pd.testing.assert_frame_equal(df, fresh, check_exact=True)

    # a completed run whose metrics are gone is not "completed": it is redone, with one line saying why
    (run_dir / results.METRICS_FILE).unlink()
    again = _lipexp(LONG, res, mirror, data_root)
    assert "marked completed, but metrics.parquet is missing" in again.stdout + again.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / results.METRICS_FILE), fresh, check_exact=True)
    # and a truncated one likewise
    (run_dir / results.METRICS_FILE).write_bytes(b"PAR1")
    again = _lipexp(LONG, res, mirror, data_root)
    assert "marked completed, but metrics.parquet is unreadable" in again.stdout + again.stderr


def test_kill_during_a_part_write_does_not_block_the_resume(tmp_path, mirror, data_root):
    res = tmp_path / "res"
    run_dir = _kill_after_checkpoints(LONG, res, mirror, data_root, n_parts=2)
    stale = run_dir / results.PARTS_DIR / f".part-0000000020-0000000038.parquet.tmp{os.getpid() + 1}"
    stale.write_bytes(b"PAR1 half")
    proc = _lipexp(LONG, res, mirror, data_root)
    assert "resuming from the checkpoint" in proc.stdout + proc.stderr
    assert not stale.exists() and results.read_status(run_dir)["status"] == "completed"
    assert list(pd.read_parquet(run_dir / results.METRICS_FILE)["step"]) == list(range(0, 1000, 2)) + [1000]


# ---------------------------------------------------------------- two processes, one run dir
def test_second_process_on_a_run_dir_fails_at_once_naming_the_holder(tmp_path, mirror, data_root):
    res = tmp_path / "res"
    first = _start(ENDLESS, res, mirror, data_root)
    runs = res / "train" / "runs" / "smoke"
    try:
        _wait_for(lambda: any(runs.glob(f"*/{results.PARTS_DIR}/part-*.parquet")), first, what="training")
        t0 = time.time()
        second = _lipexp(ENDLESS, res, mirror, data_root, check=False)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"(pid {first.pid})" in second.stderr and "in use by another process" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert time.time() - t0 < 60
        assert first.poll() is None  # the first one goes on untouched
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    (d,) = list(runs.iterdir())
    status = results.read_status(d)
    assert status["status"] == "interrupted" and "SIGTERM" in status["reason"]


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lipexp import results\n"
         f"with results.lock_run_dir({str(run_dir)!r}):\n    print('locked', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(results.RunLocked, match=rf"pid {holder.pid}\)"):
        with results.lock_run_dir(run_dir):
            pass
    holder.kill()
    holder.wait()
    with results.lock_run_dir(run_dir):  # the OS dropped the dead holder's lock
        with results.lock_run_dir(run_dir):  # and one process may nest it (job wrapper + train())
            assert (run_dir / results.LOCK_FILE).read_text().strip() == str(os.getpid())


# ---------------------------------------------------------------- W&B after a kill
def _wandb_steps(run_dir: Path) -> list[int]:
    from experiments.common import wandb_logged_steps

    return [s for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")) for s in wandb_logged_steps(f)]


def test_wandb_file_reader_sees_every_logged_step(tmp_path):
    # the resume logic trusts this reader to say what an earlier attempt logged: check it on a known run
    code = ("import wandb\n"
            f"r = wandb.init(project='t', mode='offline', dir={str(tmp_path)!r}, id='reader1')\n"
            "for s in [0, 3, 4, 9]: r.log({'a': s, 'long': 'x' * 40000 if s == 4 else ''}, step=s)\n"
            "r.finish()\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "WANDB_SILENT": "true"})
    assert _wandb_steps(tmp_path) == [0, 3, 4, 9]


def test_wandb_logs_each_step_once_across_a_kill_and_resume(tmp_path, mirror, data_root):
    args = _with(LONG, "train.steps", 600) + ["logger=wandb", "logger.mode=offline"]
    env = {"WANDB_API_KEY": None, "WANDB_MODE": None}
    res = tmp_path / "res"
    proc = _start(args, res, mirror, data_root, env=env)
    runs = res / "train" / "runs" / "smoke"
    try:  # kill once W&B has written some steps to its file, with more on their way
        _wait_for(lambda: any(_wandb_steps(d) for d in runs.glob("*")), proc, what="W&B to write history")
    finally:
        proc.kill()
        proc.wait(timeout=60)
    (run_dir,) = list(runs.iterdir())
    time.sleep(2)
    before = _wandb_steps(run_dir)
    assert results.read_status(run_dir)["status"] == "running" and before
    _lipexp(args, res, mirror, data_root, env=env)
    steps = _wandb_steps(run_dir)
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 2  # the killed attempt and the resumed one
    assert len(steps) == len(set(steps)), "a step was logged twice"
    assert sorted(steps) == list(range(0, 600, 2)) + [600]


# ---------------------------------------------------------------- files that are not what they claim
class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_a_crafted_checkpoint_is_refused_not_executed(tmp_path, mirror, data_root):
    res = tmp_path / "res"
    run_dir = _kill_after_checkpoints(LONG, res, mirror, data_root, n_parts=1)
    _Evil.marker = tmp_path / "pwned"
    ckpt = results.load_torch(run_dir / results.CHECKPOINT_FILE)
    ckpt["evil"] = _Evil()
    torch.save(ckpt, run_dir / results.CHECKPOINT_FILE)
    proc = _lipexp(LONG, res, mirror, data_root, check=False)
    assert proc.returncode == 2 and not _Evil.marker.exists()
    assert "ckpt.pt is unreadable (holds more than tensors and plain data" in proc.stderr
    assert "force=true" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    # truncated: one line too; force=true redoes the run and keeps the bad file aside
    (run_dir / results.CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 truncated")
    proc = _lipexp(LONG, res, mirror, data_root, check=False)
    assert proc.returncode == 2 and "ckpt.pt is unreadable (truncated or corrupt" in proc.stderr, proc.stderr
    _lipexp(LONG + ["force=true"], res, mirror, data_root)
    assert results.read_status(run_dir)["status"] == "completed"
    assert any((p / results.CHECKPOINT_FILE).read_bytes().startswith(b"PK\x03\x04 trunc")
               for p in run_dir.glob("previous-*"))


def test_load_torch_refuses_code_and_names_the_file(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    path = tmp_path / "snapshots.pt"
    torch.save([(0, torch.zeros(3)), _Evil()], path)
    with pytest.raises(results.RunFileError, match=r"snapshots.pt is unreadable .*force=true"):
        results.load_torch(path)
    assert not _Evil.marker.exists()
    torch.save([(0, torch.zeros(3))], path)  # plain data loads
    assert results.load_torch(path)[0][0] == 0


@pytest.mark.parametrize("name, content, expect", [
    ("status.json", b'{"status": "runn', "status.json is unreadable (not valid JSON"),
    ("config.yaml", b"figure: {id: [unclosed\n", "config.yaml is unreadable (not valid YAML"),
])
def test_a_corrupt_run_file_is_one_line_naming_it(tmp_path, mirror, data_root, name, content, expect):
    args = MNIST + ["tracker=sigma1", "train.steps=4"]
    _lipexp(args, tmp_path, mirror, data_root)
    run_dir = _run_dir(tmp_path, args)
    (run_dir / name).write_bytes(content)
    proc = _lipexp(args, tmp_path, mirror, data_root, check=False)
    assert proc.returncode == 2 and expect in proc.stderr and "force=true" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (run_dir / name).read_bytes() == content  # nothing was overwritten


def test_a_corrupt_part_file_is_one_line(tmp_path):
    ds = _toy_mnist()
    spec = TrainSpec(steps=30, lr=0.01, batch_size=16, tracker="sigma1", checkpoint_every=10, progress=False)
    run_dir = tmp_path / "run"
    from lipexp.train import Interrupted

    def stop(row):
        if row["step"] == 15:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(_mlp(), ds, None, spec, run_dir, log_fn=stop)
    part = sorted((run_dir / results.PARTS_DIR).glob("part-*.parquet"))[0]
    part.write_bytes(b"not parquet")
    with pytest.raises(results.RunFileError, match=rf"{part.name} is unreadable \(not a readable parquet"):
        train(_mlp(), ds, None, spec, run_dir)


def test_one_unreadable_run_does_not_break_the_figure(tmp_path, mirror, data_root):
    args = MNIST + ["tracker=sigma1", "train.steps=4"]
    _lipexp(["-m", *args, "seed.sampling=1,2"], tmp_path, mirror, data_root)
    runs = sorted(p for p in (tmp_path / "train" / "runs" / "smoke").iterdir() if p.is_dir())
    (runs[0] / "status.json").write_text("{ not json")
    proc = _lipexp(args + ["aggregate_only=true"], tmp_path, mirror, data_root)
    md = (tmp_path / "train" / "smoke" / "summary.md").read_text()
    assert "unreadable" in md and runs[0].name in md and "runs (completed/total)" in md
    table = pd.read_csv(tmp_path / "train" / "smoke" / "summary.csv")
    assert sorted(table["status"]) == ["completed", "unreadable"], proc.stdout[-2000:]


def _toy_mnist(n=128):
    g = torch.Generator().manual_seed(0)
    return D.Dataset("mnist", "train", torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
                     torch.randint(0, 10, (n,), generator=g), 10, "synthetic")


def _mlp():
    from lipexp import models

    torch.manual_seed(0)
    return models.mlp(num_classes=10)


def test_mirror_and_cache_files(tmp_path, mirror):
    bad = tmp_path / "mirror"
    bad.mkdir()
    (bad / "mnist.npz").write_bytes(b"PK\x03\x04 not an archive")
    with pytest.raises(results.InputError, match=r"mirror file .*mnist.npz is unreadable .*copy it again"):
        D.load_dataset("mnist", "test", root=tmp_path / "root", mirror=bad, download=False)
    # a corrupt decoded cache is rebuilt from the mirror, not reused forever
    cache = tmp_path / "cache"
    first = D.load_dataset("mnist", "test", root=tmp_path / "root", mirror=mirror, download=False, cache_dir=cache)
    (cached,) = cache.glob("mnist_test_*.npz")
    cached.write_bytes(cached.read_bytes()[:1000])
    again = D.load_dataset("mnist", "test", root=tmp_path / "root", mirror=mirror, download=False, cache_dir=cache)
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    with np.load(cached) as d:
        assert d["x"].shape == tuple(first.x.shape)
    # a data root that is a file
    afile = tmp_path / "root.txt"
    afile.write_text("x")
    with pytest.raises(results.InputError, match="is a file, not a folder"):
        D.load_dataset("mnist", "test", root=afile, mirror=mirror, download=False)


# ---------------------------------------------------------------- bad input: one line, exit 2
def _one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for f in fragments:
        assert f in proc.stderr, proc.stderr


@pytest.mark.parametrize("override, fragments", [
    ("train.stepz=5", ["unknown key 'train.stepz'; valid keys of train: steps,"]),
    ("optimm.lr=1", ["unknown key 'optimm.lr'; valid keys at the top level: optim,"]),
    ("model=resnet", ["unknown model 'resnet'; valid options of model:"]),
    ("optim.lr=inf", ["optim.lr=inf is not valid"]),
    ("optim.weight_decay=nan", ["optim.weight_decay=nan is not valid; it must be a finite number"]),
    ("optim.momentum=inf", ["optim.momentum=inf is not valid; it must be a finite number"]),
    ("results_dir=/sys/fs/lipexp-results", ["cannot write to the results folder /sys/fs/lipexp-results"]),
])
def test_bad_input_is_one_line(override, fragments, tmp_path):
    args = [sys.executable, "-m", "experiments.runner", *MNIST]
    if not override.startswith("results_dir"):
        args.append(f"results_dir={tmp_path}")
    proc = subprocess.run(args + [override], cwd=ROOT, capture_output=True, text=True, timeout=300)
    _one_line_error(proc, "lipexp: config error: ", *fragments)
    assert not list(tmp_path.rglob("status.json")) and not list(tmp_path.rglob("*.parquet"))  # nothing ran


def test_read_only_results_folder_is_one_line():
    import shutil
    import tempfile

    ro = Path(tempfile.mkdtemp(prefix="lipexp-ro-"))  # outside pytest's private tmp so another user can reach it
    ro.chmod(0o555)
    cmd = [sys.executable, "-m", "experiments.runner", *MNIST, f"results_dir={ro}"]
    if os.geteuid() == 0:  # root writes through permission bits: run as nobody, as a user would be
        if not shutil.which("setpriv"):
            pytest.fail("running as root needs setpriv (util-linux) to test a read-only folder as another user")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        probe = subprocess.run([*cmd[:4], sys.executable, "-c", "import experiments.runner"], cwd=ROOT,
                               capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"user nobody cannot run this checkout's Python here: {probe.stderr.strip()[-200:]}")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        _one_line_error(proc, f"cannot write to the results folder {ro} (Permission denied)")
    finally:
        ro.chmod(0o755)
        ro.rmdir()


def test_data_root_that_is_a_file_is_one_line(tmp_path, mirror):
    afile = tmp_path / "data.txt"
    afile.write_text("x")
    proc = _lipexp(MNIST, tmp_path / "res", mirror, afile, check=False)
    _one_line_error(proc, f"data root {afile} is a file, not a folder")


def test_diverged_single_run_exits_nonzero_with_the_lr_hint(tmp_path, mirror, data_root):
    for tracker in ("sigma1", "full"):
        proc = _lipexp(MNIST + [f"tracker={tracker}", "optim.lr=1e6", "train.steps=20"], tmp_path / tracker,
                          mirror, data_root, check=False)
        assert proc.returncode == 1, (tracker, proc.stdout[-2000:], proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and "OverflowError" not in proc.stdout + proc.stderr
        assert "run failed:" in proc.stderr and "lower optim.lr" in proc.stderr, proc.stderr
        (run_dir,) = (tmp_path / tracker / "train" / "runs" / "smoke").iterdir()
        assert results.read_status(run_dir)["status"] == "failed"


def test_sigterm_before_the_training_loop_records_why(tmp_path, mirror, data_root):
    # a fresh cache makes the run decode all 60,000 CIFAR-10 JPEGs first: SIGTERM lands in data loading
    args = ["figure=train", "profile=smoke", "tracker=sigma1", "progress=false", f"data.cache_dir={tmp_path / 'c'}"]
    proc = _start(args, tmp_path / "res", mirror, data_root)
    runs = tmp_path / "res" / "train" / "runs" / "smoke"

    def running():
        return any(results.read_status(d).get("status") == "running" for d in runs.glob("*") if d.is_dir())

    _wait_for(running, proc, what="the job to start")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, out[-2000:]
    (run_dir,) = [d for d in runs.iterdir() if d.is_dir()]
    status = results.read_status(run_dir)
    assert status["status"] == "interrupted", status
    assert status["reason"] == "received SIGTERM before the training loop began", status


# ---------------------------------------------------------------- figures per profile
def test_a_smoke_run_never_overwrites_another_profiles_figure(tmp_path, mirror, data_root):
    quick = tmp_path / "train" / "quick"
    quick.mkdir(parents=True)
    for name in ("figure.png", "summary.md", "summary.csv", "provenance.json"):
        (quick / name).write_text(f"quick {name}")
    (quick / "provenance.json").write_text(json.dumps({"profile": "quick", "title": "t", "claim": "c"}))
    _lipexp(MNIST + ["tracker=sigma1", "train.steps=4"], tmp_path, mirror, data_root)
    assert (quick / "figure.png").read_text() == "quick figure.png"
    assert (tmp_path / "train" / "smoke" / "figure.png").read_bytes()[:4] == b"\x89PNG"
    from experiments import report

    report.main(["--results", str(tmp_path)])
    index = (tmp_path / "index.md").read_text()
    assert "![train](train/quick/figure.png)" in index and "[smoke](train/smoke/summary.md)" in index


def test_committed_results_are_per_profile_and_smoke_outputs_are_ignored():
    assert not list((ROOT / "results").glob("*/figure.png")), "figure outputs belong in results/<figure>/<profile>/"
    proc = subprocess.run(["git", "check-ignore", "-q", "results/fig4_2/smoke/figure.png"], cwd=ROOT)
    if proc.returncode == 128:
        pytest.skip("not a git checkout")
    assert proc.returncode == 0
