"""The training loop: K_emp, exact resume after an interruption, NaN handling."""
import math
import os
import signal

import pandas as pd
import pytest
import torch

from lipexp import models, results
from lipexp.data import Dataset
from lipexp.layers import k_emp, top_singular_values, weight_layers
from lipexp.train import Diverged, Interrupted, TrainSpec, train


def _toy_cifar(n=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return Dataset("cifar10", "train", x, y, 10, "synthetic")


def _model(seed=1):
    torch.manual_seed(seed)
    return models.convnet(10, dropout=True)


def test_k_emp_equals_direct_svd():
    m = _model()
    sig = top_singular_values(m)
    assert list(sig) == ["0.weight", "3.weight", "7.weight", "12.weight", "15.weight"]
    for name, mod in weight_layers(m):
        w = mod.weight.detach().double().reshape(mod.weight.shape[0], -1)
        assert sig[name] == pytest.approx(float(torch.linalg.svdvals(w)[0]), rel=1e-12)
    assert k_emp(sig) == pytest.approx(math.prod(sig.values()), rel=1e-12)


def _spec(**kw):
    base = dict(steps=24, lr=0.05, batch_size=32, tracker="sigma1", mixup_alpha=0.4, checkpoint_every=5,
                eval_samples=64, progress=False, sampling_seed=3, aux_seed=4)
    base.update(kw)
    return TrainSpec(**base)


@pytest.mark.parametrize("tracker", ["sigma1", "full"])
def test_resume_after_interrupt_gives_identical_metrics(tmp_path, tracker):
    ds = _toy_cifar()
    ref = train(_model(), ds, None, _spec(tracker=tracker), tmp_path / "ref")
    ref_df = pd.read_parquet(tmp_path / "ref" / results.METRICS_FILE)

    def interrupt(row):  # as if the user pressed Ctrl-C while the rows up to step 14 are written
        if row["step"] == 13:
            os.kill(os.getpid(), signal.SIGINT)

    run_dir = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        train(_model(), ds, None, _spec(tracker=tracker), run_dir, log_fn=interrupt)
    assert results.read_status(run_dir)["status"] == "interrupted"
    # log_fn sees rows when they are written (the checkpoint after step 14); the loop stops after the next step
    assert results.load_torch(run_dir / results.CHECKPOINT_FILE)["step"] == 16
    resumed = train(_model(), ds, None, _spec(tracker=tracker), run_dir)
    df = pd.read_parquet(run_dir / results.METRICS_FILE)
    assert list(df["step"]) == list(range(24)) + [24]  # no lost or duplicated rows
    pd.testing.assert_frame_equal(df, ref_df, check_exact=True)
    assert resumed["final_K_emp"] == ref["final_K_emp"]
    if tracker == "full":
        assert {"K_pred", "mu_Z", "kappa/0.weight", "K_pred_2nd", "EK_pred_2nd", "VarK_pred_2nd", "mu2_Z",
                "lambda2_Z_full", "mu2/0.weight"} <= set(df.columns)
        assert resumed["max_rel_err"] == ref["max_rel_err"]
        assert resumed["max_rel_err_2nd"] == ref["max_rel_err_2nd"]


def test_non_finite_loss_stops_with_reason(tmp_path):
    with pytest.raises(Diverged, match="non-finite loss"):
        train(_model(), _toy_cifar(), None, _spec(lr=1e6, mixup_alpha=0.0), tmp_path)
    status = results.read_status(tmp_path)
    assert status["status"] == "failed" and "non-finite loss" in status["reason"]


def test_spec_validation_is_explicit():
    with pytest.raises(ValueError, match="batch size"):
        _spec(batch_size=0).validate()
    with pytest.raises(ValueError, match="unknown tracker"):
        _spec(tracker="nope").validate()
    for kw, msg in ((dict(lr=float("inf")), "learning rate must be a finite"), (dict(lr=float("nan")), "learning rate"),
                    (dict(momentum=float("nan")), "momentum must be finite"),
                    (dict(weight_decay=float("inf")), "weight decay must be finite")):
        with pytest.raises(ValueError, match=msg):
            _spec(**kw).validate()


def test_evaluation_subset_is_not_the_first_samples_of_a_sorted_set():
    from lipexp.train import evaluate

    y = torch.arange(10).repeat_interleave(100)  # sorted by class, like the CIFAR-10 mirror
    ds = Dataset("cifar10", "test", torch.zeros(1000, 3, 32, 32, dtype=torch.uint8), y, 10, "synthetic")

    class Oracle(torch.nn.Module):  # predicts class 0 always
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()

    acc = evaluate(Oracle(), ds, "cpu", batch_size=64, limit=500)["acc"]
    assert 0.03 < acc < 0.2  # about 1/10, not 1.0 as on the first 500 samples
