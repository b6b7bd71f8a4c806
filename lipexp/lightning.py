"""A PyTorch Lightning callback that logs the Lipschitz dynamics of every training step.

    from lipexp.lightning import LipschitzCallback
    trainer = lightning.pytorch.Trainer(callbacks=[LipschitzCallback()], logger=CSVLogger("logs"))

Each optimiser step logs ``lipexp/K_emp``, ``lipexp/K_pred``, ``lipexp/EK_pred``, ``lipexp/VarK_pred``,
the network sums ``lipexp/mu_Z`` ... and per weight ``lipexp/<term>/<param name>`` to every logger of the
trainer (``logger.log_metrics``, at the callback's own step count). The step is bracketed by
``on_train_batch_start`` (``LipschitzMonitor.begin``) and ``on_train_batch_end`` (``end``, after
Lightning's optimiser step), so the training step must be one forward/backward and one plain SGD update
(no gradient accumulation). ``sigma1_only=True`` logs only ``sigma1/<param>`` and ``K_emp`` and works
with any optimiser. Needs the ``lightning`` package (``pip install 'lipexp[lightning]'``).
"""
from __future__ import annotations

try:
    from lightning.pytorch import Callback
except ImportError as err:  # the optional extra
    raise ImportError("lipexp.lightning needs the lightning package: pip install 'lipexp[lightning]'") from err

import torch

from .monitor import LipschitzMonitor

__all__ = ["LipschitzCallback"]


class LipschitzCallback(Callback):
    """Logs per-layer terms and K_pred of each training step to the trainer's loggers.

    - ``lr``: the step size of the SDE (default: the learning rate of the optimiser's first group,
      re-read at every step, so a scheduler's changes are followed).
    - ``sigma1_only``, ``split``, ``check_grad``: as in ``LipschitzMonitor`` / ``DynamicsTracker``.
    - ``log_layers``: also log the ``<term>/<param name>`` columns (else only K and the network sums).
    - ``prefix``: put before every logged name.

    After training, ``callback.monitor.dataframe()`` holds the same rows as a table. Each ``fit`` starts a
    new monitor, so the prediction of a resumed fit starts from the K at its start.
    """

    def __init__(self, lr: float | None = None, sigma1_only: bool = False, split: bool = False,
                 check_grad: bool = True, log_layers: bool = True, prefix: str = "lipexp/"):
        super().__init__()
        self.lr, self.sigma1_only, self.split, self.check_grad = lr, sigma1_only, split, check_grad
        self.log_layers, self.prefix = log_layers, prefix
        self.monitor: LipschitzMonitor | None = None

    def _optimizer(self, trainer) -> torch.optim.Optimizer:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"LipschitzCallback follows one optimiser; this trainer has {len(trainer.optimizers)}")
        return trainer.optimizers[0]

    def _lr(self, trainer) -> float:
        return float(self.lr if self.lr is not None else self._optimizer(trainer).param_groups[0]["lr"])

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise ValueError("LipschitzCallback needs one backward per optimiser step; set accumulate_grad_batches=1")
        opt = self._optimizer(trainer)
        self.monitor = LipschitzMonitor(pl_module, self._lr(trainer), optimizer=None if self.sigma1_only else opt,
                                        sigma1_only=self.sigma1_only, split=self.split, check_grad=self.check_grad)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.monitor.lr = self._lr(trainer)
        self.monitor.begin()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs is None:  # training_step returned None: Lightning skipped backward and the step
            self.monitor.abort()
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        extra = {"loss": float(loss)} if torch.is_tensor(loss) else {}
        row = self.monitor.end(**extra)
        metrics = {f"{self.prefix}{k}": v for k, v in row.items()
                   if k != "step" and (self.log_layers or "/" not in k)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=row["step"])

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def _close(self) -> None:
        if self.monitor is not None:
            if self.monitor.tracker.armed:
                self.monitor.abort()
            self.monitor.close()
