"""Every Chapter 4 figure runs end to end (profile smoke) and writes the results contract."""
import json

import pandas as pd
import pytest

CH4 = ["fig4_2", "fig4_8", "fig4_3", "fig4_4", "fig4_5", "fig4_6", "fig4_7", "fig4_1"]


def _check_outputs(results, fig):
    d = results / fig / "smoke"
    for name in ("figure.png", "figure.pdf", "summary.csv", "summary.md", "provenance.json"):
        assert (d / name).stat().st_size > 0, name
    md = (d / "summary.md").read_text()
    assert "**Thesis claim.**" in md and "**Measured.**" in md and "smoke" in md
    prov = json.loads((d / "provenance.json").read_text())
    assert prov["profile"] == "smoke" and prov["completed"] >= 1 and prov["findings"]
    return pd.read_csv(d / "summary.csv"), md


@pytest.mark.parametrize("fig", CH4)
def test_figure_runs_end_to_end(lipexp_cli, fig):
    lipexp_cli("-m", f"figure={fig}", "profile=smoke", timeout=900)
    table, md = _check_outputs(lipexp_cli.results, fig)
    runs = list((lipexp_cli.results / fig / "runs" / "smoke").glob("*/status.json"))
    statuses = [json.loads(p.read_text())["status"] for p in runs]
    assert statuses and all(s == "completed" for s in statuses), statuses
    if fig in ("fig4_2", "fig4_8", "fig4_4", "fig4_3"):
        assert "max_rel_err" in table.columns and table["max_rel_err"].notna().all()
        assert (table["max_rel_err"] < 0.05).all()  # a few steps at lr 1e-3: the SDE is near exact
        metrics = pd.read_parquet(runs[0].parent / "metrics.parquet")
        for col in ("step", "t", "loss", "K_emp", "Z_emp", "K_pred", "Z_pred", "EK_pred", "VarK_pred",
                    "mu_Z", "kappa_Z", "lambda2_Z", "sigma1/0.weight", "mu/0.weight", "kappa/0.weight",
                    "lambda2/0.weight"):
            assert col in metrics.columns, col
    if fig == "fig4_3":
        metrics = pd.read_parquet(runs[0].parent / "metrics.parquet")
        assert {"kappa_var/0.weight", "kappa_cov/0.weight", "lambda2_var/0.weight", "lambda2_cov/0.weight",
                "kappa_Z_var", "kappa_Z_cov"} <= set(metrics.columns)
    if fig == "fig4_5":
        assert "p_predicted" in table.columns
    if fig in ("fig4_6", "fig4_7"):
        assert "predicted_EK" in table.columns and table["predicted_EK"].notna().all()


def test_sample_variance_error_bars_match_monte_carlo():
    # fig4_5 reports the observed exponent with a standard error and a bias-corrected obs/pred ratio:
    # both must match the spread of sample variances of 4 Gaussian draws
    import numpy as np

    from experiments import ch4

    rng = np.random.default_rng(0)
    m, n = np.array([32, 64, 128]), [4, 4, 4]
    slopes, log_ratios = [], []
    for _ in range(3000):
        v = np.array([np.var(rng.normal(0, (1 / k) ** 0.5, 4), ddof=1) for k in m])
        slopes.append(ch4.fit_power(m, v)[0])
        log_ratios.append(np.log(ch4.log_ratio_mean_se(v * m, n)[0]))
    assert abs(np.mean(slopes) + 1) < 0.06
    assert np.std(slopes) == pytest.approx(ch4.sample_variance_slope_se(m, n), rel=0.06)
    assert abs(np.mean(log_ratios)) < 0.04
    assert np.std(log_ratios) == pytest.approx(ch4.log_ratio_mean_se([1, 1, 1], n)[1], rel=0.06)


def test_out_of_sample_check_is_calibrated_on_runs_drawn_from_the_sde():
    # 40 "runs" whose log K is a Gaussian random walk with the per-step variance the prediction states:
    # one run's path as the mean and its predicted std must give z rms sqrt(2) and coverage erf(1.96/2)
    import numpy as np

    from experiments import ch4

    rng = np.random.default_rng(1)
    steps, lr, lam2, drift = 300, 0.01, 0.005, 0.3  # Var[log K(T)] = 0.015: K nearly Gaussian, as in training
    frames = {}
    for s in range(40):
        z = np.log(2.0) + np.concatenate([[0.0], np.cumsum(lr * drift + np.sqrt(lr * lam2) * rng.normal(size=steps))])
        v = lr * lam2 * np.arange(steps + 1)
        ek = np.exp(z + v / 2)
        frames[s] = pd.DataFrame({"K_emp": np.exp(z), "EK_pred": ek, "VarK_pred": ek**2 * np.expm1(v)})
    res = ch4.out_of_sample(frames)
    assert res["n_pairs"] == 40 * 39
    assert abs(res["z_rms"] - ch4.PAIR_Z_STD) < 0.15 and abs(res["z_mean"]) < 0.2
    assert abs(res["coverage"] - ch4.PAIR_COVERAGE) < 0.05
    assert ch4.out_of_sample({0: frames[0]}) is None
    # a prediction with too small a spread is caught
    narrow = {s: f.assign(VarK_pred=f["VarK_pred"] / 16) for s, f in frames.items()}
    assert ch4.out_of_sample(narrow)["coverage"] < 0.5


def test_forward_prediction_extrapolates_the_early_terms():
    import numpy as np

    from experiments import ch4

    steps, lr = 100, 0.1
    mu = np.full(steps, 0.2)  # constant drift: the forward extrapolation is exact
    z = np.log(3.0) + np.concatenate([[0.0], np.cumsum(lr * mu)])
    df = pd.DataFrame({"step": np.arange(steps + 1), "K_emp": np.exp(z),
                       "mu_Z": np.append(mu, np.nan), "kappa_Z": np.append(np.zeros(steps), np.nan)})
    f = ch4.forward_prediction(df, lr)
    assert f["fwd_from_step"] == 20 and f["fwd_rel_err"] < 1e-12 and f["fwd_rel_err_constant"] > 0.5
