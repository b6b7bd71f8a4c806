"""Loss and Lipschitz landscapes around a parameter vector (thesis Figs. 4.1 and 5.6).

Directions are flat float64 vectors over ``model.parameters()`` (in that order, all parameters),
the same layout as :func:`flat_params`. Filter normalisation follows Li et al. (2018, "Visualizing
the loss landscape of neural nets"): a random Gaussian direction is rescaled filter by filter (the
rows of a Linear weight, the output channels of a Conv2d weight: slices along dim 0) to the norm of
the matching filter of the weights; parameters with at most one dimension (biases, BatchNorm affine
parameters) get 0 (``ignore="biasbn"``, the authors' default) or a copy of the weights
(``ignore=None``, as in their code). BatchNorm running statistics are buffers, never moved.
Example scalar functions: ``make_loss_fn(batches)`` and, for K(t) = prod sigma_1,
``lambda m: lipexp.layers.k_emp(lipexp.layers.top_singular_values(m))``.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IGNORE = ("biasbn", None)
ORTHOGONALIZE = ("filter", "global", "none")


# ------------------------------------------------------------------ flat parameter vectors


def flat_params(model: nn.Module) -> torch.Tensor:
    """Copy of all parameters as one (P,) float64 vector, in ``model.parameters()`` order."""
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])


@torch.no_grad()
def set_flat_params(model: nn.Module, vec: torch.Tensor) -> None:
    """Write a (P,) vector into the parameters (cast to each parameter's dtype and device)."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    if vec.ndim != 1 or vec.numel() != total:
        raise ValueError(f"expected a flat vector of {total} entries for this model, got shape {tuple(vec.shape)}")
    i = 0
    for p in params:
        p.copy_(vec[i : i + p.numel()].view_as(p).to(p.dtype))
        i += p.numel()


# ------------------------------------------------------------------ directions


def filter_normalized_direction(
    model: nn.Module, generator: torch.Generator | None = None, ignore: str | None = "biasbn"
) -> torch.Tensor:
    """Random Gaussian direction (P,) float64, each filter scaled to its weight filter's norm."""
    _check_ignore(ignore)
    parts = []
    for p in model.parameters():
        w = p.detach().double().cpu()
        d = torch.randn(w.shape, generator=generator, dtype=torch.float64)
        if w.ndim <= 1:
            d = torch.zeros_like(w) if ignore == "biasbn" else w.clone()
        else:
            d = _scale_filters(d, w)
        parts.append(d.reshape(-1))
    return torch.cat(parts)


def random_directions(
    model: nn.Module, seed: int = 0, ignore: str | None = "biasbn", orthogonalize: str = "filter"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two seeded filter-normalised directions (P,) float64 with ``<d1, d2> = 0``.

    ``orthogonalize="filter"`` (default) applies Gram-Schmidt filter by filter — each filter of d2 is
    made orthogonal to the same filter of d1, then rescaled to the weight filter's norm — so both
    directions stay exactly filter-normalised and, summing over filters, are exactly orthogonal as flat
    vectors. ``"global"`` is one Gram-Schmidt step on the flat vectors (d2's filters then lose their
    exact normalisation, by the small overlap of two random directions); ``"none"`` skips it.
    """
    if orthogonalize not in ORTHOGONALIZE:
        raise ValueError(f"unknown orthogonalize '{orthogonalize}'; choose one of {ORTHOGONALIZE}")
    gen = torch.Generator().manual_seed(seed)
    d1 = filter_normalized_direction(model, gen, ignore)
    d2 = filter_normalized_direction(model, gen, ignore)
    if orthogonalize == "global":
        d2 = d2 - (d2 @ d1) / (d1 @ d1) * d1
    elif orthogonalize == "filter":
        d2 = _filterwise_orthogonal(model, d1, d2, ignore)
    return d1, d2


def _scale_filters(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    dn = d.reshape(d.shape[0], -1).norm(dim=1)
    wn = w.reshape(w.shape[0], -1).norm(dim=1)
    scale = torch.where(dn > 0, wn / dn.clamp_min(1e-300), torch.zeros_like(dn))
    return d * scale.view(-1, *([1] * (d.ndim - 1)))


def _filterwise_orthogonal(model: nn.Module, d1: torch.Tensor, d2: torch.Tensor, ignore) -> torch.Tensor:
    out, i = [], 0
    for name, p in model.named_parameters():
        n = p.numel()
        a, b = d1[i : i + n].view(p.shape), d2[i : i + n].view(p.shape)
        i += n
        if p.ndim <= 1:
            if ignore is None and n > 0 and p.detach().abs().sum() > 0:
                raise ValueError(
                    f"parameter '{name}' is one-dimensional and ignore=None copies the weights into both "
                    "directions, so they cannot be orthogonal; use ignore='biasbn' or orthogonalize='global'"
                )
            out.append(b.reshape(-1))
            continue
        a2, b2 = a.reshape(p.shape[0], -1), b.reshape(p.shape[0], -1)
        if a2.shape[1] < 2 and bool((a2.abs() > 0).any()):
            raise ValueError(
                f"parameter '{name}' has filters of a single entry: two nonzero filter-normalised directions "
                "cannot be orthogonal there; use orthogonalize='global'"
            )
        aa = (a2 * a2).sum(1, keepdim=True)
        b2 = b2 - torch.where(aa > 0, (a2 * b2).sum(1, keepdim=True) / aa.clamp_min(1e-300), torch.zeros_like(aa)) * a2
        out.append(_scale_filters(b2, p.detach().double().cpu().reshape(p.shape[0], -1)).reshape(-1))
    return torch.cat(out)


def pca_directions(snapshots: Sequence[torch.Tensor] | torch.Tensor, centre: torch.Tensor | None = None):
    """Top two principal directions (unit, float64) of ``snapshot - centre`` (default: the last
    snapshot, as Li et al. for trajectories) and their explained-variance ratios. Random directions
    in millions of dimensions are nearly orthogonal to any trajectory; PCA directions capture it."""
    traj = _stack(snapshots)
    centre = traj[-1] if centre is None else centre.double().reshape(-1)
    diff = traj - centre
    if diff.shape[0] < 2:
        raise ValueError("need at least two snapshots besides the centre for two PCA directions")
    gram = diff @ diff.T  # T x T: cheap when T << P
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0), evecs.flip(1)
    dirs = []
    for k in range(2):
        v = diff.T @ evecs[:, k]
        dirs.append(v / v.norm())
    ratio = (evals[:2] / evals.clamp_min(0).sum()).tolist()
    return dirs[0], dirs[1], ratio


# ------------------------------------------------------------------ landscapes


def landscape_grid(
    model: nn.Module,
    fn: Callable[[nn.Module], float],
    d1: torch.Tensor,
    d2: torch.Tensor,
    alphas: Sequence[float],
    betas: Sequence[float],
    centre: torch.Tensor | None = None,
) -> np.ndarray:
    """``fn(model at centre + alpha d1 + beta d2)`` for every pair: array (len(alphas), len(betas)).

    ``centre`` defaults to the current parameters. The model's parameters, buffers and train/eval
    mode are restored afterwards, also when ``fn`` raises.
    """
    centre = flat_params(model) if centre is None else centre.double().reshape(-1)
    _check_same_size(centre, d1, d2)
    out = np.empty((len(alphas), len(betas)))
    with _restored(model):
        for i, a in enumerate(alphas):
            for j, b in enumerate(betas):
                set_flat_params(model, centre + float(a) * d1 + float(b) * d2)
                out[i, j] = float(fn(model))
    return out


def landscape_1d(
    model: nn.Module,
    fn: Callable[[nn.Module], float],
    d: torch.Tensor,
    alphas: Sequence[float],
    centre: torch.Tensor | None = None,
) -> np.ndarray:
    """``fn(model at centre + alpha d)`` for every alpha: array (len(alphas),); model restored."""
    centre = flat_params(model) if centre is None else centre.double().reshape(-1)
    _check_same_size(centre, d)
    out = np.empty(len(alphas))
    with _restored(model):
        for i, a in enumerate(alphas):
            set_flat_params(model, centre + float(a) * d)
            out[i] = float(fn(model))
    return out


def project_trajectory(
    snapshots: Sequence[torch.Tensor] | torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, centre: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares plane coordinates of each snapshot: ``argmin_c |theta - centre - c1 d1 - c2 d2|``.

    Returns ``coords`` (T, 2) and ``residual`` (T,) = out-of-plane norm / ``|theta - centre|`` (0 where
    theta = centre), which says how much of the trajectory the plane shows. Snapshots: a (T, P) tensor
    or a list of (P,) vectors from :func:`flat_params`.
    """
    traj = _stack(snapshots)
    centre = centre.double().reshape(-1)
    _check_same_size(centre, d1, d2, traj[0])
    basis = torch.stack([d1.double(), d2.double()], 1)  # P x 2
    diff = traj - centre
    coords = torch.linalg.solve(basis.T @ basis, basis.T @ diff.T).T  # T x 2
    resid = (diff - coords @ basis.T).norm(dim=1)
    dn = diff.norm(dim=1)
    rel = torch.where(dn > 0, resid / dn.clamp_min(1e-300), torch.zeros_like(dn))
    return coords.numpy(), rel.numpy()


def make_loss_fn(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> Callable[[nn.Module], float]:
    """``fn(model)`` = mean per-sample loss over fixed ``(x, y)`` batches, in eval mode, no grad.

    ``criterion`` must return the batch mean (PyTorch's default reduction); batches are weighted by
    size. The batches are materialised once so every grid point sees the same samples.
    """
    fixed = list(batches)
    if not fixed:
        raise ValueError("make_loss_fn needs at least one (x, y) batch")

    @torch.no_grad()
    def fn(model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            total, count = 0.0, 0
            for x, y in fixed:
                x, y = x.to(device), y.to(device)
                total += float(criterion(model(x), y)) * x.shape[0]
                count += x.shape[0]
            return total / count
        finally:
            model.train(was_training)

    return fn


# ------------------------------------------------------------------ sharpness


@dataclass(frozen=True)
class HessianEig:
    value: float  # largest algebraic eigenvalue of the Hessian of the loss
    vector: torch.Tensor  # (P',) unit eigenvector over the parameters with requires_grad
    iterations: int  # HVPs used
    converged: bool  # relative change of the Rayleigh quotient fell below tol
    dominant: float  # eigenvalue of largest magnitude (equals value when it is positive)


def hessian_vector_product(
    model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], v: torch.Tensor
) -> torch.Tensor:
    """``H v`` for ``H`` the Hessian of ``loss_fn(model)`` w.r.t. the parameters with requires_grad
    (flat, in ``parameters()`` order), by double backward. ``v``: (P',); returns (P',) float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model), params, create_graph=True)
    return _hvp(params, grads, v)


def hessian_top_eigenvalue(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor] | Sequence[Callable[[nn.Module], torch.Tensor]],
    iters: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
) -> HessianEig:
    """Top Hessian eigenvalue of the loss by power iteration on Hessian-vector products.

    ``loss_fn(model)`` returns a scalar tensor with its graph (e.g. mean cross-entropy on a fixed
    batch, model in eval mode). A list of closures means the sum of their losses: each HVP then
    recomputes one closure at a time (memory of one batch), whereas a single closure's gradient
    graph is built once and reused. Power iteration finds the eigenvalue of largest magnitude; if it
    is negative, a second run on ``H - lambda I`` (positive semi-definite) gives the largest algebraic
    one. Stops when the Rayleigh quotient changes by less than ``tol`` relative (per stage, at most
    ``iters`` HVPs each). Parameters, buffers and the train/eval mode are restored afterwards.
    """
    closures = list(loss_fn) if isinstance(loss_fn, (list, tuple)) else [loss_fn]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad")
    if iters < 1 or not tol > 0:
        raise ValueError(f"need iters >= 1 and tol > 0, got {iters}, {tol}")
    with _restored(model):
        if len(closures) == 1:
            grads = torch.autograd.grad(closures[0](model), params, create_graph=True)

            def hvp(v):
                return _hvp(params, grads, v)
        else:

            def hvp(v):
                out = 0
                for c in closures:
                    out = out + _hvp(params, torch.autograd.grad(c(model), params, create_graph=True), v, retain=False)
                return out

        gen = torch.Generator().manual_seed(seed)
        v0 = torch.randn(sum(p.numel() for p in params), generator=gen, dtype=torch.float64)
        lam, vec, n1, ok1 = _power(hvp, v0, 0.0, iters, tol)
        if lam >= 0:
            return HessianEig(lam, vec, n1, ok1, lam)
        mu, vec2, n2, ok2 = _power(hvp, v0, lam, iters, tol)
        return HessianEig(mu + lam, vec2, n1 + n2, ok1 and ok2, lam)


def _power(hvp, v0: torch.Tensor, shift: float, iters: int, tol: float):
    v = v0 / v0.norm()
    lam_prev, lam = None, 0.0
    for k in range(1, iters + 1):
        w = hvp(v) - shift * v
        lam = float(v @ w)
        wn = w.norm()
        if wn == 0:  # v is in the null space of H - shift I
            return lam, v, k, True
        v = w / wn
        if lam_prev is not None and abs(lam - lam_prev) <= tol * max(abs(lam), 1e-300):
            return lam, v, k, True
        lam_prev = lam
    return lam, v, iters, False


def _hvp(params, grads, v: torch.Tensor, retain: bool = True) -> torch.Tensor:
    dot, i = 0, 0
    for p, g in zip(params, grads):
        dot = dot + (g * v[i : i + p.numel()].view_as(p).to(device=g.device, dtype=g.dtype)).sum()
        i += p.numel()
    hv = torch.autograd.grad(dot, params, retain_graph=retain, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if h is None else h).reshape(-1).double().cpu() for p, h in zip(params, hv)]
    )


# ------------------------------------------------------------------ helpers


class _restored:
    """Context manager restoring parameters, buffers and train/eval mode of a model."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.state = copy.deepcopy(self.model.state_dict())
        self.training = [m.training for m in self.model.modules()]
        return self

    def __exit__(self, *exc):
        self.model.load_state_dict(self.state)
        for m, t in zip(self.model.modules(), self.training):
            m.training = t
        return False


def _stack(snapshots) -> torch.Tensor:
    if isinstance(snapshots, torch.Tensor):
        traj = snapshots.double()
        if traj.ndim == 1:
            traj = traj[None]
    else:
        traj = torch.stack([s.double().reshape(-1) for s in snapshots])
    if traj.ndim != 2 or traj.shape[0] == 0:
        raise ValueError(f"snapshots must be a (T, P) tensor or a non-empty list of (P,) vectors, got {tuple(traj.shape)}")
    return traj


def _check_same_size(*vecs: torch.Tensor) -> None:
    sizes = {v.numel() for v in vecs}
    if len(sizes) != 1:
        raise ValueError(f"parameter vectors differ in size: {sorted(sizes)} (build them with flat_params of this model)")


def _check_ignore(ignore) -> None:
    if ignore not in IGNORE:
        raise ValueError(f"unknown ignore {ignore!r}; choose 'biasbn' (zero biases/BN) or None (copy them)")
