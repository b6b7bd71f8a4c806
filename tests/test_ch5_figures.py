"""Chapter 5 figures end to end through the ``lipexp`` command (profile smoke), plus the pieces they add.

Every figure's sweep runs with ``-m`` (as ``make reproduce-chapter5`` does) and must leave figure.png/pdf,
summary.csv with the expected columns and a summary.md that states what it measured.
"""
import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from lipexp import models


def _outputs(results, fig):
    d = results / fig / "smoke"
    for name in ("figure.png", "figure.pdf", "summary.csv", "summary.md"):
        assert (d / name).stat().st_size > 0, f"{fig}: {name} missing or empty"
    return pd.read_csv(d / "summary.csv"), (d / "summary.md").read_text()


def _statuses(results, fig):
    runs = sorted((results / fig / "runs" / "smoke").glob("*/status.json"))
    return {p.parent.name: json.loads(p.read_text()) for p in runs}


@pytest.mark.parametrize(
    "fig, columns, rows",
    [
        ("fig5_2", {"seed", "K_f_grid", "bound_analytic", "bound_fft", "K_over_bound"}, 3),
        ("gaussian", {"a", "K_f_exact", "K_f_fd", "bound_exact", "bound_fft", "bound_rel_err"}, 3),
        ("lemma5_3_4", {"zeta_norm", "delta", "sup_diff", "bound", "ratio", "ratio_predicted"}, 4),
    ],
)
def test_theory_figures(lipexp_cli, fig, columns, rows):
    lipexp_cli("-m", f"figure={fig}", "profile=smoke")
    table, md = _outputs(lipexp_cli.results, fig)
    assert columns <= set(table.columns) and len(table) == rows
    assert "Thesis claim" in md and "smoke" in md
    if fig == "fig5_2":  # Theorem 5.3.1 holds and the FFT estimate matches the analytic bound
        assert (table["K_f_grid"] <= table["bound_analytic"]).all()
        assert (table["bound_fft"] / table["bound_analytic"] - 1).abs().max() < 1e-4
    if fig == "gaussian":
        assert table["bound_rel_err"].abs().max() < 1e-3 and table["K_f_rel_err"].abs().max() < 1e-3
    if fig == "lemma5_3_4":
        assert (table["sup_diff"] <= table["bound"]).all()


def test_fig5_1_frequency_response(lipexp_cli):
    lipexp_cli("-m", "figure=fig5_1", "profile=smoke")
    table, md = _outputs(lipexp_cli.results, "fig5_1")
    assert {"final_test_acc", "fhat_t0", "K_max", "t_at_K_max", "init_K_max"} <= set(table.columns)
    # |f^(0)| is the mean true-label probability: a probability, above chance after a few Adam steps
    assert 0.1 < table["fhat_t0"].iloc[0] <= 1.0
    assert "mirror:mnist.npz" in md


def test_cifar_figures_train_once_and_share_models(lipexp_cli):
    """fig5_5 trains one model per cutoff; fig5_6 reuses those with the same training config and trains the
    cutoff fig5_5 lacks; fig5_4 standardises each filtered set with its own statistics, so it reuses nothing."""
    lipexp_cli("-m", "figure=fig5_5", "profile=smoke")
    table, md = _outputs(lipexp_cli.results, "fig5_5")
    assert {"cutoff", "K_emp_input", "K_input_median", "K_bound", "test_acc", "lip_method"} <= set(table.columns)
    assert list(table["cutoff"]) == [0.5, 1.0]
    assert (table["K_emp_input"] > 0).all() and (table["K_bound"] > 0).all()
    assert "Pearson" in md and "Spearman" in md and "JPEG" in md and "smoke" in md

    lipexp_cli("-m", "figure=fig5_6", "profile=smoke", "data.cutoff=0.5,0.6")
    table, md = _outputs(lipexp_cli.results, "fig5_6")
    assert {"cutoff", "sharpness", "loss_rise_half", "loss_centre", "reused_model"} <= set(table.columns)
    assert dict(zip(table["cutoff"], table["reused_model"])) == {0.5: True, 0.6: False}
    assert all(s["status"] == "completed" for s in _statuses(lipexp_cli.results, "fig5_6").values())
    assert "Spearman" in md and "JPEG" in md

    lipexp_cli("-m", "figure=fig5_4", "profile=smoke")
    table, md = _outputs(lipexp_cli.results, "fig5_4")
    assert {"filter", "grad_median", "grad_mean", "grad_p90", "grad_input_median", "grad_init_median", "test_acc"} <= set(table.columns)
    assert list(table["filter"]) == ["lowpass", "none", "highpass"]
    assert (table["grad_median"] > 0).all() and "JPEG" in md
    std = dict(zip(table["filter"], table["input_std"]))
    assert std["highpass"] < 0.1 < std["lowpass"], "each filtered set is standardised with its own statistics"
    assert not any("reused_model" in s for s in _statuses(lipexp_cli.results, "fig5_4").values())


def test_cross_entropy_on_log_softmax_output_is_nll():
    """mlp_ch5 ends in LogSoftmax and is trained with cross-entropy: that is its NLL (log_softmax is idempotent)."""
    torch.manual_seed(0)
    logp = models.mlp_ch5()(torch.rand(8, 1, 28, 28))
    y = torch.randint(0, 10, (8,))
    torch.testing.assert_close(F.cross_entropy(logp, y), F.nll_loss(logp, y))
