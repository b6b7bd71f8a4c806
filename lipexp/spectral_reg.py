"""The Chapter 7 regularisers: spectral gap (thesis eq. 7.3) and spectrum-gradient alignment (eq. 7.5).

Both act on the matrix view of every weight of ``lipexp.layers.weight_layers`` (Linear ``out x in``,
Conv2d ``out x (in*kh*kw)``) and are differentiable through the identity

    d sigma_k / d W = u_k v_k^T        (sigma_k simple, u_k, v_k its singular pair),

so each singular value is computed as ``sigma = u^T W v`` with ``u, v`` *detached*: the value is the
Rayleigh quotient of the current vectors and autograd then gives exactly ``u v^T`` (no SVD is
differentiated). The vectors are kept between steps (``SpectralState``) and refined by one or two
iterations a step, because a weight moves little in one SGD step (warm start).

- ``sigma_max``: power iteration ``v <- W^T u / |.|, u <- W v / |.|`` (two mat-vecs an iteration).
- ``sigma_min``: the smallest of the ``r = min(m, n)`` singular values, i.e. the smallest *non-zero* one
  of a full-rank matrix, by inverse iteration on the smaller Gram matrix (``W W^T`` for a wide matrix,
  ``W^T W`` for a tall one; r x r, one Cholesky factorisation a step in float64, then cheap solves).
  Why the smallest non-zero and not the smallest of the n right singular values: a wide ``m x n``
  matrix (m < n: every convolution here, 64 x 288, 256 x 2048 ...) has an (n - m)-dimensional null
  space whatever its entries, so that ``sigma_min`` would be 0 for every weight, the gap (7.3) would be
  ``sigma_max`` alone and the penalty a spectral-norm penalty. The r-th singular value is the one
  training can move, and it is what "distributing features across the rank(theta) subspaces" of eq.
  7.1 refers to. Why inverse and not shifted power iteration (on ``c I - W W^T``): the bottom singular
  values of a random or trained matrix are dense (the Marchenko-Pastur edge), so the shifted
  iteration's rate ``(c - s_{r-1}^2) / (c - s_r^2)`` is within 1e-3 of 1 and it never settles, while
  inverse iteration's rate is ``(s_r / s_{r-1})^2``. The factorisation is float64 because the Gram
  squares the condition number.

Penalties (value and gradient; per-layer terms in ``last`` for logging):

- gap: ``t_l = sigma_max(W_l) - sigma_min(W_l)`` (>= 0), ``R = sign * beta * reduce(t)``; ``sign = +1``
  penalises the gap (whitening), ``-1`` rewards it (the thesis discusses both directions).
- alignment: ``t_l = <J_op^(l), -vec(grad_l L)> = -u1^T (dL/dW_l) v1 = sigma1 * mu_l`` (the Chapter 4
  drift of a plain SGD step, theory.md §2), ``R = beta * reduce(t)``. ``dL/dW`` is taken with
  ``create_graph=True`` so that ``R`` is differentiable: its gradient is a Hessian-vector product
  ``beta * H vec(s_l u_l v_l^T)`` (``s_l`` the signs), which double backward computes in one extra
  backward pass through the graph of the first (cost measured in scripts/bench_ch7.py). ``J_op = u1 v1^T``
  is held fixed within a step (detached, as sigma's vectors are): the gradient is that of the
  alignment of the gradient with the step's principal direction. The exact derivative of (7.5) has a
  second term, the operator-norm Hessian applied to the gradient (how the direction turns), which needs
  every singular pair and the inverse gaps ``1/(s1^2 - s_i^2)`` (a full SVD a step); it is left out.

``reduce``: ``per_layer`` = ``sum_l |t_l|`` (each layer's term on its own, as eqs. 7.3 and 7.5 are
written); ``sum`` = ``|sum_l t_l|`` (the network-level term; for the alignment it is
``|<J_op, -vec grad>|`` of all weights stacked, i.e. ``|sum_l sigma_l mu_l|``, which lets layers
cancel). The gaps are non-negative, so for the gap both reductions coincide.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import weight_layers, weight_matrix

KINDS = ("none", "spectral_gap", "alignment")
REDUCES = ("per_layer", "sum")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp_min(torch.finfo(x.dtype).tiny)


@torch.no_grad()
def power_step(w: torch.Tensor, u: torch.Tensor, iters: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``iters`` power iterations for the top pair of ``w`` (m x n) from left vector ``u`` (m,); returns (u, v)."""
    for _ in range(max(int(iters), 1)):
        v = _unit(w.T @ u)
        u = _unit(w @ v)
    return u, v


