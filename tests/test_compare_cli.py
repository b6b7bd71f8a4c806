"""``lipexp --help`` and ``lipexp compare`` on runs made by ``lipexp.train.train`` (spec.json, no config.yaml)."""
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from experiments import compare
from lipexp.train import TrainSpec, train


@pytest.fixture(scope="module")
def own_runs(tmp_path_factory):
    """Two train() runs that differ in the learning rate, in one folder."""
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(48, 4, generator=g), torch.randint(0, 2, (48,), generator=g))
    folder = tmp_path_factory.mktemp("own")
    for lr in (0.05, 0.2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        train(model, ds, ds, TrainSpec(steps=6, lr=lr, batch_size=8, tracker="full", progress=False),
              folder / f"lr{lr}")
    return folder


def test_compare_reads_train_runs(own_runs, tmp_path):
    table = compare.main([str(own_runs), "--out", str(tmp_path)])
    assert len(table) == 2 and sorted(table["spec.lr"]) == [0.05, 0.2]
    assert list(table["status"]) == ["completed", "completed"]
    assert table["max_rel_err"].notna().all() and table["final_test_acc"].notna().all()
    assert table["final_K_pred"].nunique() == 2
    assert (tmp_path / "compare.png").stat().st_size > 0
    one = compare.main([str(own_runs / "lr0.2"), "--metrics", "final_K_emp", "--curves", "loss", "--out", str(tmp_path)])
    assert list(one.columns) == ["run", "status", "final_K_emp"]


def test_unknown_metric_or_curve_is_one_line_and_exit_2(own_runs, tmp_path, capsys):
    for flag, name, closest, kind in (("--metrics", "max_rel_er", "max_rel_err", "metric"),
                                      ("--curves", "K_prd", "K_pred", "curve")):
        with pytest.raises(SystemExit) as exc:
            compare.main([str(own_runs), flag, name, "--out", str(tmp_path)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert err.startswith(f"lipexp compare: unknown {kind} '{name}': no run has it; valid {kind}s "
                              f"(closest first): {closest}, "), err


def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``lipexp <args>`` through the console entry point, in this process."""
    from experiments.runner import cli

    monkeypatch.setattr(sys, "argv", ["lipexp", *args])
    code = 0
    try:
        cli()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_the_commands_and_compare_errors_through_the_cli(own_runs, tmp_path, monkeypatch, capsys):
    for flag in ("--help", "-h"):
        code, out, err = _cli(monkeypatch, capsys, flag)
        assert code == 0, err
        for text in ("lipexp list", "lipexp compare", "figure=<id>", "-m", "== Config groups ==", "tracker: "):
            assert text in out, (flag, text)
    code, _, err = _cli(monkeypatch, capsys, "compare", str(own_runs), "--metrics", "nope", "--out", str(tmp_path))
    assert code == 2 and err.startswith("lipexp compare: unknown metric 'nope'") and err.count("\n") == 1, err
