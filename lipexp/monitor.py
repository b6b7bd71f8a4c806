"""The Lipschitz dynamics of any model in your own training loop.

``LipschitzMonitor`` wraps ``lipexp.dynamics.DynamicsTracker`` (per-layer sigma1, mu, kappa, lambda2 of
each step) and ``KIntegrator`` (the predicted K(t)) and keeps one row per step, with the column names of
``lipexp.train.train``'s ``metrics.parquet``::

    monitor = LipschitzMonitor(model, lr=0.05, optimizer=opt)
    for x, y in loader:
        with monitor.step() as row:            # begin(): spectral data of the weights, hooks armed
            loss = loss_fn(model(x), y)         # ONE forward with grad; the mean of per-sample losses
            opt.zero_grad()
            loss.backward()
            opt.step()
            row["loss"] = loss.item()           # any extra columns of this step's row
    df = monitor.dataframe()                    # step, t, loss, K_emp, K_pred, ..., sigma1/<param>, ...

or ``monitor.begin()`` ... ``row = monitor.end(loss=loss.item())``. What the step may contain, and what
it must not (a second forward with grad, accumulated gradients, momentum), is ``DynamicsTracker``'s
rule. ``sigma1_only=True`` tracks the top singular values alone, for any optimiser and any loop.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .dynamics import DynamicsTracker, KIntegrator, term_columns
from .layers import k_emp, top_singular_values

__all__ = ["LipschitzMonitor"]


class LipschitzMonitor:
    """Rows of per-step Lipschitz terms for an own training loop.

    - ``lr``: the step size; set ``monitor.lr`` when a scheduler changes it (``t`` accumulates it).
    - ``optimizer``: passed to the tracker, which checks it is plain SGD (the SDE's update).
    - ``sigma1_only``: only ``sigma1/<param>``, ``K_emp``, ``Z_emp`` per row (no hooks; any optimiser).
    - ``split``, ``grad_scale``, ``noise_var``, ``check_grad``, ``reduction``: as in ``DynamicsTracker``.
    - ``k0``: the K the prediction starts from (default: the first step's ``K_emp``).
    - ``on_row``: called with each new row (a logger, e.g. ``wandb.log``).
    - ``start_step``: the step number of the first row.

    Columns of a row: ``step, t``, the extras given to ``end``/the ``step()`` dict, then (full
    tracking) ``K_emp, Z_emp, K_pred, Z_pred, EK_pred, VarK_pred, mu_Z, kappa_Z, lambda2_Z`` and
    ``<term>/<param name>`` for each term and weight, as ``term_columns``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        sigma1_only: bool = False,
        split: bool = False,
        grad_scale: float = 1.0,
        noise_var: float = 0.0,
        check_grad: bool = True,
        reduction: str = "mean",
        k0: float | None = None,
        on_row: Callable[[dict], None] | None = None,
        start_step: int = 0,
    ):
        self.model = model
        self.tracker = DynamicsTracker(model, lr, split=split, grad_scale=grad_scale, noise_var=noise_var,
                                       optimizer=optimizer, sigma1_only=sigma1_only, reduction=reduction,
                                       check_grad=check_grad)
        self.integrator = None if sigma1_only else KIntegrator(lr, k0)
        self.sigma1_only = sigma1_only
        self.on_row = on_row
        self.rows: list[dict] = []
        self.step_count = int(start_step)
        self.t = 0.0

    @property
    def lr(self) -> float:
        return self.tracker.lr

    @lr.setter
    def lr(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"lr must be > 0, got {value}")
        self.tracker.lr = float(value)

    # -- per step ------------------------------------------------------------------------------------
    def begin(self) -> None:
        """Before the step's forward: the weights' spectral data, hooks armed."""
        self.tracker.begin()

    def end(self, **extra) -> dict:
        """After ``optimizer.step()``: this step's row (also appended to ``rows``)."""
        terms = self.tracker.end()
        row = {"step": self.step_count, "t": self.t, **extra}
        if self.integrator is None:
            sig = {name: t["sigma1"] for name, t in terms.items()}
            row["K_emp"] = k_emp(sig)
            row["Z_emp"] = math.log(row["K_emp"])
        else:
            row.update(self.integrator.update(terms, lr=self.lr))
        row.update(term_columns(terms))
        self.rows.append(row)
        self.step_count += 1
        self.t += self.lr
        if self.on_row is not None:
            self.on_row(row)
        return row

    def abort(self) -> None:
        """Drop a step that failed between ``begin()`` and ``end()``."""
        self.tracker.abort()

    @contextmanager
    def step(self) -> Iterator[dict]:
        """``begin()`` on entry, ``end(**extras)`` on exit; the yielded dict collects the extras."""
        extra: dict = {}
        self.begin()
        try:
            yield extra
        except BaseException:
            self.abort()
            raise
        self.end(**extra)

    # -- results -------------------------------------------------------------------------------------
    def final_row(self) -> dict:
        """The state after the last step: its ``K_emp`` against the prediction integrated through it (the
        last row of ``train``'s metrics; ``loss`` is NaN, as no step follows)."""
        sig = top_singular_values(self.model, strict=False)
        sig = {name: sig[name] for name in (layer.name for layer in self.tracker.layers) if name in sig}
        row = {"step": self.step_count, "t": self.t, "loss": float("nan"), "K_emp": k_emp(sig),
               "Z_emp": math.log(k_emp(sig)), **{f"sigma1/{k}": v for k, v in sig.items()}}
        if self.integrator is not None and self.rows:
            row.update(self.integrator.prediction())
        return row

    def dataframe(self, final: bool = True):
        """The rows as a pandas DataFrame, with ``final_row()`` appended when ``final`` and a step was taken."""
        import pandas as pd

        rows = self.rows + ([self.final_row()] if final and self.rows else [])
        return pd.DataFrame(rows)

    def close(self) -> None:
        """Remove the tracker's hooks (the rows stay)."""
        self.tracker.close()

    def __enter__(self) -> "LipschitzMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