@torch.no_grad()
def inverse_step(w: torch.Tensor, q: torch.Tensor, iters: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``iters`` inverse iterations for the bottom pair of ``w`` (m x n) on the smaller Gram (r x r, float64).

    ``q`` (r,) is the bottom eigenvector estimate of the Gram (a left vector when m <= n, a right one
    otherwise). Returns (q, u, v) with u (m,), v (n,) unit vectors in ``w``'s dtype. A singular Gram
    (rank-deficient ``w``: sigma_min = 0, not differentiable) is shifted by the smallest multiple of ten of
    its rounding level (10 eps of ``w``'s dtype times its largest diagonal entry) that factorises.
    """
    # The Gram product in the weights' dtype (the step's main cost; sgemm is 2x dgemm here), the factorisation
    # and solves in float64: for float32 weights the bottom eigenvalue then carries a relative error of about
    # 1e-7 * cond(W)^2 (1e-3 at cond 100), fine for a penalty; float64 weights are exact throughout.
    wide = w.shape[0] <= w.shape[1]
    wd = w.to(torch.float64)
    gram = (w @ w.T if wide else w.T @ w).to(torch.float64)
    chol, info = torch.linalg.cholesky_ex(gram)
    # A (numerically) singular Gram: rewarding the gap drives sigma_min to 0, and a float32 product can then
    # have a slightly negative bottom eigenvalue. Shift by multiples of the product's rounding level.
    jitter = 10 * torch.finfo(w.dtype).eps * float(gram.diagonal().max().clamp_min(1e-300))
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    while int(info) != 0:
        chol, info = torch.linalg.cholesky_ex(gram + jitter * eye)
        jitter *= 10
    q = q.to(torch.float64)
    for _ in range(max(int(iters), 1)):
        # two triangular solves: 8x faster than cholesky_solve for one right-hand side here
        y = torch.linalg.solve_triangular(chol, q.unsqueeze(1), upper=False)
        q = _unit(torch.linalg.solve_triangular(chol.mT, y, upper=True).squeeze(1))
    other = _unit(wd.T @ q) if wide else _unit(wd @ q)
    u, v = (q, other) if wide else (other, q)
    return q, u.to(w.dtype), v.to(w.dtype)


def rayleigh_sigma(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``u^T W v`` with the vectors detached: differentiable in ``w``, gradient ``u v^T``."""
    return u.detach() @ w @ v.detach()


@dataclass
class SpectralState:
    """Warm-start vectors per weight: ``top[name] = u1`` (m,), ``bottom[name] = q`` (r,) of the smaller Gram."""

    top: dict[str, torch.Tensor] = field(default_factory=dict)
    bottom: dict[str, torch.Tensor] = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"top": {k: v.detach().cpu().clone() for k, v in self.top.items()},
                "bottom": {k: v.detach().cpu().clone() for k, v in self.bottom.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.top = {k: v.clone() for k, v in state.get("top", {}).items()}
        self.bottom = {k: v.clone() for k, v in state.get("bottom", {}).items()}


def _start(n: int, seed: int, like: torch.Tensor, dtype=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return _unit(torch.randn(n, generator=g, dtype=torch.float64)).to(like.device, dtype or like.dtype)


def top_pair(name: str, w: torch.Tensor, state: SpectralState, iters: int, init_iters: int = 50):
    """(u1, v1) of ``w`` (m x n) from the warm-start state (``init_iters`` iterations the first time)."""
    u = state.top.get(name)
    first = u is None
    if first:
        u = _start(w.shape[0], 0, w)
    u, v = power_step(w.detach(), u.to(w.device, w.dtype), init_iters if first else iters)
    state.top[name] = u
    return u, v


def bottom_pair(name: str, w: torch.Tensor, state: SpectralState, iters: int, init_iters: int = 200,
                solves_per_iter: int = 4):
    """(u_r, v_r) of the smallest of the min(m, n) singular values of ``w``, warm-started.

    The Gram matrix and its Cholesky factor (O(r^2 n + r^3)) are the cost of a step; each further solve is
    O(r^2), so one "iteration" here is ``solves_per_iter`` solves with the same factor."""
    q = state.bottom.get(name)
    first = q is None
    if first:
        q = _start(min(w.shape), 1, w, torch.float64)
    q, u, v = inverse_step(w.detach(), q.to(w.device), init_iters if first else iters * solves_per_iter)
    state.bottom[name] = q
    return u, v


def _reduce(terms: torch.Tensor, reduce: str) -> torch.Tensor:
    return terms.abs().sum() if reduce == "per_layer" else terms.sum().abs()


def gap_terms(model: nn.Module, state: SpectralState, iters: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{weight name: (sigma_max, sigma_min)}``, both differentiable (Rayleigh quotients, vectors detached)."""
    out = {}
    for name, mod in weight_layers(model):
        w = weight_matrix(mod.weight)
        u1, v1 = top_pair(name, w, state, iters)
        ur, vr = bottom_pair(name, w, state, iters)
        out[name] = (rayleigh_sigma(w, u1, v1), rayleigh_sigma(w, ur, vr))
    return out


def gap_penalty(model: nn.Module, state: SpectralState, beta: float, sign: int = 1, reduce: str = "per_layer",
                iters: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
    """``sign * beta * reduce_l (sigma_max - sigma_min)`` (eq. 7.3) and per-layer logging columns."""
    terms = gap_terms(model, state, iters)
    gaps = torch.stack([smax - smin for smax, smin in terms.values()])
    log = {}
    for (name, (smax, smin)), g in zip(terms.items(), gaps.detach().tolist()):
        log[f"gap/{name}"] = g
        log[f"sigma_min/{name}"] = float(smin.detach())
    return sign * beta * _reduce(gaps, reduce), log


def alignment_terms(model: nn.Module, loss: torch.Tensor, state: SpectralState, iters: int = 1
                    ) -> dict[str, torch.Tensor]:
    """``{weight name: <J_op, -vec(dL/dW)> = -u1^T (dL/dW) v1}``, differentiable (create_graph)."""
    layers = weight_layers(model)
    weights = [mod.weight for _, mod in layers]
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    out = {}
    for (name, mod), g in zip(layers, grads):
        w = weight_matrix(mod.weight)
        u1, v1 = top_pair(name, w, state, iters)
        out[name] = -(u1 @ weight_matrix(g) @ v1)
    return out


def alignment_penalty(model: nn.Module, loss: torch.Tensor, state: SpectralState, beta: float,
                      reduce: str = "per_layer", iters: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
    """``beta * reduce_l |<J_op^(l), -vec(grad_l L)>|`` (eq. 7.5) and per-layer logging columns
    (``align/<name>`` = sigma1 * mu of a plain SGD step on ``loss``)."""
    terms = alignment_terms(model, loss, state, iters)
    t = torch.stack(list(terms.values()))
    log = {f"align/{name}": v for name, v in zip(terms, t.detach().tolist())}
    return beta * _reduce(t, reduce), log


class Penalty:
    """The configured Chapter 7 term for a training loop: ``total = loss + penalty(loss)``.

    ``penalty.last`` holds the per-layer columns of the last call; ``state_dict`` the warm-start vectors.
    """

    def __init__(self, model: nn.Module, kind: str, beta: float, reduce: str = "per_layer", sign: int = 1,
                 iters: int = 1):
        check(kind, beta, reduce, sign, iters)
        self.model, self.kind, self.beta, self.reduce, self.sign, self.iters = model, kind, beta, reduce, sign, iters
        self.state = SpectralState()
        self.last: dict[str, float] = {}

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        if self.kind == "spectral_gap":
            value, self.last = gap_penalty(self.model, self.state, self.beta, self.sign, self.reduce, self.iters)
        else:
            value, self.last = alignment_penalty(self.model, loss, self.state, self.beta, self.reduce, self.iters)
        self.last["reg_penalty"] = float(value.detach())
        return value

    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state.load_state_dict(state)


def check(kind: str, beta: float, reduce: str, sign: int, iters: int) -> None:
    """One-line errors for bad settings."""
    if kind not in KINDS:
        raise ValueError(f"unknown spectral regulariser '{kind}'; choose one of {KINDS}")
    if not beta >= 0:
        raise ValueError(f"reg beta must be >= 0 (use sign=-1 to reward the gap), got {beta}")
    if reduce not in REDUCES:
        raise ValueError(f"unknown reg reduce '{reduce}'; choose one of {REDUCES}")
    if sign not in (1, -1):
        raise ValueError(f"reg sign must be +1 (penalise the gap) or -1 (reward it), got {sign}")
    if not iters >= 1:
        raise ValueError(f"reg iters (power iterations a step) must be >= 1, got {iters}")


@torch.no_grad()
def layer_spectra(model: nn.Module) -> dict[str, dict[str, float]]:
    """Exact per-layer spectrum summary (float64 SVD) of every Linear/Conv2d module's *effective* weight
    (``module.weight``, so a spectral-norm parametrisation is seen as used): sigma_max, sigma_min (the r-th),
    gap, condition number and stable rank ``|W|_F^2 / sigma_max^2``."""
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        s = torch.linalg.svdvals(weight_matrix(mod.weight.detach()).double())
        smax, smin = float(s[0]), float(s[-1])
        out[name] = {"sigma_max": smax, "sigma_min": smin, "gap": smax - smin,
                     "cond": smax / smin if smin > 0 else float("inf"),
                     "stable_rank": float((s ** 2).sum() / s[0] ** 2)}
    return out
