"""Every Chapter 3 figure (and init_k0) runs end to end through the CLI (profile smoke) with its outputs."""
import json

import pandas as pd
import pytest

COLUMNS = {
    "fig3_2": {"dist", "shape", "k", "sigma_k", "eps", "thesis_bound", "within_thesis_bound"},
    "fig3_3": {"dist", "shape", "k", "sigma_k", "eps", "thesis_bound", "within_thesis_bound"},
    "fig3_4": {"derivative", "case", "k", "max", "median", "mean", "trials", "thesis_bound", "within_thesis_bound"},
    "table2_1": {"activation", "thesis", "closed_form", "numerical", "abs_err"},
    "bounds": {"layer", "kind", "type", "input_shape", "a_reshaped_sigma1", "unfold_factor", "a1_unfold_bound",
               "b_operator_norm", "b_over_a", "c_fft_bound", "b_iterations", "factor", "lower_bound"},
    "init_k0": {"model", "init", "layer", "m", "n", "std", "predicted", "measured_mean", "measured_std", "ratio"},
}


def _outputs(results, fig):
    d = results / fig / "smoke"
    for name in ("figure.png", "figure.pdf", "summary.csv", "summary.md", "provenance.json"):
        assert (d / name).stat().st_size > 0, name
    md = (d / "summary.md").read_text()
    assert "**Thesis claim.**" in md and "**Measured.**" in md and "smoke" in md
    prov = json.loads((d / "provenance.json").read_text())
    assert prov["profile"] == "smoke" and prov["completed"] == prov["total"] == 1 and prov["findings"]
    table = pd.read_csv(d / "summary.csv")
    assert COLUMNS[fig] <= set(table.columns), set(table.columns)
    return table, md


@pytest.mark.parametrize("fig", list(COLUMNS))
def test_figure_runs_end_to_end(lipexp_cli, fig):
    lipexp_cli("-m", f"figure={fig}", "profile=smoke", timeout=600)
    table, md = _outputs(lipexp_cli.results, fig)
    if fig == "fig3_2":  # 3 shapes x 2 distributions, one row per singular value
        assert len(table) == 2 * (6 + 6 + 8) and (table["eps"] == 0).all()
    if fig == "fig3_3":  # the thesis' bounds are for 6x10 only
        wide = table["shape"] == "6x10"
        assert table.loc[wide, "within_thesis_bound"].astype(bool).all() and table.loc[~wide, "thesis_bound"].isna().all()
        assert (table["eps"] < 1e-13).all()
    if fig == "fig3_4":
        wide = table["case"].str.endswith("6x10")
        assert table.loc[wide, "within_thesis_bound"].astype(bool).all() and table.loc[~wide, "thesis_bound"].isna().all()
    if fig == "fig3_4":
        assert set(table["derivative"]) == {"hessian", "jacobian"} and (table["trials"] == 5).all()
    if fig == "table2_1":
        assert len(table) == 11 and (table["abs_err"] < 1e-4).all()
    if fig == "bounds":
        net = table.set_index("layer")
        upper = float(net.loc["network upper bound, normalised input", "b_operator_norm"])
        for row in ("lower bound max Jacobian, normalised input", "lower bound ascent (eq 2.45), normalised input"):
            assert 0 < float(net.loc[row, "lower_bound"]) <= upper
        w = table[table["kind"] == "weight"]
        assert len(w) == 5 and (w["b_operator_norm"] <= w["c_fft_bound"] * (1 + 1e-6)).all()
        assert "normalised input" in md and "pixel input" in md
    if fig == "init_k0":
        net = table[table["layer"] == "K(0) = product"]
        assert len(net) == 4 and net["ratio"].between(0.7, 1.1).all()
