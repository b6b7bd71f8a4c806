"""End to end through the ``lipexp`` command: run dirs, resume, sweeps, launchers, W&B offline."""
import json
import signal
import subprocess
import sys
import time

import pandas as pd
from omegaconf import OmegaConf

from experiments.runner import CONF_DIR

from .conftest import ROOT, run_lipexp

MNIST = ["figure=train", "profile=smoke", "model=mlp", "data=mnist", "tracker=sigma1"]


def _runs(results, profile="smoke"):
    return sorted(p for p in (results / "train" / "runs" / profile).iterdir() if (p / "config.yaml").exists())


def test_single_run_writes_the_contract(lipexp_cli):
    lipexp_cli(*MNIST)
    fig = lipexp_cli.results / "train" / "smoke"
    for name in ("figure.png", "figure.pdf", "summary.csv", "summary.md"):
        assert (fig / name).stat().st_size > 0
    (run,) = _runs(lipexp_cli.results)
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed"
    for key in ("git_commit", "profile", "data_source", "seeds", "wall_time_s"):
        assert status[key] is not None
    assert status["data_source"] == "mirror:mnist.npz"
    df = pd.read_parquet(run / "metrics.parquet")
    assert {"step", "t", "loss", "K_emp", "sigma1/1.weight"} <= set(df.columns)
    log_text = (run / "run.log").read_text()
    assert "final: step" in log_text and "completed in" in log_text, log_text
    md = (fig / "summary.md").read_text()
    assert "smoke" in md and "mirror:mnist.npz" in md
    # rerunning the same command finds the completed run and does not train again
    again = lipexp_cli(*MNIST)
    assert "already completed" in again.stdout + again.stderr
    # a run made with other settings (here: an older profile with fewer steps) is archived and redone
    saved = OmegaConf.load(run / "config.yaml")
    saved.train.steps += 1
    OmegaConf.save(saved, run / "config.yaml")
    redo = lipexp_cli(*MNIST)
    assert "made with other settings (train.steps)" in redo.stdout + redo.stderr
    (old,) = run.glob("previous-*")
    assert (old / "metrics.parquet").exists() and json.loads((run / "status.json").read_text())["status"] == "completed"


