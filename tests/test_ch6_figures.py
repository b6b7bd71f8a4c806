"""Chapter 6 figures end to end (profile=smoke through the ``lipexp`` command), and the helpers they rely on.

The figure tests share one results folder (module scope), so the smoke zoo is trained once and reused, as in
`make reproduce-chapter6`; each figure still trains what it misses (the first one to run trains the zoo).
"""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn

from experiments import ch6
from experiments.fig6_3 import derived
from lipexp import data as D
from lipexp import frequency, iaside, zoo

from .conftest import run_lipexp

# one thread: the attacks and the tiny smoke models are dominated by per-op overhead, which extra threads on a
# shared 2-core machine only make worse
ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}

FIGURES = {
    "fig6_zoo": {"model", "family", "params", "test_acc"},
    "fig6_1": {"dataset", "r", "esd", "fit"},
    "fig6_2": {"perturbation", "snr_db_r1", "snr_db_rmax", "loglog_slope", "images"},
    "fig6_6": {"code", "bands", "energy_fraction"},
    "fig6_7": {"model", "init", "srs", "tv_uniform", "tv_uniform_lo", "entropy", "sid_0", "sid_3"},
    "fig6_9": {"model", "perturbation", "level", "srs", "mpe", "pearson", "spearman"},
    "fig6_10": {"model", "perturbation", "level", "srs", "mpe", "pearson", "spearman"},
    "fig6_11": {"model", "params", "srs", "transformer", "sid_0"},
    "fig6_12": {"arch", "label_noise", "srs", "entropy", "tv_uniform", "test_acc", "sid_0"},
    "fig6_13": {"model", "absence", "srs", "sid_0"},
    "fig6_15": {"model", "partition", "srs", "frequencies", "density"},
    "fig6_16": {"model", "K", "error_mean", "error_std"},
    "fig6_3": {"train_set", "train_acc", "val_acc", "gap", "noisy_val_acc", "embed_shift_ratio"},
    "fig6_8": {"model", "srs", "source"},
}


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ch6_results")


@pytest.mark.parametrize("fig", list(FIGURES))
def test_figure_runs_end_to_end(fig, results_dir, mirror, data_root):
    run_lipexp(["-m", f"figure={fig}", "profile=smoke", "progress=false"], results_dir, mirror, data_root, env=ENV)
    out = results_dir / fig / "smoke"
    for name in ("figure.png", "figure.pdf", "summary.csv", "summary.md", "provenance.json"):
        assert (out / name).stat().st_size > 0, name
    table = pd.read_csv(out / "summary.csv")
    assert FIGURES[fig] <= set(table.columns), set(table.columns)
    assert len(table) > 0
    statuses = [json.loads(p.read_text())["status"] for p in (results_dir / fig / "runs" / "smoke").glob("*/status.json")]
    assert statuses and all(s == "completed" for s in statuses), statuses
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["profile"] == "smoke" and prov["findings"] and prov["data_source"] != "none"
    md = (out / "summary.md").read_text()
    assert "**Thesis claim.**" in md and "**Measured.**" in md
    _check_values(fig, table, md)


def _check_values(fig: str, table: pd.DataFrame, md: str) -> None:
    if fig == "fig6_6":
        full = table[table["k"] == table["k"].max()]  # bitmask 2^M - 1: every band present
        assert abs(full["energy_fraction"].iloc[0] - 1.0) < 1e-3  # all bands = the image
        assert len(table) == 16
    if fig in ("fig6_7", "fig6_11", "fig6_12", "fig6_13"):
        sids = ch6.sid_matrix(table.dropna(subset=["sid_0"]))
        assert abs(sids.sum(1) - 1).max() < 1e-6 and sids.min() >= 0
    if fig == "fig6_7":
        assert set(table["init"]) == {"trained", "kaiming"}
    if fig in ("fig6_9", "fig6_10"):
        assert table["mpe"].between(0, 1).all()
    if fig == "fig6_16":
        assert (table["error_mean"] > 0).all()
    if fig == "fig6_8":
        assert "mCE correlation skipped" in md  # no torchvision weights offline / in smoke
    if fig == "fig6_3":
        assert set(table["train_set"]) == {"[0, 1]", "[0, 0.3]", "[0.3, 1]"}


