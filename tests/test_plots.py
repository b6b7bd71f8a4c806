"""``lipexp.plots.k_curves`` on a real run's metrics (headless)."""
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from lipexp import results  # noqa: E402
from lipexp.plots import k_curves  # noqa: E402
from lipexp.train import TrainSpec, train  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    d = tmp_path_factory.mktemp("run")
    train(model, ds, None, TrainSpec(steps=10, lr=0.2, batch_size=8, tracker="full", progress=False), d)
    return d


def test_k_curves_draws_k_emp_k_pred_and_the_std_band(run_dir):
    df = results.read_metrics(run_dir)
    ax = k_curves(df, x="t", label="mine")
    emp, pred = ax.get_lines()
    assert emp.get_label() == "mine K_emp" and pred.get_label() == "mine K_pred"
    np.testing.assert_array_equal(emp.get_ydata(), df["K_emp"].to_numpy())
    np.testing.assert_array_equal(pred.get_ydata(), df["K_pred"].to_numpy())
    np.testing.assert_array_equal(emp.get_xdata(), df["t"].to_numpy())
    (band,) = ax.collections
    lo, hi = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    std = np.sqrt(df["VarK_pred"].to_numpy())
    assert lo == pytest.approx(float((df["EK_pred"] - std).min()))
    assert hi == pytest.approx(float((df["EK_pred"] + std).max()))
    assert std[-1] > 0  # a real run: the variance grows from 0
    ax.figure.savefig(run_dir / "k.png")
    assert (run_dir / "k.png").stat().st_size > 0


def test_k_curves_on_a_sigma1_run_and_bad_input(run_dir):
    import matplotlib.pyplot as plt

    df = results.read_metrics(run_dir)
    fig, ax = plt.subplots()
    assert k_curves(df[["step", "K_emp"]], ax=ax) is ax and len(ax.get_lines()) == 1 and not ax.collections
    with pytest.raises(ValueError, match="no K_emp column .* tracker=off"):
        k_curves(df[["step", "loss"]])
    plt.close("all")