def test_sigterm_then_rerun_resumes_exactly(lipexp_cli, mirror, data_root):
    args = MNIST + ["train.steps=150", "train.checkpoint_every=10", "train.log_every=3", "optim.lr=0.01"]
    cmd = [sys.executable, "-m", "experiments.runner", *args, "seed.sampling=8",
           f"results_dir={lipexp_cli.results}", f"data.mirror={mirror}", f"data.root={data_root}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = lipexp_cli.results / "train" / "runs" / "smoke" / (
        "data=mnist,model=mlp,optim.lr=0.01,seed.sampling=8,tracker=sigma1,train.checkpoint_every=10,train.log_every=3,train.steps=150")
    deadline = time.time() + 300
    while not (run_dir / "ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    status = json.loads((run_dir / "status.json").read_text())
    if status["status"] == "interrupted":
        assert proc.returncode != 0, out
    lipexp_cli(*args, "seed.sampling=8")
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    if status["status"] == "interrupted":
        assert "resuming from the checkpoint at step" in (run_dir / "run.log").read_text()
    df = pd.read_parquet(run_dir / "metrics.parquet")
    assert list(df["step"]) == list(range(0, 150, 3)) + [150]
    # the interrupted-and-resumed run equals an uninterrupted run of the same command, row for row
    run_lipexp(args + ["seed.sampling=8"], lipexp_cli.results / "fresh", mirror, data_root)
    fresh = pd.read_parquet(lipexp_cli.results / "fresh" / "train" / "runs" / "smoke" / run_dir.name / "metrics.parquet")
    pd.testing.assert_frame_equal(df, fresh, check_exact=True)


def test_sweep_goes_on_after_a_diverged_run(lipexp_cli):
    lipexp_cli("-m", *MNIST, "optim.lr=1e6,0.01", "train.steps=20")
    runs = _runs(lipexp_cli.results)
    statuses = {r.name: json.loads((r / "status.json").read_text()) for r in runs}
    assert len(statuses) == 2
    bad = [s for n, s in statuses.items() if "optim.lr=1000000.0" in n or "1e6" in n][0]
    assert bad["status"] == "failed" and "non-finite loss" in bad["reason"]
    assert sum(s["status"] == "completed" for s in statuses.values()) == 1
    md = (lipexp_cli.results / "train" / "smoke" / "summary.md").read_text()
    assert "did not complete" in md and "non-finite loss" in md


def test_sweep_reports_a_dataset_it_cannot_get_as_skipped(lipexp_cli):
    # CIFAR-100 is not in the offline mirror: its run is skipped with both ways to get it, the other completes
    lipexp_cli("-m", "figure=train", "profile=smoke", "model=convnet", "tracker=sigma1", "data=cifar10,cifar100",
               "data.download=false")
    statuses = {r.name: json.loads((r / "status.json").read_text()) for r in _runs(lipexp_cli.results)}
    assert sorted(s["status"] for s in statuses.values()) == ["completed", "skipped"]
    (skipped,) = [s for n, s in statuses.items() if "cifar100" in n]
    assert "data.download=true" in skipped["reason"] and "LIPEXP_DATA_MIRROR" in skipped["reason"]
    md = (lipexp_cli.results / "train" / "smoke" / "summary.md").read_text()
    assert "did not complete" in md and "skipped" in md and "cifar100" in md


def test_sweep_records_an_invalid_combination_and_goes_on(lipexp_cli):
    # model=mlp cannot take CIFAR images: that job is saved as invalid with the reason, the MNIST one runs,
    # and the figure is still aggregated over both
    lipexp_cli("-m", "figure=train", "profile=smoke", "model=mlp", "tracker=sigma1", "data=cifar10,mnist")
    statuses = {r.name: json.loads((r / "status.json").read_text()) for r in _runs(lipexp_cli.results)}
    assert sorted(s["status"] for s in statuses.values()) == ["completed", "invalid"]
    (bad,) = [s for n, s in statuses.items() if "cifar10" in n]
    assert "model=mlp expects 28x28" in bad["reason"]
    md = (lipexp_cli.results / "train" / "smoke" / "summary.md").read_text()
    assert "did not complete" in md and "invalid" in md
    # a single (non-sweep) run with the same bad combination is still a one-line error before anything runs
    single = lipexp_cli("figure=train", "profile=smoke", "model=mlp", "data=cifar10", check=False)
    assert single.returncode == 2 and "config error: model=mlp expects 28x28" in single.stderr


def test_sweep_of_only_config_errors_exits_2_and_leaves_saved_runs_untouched(lipexp_cli):
    # threads is not part of the run name: threads=0 maps the sweep's job onto the saved run, whose files stay
    lipexp_cli(*MNIST)
    (saved,) = _runs(lipexp_cli.results)
    config_before = (saved / "config.yaml").read_text()
    proc = lipexp_cli("-m", *MNIST, "threads=0", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "lipexp: no job of the sweep ran: config error: threads=0 is not valid" in proc.stderr
    assert json.loads((saved / "status.json").read_text())["status"] == "completed"
    assert (saved / "config.yaml").read_text() == config_before
    assert "threads=0" in (saved / "config_error.json").read_text()
    # two jobs, both invalid (one in a new folder, recorded as an invalid run): still exit 2
    proc = lipexp_cli("-m", *MNIST, "threads=0", "seed.sampling=1,2", check=False)
    assert proc.returncode == 2 and "threads=0 is not valid" in proc.stderr
    # the sweep with a valid value is not an error (its job is already done) and drops the config_error.json
    lipexp_cli("-m", *MNIST)
    assert not (saved / "config_error.json").exists()


def test_submitit_local_multirun_aggregates_two_jobs(lipexp_cli):
    lipexp_cli("-m", *MNIST, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
               "seed.sampling=1,2", timeout=900)
    runs = _runs(lipexp_cli.results)
    assert len(runs) == 2 and all(json.loads((r / "status.json").read_text())["status"] == "completed" for r in runs)
    table = pd.read_csv(lipexp_cli.results / "train" / "smoke" / "summary.csv")
    assert len(table) == 2 and (table["status"] == "completed").all()


def test_wandb_offline_run_has_the_logged_keys(lipexp_cli):
    lipexp_cli(*MNIST, "logger=wandb", "logger.mode=offline", env={"WANDB_API_KEY": None, "WANDB_MODE": None})
    (run,) = _runs(lipexp_cli.results)
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    blob = files[0].read_bytes()
    for key in (b"K_emp", b"loss", b"sigma1/1.weight", b"train_acc"):
        assert key in blob
    assert b"mnist" in blob  # the resolved config travels with the run


def test_launcher_configs_exist():
    for name in ("joblib", "submitit_local", "submitit_slurm"):
        proc = subprocess.run([sys.executable, "-m", "experiments.runner", "figure=train",
                               f"hydra/launcher={name}", "--cfg", "hydra", "-p", "hydra.launcher"],
                              cwd=CONF_DIR.parent, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "_target_" in proc.stdout


def test_a_setting_added_later_does_not_make_old_runs_stale():
    from experiments.common import config_changes

    new = OmegaConf.create({"figure": {"id": "train", "title": "x"}, "data": {"name": "mnist", "batch_size": 64,
                                                                             "sampling": "shuffle"}})
    old = OmegaConf.create({"figure": {"id": "train", "title": "y"}, "data": {"name": "mnist", "batch_size": 64}})
    # the saved run predates data.sampling and ran with what its default (shuffle) does; the title is prose
    assert config_changes(old, new) == []
    new.data.sampling = "iid"
    assert config_changes(old, new) == ["data.sampling"]
    new.data.sampling, new.data.batch_size = "shuffle", 128
    assert config_changes(old, new) == ["data.batch_size"]
