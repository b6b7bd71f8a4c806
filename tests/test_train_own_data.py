"""``lipexp.train.train`` on one's own data: torch Datasets, DataLoaders, own losses, the run contract."""
import json
import logging
import os
import signal

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lipexp import results
from lipexp.data import batch_indices
from lipexp.dynamics import DynamicsTracker, KIntegrator, term_columns
from lipexp.train import Interrupted, TrainSpec, train


def _spec(**kw):
    base = dict(steps=12, lr=0.05, batch_size=16, tracker="full", checkpoint_every=4, eval_samples=None,
                progress=False, sampling_seed=5)
    base.update(kw)
    return TrainSpec(**base)


def _tabular(n=96, d=6, k=3, seed=0):
    """Regression with (n, k) targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.tanh(x @ torch.randn(d, k, generator=g)) + 0.1 * torch.randn(n, k, generator=g)
    return TensorDataset(x, y)


def _mlp(d=6, k=3, seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, k))


def _mse(out, y):
    return nn.functional.mse_loss(out, y, reduction="none")  # (M, k): train() averages over k


def test_tensor_dataset_with_mse_matches_a_manual_loop_and_writes_the_contract(tmp_path):
    ds = _tabular()
    spec = _spec()
    summary = train(_mlp(), ds, ds, spec, tmp_path, loss_fn=_mse)
    df = pd.read_parquet(tmp_path / "metrics.parquet")

    # the same steps by hand: batches from batch_indices, mean over the target dims, SGD, the tracker
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr)
    tracker, integ = DynamicsTracker(model, spec.lr, optimizer=opt), KIntegrator(spec.lr)
    for step in range(spec.steps):
        idx = batch_indices(len(ds), spec.batch_size, spec.sampling_seed, step)
        x, y = ds.tensors[0][idx], ds.tensors[1][idx]
        tracker.begin()
        loss = _mse(model(x), y).mean(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        row = {**integ.update(terms := tracker.end()), **term_columns(terms)}
        got = df.iloc[step]
        assert got["loss"] == pytest.approx(loss.item(), rel=1e-6)
        for key in ("K_emp", "K_pred", "VarK_pred", "kappa/0.weight", "lambda2/2.weight"):
            assert got[key] == pytest.approx(row[key], rel=1e-5, abs=1e-12), key
    tracker.close()
    with torch.no_grad():
        full = _mse(model(ds.tensors[0]), ds.tensors[1]).mean().item()
    final = df.iloc[-1]
    assert final["train_loss"] == pytest.approx(full, rel=1e-5)
    assert "train_acc" not in df and "test_acc" not in df  # regression: no accuracy

    # the run contract of the lipexp command
    status = results.read_status(tmp_path)
    assert status["status"] == "completed" and status["reason"] is None
    for key in ("git_commit", "torch", "wall_time_s", "started", "finished"):
        assert status[key] is not None, key
    assert status["data"]["train"] == {"kind": "map", "type": "TensorDataset", "n": 96}
    assert json.loads((tmp_path / "spec.json").read_text())["lr"] == spec.lr
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["final_K_emp"] == summary["final_K_emp"] and "max_rel_err" in saved


def _interrupt_at(step):
    def log_fn(row):
        if row["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)
    return log_fn


def _seq_data(n=80, t=5, d=4, c=3, seed=2):
    """Sequences (n, t, d) with class labels: a Linear applied along the sequence, then flattened."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, t, d, generator=g), torch.randint(0, c, (n,), generator=g))


def _seq_model(seed=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Flatten(), nn.Linear(40, 3))


@pytest.mark.parametrize("kind", ["dataset", "loader"])
def test_resume_is_exact_for_datasets_and_seeded_loaders(tmp_path, kind):
    ds = _seq_data()

    def data():  # a loader made afresh, as a resumed process would make it
        if kind == "dataset":
            return ds
        return DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(9))

    spec = _spec(steps=14, mixup_alpha=0.3)
    ref = train(_seq_model(), data(), None, spec, tmp_path / "ref")
    ref_df = pd.read_parquet(tmp_path / "ref" / "metrics.parquet")
    with pytest.raises(Interrupted):
        train(_seq_model(), data(), None, spec, tmp_path / "run", log_fn=_interrupt_at(6))
    assert results.read_status(tmp_path / "run")["status"] == "interrupted"
    resumed = train(_seq_model(), data(), None, spec, tmp_path / "run")
    df = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    pd.testing.assert_frame_equal(df, ref_df, check_exact=True)
    assert resumed["final_K_pred"] == ref["final_K_pred"]
    assert {"train_loss", "train_acc", "K_pred", "mu/0.weight"} <= set(df.columns)  # classification: accuracy


