"""The README section "Your own model": every code block runs as written, and does what the text says.

The blocks are read from README.md (the ``# example: <name>`` first line names each), so the section and
these tests cannot drift apart.
"""
import math
import re

import pandas as pd
import pytest

from .conftest import ROOT

SECTION = "## Your own model"
EXAMPLES = ("one-step", "own-data", "resnet18", "transformer", "own-loop", "lightning")


def readme_examples() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION + "\n")
    end = text.find("\n## ", start + len(SECTION))
    blocks = re.findall(r"```python\n(.*?)```", text[start : end if end >= 0 else None], flags=re.S)
    out = {}
    for code in blocks:
        first = code.splitlines()[0]
        assert first.startswith("# example: "), f"a python block of '{SECTION}' lacks its '# example:' line: {first}"
        out[first.removeprefix("# example: ").strip()] = code
    return out


def test_the_section_has_every_example():
    assert tuple(readme_examples()) == EXAMPLES


def _run(name, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)  # the examples write runs/ and figures into the working directory
    import matplotlib

    matplotlib.use("Agg")
    namespace = {"__name__": f"readme_{name.replace('-', '_')}"}
    exec(compile(readme_examples()[name], f"README.md ({name})", "exec"), namespace)
    return namespace


def test_one_step(tmp_path, monkeypatch):
    ns = _run("one-step", tmp_path, monkeypatch)
    assert set(ns["terms"]) == {"0.weight", "3.weight"}
    assert ns["K"] == pytest.approx(math.prod(t["sigma1"] for t in ns["terms"].values()), rel=1e-6)


def test_own_data(tmp_path, monkeypatch):
    ns = _run("own-data", tmp_path, monkeypatch)
    s = ns["summary"]
    assert math.isfinite(s["final_K_pred"]) and 0 <= s["max_rel_err"] < 1
    df = pd.read_parquet(tmp_path / "runs/mine/metrics.parquet")
    assert len(df) == 201 and df["loss"].iloc[:20].mean() > df["loss"].iloc[-21:-1].mean()  # it learns
    assert "test_acc" not in df and df["test_loss"].notna().sum() == 3  # regression: loss only; steps 0, 100, end
    for name in ("spec.json", "status.json", "summary.json", "k.png"):
        assert (tmp_path / "runs/mine" / name).exists(), name


def test_resnet18(tmp_path, monkeypatch):
    ns = _run("resnet18", tmp_path, monkeypatch)
    df = pd.read_parquet(tmp_path / "runs/resnet18/metrics.parquet")
    assert {"kappa/conv1.weight", "lambda2/layer4.1.conv2.weight", "mu/fc.weight"} <= set(df.columns)
    assert math.isfinite(ns["summary"]["final_K_pred"]) and 0 <= ns["summary"]["final_test_acc"] <= 1


def test_transformer(tmp_path, monkeypatch):
    ns = _run("transformer", tmp_path, monkeypatch)
    df = pd.read_parquet(tmp_path / "runs/transformer/metrics.parquet")
    assert {"kappa/0.layers.0.self_attn.in_proj_weight", "kappa/0.layers.1.self_attn.out_proj.weight"} <= set(df)
    assert math.isfinite(ns["summary"]["final_K_pred"])


def test_own_loop(tmp_path, monkeypatch):
    ns = _run("own-loop", tmp_path, monkeypatch)
    df = ns["df"]
    assert len(df) == 21 and df["K_pred"].notna().all() and (tmp_path / "own_loop_k.png").exists()
    assert df["K_pred"].iloc[0] == df["K_emp"].iloc[0] and df["kappa/0.weight"].iloc[:20].notna().all()


def test_lightning(tmp_path, monkeypatch):
    pytest.importorskip("lightning.pytorch", reason="the lightning extra (pip install 'lipexp[lightning]')")
    _run("lightning", tmp_path, monkeypatch)
    logged = pd.read_csv(tmp_path / "runs/lightning/version_0/metrics.csv")
    k = logged.dropna(subset=["lipexp/K_pred"])
    assert len(k) == 16 and k["lipexp/kappa/net.0.weight"].notna().all()  # 2 epochs of 8 batches
