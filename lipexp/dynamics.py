"""Chapter 4 engine: drift, diffusion and noise-curvature of every weight matrix at each SGD step,
and the predicted K(t) (theory.md §1-§3, thesis Theorems 4.6.5-4.6.8).

Per step and per weight matrix W (m x n, Conv2d reshaped to out x in*kh*kw) with SVD
``W = U diag(s) V^T`` and per-sample gradients ``G_i`` (i = 1..M):

- ``sigma1 = s_1`` before the step;
- ``mu = <u_1 v_1^T, dW> / (s_1 * lr)`` from the applied update ``dW`` (plain SGD: ``-u_1^T g v_1 / s_1``);
- ``lambda2 = lr / s_1^2 * J^T Sigma J`` and ``kappa = lr / (2 s_1) * <H, Sigma>``, with
  ``Sigma = grad_scale^2 * sum_i vec(G~_i) vec(G~_i)^T / (M (M-1)) + noise_var * I``, ``G~_i = G_i - mean G``,
  J and H the gradient and Hessian of ``s_1`` (thesis Lemmas 4.6.2, 4.6.3);
- beyond the thesis (docs/sde_second_order.md): ``mu2 = lr/(2 s_1) vec(d)^T H vec(d) - lr/(2 s_1^2) (J^T vec(d))^2``
  with ``d = dW / lr``, the second-order drift that Theorem 4.6.5 drops, and ``lambda2_full``, the layer's
  share ``Cov(layer noise, network noise)`` of the network diffusion with the cross-layer covariances
  (thesis Assumption 4.3.1 drops them); ``network_sums`` gives ``mu2_Z`` and ``lambda2_Z_full``.

Which weights, their matrix views and how each layer type's hooks produce the projections below:
``lipexp.layers.find_weights`` and the handler registry ``lipexp.handlers.HANDLERS``.

Nothing of size M*m*n is formed for these: hooks collect the per-sample projections ``a_i = G_i v_1``
(length m) and ``b_i = G_i^T u_1`` (length n) from the forward/backward pass that makes the step
(theory.md §2), and ``<H, G~ G~^T>`` needs only them and a Cholesky factor of
``s_1^2 I - W W^T + s_1^2 u_1 u_1^T`` (see ``OpNormGeometry``): no singular vectors beyond the top pair,
all in float64 from the smaller Gram matrix. The optional variance/covariance split (thesis Prop. 4.4.2)
uses ``diag(Sigma)`` against ``diag(H)`` in closed form; for convolutions (and Linear layers applied to
sequences) it forms per-sample gradients, a chunk of samples at a time.

A training loop with the tracker (one metrics row per step)::

    tracker = DynamicsTracker(model, lr, optimizer=opt)          # split=True for Fig. 4.3's var/cov parts
    integ = KIntegrator(lr)
    for step, (x, y) in enumerate(batches):
        x_adv = attack(model, x, y)                                # optional: anything before begin()
        tracker.begin()
        opt.zero_grad()
        losses = loss_fn(model(x_adv), y)                          # (M,) per-sample losses
        losses.mean().backward()
        opt.step()
        terms = tracker.end()
        row = {"step": step, "t": step * lr, "loss": losses.mean().item(), **integ.update(terms),
               **term_columns(terms)}
    tracker.close()

Cost (``scripts/bench_tracker.py``, paired median over interleaved repeats on a 2-core AMD EPYC CPU, 1 / 2
threads, results/bench/tracker_cpu.txt, at 624a932): ConvNet of thesis Table 4.1 1.12x / 1.26x a plain SGD step
at batch 256 (1.33x / 1.38x at 128); TransformerEncoder 1.25x / 1.39x; resnet18 (32x32, batch 64) 2.8x / 3.3x
(1.11x / 1.18x at 224x224); the MLP of Table 4.2 (batch 128) 4.6x / 5.6x (these ratios drift by 0.1-0.2 between
runs of the same code on this machine, and with its speed: the day before, its slower plain steps gave resnet18
2.5x / 2.8x).
The bench's ``floor`` variant times the plain step plus each weight's exact float64 Gram (k^2 N operations for a
k x N weight, k the smaller side) and one k x k Cholesky factor, by the tracker's own kernels, which any exact
per-step kappa needs: 1.03-1.08x for the ConvNet, 1.06x for the Transformer, but 2.0-2.4x for resnet18 on
32x32 inputs and 2.9-3.0x for the MLP (bench at 624a932), whose weights are large next to their activations
(512 x 4608 convolutions on 1 x 1 maps, a 512 x 784 layer at batch 128). The Cholesky factors, and with torch on
one thread the Gram matrices, run through SciPy's LAPACK (``lipexp.cpu_lapack``: on this CPU torch's MKL was
1.4-1.8x slower at the factor on one thread, about 2x on two).

Per-sample gradient convention: ``G_i = sum_p delta_{i,p} x_{i,p}^T`` with ``delta`` the gradient of the
*summed* loss with respect to the layer output (the loop may backprop the mean; the tracker rescales).
Without batch coupling this is the exact gradient of sample i's loss. With BatchNorm in training mode
(samples coupled through batch statistics) it is the definition used; ``sum_i G_i`` is still M times the
batch gradient. Dropout masks, mixup, label smoothing or adversarial inputs: the per-sample terms are those
of the very forward pass that produced the step. BatchNorm layers do not enter K(t) (theory.md §1).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lipexp import cpu_lapack
from lipexp.handlers import ConvGeom, conv_b_projection, conv_geometry
from lipexp.layers import WeightRef, find_weights, group_blocks, preserved_buffers

__all__ = [
    "DynamicsTracker",
    "KIntegrator",
    "integrate",
    "step_terms",
    "term_columns",
    "network_sums",
    "OpNormGeometry",
    "opnorm_geometry",
    "hessian_quadratic_sum",
    "hessian_trace",
    "hessian_diagonal_dot",
    "second_order_drift",
    "cross_layer_lambda2",
    "conv_b_projection",
]

TERMS = ("sigma1", "mu", "kappa", "lambda2")
SECOND_TERMS = ("mu2", "lambda2_full")  # beyond the thesis: docs/sde_second_order.md
SPLIT_TERMS = ("kappa_var", "kappa_cov", "lambda2_var", "lambda2_cov")


# ----------------------------------------------------------------------------------------------
# The operator norm's Jacobian and Hessian, without a full SVD
# ----------------------------------------------------------------------------------------------
@dataclass
class OpNormGeometry:
    """What the Chapter 4 terms need of a weight matrix ``W`` (m x n), all float64.

    Everything goes through the smaller side: ``wide = m <= n`` works with the k x k Gram ``W W^T``
    (k = m) and the left vector ``q1 = u1``, otherwise with ``W^T W`` (k = n) and ``q1 = v1``. With
    ``A = s1^2 I - Gram + s1^2 q1 q1^T`` (positive definite when s1 is simple; its eigenvalues are
    ``s1^2 - s_i^2`` for i >= 2, with ``s_i = 0`` past the rank, and ``s1^2``), the Hessian of thesis
    Lemma 4.6.3 has, for any G with ``a = G v1``, ``b = G^T u1`` projected off ``u1``, ``v1`` (``a'``, ``b'``):

        q(G) = vec(G)^T H vec(G) = ( |L^-1 (s1 a' + W b')|^2 + |b'|^2 ) / s1     (wide; A = L L^T)

    (the left, right and cross sums of Lemma 4.6.3 are ``s1 a'^T A^-1 a'``, ``(|b'|^2 + |L^-1 W b'|^2)/s1``
    and ``2 a'^T A^-1 W b'``; for tall matrices swap the roles of a and b). So a Cholesky factor replaces
    the singular vectors, and the index ranges of the Lemma (all m left and n right vectors) hold by
    construction.
    """

    w: torch.Tensor | None  # m x n float64; None when only ``w_model`` is kept (the tracker: half the memory)
    wide: bool
    s1: torch.Tensor  # 0-d
    u1: torch.Tensor  # (m,)
    v1: torch.Tensor  # (n,)
    chol: torch.Tensor  # k x k lower Cholesky factor of A
    w_model: torch.Tensor | None = None  # the same W in the model's dtype (if not float64): saves a cast per use

    def w_as(self, dtype: torch.dtype) -> torch.Tensor:
        """W (m x n) in ``dtype``; the model's own copy when that is the dtype (exact: W came from it)."""
        if self.w_model is not None and (self.w_model.dtype == dtype or self.w is None):
            return self.w_model.to(dtype)
        return self.w.to(dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple((self.w if self.w is not None else self.w_model).shape)

    @property
    def q1(self) -> torch.Tensor:
        return self.u1 if self.wide else self.v1

    @property
    def p1(self) -> torch.Tensor:
        return self.v1 if self.wide else self.u1

    @property
    def w_small(self) -> torch.Tensor:
        """W oriented as k x (larger size), float64."""
        w = self.w_as(torch.float64)
        return w if self.wide else w.T


class SpectrumError(ValueError):
    """A weight whose top singular value is zero or repeated: the Chapter 4 terms are undefined."""


def _shifted(gram: torch.Tensor, shift) -> torch.Tensor:
    """``shift I - gram`` without forming I (k x k float64 identities were a measurable part of begin())."""
    out = torch.neg(gram)
    out.diagonal().add_(shift)
    return out


def _top_eigvec(
    gram: torch.Tensor, shift: float, x: torch.Tensor, iters: int = 10
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
    """Inverse iteration on ``shift I - gram`` (shift just above the top eigenvalue) from ``x``.

    Returns ``(top, last)``: ``top = (x, lam1)`` once converged to float64 accuracy (else None) and
    ``last``, the final iterate, to re-shift from (None if the shift is not above the top eigenvalue:
    the Cholesky factorisation fails, and iterating would not find the top pair).
    """
    c, ok = _cholesky(_shifted(gram, shift))
    if not ok:
        return None, None
    for _ in range(iters):
        x = _chol_solve(c, x)
        x = x / x.norm()
        gx = gram @ x
        lam1 = x @ gx
        if float((gx - lam1 * x).norm()) <= 1e-12 * float(lam1):  # converged: one more step to polish
            x = _chol_solve(c, x)
            x = x / x.norm()
            return (x, x @ gram @ x), x
    return None, x


def _chol_solve(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(c c^T)^-1 x`` for a vector x by two triangular solves: ``torch.cholesky_solve`` copied the k x k
    factor on every call (1.4 ms of a 512 x 512 one, several calls per inverse iteration)."""
    y = torch.linalg.solve_triangular(c, x[:, None], upper=False)
    return torch.linalg.solve_triangular(c.mT, y, upper=True)[:, 0]


def _residual_shift(gram: torch.Tensor, x: torch.Tensor) -> float:
    """A shift above the eigenvalue nearest the Rayleigh quotient of unit ``x`` (some eigenvalue lies
    within the residual norm of it); near the top eigenvector that eigenvalue is the top one."""
    gx = gram @ x
    lam_r = float(x @ gx)
    return lam_r + 1.01 * float((gx - lam_r * x).norm()) + 1e-12 * lam_r


def _warm_top(gram: torch.Tensor, x: torch.Tensor, tries: int = 3) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Top eigenpair by inverse iteration from the previous step's vector ``x``, re-shifting from the
    improved iterate when ten steps do not converge (a large step, e.g. injected gradient noise, moves the
    top vector far: the first shift is then loose and convergence slow). None if a shift falls below the
    top eigenvalue or ``tries`` shifts do not converge (the caller then computes the spectrum)."""
    for _ in range(tries):
        top, x = _top_eigvec(gram, _residual_shift(gram, x), x)
        if top is not None or x is None:
            return top
    return None


def _cholesky(a: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(L, ok)``: lower Cholesky factor of the symmetric float64 ``a`` (overwritten on the CPU route of
    ``lipexp.cpu_lapack``, OpenBLAS on one thread); ``ok`` False when ``a`` is not positive definite."""
    if cpu_lapack.available(a):
        return cpu_lapack.cholesky_lower(a)
    chol, info = torch.linalg.cholesky_ex(a)
    return chol, int(info) == 0


def _gram(w: torch.Tensor) -> torch.Tensor:
    """``w @ w.T`` (k x k) for a k x N float64 matrix: SciPy's ``syrk`` on the one-thread CPU route
    (``lipexp.cpu_lapack``), else ``_gram_torch``."""
    return cpu_lapack.gram(w) if cpu_lapack.gram_available(w) else _gram_torch(w)


def _gram_torch(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``w @ w.T`` by torch; for large k and N by panels of rows, the upper triangle only and mirrored (a
    BLAS ``syrk``, which torch does not expose): 10-20% faster than one product for the 512 x 784 layer of
    the MLP and the 512 x 4608 convolutions of a resnet18, where this product dominates ``begin()`` (about
    k^2 N / 2 + 64 k N multiply-adds in place of k^2 N)."""
    k, big = w.shape
    if k < 256 or big < 512:  # small: one product is faster than the panels' overhead
        return w @ w.T
    g = w.new_empty(k, k)
    for i in range(0, k, block):
        panel = w[i:i + block] @ w[i:].T  # (b, k - i): rows i.. of the upper triangle
        g[i:i + block, i:] = panel
        g[i + block:, i:i + block] = panel[:, block:].T
    return g


def opnorm_geometry(w: torch.Tensor, start: torch.Tensor | None = None, name: str = "weight") -> OpNormGeometry:
    """s1, (u1, v1) and the Cholesky factor of ``A`` for ``w`` (m x n; computed in float64).

    The top eigenpair of the smaller Gram matrix comes from inverse iteration. With ``start`` (the
    previous step's top vector: weights move little per step) the shift is its Rayleigh quotient plus
    the residual norm, re-shifted from the improved iterate if needed; the Cholesky factorisation of ``A``
    (positive definite only at the simple top eigenpair) certifies the result. Otherwise, or if that
    fails, ``eigvalsh`` gives the spectrum, the check that s1 is simple, and a shift ``1e-12`` above the
    top eigenvalue. Raises ``SpectrumError`` (a ValueError) if ``w`` is zero or its top singular value is
    repeated (thesis Assumption 4.6.1: the terms are then undefined).
    """
    wd = w.detach().to(torch.float64, copy=True)  # a copy even for float64: the step updates w in place
    m, n = wd.shape
    wide = m <= n
    gram = _gram(wd if wide else wd.T)
    k = gram.shape[0]
    found = None
    if start is not None and start.shape == (k,):
        top = _warm_top(gram, start.to(torch.float64))
        found = None if top is None else _factor_a(gram, *top)
    if found is None:
        found = _factor_a(gram, *_cold_top(gram, name), name=name)
    x, lam1_t, chol = found
    s1 = lam1_t.sqrt()
    p = (wd.T @ x if wide else wd @ x) / s1
    u1, v1 = (x, p) if wide else (p, x)
    return OpNormGeometry(wd, wide, s1, u1, v1, chol)


def _cold_top(gram: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The top eigenpair without a start: the spectrum (eigvalsh) checks that it is simple and sets a shift
    just above it for inverse iteration."""
    k = gram.shape[0]
    lam = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
    lam1 = float(lam[0])
    if not lam1 > 0:
        raise SpectrumError(f"{name} is zero: sigma_1 = 0, and the Chapter 4 terms divide by it")
    if k > 1 and lam1 - float(lam[1]) <= 1e-12 * lam1:
        raise SpectrumError(
            f"{name} has a repeated top singular value (s1 = {lam1 ** 0.5:.6g}, s2 = {float(lam[1]) ** 0.5:.6g}); "
            "the operator norm is then not differentiable (thesis Assumption 4.6.1) and kappa is undefined. "
            "An orthogonal or identity initialisation does this: perturb the weights or use a random init."
        )
    gen = torch.Generator().manual_seed(0)
    x0 = gram @ torch.randn(k, generator=gen, dtype=torch.float64).to(gram.device)
    top = _top_eigvec(gram, lam1 * (1 + 1e-12), x0)[0]
    if top is None:  # s1 nearly repeated: inverse iteration converges slowly, do it fully
        x = torch.linalg.eigh(gram)[1][:, -1]
        top = x, x @ gram @ x
    return top


def _factor_a(gram: torch.Tensor, x: torch.Tensor, lam1: torch.Tensor, name: str | None = None):
    """``(x, lam1, L)`` with L the Cholesky factor of ``A = lam1 I - gram + lam1 x x^T``; None (or, given
    the weight's ``name``, SpectrumError) when A is not positive definite: ``lam1`` is then not the simple
    top eigenvalue (s2 = s1 to rounding, or a start that led to another eigenpair)."""
    chol, ok = _cholesky(_shifted(gram, lam1).addr_(x, x, alpha=lam1))
    if ok:
        return x, lam1, chol
    if name is None:
        return None
    raise SpectrumError(f"{name} has a repeated top singular value (s1 = {float(lam1.sqrt()):.6g}); kappa is undefined")


def _times_w(x: torch.Tensor, geo: OpNormGeometry, dt: torch.dtype, transpose: bool) -> torch.Tensor:
    """``x @ W^T`` (transpose) or ``x @ W`` in ``dt``. When W is held in a narrower dtype than ``dt`` (a float32
    model, float64 projections), W is cast a block of rows at a time: no float64 copy of the whole weight."""
    w = geo.w if geo.w is not None and geo.w.dtype == dt else geo.w_model
    if w is None or w.dtype == dt or w.numel() <= _CAST_BLOCK:
        w = geo.w_as(dt)
        return x @ w.T if transpose else x @ w
    rows = max(1, _CAST_BLOCK // w.shape[1])
    blocks = [w[i:i + rows].to(dt) for i in range(0, w.shape[0], rows)]
    if transpose:  # x (R, n) @ W^T -> (R, m): columns block by block
        return torch.cat([x @ blk.T for blk in blocks], dim=1)
    out = None  # x (R, m) @ W -> (R, n): a sum over row blocks
    for i, blk in zip(range(0, w.shape[0], rows), blocks):
        part = x[:, i:i + rows] @ blk
        out = part if out is None else out.add_(part)
    return out


_CAST_BLOCK = 1 << 18  # elements of W cast to float64 at a time (2 MiB)


def _rows_projections(dw: torch.Tensor, v1: torch.Tensor, u1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dW v1, u1^T dW)`` in float64 (v1, u1 float64), casting dW a block of rows at a time."""
    if dw.dtype == torch.float64 or dw.numel() <= _CAST_BLOCK:
        d = dw.to(torch.float64)
        return d @ v1, u1 @ d
    rows = max(1, _CAST_BLOCK // dw.shape[1])
    dv, dtu = [], None
    for i in range(0, dw.shape[0], rows):
        blk = dw[i:i + rows].to(torch.float64)
        dv.append(blk @ v1)
        part = u1[i:i + rows] @ blk
        dtu = part if dtu is None else dtu.add_(part)
    return torch.cat(dv), dtu


def hessian_quadratic_sum(
    geo: OpNormGeometry, a: torch.Tensor, b: torch.Tensor, w_b: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum_i vec(G_i)^T H vec(G_i)`` from ``a`` (M x m, rows ``G_i v1``) and ``b`` (M x n, rows ``G_i^T u1``).

    ``w_b`` (M x m, rows ``W b_i``) may be passed when known more cheaply than ``b @ W^T`` (a Linear
    layer has it from its own output). Works in the dtype of ``a`` up to the float64 triangular solve.
    """
    return _quadratic_sum_times_s1(geo, a, b, w_b) / geo.s1


def _quadratic_sum_times_s1(geo: OpNormGeometry, a: torch.Tensor, b: torch.Tensor, w_b: torch.Tensor | None):
    """``s1 * hessian_quadratic_sum(geo, a, b, w_b)`` (0-d float64), in few ops: the tracker calls it twice
    per weight per step, and on small layers the per-op cost, not the arithmetic, is what shows."""
    dt = a.dtype
    u1, v1, s1 = geo.u1.to(dt), geo.v1.to(dt), geo.s1.to(dt)
    au, bv = a @ u1, b @ v1
    a_perp = torch.addr(a, au, u1, alpha=-1)
    b_perp = torch.addr(b, bv, v1, alpha=-1)
    if geo.wide:
        wb = _times_w(b_perp, geo, dt, transpose=True) if w_b is None else torch.addr(w_b, s1 * bv, u1, alpha=-1)
        r, rest = torch.addcmul(wb, a_perp, s1), b_perp
    else:
        r, rest = torch.addcmul(_times_w(a_perp, geo, dt, transpose=False), b_perp, s1), a_perp
    x = torch.linalg.solve_triangular(geo.chol, r.T.to(torch.float64), upper=False).reshape(-1)
    rest = rest.reshape(-1)
    return x @ x + (rest @ rest).to(torch.float64)


def hessian_trace(geo: OpNormGeometry) -> torch.Tensor:
    """``tr(H) = sum_{i=2..m} s1/(s1^2-s_i^2) + sum_{j=2..n} s1/(s1^2-s_j^2)`` (``s_i = 0`` past the rank).

    On the small side ``sum_{i>=2} 1/(s1^2-s_i^2) = tr(A^-1) - 1/s1^2``; the larger side has the same
    terms plus ``max(m, n) - k`` zero singular values.
    """
    m, n = geo.shape
    k = geo.chol.shape[0]
    eye = torch.eye(k, dtype=torch.float64, device=geo.chol.device)
    l_inv = torch.linalg.solve_triangular(geo.chol, eye, upper=False)
    small = geo.s1 * ((l_inv * l_inv).sum() - 1.0 / geo.s1**2)
    return 2.0 * small + (max(m, n) - k) / geo.s1


def hessian_diagonal_dot(geo: OpNormGeometry, d: torch.Tensor) -> torch.Tensor:
    """``sum_{ab} diag(H)_{ab} D_{ab}`` for an m x n matrix ``D``, ``diag(H)`` in closed form.

    On the small side (wide case), ``diag(H)_{ab} = alpha_a v1_b^2 + u1_a^2 beta_b + 2 u1_a v1_b C_ab``
    with ``alpha = s1 diag(A^-1) - u1^2/s1``, ``beta = (1 + diag(W^T A^-1 W) - 2 v1^2)/s1`` and
    ``C = A^-1 W - u1 v1^T / s1`` (the matrix ``sum_{k>=2} s_k/(s1^2-s_k^2) u_k v_k^T``).
    """
    w = geo.w_small
    d = (d if geo.wide else d.T).to(torch.float64)
    q1, p1, s1 = geo.q1, geo.p1, geo.s1
    a_inv = torch.cholesky_inverse(geo.chol)
    t = torch.linalg.solve_triangular(geo.chol, w, upper=False)
    alpha = s1 * torch.diagonal(a_inv) - q1 * q1 / s1
    beta = (1.0 + (t * t).sum(0) - 2.0 * p1 * p1) / s1
    cross = a_inv @ w - torch.outer(q1, p1) / s1
    return alpha @ d @ (p1 * p1) + (q1 * q1) @ d @ beta + 2.0 * (q1 @ (cross * d) @ p1)


def second_order_drift(geo: OpNormGeometry, d_v: torch.Tensor, dt_u: torch.Tensor, lr: float) -> torch.Tensor:
    """``mu2 = lr/(2 s1) vec(d)^T H vec(d) - lr/(2 s1^2) (J^T vec(d))^2`` for one update direction ``d``
    (the applied update over lr, m x n), from its projections ``d_v = d v1`` (m,) and ``dt_u = d^T u1`` (n,).

    ``lr * mu2`` is the second-order term of ``log s1(W + lr d) - log s1(W)``, which Theorem 4.6.5 drops
    (its expectation over the batch noise holds ``kappa - lambda2/2``; docs/sde_second_order.md). One
    triangular solve with one right-hand side, float64.
    """
    d_v, dt_u = d_v.to(torch.float64), dt_u.to(torch.float64)
    return _mu2(geo.s1, _quadratic_sum_times_s1(geo, d_v[None], dt_u[None], None), geo.u1 @ d_v, lr)


def _mu2(s1, q_times_s1, jd, lr: float):
    """``second_order_drift`` from ``s1``, ``s1 vec(d)^T H vec(d)`` and ``jd = J^T vec(d) = u1 . d v1`` (tensors or
    floats: the tracker combines them on the host)."""
    return lr / (2 * s1) * (q_times_s1 / s1) - lr / (2 * s1**2) * jd * jd


def cross_layer_lambda2(rows: list[tuple[torch.Tensor | None, torch.Tensor]]) -> list[torch.Tensor]:
    """Each layer's share of the full network diffusion ``lambda2_Z_full = |sum_l r_l|^2 + sum_l n_l``.

    ``rows[l] = (r_l, n_l)``: ``r_l`` (M,) float64 the per-sample noise on ``log s1`` of layer l
    (``|r_l|^2`` is its block-diagonal lambda2 without injected noise; None for a layer without
    per-sample gradients) and ``n_l`` the injected isotropic noise's part (independent across layers).
    The share is ``r_l . R + n_l`` with ``R = sum_k r_k``: the covariance of layer l's noise with the
    network's, so the shares sum to the full value. NaN for all if the layers saw different batch sizes.
    """
    rs = [r for r, _ in rows if r is not None]
    if not rs:
        return [n + 0.0 for _, n in rows]
    if len({r.shape for r in rs}) > 1:
        nan = torch.full((), float("nan"), dtype=torch.float64, device=rs[0].device)
        return [nan for _ in rows]
    total = torch.stack(rs).sum(0)
    return [n + (r @ total if r is not None else 0.0) for r, n in rows]


# ----------------------------------------------------------------------------------------------
# Per-weight state: the sink the layer handlers (lipexp.handlers) feed
# ----------------------------------------------------------------------------------------------
_ConvGeom = ConvGeom  # the old private names, for callers
_conv_geometry = conv_geometry


@dataclass
class _Layer:
    name: str
    ref: WeightRef
    owner: "DynamicsTracker"
    full_shape: tuple[int, int]  # the weight's matrix view, out x (in/groups * k)
    dtype: torch.dtype
    requires_grad: bool
    # set by begin()
    geo: OpNormGeometry | None = None
    s1: torch.Tensor | None = None  # 0-d float64
    u1: torch.Tensor | None = None  # (m,) model dtype
    v1: torch.Tensor | None = None  # (n,) model dtype
    group: int = 0  # grouped conv: the group whose block has the largest sigma1 (the operator's)
    geo_group: int = -1  # the group ``geo`` belongs to (for the warm start)
    snapshot: torch.Tensor | None = None  # the (effective) weight before the step, param shape
    raw_snaps: list | None = None  # parametrised: the raw parameters before the step
    # per step, from the hooks
    calls: int = 0  # forward calls with grad seen
    grads: int = 0  # their output gradients received
    mb: int | None = None
    single: bool = False  # a 1-sample batch: no noise terms (they need 2 samples)
    a: torch.Tensor | None = None  # (M, m), reduced-loss scale, summed over uses
    b: torch.Tensor | None = None  # (M, n)
    wb: torch.Tensor | None = None  # rows W b_i, (M, m), when every use could give it
    wb_ok: bool = True
    sumsq: torch.Tensor | None = None  # split only: sum_i G_i^2 (m, n)
    gsum: torch.Tensor | None = None  # split only: sum_i G_i (m, n)
    gps: torch.Tensor | None = None  # split with several uses: per-sample gradients (M, m, n)
    grad_checked: bool = False
    grad_check: torch.Tensor | None = None  # (|grad v1 - sum_i a_i|, sum_i |a_i|)
    raw_grads: dict = field(default_factory=dict)  # index in ref.raw_parameters() -> its .grad tensor
    handles: list = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        m, n = self.full_shape
        return m // self.ref.groups, n

    @property
    def param(self) -> torch.Tensor | None:
        """The leaf weight whose ``.grad`` is checked (None for a parametrised weight)."""
        return None if self.ref.parametrized else self.ref.raw_parameters()[0]

    def matrix(self, t: torch.Tensor) -> torch.Tensor:
        """The tracked matrix of a weight-shaped tensor (grouped conv: the top group's block)."""
        w = t.reshape(self.full_shape)
        if self.ref.groups == 1:
            return w
        m = self.shape[0]
        return w[self.group * m:(self.group + 1) * m]

    def clear_step(self) -> None:
        self.calls, self.grads, self.mb, self.single = 0, 0, None, False
        self.a, self.b, self.wb, self.wb_ok = None, None, None, True
        self.sumsq, self.gsum, self.gps, self.grad_checked, self.grad_check = None, None, None, False, None
        self.raw_grads = {}

    # -- the sink interface of lipexp.handlers ----------------------------------------------------
    def capture(self, module: nn.Module, output: torch.Tensor) -> bool:
        """Whether to capture this forward call (armed, with grad, weight trainable); counts it."""
        if not self.owner.armed or not torch.is_grad_enabled():
            return False
        if self.grads:
            raise RuntimeError(
                f"layer '{self.name}' was called twice with grad inside one tracked step, after its backward "
                "(a second forward/backward between begin() and end()); the per-sample terms need one backward. "
                "Run extra forwards (e.g. an adversarial attack) before begin() or under no_grad"
            )
        if not (output.requires_grad and self.requires_grad):
            return False  # a frozen weight does not move: no noise terms
        if output.dtype != self.dtype:
            raise ValueError(
                f"layer '{self.name}' computed in {output.dtype} with {self.dtype} weights (autocast?); "
                "the tracker needs the forward in the weights' dtype"
            )
        self.calls += 1
        return True

    def add(self, rows, a, b, wb, per_sample, per_sample_elems, moments=None) -> None:
        """One use's projections: a (M, r1-r0) for matrix rows ``rows``, b (M, n), wb (M, m) or None;
        ``per_sample(i, j)`` gives that use's per-sample gradients (s, r1-r0, n) for the split."""
        mb = a.shape[0]
        if self.mb is not None and mb != self.mb:
            raise RuntimeError(f"weight '{self.name}' was used with batch sizes {self.mb} and {mb} in one step; "
                               "the per-sample gradient sums its uses sample by sample, so they must agree")
        self.mb = mb
        self.grads += 1
        if self.grads > self.calls:
            raise RuntimeError(
                f"layer '{self.name}' received a second gradient in one tracked step (backward run twice?)"
            )
        if mb < 2:  # the noise terms need 2 samples: skipped for this step (end() reports NaN)
            self.single = True
            return
        m, n = self.shape
        r0, r1 = rows
        full = (r0, r1) == (0, m)
        if self.a is None:
            self.a = a if full else a.new_zeros(mb, m).index_copy_(1, torch.arange(r0, r1, device=a.device), a)
            self.b = b
        else:
            self.a[:, r0:r1] += a
            self.b = self.b + b
        if wb is None or not full:
            self.wb_ok, self.wb = False, None
        elif self.wb_ok:
            self.wb = wb if self.wb is None else self.wb + wb
        if not self.owner.split:
            return
        if self.calls == 1:  # one use: second moments directly, a chunk of samples at a time
            if self.sumsq is None:
                self.sumsq, self.gsum = a.new_zeros(m, n), a.new_zeros(m, n)
            if moments is not None:
                sq, s = moments()
                self.sumsq[r0:r1] += sq
                self.gsum[r0:r1] += s
                return
            step = _chunk(self.owner.chunk_elems, per_sample_elems, mb)
            for i in range(0, mb, step):
                g = per_sample(i, min(i + step, mb))
                self.sumsq[r0:r1] += (g * g).sum(0)
                self.gsum[r0:r1] += g.sum(0)
            return
        # several uses: G_i is their sum, so its squares need the per-sample gradients (M x m x n)
        if self.gps is None:
            self.gps = a.new_zeros(mb, m, n)
        self.gps[:, r0:r1] += per_sample(0, mb)
        if self.grads == self.calls:
            self.sumsq, self.gsum = (self.gps * self.gps).sum(0), self.gps.sum(0)
            self.gps = None


@contextmanager
def _cpu_threads(n: int | None):
    """Run the block with ``n`` intra-op CPU threads (None: leave torch's setting)."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _chunk(budget: int, per_sample: int, total: int) -> int:
    return max(1, min(total, budget // max(per_sample, 1)))


def _top_group(w: torch.Tensor, groups: int, name: str) -> int:
    """The group of a grouped conv whose block has the largest sigma1 (that of the block-diagonal operator)."""
    blocks = group_blocks(w, groups).to(torch.float64)
    gram = blocks @ blocks.transpose(1, 2) if blocks.shape[1] <= blocks.shape[2] else blocks.transpose(1, 2) @ blocks
    top = torch.linalg.eigvalsh(gram)[:, -1]
    two = top.topk(2).values
    if float(two[0] - two[1]) <= 1e-12 * float(two[0]):
        raise SpectrumError(f"weight '{name}': two groups share the top singular value of the block-diagonal "
                            "operator (s1 is then not differentiable); perturb the weights")
    return int(top.argmax())


def _single_sample_nan(out: dict[str, dict[str, float]], layers: list[_Layer]) -> None:
    """A 1-sample batch has no sample covariance: its kappa and lambda2 (and split parts) are NaN; the
    drift terms (mu, and mu2 from the applied update) stand."""
    for layer in layers:
        if layer.single:
            for k in out[layer.name]:
                if k not in ("sigma1", "mu", "mu2"):
                    out[layer.name][k] = float("nan")


class DynamicsTracker:
    """Per-step sigma1, mu, kappa, lambda2 of every weight matrix of ``model``.

    Weights: those of ``lipexp.layers.find_weights`` (Linear, Conv1d/2d/3d incl. grouped and depthwise as
    the block-diagonal operator, Embedding, MultiheadAttention's ``in_proj_weight``/``q,k,v_proj_weight``
    and ``out_proj.weight``, parametrised weights by their effective weight), each handled by its layer
    type's handler in ``lipexp.handlers``; keys are ``named_parameters()`` names. A module called several
    times in a step, or a weight shared by several modules (tied embeddings), gets the per-sample gradient
    summed over its uses. ``tracker.skipped`` lists the parameters left out by rule, with why.

    Usage per training step (the loop backprops the *mean* of per-sample losses, or the sum with
    ``reduction='sum'``)::

        tracker.begin()                      # spectral data of the weights, snapshot, hooks armed
        losses = loss_fn(model(x), y)        # (M,) per-sample losses, ONE forward with grad
        losses.mean().backward()
        optimizer.step()                     # or any manual update (weight decay, scaling, noise)
        terms = tracker.end()                # {param name: {sigma1, mu, kappa, lambda2, mu2, lambda2_full[, *_var, *_cov]}}

    Hooks capture only between ``begin()`` and ``end()``: work done before ``begin()`` (an FGSM attack's
    forward/backward) is not seen, and forwards under ``torch.no_grad()`` are ignored. A second
    forward with grad through a layer inside one step is an error.

    - ``lr``: the step size (``dt``); update ``tracker.lr`` if it changes.
    - ``split``: also the variance (diag Sigma) / covariance (off-diagonal) parts of kappa, lambda2.
    - ``grad_scale``: the loop multiplies the batch gradient by this after backward (thesis Fig. 4.6's
      ``sqrt(rho)``), so the per-sample noise covariance is scaled by its square; the drift comes from the
      applied update. A factor put on the loss before backward needs nothing: the hooks see it.
    - ``noise_var``: per-coordinate variance of isotropic noise the loop adds to the batch gradient
      (``(1-rho)`` for N(0,1), ``(1-rho)/12`` for U[-0.5, 0.5]); adds ``lr*noise_var/s1^2`` to lambda2 and
      ``lr/(2 s1) noise_var tr(H)`` to kappa (counted in the variance part: the noise is diagonal).
    - ``optimizer``: if given, it must be plain SGD (no momentum, nesterov or maximize; weight decay is
      fine): the SDE of the thesis models that update. Other optimisers raise unless ``sigma1_only``.
    - ``check_update``: whether or not the optimizer is passed, ``end()`` checks that each weight moved by
      ``-lr * .grad`` (``.grad`` as the loop left it: gradient scaling and injected noise included) plus a
      weight-decay multiple of W, and refuses (ValueError) a momentum, Adam or any other update; the check
      is exact to rounding. (Momentum equals SGD on its first step, so it is caught from the second.) Turn
      off for a deliberate extra change of the weights (a projection after the step): the drift ``mu``
      still uses the applied update exactly, but the noise terms then model an SGD step that was not taken.
    - ``strict``: a weight of a layer type without a handler (LSTM, Bilinear, custom layers) is an error;
      ``strict=False`` skips it (listed in ``tracker.skipped``), and K(t) then leaves it out.
    - ``batch_dim``: the batch dimension of the inputs of Linear and Embedding layers of three or more
      dimensions (1 for sequence-first models, e.g. ``nn.TransformerEncoderLayer(batch_first=False)``);
      two-dimensional inputs are (batch, features), convolutions batch first, attention per its ``batch_first``.
    - A batch of one sample: ``kappa`` and ``lambda2`` (and the split parts) need two and are NaN for that
      step; sigma1 and mu are computed, and ``network_sums`` counts the NaN terms as 0.
    - ``sigma1_only``: track ``sigma1`` alone (no hooks), for any optimiser.
    - ``check_grad``: check (in ``end()``) that each weight's ``.grad`` after backward is the sum of what its
      modules' hooks saw (catches a weight used outside a registered module, e.g. ``F.linear(x, W.T)``,
      gradients not zeroed, a second backward). Not done for parametrised weights (their effective
      weight has no ``.grad``). Turn off if the loss deliberately adds terms on the weights (an L2
      penalty in the loss; the applied-update drift still handles it exactly).
    - ``chunk_elems``: memory budget (elements) of a chunk of per-sample gradients in the split.
    - ``linalg_threads``: CPU threads for the float64 linear algebra of ``begin()``/``end()`` (Gram
      matrices, ``eigvalsh``, Cholesky factors). ``None`` (default) keeps torch's setting, as the training
      step does: on an idle 2-core machine, 2 threads halve the Gram and triangular solves of a 512-row
      weight, and switching the thread count around every step also slowed the model's own next
      forward/backward (the MLP's, at 2 threads inside a tracked step: 6.7 ms with the switch, 4.7 ms
      without, timed one after the other). On an oversubscribed machine set
      torch's threads to 1 for the whole job (the Makefile's parallel launches do), or pass 1 here.
      The Cholesky factors (at any thread count) and, on one thread, the Gram matrices go through SciPy's
      BLAS/LAPACK, pinned to one thread for the call (``lipexp.cpu_lapack``; it agrees with torch's kernels
      to rounding: fig4_3 quick's summary moved by at most 7e-14 relative). Whether ``linalg_threads=1`` pays with torch on 2 threads
      depends on the model (paired, b68a1d7: the MLP of Table 4.2 6.9x -> 5.8x a plain step, resnet18 on
      32x32 2.8x -> 3.0x, the bench Transformer 1.57x either way). The hooks always use torch's setting.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        split: bool = False,
        grad_scale: float = 1.0,
        noise_var: float = 0.0,
        optimizer: torch.optim.Optimizer | None = None,
        sigma1_only: bool = False,
        reduction: str = "mean",
        check_grad: bool = True,
        chunk_elems: int = 1 << 22,
        linalg_threads: int | None = None,
        strict: bool = True,
        batch_dim: int = 0,
        check_update: bool = True,
    ):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"reduction must be 'mean' or 'sum' (how the loop reduces per-sample losses), got {reduction!r}"
            )
        if noise_var < 0:
            raise ValueError(f"noise_var is a variance and must be >= 0, got {noise_var}")
        if sigma1_only and (split or noise_var or grad_scale != 1.0):
            raise ValueError("sigma1_only=True tracks sigma1 alone; split, grad_scale and noise_var do not apply")
        self.model, self.lr, self.split = model, float(lr), split
        self.grad_scale, self.noise_var = float(grad_scale), float(noise_var)
        self.optimizer, self.sigma1_only, self.reduction = optimizer, sigma1_only, reduction
        self.check_grad, self.chunk_elems, self.linalg_threads = check_grad, chunk_elems, linalg_threads
        if batch_dim not in (0, 1):
            raise ValueError(f"batch_dim must be 0 (batch first) or 1 (sequence first), got {batch_dim}")
        self.batch_dim, self.check_update = batch_dim, check_update
        refs, self.skipped = find_weights(model, strict)
        self.layers = [self._make_layer(ref) for ref in refs]
        if not self.layers:
            raise ValueError("model has no weight the tracker knows (Linear, Conv1d/2d/3d, Embedding, "
                             "MultiheadAttention); see lipexp.layers.find_weights")
        if optimizer is not None and not sigma1_only:
            self._check_optimizer()
        self.armed = False
        self._starts: dict[str, torch.Tensor] = {}
        self._last: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self._handles: list = []
        self._noise_rows: dict[str, torch.Tensor | None] = {}
        if not sigma1_only:
            self._install()

    # -- setup -----------------------------------------------------------------------------------
    def _make_layer(self, ref: WeightRef) -> _Layer:
        w = ref.tensor()
        raws = ref.raw_parameters()
        return _Layer(ref.name, ref, self, (w.shape[0], w[0].numel()), w.dtype, any(p.requires_grad for p in raws))

    def _install(self) -> None:
        """One handler per module that uses a tracked weight (several for a tied weight)."""
        per_module: dict[int, tuple[nn.Module, object, dict]] = {}
        for layer in self.layers:
            for module, attr, handler in layer.ref.uses:
                per_module.setdefault(id(module), (module, handler, {}))[2][attr] = layer
            for i, p in enumerate(layer.ref.raw_parameters()):
                if p.requires_grad:  # a frozen weight gets no gradient to check
                    layer.handles.append(p.register_post_accumulate_grad_hook(self._param_hook(layer, i)))
        for module, handler, sinks in per_module.values():
            self._handles += handler.install(module, sinks, self)

    def _check_optimizer(self) -> None:
        opt = self.optimizer
        if type(opt) is not torch.optim.SGD:
            raise ValueError(
                f"the Chapter 4 prediction models plain SGD; got {type(opt).__name__}. Use torch.optim.SGD without "
                "momentum, or DynamicsTracker(..., sigma1_only=True) to track sigma1 alone"
            )
        tracked = {id(p) for layer in self.layers for p in layer.ref.raw_parameters()}
        for group in opt.param_groups:
            if not any(id(p) in tracked for p in group["params"]):
                continue
            bad = [k for k in ("momentum",) if group.get(k, 0)]
            bad += [k for k in ("nesterov", "maximize") if group.get(k, False)]
            if bad:
                raise ValueError(
                    f"the Chapter 4 prediction models plain SGD; this SGD has {', '.join(bad)} set "
                    f"({ {k: group[k] for k in bad} }). Use momentum=0, or sigma1_only=True"
                )

    def close(self) -> None:
        """Remove the hooks."""
        for layer in self.layers:
            for h in layer.handles:
                h.remove()
            layer.handles.clear()
            layer.clear_step()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.armed = False

    def __enter__(self) -> "DynamicsTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- per step --------------------------------------------------------------------------------
    @torch.no_grad()
    def begin(self) -> None:
        """Spectral data and snapshot of every weight; arm the hooks for one forward/backward."""
        if self.armed:
            raise RuntimeError("begin() called twice without end(); call abort() to drop a failed step")
        with _cpu_threads(self.linalg_threads):
            self._begin()
        self.armed = True

    def _begin(self) -> None:
        for layer in self.layers:
            layer.clear_step()
            w_full = layer.ref.tensor().detach()
            if layer.ref.groups > 1:
                layer.group = _top_group(w_full, layer.ref.groups, layer.name)
            w = layer.matrix(w_full)
            if self.sigma1_only:
                g = w.to(torch.float64)
                g = g @ g.T if g.shape[0] <= g.shape[1] else g.T @ g
                layer.s1 = torch.linalg.eigvalsh(g)[-1].clamp_min(0).sqrt()
                continue
            # weights move little per step: start from the previous top vector (or a checkpoint's)
            if layer.geo is not None:
                start = layer.geo.q1 if layer.geo_group == layer.group else None
            else:
                start = self._starts.pop(layer.name, None)
            layer.geo = opnorm_geometry(w, start, f"weight '{layer.name}'")
            layer.geo_group = layer.group
            layer.s1 = layer.geo.s1
            layer.u1, layer.v1 = layer.geo.u1.to(w.dtype), layer.geo.v1.to(w.dtype)
            layer.snapshot = w_full.clone()
            if w.dtype != torch.float64:  # the projections run in the model's dtype: W in it, without a cast;
                layer.geo.w_model = layer.matrix(layer.snapshot)  # and no float64 copy of every weight is held
                layer.geo.w = None
            if layer.ref.parametrized:
                layer.raw_snaps = [p.detach().clone() for p in layer.ref.raw_parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The warm-start vectors of the top eigenpairs, so that a resumed run repeats every bit."""
        return {layer.name: layer.geo.q1.detach().cpu().clone() for layer in self.layers if layer.geo is not None}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._starts = {k: v.clone() for k, v in state.items()}

    def abort(self) -> None:
        """Disarm after a failed step (exception between begin() and end())."""
        for layer in self.layers:
            layer.clear_step()
        self.armed = False

    def end(self, updates: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
        """Terms of the step just taken. ``updates`` (name -> dW) replaces ``W_now - W_before``."""
        if not self.armed:
            raise RuntimeError("end() called without begin()")
        self.armed = False
        if self.sigma1_only:
            values = torch.stack([layer.s1 for layer in self.layers]).tolist()
            return {layer.name: {"sigma1": v} for layer, v in zip(self.layers, values)}
        lr = self._step_lr()
        self._verify_grads()
        names, rows = [], []
        self._last, self._noise_rows = {}, {}
        with torch.no_grad(), _cpu_threads(self.linalg_threads):
            for layer in self.layers:
                if layer.grads < layer.calls:
                    raise RuntimeError(
                        f"layer '{layer.name}' ran forward but received no gradient: call backward() between "
                        "the forward and end()"
                    )
                if updates is not None:
                    dw = updates[layer.name]
                else:
                    dw = layer.ref.tensor().detach() - layer.snapshot
                if self.check_update and (updates is None or not layer.ref.parametrized):
                    self._check_update(layer, dw, lr)
                names.append(layer.name)
                rows.append(self._layer_raw(layer, layer.matrix(dw), lr))
            shares = cross_layer_lambda2([(self._noise_rows[name], 0.0) for name in names])
            raw = [r + [f if torch.is_tensor(f) else r[0].new_zeros(())] for r, f in zip(rows, shares)]
            values = torch.stack([torch.stack(r) for r in raw]).tolist() if raw else []  # one device sync
        self._noise_rows = {}
        keys = TERMS + SECOND_TERMS + (SPLIT_TERMS if self.split else ())
        out = {name: dict(zip(keys, self._finish_terms(layer, vals, lr)))
               for name, layer, vals in zip(names, self.layers, values)}
        _single_sample_nan(out, self.layers)
        for layer in self.layers:
            layer.clear_step()
            layer.snapshot = layer.raw_snaps = None
        return out

    def last_projections(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-sample ``(a, b)`` = ``(G_i v1, G_i^T u1)`` rows (M x m, M x n) of the last step, by layer."""
        return {name: (a * scale, b * scale) for name, (a, b, scale) in self._last.items()}

    def _verify_grads(self) -> None:
        checked = [layer for layer in self.layers if layer.grad_check is not None]
        if not checked:
            return
        for layer, (err, scale) in zip(checked, torch.stack([c.grad_check for c in checked]).tolist()):
            if not err <= 1e4 * torch.finfo(layer.a.dtype).eps * scale + 1e-30:
                raise RuntimeError(
                    f"the .grad of weight '{layer.name}' differs from the sum of the per-sample gradients its "
                    f"module's hooks saw (|diff . v1| = {err:.3g}, scale {scale:.3g}). Causes: the weight is also "
                    "used outside its module (tied weights), .grad was not zeroed before the step, "
                    "gradients are accumulated over several backward passes, or the loss adds a term on the "
                    "weights (an L2 penalty: fine for the tracker, pass check_grad=False)"
                )

    def _step_lr(self) -> float:
        if self.optimizer is not None:
            tracked = {id(p) for layer in self.layers for p in layer.ref.raw_parameters()}
            for group in self.optimizer.param_groups:
                if any(id(p) in tracked for p in group["params"]) and group["lr"] != self.lr:
                    raise ValueError(
                        f"optimizer lr {group['lr']} differs from tracker lr {self.lr}; set tracker.lr when the "
                        "learning rate changes"
                    )
        return self.lr

    # -- hooks -----------------------------------------------------------------------------------
    def _param_hook(self, layer: _Layer, index: int) -> Callable:
        def hook(param):
            if not self.armed:
                return None
            layer.raw_grads[index] = param.grad  # the update check reads it in end() (zero_grad may drop .grad)
            if not self.check_grad or layer.ref.parametrized or layer.single:
                return None
            if layer.a is None:
                raise RuntimeError(
                    f"weight '{layer.name}' received a gradient that did not come through its "
                    f"{type(layer.ref.module).__name__} module inside the tracked step: the weight is used outside "
                    "a registered module (a functional use such as F.linear(x, W.T)), which the tracker cannot see"
                )
            if layer.grad_checked:
                raise RuntimeError(f"weight '{layer.name}' received a second gradient in one tracked step")
            layer.grad_checked = True
            with torch.no_grad():  # compared in end(), so that a GPU need not sync inside backward
                got = layer.matrix(param.grad) @ layer.v1
                layer.grad_check = torch.stack([(got - layer.a.sum(0)).norm(), layer.a.norm(dim=1).sum()])
            return None

        return hook

    def _check_update(self, layer: _Layer, dw: torch.Tensor, lr: float) -> None:
        """Refuse a step that is not ``-lr * grad`` (+ weight decay ``-lr*wd*W``): momentum, Adam, ...

        ``.grad`` is read after the loop's own changes (gradient scaling, injected noise), so those pass.
        With ``reduction='sum'`` the SGD step of the thesis is ``-lr/M * grad``. The residual after the best
        weight-decay fit must be within rounding (``1e-3 |dW| + 16 eps |W|``).
        """
        if not layer.requires_grad:
            return
        raws = layer.ref.raw_parameters()
        if layer.ref.parametrized:
            pairs = [(p.detach() - s, i) for i, (p, s) in enumerate(zip(raws, layer.raw_snaps))]
            befores = layer.raw_snaps
        else:
            pairs, befores = [(dw, 0)], [layer.snapshot]
        step = lr / (layer.mb or 1) if self.reduction == "sum" else lr
        for (d, i), w0 in zip(pairs, befores):
            g = layer.raw_grads.get(i, raws[i].grad)
            if g is None:
                g = torch.zeros_like(d)
            # in the weights' dtype (its own rounding, ~eps |W|, is inside the tolerance): cheap for big nets
            d, g, w0 = d.reshape(-1), g.reshape(-1).to(d.dtype), w0.reshape(-1).to(d.dtype)
            r = torch.add(d, g, alpha=step)
            rw, ww, dd = torch.stack([r @ w0, w0 @ w0, d @ d]).double().tolist()
            rr = float(r @ r)
            if ww > 0:  # the weight-decay part, -lr*wd*W: |r - c w0|^2 = |r|^2 - (r.w0)^2/|w0|^2
                rr = max(rr - rw * rw / ww, 0.0)
            tol = 1e-3 * math.sqrt(dd) + 16 * torch.finfo(raws[i].dtype).eps * math.sqrt(ww) + 1e-300
            if math.sqrt(rr) > tol:
                raise ValueError(
                    f"weight '{layer.name}' moved by an update that is not -lr * grad (+ weight decay): relative "
                    f"residual {math.sqrt(rr) / max(math.sqrt(dd), 1e-300):.3g}. The Chapter 4 prediction models "
                    "plain SGD; momentum, Adam and the like are refused: use torch.optim.SGD(momentum=0), or "
                    "DynamicsTracker(..., sigma1_only=True) to track sigma1 alone"
                )

    # -- the terms -------------------------------------------------------------------------------
    def _layer_raw(self, layer: _Layer, dw: torch.Tensor, lr: float) -> list[torch.Tensor]:
        """The 0-d tensors the terms of one weight are made of (``_finish_terms`` combines them on the host,
        after the one sync of ``end()``: scalar tensor arithmetic was a third of end()'s ops):
        ``[s1, u1.dW v1, s1 q(dW/lr), tr(H) or 0, s1 q_noise, lambda2 without injected noise(, split parts)]``,
        with ``q`` the Hessian quadratic sums; sets ``_noise_rows[name]`` (the per-sample noise on log s1)."""
        geo = layer.geo
        s1, u1, v1 = geo.s1, geo.u1, geo.v1
        dv, dtu = _rows_projections(dw, v1, u1)  # (m,), (n,): d v1 and d^T u1 times lr
        ud = u1 @ dv
        q2 = _quadratic_sum_times_s1(geo, (dv / lr)[None], (dtu / lr)[None], None)
        zero = s1.new_zeros(())
        trace = hessian_trace(geo) if self.noise_var else zero
        if layer.a is None:  # not used by this forward: no per-sample gradient, only the deterministic drift
            self._noise_rows[layer.name] = None
            return [s1, ud, q2, trace, zero, zero] + ([zero, zero] if self.split else [])
        a, b = layer.a, layer.b  # at the scale of the reduced loss: per-sample = scale * these
        mb = a.shape[0]
        scale = float(mb) if self.reduction == "mean" else 1.0
        self._last[layer.name] = (a, b, scale)
        coef = self._coef(mb)
        ac, bc = a - a.mean(0), b - b.mean(0)
        wbc = None if layer.wb is None else layer.wb - layer.wb.mean(0)
        q = _quadratic_sum_times_s1(geo, ac, bc, wbc)
        # r_i = sqrt(lr c) J^T vec(G~_i) / s1: sample i's noise on this layer's log s1, |r|^2 = lambda2
        r = (ac @ layer.u1).double().mul_(math.sqrt(lr * coef)).div_(s1)
        self._noise_rows[layer.name] = r
        out = [s1, ud, q2, trace, q, r @ r]
        if self.split:
            d = (layer.sumsq - layer.gsum * layer.gsum / mb).double()  # sum_i (G_i - mean G)^2 / scale^2
            out += [(u1 * u1) @ d @ (v1 * v1), hessian_diagonal_dot(geo, d)]
        return out

    def _coef(self, mb: int) -> float:
        """c of thesis Prop. 4.4.1 times the gradient scaling squared, at the reduced loss' scale: every
        noise sum is quadratic in the (a, b) rows."""
        scale = float(mb) if self.reduction == "mean" else 1.0
        return self.grad_scale**2 * scale**2 / (mb * (mb - 1))

    def _finish_terms(self, layer: _Layer, raw: list[float], lr: float) -> list[float]:
        """The terms of one weight, in the order of ``TERMS + SECOND_TERMS (+ SPLIT_TERMS)``, from
        ``_layer_raw``'s values and the cross-layer share (last), as floats."""
        s1, ud, q2, trace, q, lam_r, *rest = raw
        share = rest.pop()
        nv = self.noise_var
        mu = ud / (s1 * lr)
        mu2 = _mu2(s1, q2, ud / lr, lr)
        noise_lam = lr * nv / s1**2
        noise_kap = lr / (2 * s1) * nv * trace if nv else 0.0
        if layer.a is None:
            out = [s1, mu, noise_kap, noise_lam, mu2, share + noise_lam]
            return out + ([noise_kap, 0.0, noise_lam, 0.0] if self.split else [])
        coef = self._coef(layer.a.shape[0])
        kap = lr / (2 * s1) * coef * (q / s1) + noise_kap
        lam = lam_r + noise_lam
        out = [s1, mu, kap, lam, mu2, share + noise_lam]
        if self.split:
            uvd, hdd = rest
            lam_var = lr / s1**2 * coef * uvd + noise_lam
            kap_var = lr / (2 * s1) * coef * hdd + noise_kap
            out += [kap_var, kap - kap_var, lam_var, lam - lam_var]
        return out


# ----------------------------------------------------------------------------------------------
# One-call API and the integrator
# ----------------------------------------------------------------------------------------------
def step_terms(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    split: bool = False,
    strict: bool = True,
    batch_dim: int = 0,
) -> dict[str, dict[str, float]]:
    """Terms of every weight matrix for the current parameters and a plain SGD step on (x, y).

    ``loss_fn(outputs, targets)`` returns per-sample losses (M,). Fills ``.grad`` with the batch-mean
    gradient; the parameters and buffers (BatchNorm running statistics, spectral_norm's vectors) are not
    changed: the step enters only through ``dW = -lr * grad`` (for a parametrised weight, the first-order
    change of the effective weight, ``J_param (-lr * grad of the raw parameters)``). Keys: see
    ``lipexp.layers.find_weights``. A 1-sample batch gives NaN kappa and lambda2 (they need 2 samples).
    """
    for p in model.parameters():
        p.grad = None
    saved = {k: b.detach().clone() for k, b in model.named_buffers()}
    tracker = DynamicsTracker(model, lr, split=split, strict=strict, batch_dim=batch_dim)
    try:
        tracker.begin()
        losses = loss_fn(model(x), y)
        if losses.dim() != 1 or losses.shape[0] != x.shape[0]:
            raise ValueError(
                f"loss_fn must return per-sample losses of shape ({x.shape[0]},) (reduction='none'), got "
                f"{tuple(losses.shape)}"
            )
        losses.mean().backward()
        updates = {layer.name: _sgd_update(layer.ref, lr) for layer in tracker.layers}
        return tracker.end(updates)
    finally:
        tracker.close()
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(saved[k])


def _sgd_update(ref: WeightRef, lr: float) -> torch.Tensor:
    """``-lr * grad`` of a weight; for a parametrised one, the first-order change of the effective weight
    (called after the step's forward, so spectral_norm's vectors are those that forward used)."""
    raws = ref.raw_parameters()
    steps = [-lr * (p.grad if p.grad is not None else torch.zeros_like(p)) for p in raws]
    if not ref.parametrized:
        return steps[0]
    plist = ref.module.parametrizations[ref.attr]
    names = [n for n, _ in plist.named_parameters()]
    def eff(*ps):
        return torch.func.functional_call(plist, dict(zip(names, ps)), ())

    training = plist.training
    with preserved_buffers(ref.module):
        plist.eval()  # the buffers as the step's forward left them, held: the gradient treats them as constants
        try:  # double-backward jvp: forward-mode AD does not cover every parametrisation (spectral_norm)
            with torch.enable_grad():
                return torch.autograd.functional.jvp(eff, tuple(p.detach() for p in raws), tuple(steps))[1].detach()
        finally:
            plist.train(training)


def network_sums(terms: dict[str, dict[str, float]]) -> dict[str, float]:
    """``mu_Z``, ``kappa_Z``, ``lambda2_Z``, and when present ``mu2_Z``, ``lambda2_Z_full`` (the diffusion
    with the cross-layer covariances) and ``*_Z_var``/``*_Z_cov`` (split): sums over layers.

    NaN terms (kappa, lambda2 of a 1-sample batch) count as 0, so a short last batch moves the
    prediction by its drift alone instead of ending it.
    """
    first = next(iter(terms.values()))
    out = {}

    def total(key):
        return sum(t[key] for t in terms.values() if not math.isnan(t[key]))

    for key in ("mu", "kappa", "lambda2"):
        out[f"{key}_Z"] = total(key)
    if "mu2" in first:
        out["mu2_Z"] = total("mu2")
    if "lambda2_full" in first:
        out["lambda2_Z_full"] = total("lambda2_full")
    for key in SPLIT_TERMS:
        if key in first:
            base, part = key.split("_")
            out[f"{base}_Z_{part}"] = total(key)
    return out


def term_columns(terms: dict[str, dict[str, float]]) -> dict[str, float]:
    """Flat per-layer columns ``'<term>/<param name>'``, e.g. ``'sigma1/0.weight'``."""
    return {f"{key}/{name}": val for name, t in terms.items() for key, val in t.items()}


SDES = ("thesis", "second_order")


def _check_sde(sde: str) -> None:
    if sde not in SDES:
        raise ValueError(f"unknown sde {sde!r}; choose 'thesis' (Theorems 4.6.7-4.6.8) or 'second_order' "
                         "(with mu2 and the cross-layer diffusion, docs/sde_second_order.md)")


class KIntegrator:
    """Running path prediction and moments of K(t) (theory.md §3, thesis Theorems 4.6.7, 4.6.8).

    ``update(terms)`` at step k returns the empirical ``K_emp = prod sigma1`` before the step, the
    prediction for the same step from steps 0..k-1 (``K_pred``, ``Z_pred``, ``EK_pred``, ``VarK_pred``),
    and this step's network sums; then it advances by ``dt = lr``. ``k0`` defaults to the first ``K_emp``.

    Two SDEs (docs/sde_second_order.md), both integrated whenever the terms carry ``mu2`` and
    ``lambda2_full`` (the tracker's always do):

    - ``thesis``: ``Z += dt (mu_Z + kappa_Z - lambda2_Z / 2)``, ``E[K] = K0 exp(sum dt (mu_Z + kappa_Z))``,
      ``Var[K] = E[K]^2 (exp(sum dt lambda2_Z) - 1)``;
    - ``second_order``: ``Z += dt (mu_Z + mu2_Z)`` (the realised second-order drift, whose expectation
      holds ``kappa_Z - lambda2_Z / 2``), ``V = sum dt lambda2_Z_full``, ``E[K] = exp(Z + V/2)``,
      ``Var[K] = E[K]^2 (exp(V) - 1)``.

    ``sde`` names the one reported as ``K_pred``/``Z_pred``/``EK_pred``/``VarK_pred``; the other gets the
    suffix ``_2nd`` (sde='thesis', the default) or ``_thesis`` (sde='second_order'). With
    sde='second_order' terms without ``mu2``/``lambda2_full`` are an error; with 'thesis' they only
    turn the second-order columns off for the rest of the run.
    """

    def __init__(self, lr: float, k0: float | None = None, sde: str = "thesis"):
        _check_sde(sde)
        self.lr, self.sde = float(lr), sde
        self.z0 = None if k0 is None else math.log(k0)
        self.z_pred = self.z0
        self.drift = 0.0  # sum dt (mu_Z + kappa_Z)
        self.var = 0.0  # sum dt lambda2_Z
        self.drift2: float | None = 0.0  # sum dt (mu_Z + mu2_Z); None once a step lacked the terms
        self.var_full: float | None = 0.0  # sum dt lambda2_Z_full

    def update(self, terms: dict[str, dict[str, float]], lr: float | None = None) -> dict[str, float]:
        first = next(iter(terms.values()))
        missing = [k for k in ("mu", "kappa", "lambda2") if k not in first]
        if missing:
            raise ValueError(f"terms lack {missing}: a sigma1_only tracker cannot drive the prediction")
        has2 = all(k in first for k in SECOND_TERMS)
        if self.sde == "second_order" and not has2:
            raise ValueError("sde='second_order' needs the terms 'mu2' and 'lambda2_full' (DynamicsTracker and "
                             "step_terms return them); use sde='thesis' for terms without them")
        dt = self.lr if lr is None else float(lr)
        z_emp = sum(math.log(t["sigma1"]) for t in terms.values())
        if self.z0 is None:
            self.z0 = self.z_pred = z_emp
        sums = network_sums(terms)
        if not has2:
            self.drift2 = self.var_full = None
        row = {"K_emp": math.exp(z_emp), "Z_emp": z_emp, **self.prediction(), **sums}
        self.z_pred += dt * (sums["mu_Z"] + sums["kappa_Z"] - 0.5 * sums["lambda2_Z"])
        self.drift += dt * (sums["mu_Z"] + sums["kappa_Z"])
        self.var += dt * sums["lambda2_Z"]
        if self.drift2 is not None:
            self.drift2 += dt * (sums["mu_Z"] + sums["mu2_Z"])
            self.var_full += dt * sums["lambda2_Z_full"]
        return row

    def prediction(self) -> dict[str, float]:
        """The prediction at the current time (after the steps integrated so far)."""
        if self.z0 is None:
            raise ValueError("no step integrated yet: call update() first")
        ek = math.exp(self.z0 + self.drift)
        thesis = {
            "K_pred": math.exp(self.z_pred),
            "Z_pred": self.z_pred,
            "EK_pred": ek,
            "VarK_pred": ek * ek * math.expm1(self.var),
        }
        if self.drift2 is None:
            return thesis
        z2 = self.z0 + self.drift2
        ek2 = math.exp(z2 + 0.5 * self.var_full)
        second = {"K_pred": math.exp(z2), "Z_pred": z2, "EK_pred": ek2, "VarK_pred": ek2 * ek2 * math.expm1(self.var_full)}
        main, other, suffix = (thesis, second, "_2nd") if self.sde == "thesis" else (second, thesis, "_thesis")
        return {**main, **{k + suffix: v for k, v in other.items()}}

    def state_dict(self) -> dict[str, float | str | None]:
        """Everything needed to resume the integration exactly (saved in training checkpoints; plain floats)."""
        return {"lr": self.lr, "z0": self.z0, "z_pred": self.z_pred, "drift": self.drift, "var": self.var,
                "drift2": self.drift2, "var_full": self.var_full, "sde": self.sde}

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.z0, self.z_pred, self.drift, self.var = (state[k] for k in ("lr", "z0", "z_pred", "drift", "var"))
        # a checkpoint written before the second-order terms existed: they cannot be resumed mid-run
        self.drift2, self.var_full = state.get("drift2"), state.get("var_full")
        self.sde = state.get("sde", self.sde)
        _check_sde(self.sde)


def integrate(
    lr: float | Iterable[float],
    z0: float,
    mu_z: Iterable[float],
    kappa_z: Iterable[float],
    lambda2_z: Iterable[float],
    mu2_z: Iterable[float] | None = None,
    lambda2_z_full: Iterable[float] | None = None,
    sde: str = "thesis",
) -> dict[str, np.ndarray]:
    """Vectorised ``KIntegrator``: arrays of ``Z_pred, K_pred, EK_pred, VarK_pred`` at steps 0..T-1 for
    one SDE (``sde='second_order'`` needs ``mu2_z`` and ``lambda2_z_full``; it does not use kappa_z and
    lambda2_z, whose expectation mu2_z holds)."""
    _check_sde(sde)
    mu, ka, la = (np.asarray(v, dtype=np.float64) for v in (mu_z, kappa_z, lambda2_z))
    dt = np.broadcast_to(np.asarray(lr, dtype=np.float64), mu.shape)

    def before(v):  # sum over the steps strictly before each step
        return np.concatenate([[0.0], np.cumsum(v)[:-1]])

    if sde == "second_order":
        if mu2_z is None or lambda2_z_full is None:
            raise ValueError("integrate(..., sde='second_order') needs mu2_z and lambda2_z_full")
        mu2, lf = np.asarray(mu2_z, dtype=np.float64), np.asarray(lambda2_z_full, dtype=np.float64)
        z = z0 + before(dt * (mu + mu2))
        v = before(dt * lf)
        ek = np.exp(z + 0.5 * v)
        return {"Z_pred": z, "K_pred": np.exp(z), "EK_pred": ek, "VarK_pred": ek * ek * np.expm1(v)}
    z = z0 + before(dt * (mu + ka - 0.5 * la))
    ek = np.exp(z0 + before(dt * (mu + ka)))
    return {"Z_pred": z, "K_pred": np.exp(z), "EK_pred": ek, "VarK_pred": ek * ek * np.expm1(before(dt * la))}
