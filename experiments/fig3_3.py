"""Fig. 3.3: the closed-form singular-value Hessian against autograd (``experiments.fig3_2`` with order 2)."""
from __future__ import annotations

from .fig3_2 import aggregate, run

__all__ = ["aggregate", "run"]