def test_loader_batches_are_the_loaders_own(tmp_path):
    ds = _seq_data()
    loader = DataLoader(ds, batch_size=16, shuffle=False)
    train(_seq_model(), loader, None, _spec(steps=7, tracker="sigma1"), tmp_path)  # 5 batches a pass: wraps
    df = pd.read_parquet(tmp_path / "metrics.parquet")
    model = _seq_model()
    x, y = ds.tensors[0][:16], ds.tensors[1][:16]  # step 0 = the loader's first batch
    assert df["loss"].iloc[0] == pytest.approx(nn.functional.cross_entropy(model(x), y).item(), rel=1e-6)
    with pytest.raises(ValueError, match="batches of 16 but spec.batch_size is 8"):
        train(_seq_model(), loader, None, _spec(batch_size=8), tmp_path / "other")


def test_torchvision_fakedata_with_a_transform(tmp_path):
    from torchvision.datasets import FakeData
    from torchvision.transforms import ToTensor

    ds = FakeData(size=48, image_size=(3, 8, 8), num_classes=4, transform=ToTensor(), random_offset=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(36, 4))
    summary = train(model, ds, ds, _spec(steps=4, eval_samples=24), tmp_path)
    assert 0.0 <= summary["final_test_acc"] <= 1.0 and summary["final_K_pred"] > 0
    with pytest.raises(ValueError, match="x of item 0 is Image, not a tensor .*ToTensor"):
        train(model, FakeData(size=8, image_size=(3, 8, 8)), None, _spec(), tmp_path / "pil")


def test_reused_run_dir_with_another_spec_is_archived_not_resumed(tmp_path, caplog):
    ds = _tabular()
    train(_mlp(), ds, None, _spec(tracker="sigma1"), tmp_path / "done", loss_fn=_mse)
    with pytest.raises(Interrupted):  # leave a checkpoint behind, as a crashed run would
        train(_mlp(), ds, None, _spec(tracker="sigma1", steps=20), tmp_path / "x", loss_fn=_mse,
              log_fn=_interrupt_at(5))
    for run_dir in (tmp_path / "done", tmp_path / "x"):
        with caplog.at_level(logging.WARNING, logger="lipexp.train"):
            train(_mlp(), ds, None, _spec(tracker="sigma1", lr=0.02), run_dir, loss_fn=_mse)
        assert "made with other settings (" in caplog.text and "lr 0.05 -> 0.02" in caplog.text
        assert "starting afresh" in caplog.text
        (old,) = run_dir.glob("previous-*")
        assert (old / "spec.json").exists() and (old / "ckpt.pt").exists()
        df = pd.read_parquet(run_dir / "metrics.parquet")
        assert list(df["step"]) == list(range(13))  # a fresh run of the new spec, from step 0
        assert torch.load(run_dir / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"] == 0.02
        caplog.clear()


def test_bad_inputs_say_what_to_do(tmp_path):
    ds = _tabular()
    with pytest.raises(ValueError, match=r"loss_fn must return one loss per sample, shape \(16,\)"):
        train(_mlp(), ds, None, _spec(), tmp_path / "a", loss_fn=lambda o, y: ((o - y) ** 2).mean())
    assert results.read_status(tmp_path / "a")["status"] == "failed"
    with pytest.raises(ValueError, match="label_smoothing applies to the default"):
        train(_mlp(), ds, None, _spec(label_smoothing=0.1), tmp_path / "b", loss_fn=_mse)
    with pytest.raises(ValueError, match=r"the training set \(list\): items must be \(x, y\) pairs; item 0 is int"):
        train(_mlp(), [1, 2, 3], None, _spec(), tmp_path / "c")
    with pytest.raises(ValueError, match="is a dict; pass a lipexp.data.Dataset, a torch.utils.data.Dataset"):
        train(_mlp(), {"x": ds.tensors[0], "y": ds.tensors[1]}, None, _spec(), tmp_path / "d")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="device 'cuda' was requested but CUDA is not available"):
        train(_mlp(), _tabular(), None, _spec(), tmp_path, device="cuda")


def test_test_sets_as_loaders_are_evaluated_on_their_samples(tmp_path):
    from torch.utils.data import IterableDataset

    ds = _tabular(n=40)

    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(*ds.tensors)

    model = _mlp()
    spec = _spec(steps=1, tracker="off")
    with pytest.raises(ValueError, match="IterableDataset, which has no indices.*DataLoader"):
        train(model, Stream(), None, spec, tmp_path / "x")
    for i, test in enumerate((DataLoader(ds, batch_size=7, shuffle=True), DataLoader(Stream(), batch_size=7))):
        summary = train(_mlp(), ds, test, _spec(steps=1, tracker="off", eval_samples=30), tmp_path / str(i),
                        loss_fn=_mse)
        m = _mlp()  # the same model after its one step
        m.load_state_dict(torch.load(tmp_path / str(i) / "ckpt.pt", weights_only=True)["model"])
        # a map-style dataset: the seeded selection of 30 samples; a stream: its first 30
        idx = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:30] if i == 0 else torch.arange(30)
        with torch.no_grad():
            want = _mse(m(ds.tensors[0][idx]), ds.tensors[1][idx]).mean().item()
        assert summary["final_test_loss"] == pytest.approx(want, rel=1e-6)
