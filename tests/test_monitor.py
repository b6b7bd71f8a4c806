"""``lipexp.monitor.LipschitzMonitor``: the tracker for own loops gives train()'s rows."""
import math

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lipexp.data import batch_indices
from lipexp.monitor import LipschitzMonitor
from lipexp.train import TrainSpec, train


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def _model(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))


@pytest.mark.parametrize("tracker", ["full", "sigma1"])
def test_monitor_rows_equal_train_rows(tmp_path, tracker):
    ds = _data()
    spec = TrainSpec(steps=8, lr=0.1, batch_size=16, tracker=tracker, progress=False, sampling_seed=2,
                     eval_samples=None)
    train(_model(), ds, None, spec, tmp_path)
    ref = pd.read_parquet(tmp_path / "metrics.parquet")

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr)
    with LipschitzMonitor(model, spec.lr, opt, sigma1_only=(tracker == "sigma1")) as monitor:
        for step in range(spec.steps):
            idx = batch_indices(len(ds), spec.batch_size, spec.sampling_seed, step)
            x, y = ds.tensors[0][idx], ds.tensors[1][idx]
            with monitor.step() as row:
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                row["loss"] = loss.item()
    df = monitor.dataframe()
    # the same columns (train's final row adds the evaluation) and the same values
    assert list(df.columns) == [c for c in ref.columns if not c.startswith(("train_", "test_"))]
    pd.testing.assert_frame_equal(df, ref[df.columns], check_exact=False, rtol=1e-6)
    assert df["step"].tolist() == list(range(spec.steps + 1)) and math.isnan(df["loss"].iloc[-1])
    if tracker == "full":
        assert {"K_pred", "VarK_pred", "kappa/0.weight"} <= set(df.columns)


def test_begin_end_and_a_failed_step(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = LipschitzMonitor(model, 0.05, opt)
    x, y = _data().tensors
    with pytest.raises(RuntimeError, match="boom"):
        with monitor.step():
            model(x)
            raise RuntimeError("boom")
    assert not monitor.tracker.armed and monitor.rows == []  # dropped, and the next step works
    monitor.begin()
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    row = monitor.end(loss=loss.item(), epoch=0)
    assert row["step"] == 0 and row["epoch"] == 0 and row["K_pred"] == pytest.approx(row["K_emp"])
    monitor.lr = 0.025  # a scheduler's change: t advances by the new lr
    for group in opt.param_groups:
        group["lr"] = 0.025
    with pytest.raises(RuntimeError, match="not zeroed"):
        with monitor.step():
            nn.functional.cross_entropy(model(x), y).backward()  # grads were not zeroed: the tracker says so
            opt.step()
    with monitor.step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert [r["t"] for r in monitor.rows] == [0.0, 0.05]
    assert monitor.final_row()["t"] == pytest.approx(0.075)
    monitor.close()
