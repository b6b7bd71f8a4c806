"""Gallery, cross-run comparison and W&B report structure on smoke-profile runs."""
import json

import pandas as pd
import pytest

from experiments import compare, report, wandb_report

MNIST = ["figure=train", "profile=smoke", "model=mlp", "data=mnist", "tracker=sigma1"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, mirror, data_root):
    from .conftest import run_lipexp

    res = tmp_path_factory.mktemp("reports") / "results"
    run_lipexp(["-m", *MNIST, "optim.lr=0.001,0.01"], res, mirror, data_root)
    return res


def test_gallery_lists_each_figure_with_claim_and_provenance(two_runs):
    report.main(["--results", str(two_runs)])
    text = (two_runs / "index.md").read_text()
    prov = json.loads((two_runs / "train" / "smoke" / "provenance.json").read_text())
    assert "![train](train/smoke/figure.png)" in text
    assert prov["claim"] in text and "profile `smoke`" in text and "mirror:mnist.npz" in text
    assert prov["commit"][:12] in text
    assert all(f"**Measured:** {f}" in text for f in prov["findings"])


def test_compare_table_has_one_row_per_run_and_the_swept_key(two_runs, tmp_path):
    table = compare.main([str(two_runs / "train" / "runs" / "smoke"), "--metrics", "final_K_emp", "final_test_acc",
                          "--curves", "K_emp", "loss", "--out", str(tmp_path)])
    assert len(table) == 2 and "optim.lr" in table.columns
    assert sorted(table["optim.lr"]) == [0.001, 0.01]
    assert table["final_K_emp"].notna().all()
    saved = pd.read_csv(tmp_path / "compare.csv")
    assert len(saved) == 2 and (tmp_path / "compare.png").stat().st_size > 0
    # the K curves of the two learning rates differ (a real comparison, not two copies)
    assert table["final_K_emp"].nunique() == 2


def test_compare_columns_skip_figure_prose_and_paths(tmp_path):
    from omegaconf import OmegaConf

    from experiments.common import Run

    def run(name, lr, claim):
        cfg = OmegaConf.create({"figure": {"id": name, "claim": claim, "title": name}, "optim": {"lr": lr},
                                "data": {"mirror": f"/m/{name}"}, "results_dir": f"/r/{name}"})
        return Run(tmp_path / name, cfg, {}, {})

    assert compare.differing_keys([run("a", 0.1, "claim a"), run("b", 0.01, "claim b")]) == ["figure.id", "optim.lr"]


def test_wandb_report_dry_run_structure(capsys):
    wandb_report.main(["--figure", "train", "--dry-run", "--group-by", "optim.lr"])
    spec = json.loads(capsys.readouterr().out)
    assert spec["runset"]["filter"] == {"group": "train"}
    assert spec["runset"]["groupby"] == ["config.optim.lr"]
    assert {"K_emp", "K_pred"} <= set(spec["line_panels"][0]["y"])
    assert "summary.max_rel_err" in [p["metric"] for p in spec["scalar_panels"]]
    rep = wandb_report.build_report(spec)  # constructed offline with the maintained reports API
    assert rep.title == spec["title"] and len(rep.blocks) == 3