# ------------------------------------------------------------------------------------------ helpers
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(16, 5))

    def forward(self, x):
        return self.net(x)


def test_per_sample_psi_averages_to_the_batch_shapley_values():
    model = _Tiny().eval()
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4])
    per = ch6.per_sample_psi(model, x, y, num_bands=3)
    assert per.shape == (5, 3)
    batch = iaside.spectral_importance(model, x, y, num_bands=3)
    torch.testing.assert_close(per.mean(0), batch, rtol=1e-9, atol=1e-9)


def test_sid_stats_uniform_and_peaked():
    st = ch6.sid_stats(torch.tensor([[3.0, 1.0, 0.0, 0.0]]))
    assert abs(st["sid"].sum() - 1) < 1e-12 and st["tv_uniform"] == pytest.approx(0.5)
    assert st["low_half"] == pytest.approx(1.0)
    # psi with two levels: SID (0.5, 0, 0.5, 0) is as far from uniform as (1, 0, 0, 0)'s half
    st2 = ch6.sid_stats(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert st2["tv_uniform"] == pytest.approx(0.5) and st2["entropy"] == pytest.approx(0.5)


def test_correlation_needs_three_points():
    assert pd.isna(ch6.correlation([1, 2], [2, 1])["pearson"])
    c = ch6.correlation([1, 2, 3, 4], [8, 6, 4, 1])
    assert c["spearman"] == pytest.approx(-1.0) and c["pearson"] < -0.9


def test_derived_band_sets_keep_one_band_of_each_image():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(6, 3, 16, 16, generator=g) * 255).to(torch.uint8)
    ds = D.Dataset("cifar10", "train", x, torch.arange(6) % 2, 2, "test")
    low = derived(ds, "low", 0.3, seed=0)
    xf = x.float() / 255
    # the low band of the derived image is the image's own low band; its high band belongs to another image
    torch.testing.assert_close(frequency.lowpass(low.x, 0.3), frequency.lowpass(xf, 0.3), atol=1e-5, rtol=0)
    hp = frequency.highpass(low.x, 0.3)
    own = (hp - frequency.highpass(xf, 0.3)).flatten(1).norm(dim=1)
    assert (own > 1e-3).all()  # never its own complement
    others = [min(float((hp[i] - frequency.highpass(xf[j], 0.3)).norm()) for j in range(6) if j != i) for i in range(6)]
    assert max(others) < 1e-4
    assert derived(ds, "full", 0.3, seed=0) is ds


def test_zoo_narrow_variants():
    wide, narrow = zoo.resnet18_cifar(), zoo.resnet18_cifar(width=16)
    assert zoo.parameter_count(narrow) < zoo.parameter_count(wide) / 10
    with torch.no_grad():
        assert narrow.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)
        assert zoo.vgg11_bn_cifar(width=16).eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    feats = {}
    mob = zoo.mobilenet_v2_cifar(width_mult=0.5, total_stride=16).eval()
    mob[1].features.register_forward_hook(lambda m, i, o: feats.__setitem__("f", o.shape))
    with torch.no_grad():
        mob(torch.rand(1, 3, 32, 32))
    assert feats["f"][-2:] == (2, 2)
    with pytest.raises(ValueError, match="total_stride"):
        zoo.mobilenet_v2_cifar(total_stride=4)
    with pytest.raises(ValueError, match="no weights 'V9'"):
        zoo.torchvision_pretrained("resnet18", allow_download=False, weights="V9")


def test_zoo_settings_come_from_the_zoo_config():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"figure": {"id": "fig6_7"}, "profile": {"name": "quick"}})
    zs, ss = ch6.zoo_settings(cfg), ch6.sid_settings(cfg)
    assert "convnet" in zs.cifar and "lite0" in zs.imagenet and ss.num_bands == 8
