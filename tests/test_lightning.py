"""The PyTorch Lightning callback logs the tracker's terms and K_pred of each step."""
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch", reason="the lightning extra (pip install 'lipexp[lightning]')")

from lipexp.dynamics import DynamicsTracker, KIntegrator, term_columns  # noqa: E402
from lipexp.lightning import LipschitzCallback  # noqa: E402

LR = 0.1


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def _loader():
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g))
    return DataLoader(ds, batch_size=12, shuffle=False)


def test_callback_logs_terms_and_k_pred_equal_to_a_direct_tracker(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    steps = 5  # more than one pass over the 4 batches
    callback = LipschitzCallback()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=CSVLogger(tmp_path, name="run"),
                         callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(Tiny(), _loader())
    (csv,) = tmp_path.glob("run/*/metrics.csv")
    logged = pd.read_csv(csv).dropna(subset=["lipexp/K_pred"]).reset_index(drop=True)
    assert len(logged) == steps

    model = Tiny()  # the same steps with the tracker directly
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tracker, integ = DynamicsTracker(model, LR, optimizer=opt), KIntegrator(LR)
    batches = list(_loader())
    for step in range(steps):
        x, y = batches[step % len(batches)]
        tracker.begin()
        loss = nn.functional.cross_entropy(model.net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        terms = tracker.end()
        row = {"loss": loss.item(), **integ.update(terms), **term_columns(terms)}
        for key in ("loss", "K_emp", "K_pred", "EK_pred", "VarK_pred", "mu_Z", "sigma1/net.0.weight",
                    "mu/net.0.weight", "kappa/net.2.weight", "lambda2/net.2.weight"):
            assert logged[f"lipexp/{key}"][step] == pytest.approx(row[key], rel=1e-5, abs=1e-10), (step, key)
    tracker.close()
    assert len(callback.monitor.rows) == steps and not callback.monitor.tracker.armed


def test_callback_refuses_gradient_accumulation(tmp_path):
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, callbacks=[LipschitzCallback()],
                         accumulate_grad_batches=2, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="accumulate_grad_batches=1"):
        trainer.fit(Tiny(), _loader())
