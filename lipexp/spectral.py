"""Closed-form first and second derivatives of singular values (thesis Chapter 3, theory.md §1, §5).

Layout: ``vec`` is column-major, so entry ``A[i, j]`` of an ``m x n`` matrix is ``vec(A)[j*m + i]`` and
``vec(u v^T) = v kron u``. Singular values are indexed from 0 (``k = 0`` is the largest).

For ``A = U diag(s) V^T`` (full U: m x m, full V: n x n, ``s_i = 0`` for i >= min(m, n)) and a
direction G with ``a_ij = u_i^T G v_j``, the second-order term of ``s_k(A + t G)`` is ``t^2/2 q(G)`` with

    q(G) = sum_{i<m, i!=k} s_k/(s_k^2-s_i^2) a_ik^2 + sum_{j<n, j!=k} s_k/(s_k^2-s_j^2) a_kj^2
         + 2 sum_{l<min(m,n), l!=k} s_l/(s_k^2-s_l^2) a_lk a_kl,

which is thesis Lemma 3.6.1 with the left sum over all m left singular vectors (erratum, theory.md §5).
For k > 0 the gaps ``s_k^2 - s_i^2`` are negative for i < k: the Hessian of a non-top singular value is
indefinite, and only the top one (k = 0) gives a PSD Hessian (the operator norm is convex).

Both derivatives exist only where ``s_k`` is simple and non-zero. We refuse (ValueError) when
``min_{i != k} |s_k - s_i| <= rtol * s_0`` (with the padded zeros among the ``s_i`` when m != n, and
``s_k`` itself compared against 0), ``rtol`` defaulting to ``1000 * eps(dtype)`` (2.2e-13 for
float64, 1.2e-4 for float32): below that the computed gap is dominated by rounding.

The rest of the module produces the data of thesis Figs. 3.2-3.4 (closed form against autograd).
"""
from __future__ import annotations

import math

import torch

DISTRIBUTIONS = ("normal", "uniform")


def _check_matrix(A: torch.Tensor, k: int) -> None:
    if not isinstance(A, torch.Tensor) or A.ndim != 2:
        raise ValueError(f"A must be a 2-D tensor (one m x n matrix), got {type(A).__name__} "
                         f"with shape {tuple(getattr(A, 'shape', ()))}")
    if not A.is_floating_point():
        raise ValueError(f"A must be a floating tensor (float64 recommended), got {A.dtype}")
    r = min(A.shape)
    if not (isinstance(k, int) and 0 <= k < r):
        raise ValueError(f"k={k!r} is out of range for a {A.shape[0]}x{A.shape[1]} matrix: "
                         f"use 0 <= k < min(m, n) = {r} (k = 0 is the largest singular value)")


def _full_spectrum(s: torch.Tensor, size: int) -> torch.Tensor:
    """Singular values padded with zeros to ``size`` (the s_i = 0 beyond min(m, n))."""
    return torch.cat([s, s.new_zeros(size - s.numel())])


def _check_simple(s: torch.Tensor, k: int, m: int, n: int, rtol: float | None) -> None:
    if rtol is None:
        rtol = 1000.0 * torch.finfo(s.dtype).eps
    # zeros stand for the extra left (m > n) or right (n > m) singular vectors; s_k must differ from them too
    others = torch.cat([s[:k], s[k + 1:], s.new_zeros(1 if m != n else 0)])
    scale = float(s[0])
    if scale == 0.0:
        raise ValueError("A is the zero matrix: its singular values are all 0 and not differentiable")
    gap = float((others - s[k]).abs().min()) if others.numel() else math.inf
    gap = min(gap, float(s[k]))  # s_k = 0 is a kink (|x| in one dimension) even for square matrices
    if gap <= rtol * scale:
        raise ValueError(
            f"singular value s_{k} = {float(s[k]):.6g} is not simple (closest other singular value, or 0, "
            f"is {gap:.3g} away; tolerance rtol * s_0 = {rtol * scale:.3g}): its derivatives do not exist "
            "there. Perturb A slightly, or pass a smaller rtol if the gap is genuine."
        )


def singular_value_jacobian(A: torch.Tensor, k: int = 0, rtol: float | None = None) -> torch.Tensor:
    """d s_k / d vec(A) = v_k kron u_k, shape ``[m*n]`` (column-major vec), dtype of A.

    Raises ValueError when s_k is repeated or zero (see module docstring for ``rtol``).
    """
    _check_matrix(A, k)
    m, n = A.shape
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    _check_simple(s, k, m, n, rtol)
    return (Vh[k, :, None] * U[None, :, k]).reshape(-1)  # v_k kron u_k


def singular_value_hessian(A: torch.Tensor, k: int = 0, rtol: float | None = None) -> torch.Tensor:
    """d^2 s_k / d vec(A)^2 in closed form, shape ``[m*n, m*n]`` (column-major vec), dtype of A.

    Built as ``P C P^T`` with ``P = [v_k kron U, V kron u_k]`` (``m*n x (m+n)``) and C holding the
    left, right and cross coefficients of the module docstring. Raises ValueError when s_k is
    repeated or zero.
    """
    _check_matrix(A, k)
    m, n = A.shape
    U, s, Vh = torch.linalg.svd(A, full_matrices=True)
    r = min(m, n)
    _check_simple(s, k, m, n, rtol)
    V = Vh.T
    sk = s[k]
    sl, sr = _full_spectrum(s, m), _full_spectrum(s, n)

    # Where i = k the denominator is 0 but the term is excluded: mask before dividing.
    keep_l = torch.ones(m, dtype=torch.bool, device=A.device)
    keep_l[k] = False
    keep_r = torch.ones(n, dtype=torch.bool, device=A.device)
    keep_r[k] = False
    den_l = torch.where(keep_l, sk**2 - sl**2, torch.ones_like(sl))
    den_r = torch.where(keep_r, sk**2 - sr**2, torch.ones_like(sr))
    c_left = torch.where(keep_l, sk / den_l, torch.zeros_like(sl))  # coefficient of (v_k kron u_i)
    c_right = torch.where(keep_r, sk / den_r, torch.zeros_like(sr))  # coefficient of (v_j kron u_k)
    c_cross = torch.where(keep_l[:r], s / den_l[:r], torch.zeros_like(s))  # pairs (l,k) <-> (k,l), l < r

    # column i of P_left is v_k kron u_i, column j of P_right is v_j kron u_k (row index b*m + a)
    P_left = (V[:, k, None, None] * U[None, :, :]).reshape(n * m, m)
    P_right = (V[:, None, :] * U[None, :, k, None]).reshape(n * m, n)
    P = torch.cat([P_left, P_right], dim=1)  # mn x (m+n)
    C = A.new_zeros(m + n, m + n)
    C[:m, :m] = torch.diag(c_left)
    C[m:, m:] = torch.diag(c_right)
    idx = torch.arange(r, device=A.device)
    C[idx, m + idx] = c_cross
    C[m + idx, idx] = c_cross
    return P @ C @ P.T


# ---------------------------------------------------------------------------------------------
# Autograd references and the data of Figs. 3.2-3.4
# ---------------------------------------------------------------------------------------------

def _unvec(x: torch.Tensor, m: int, n: int) -> torch.Tensor:
    return x.reshape(n, m).T  # column-major: vec index j*m + i -> A[i, j]


def vec(A: torch.Tensor) -> torch.Tensor:
    """Column-major vec of an ``m x n`` matrix, shape ``[m*n]``."""
    return A.T.reshape(-1)


def autograd_jacobian(A: torch.Tensor, k: int) -> torch.Tensor:
    """Reference d s_k / d vec(A) by ``torch.autograd.functional.jacobian`` of ``svdvals``, ``[m*n]``."""
    m, n = A.shape
    return torch.autograd.functional.jacobian(lambda x: torch.linalg.svdvals(_unvec(x, m, n))[k], vec(A))


def autograd_hessian(A: torch.Tensor, k: int) -> torch.Tensor:
    """Reference Hessian by ``torch.autograd.functional.hessian`` of ``svdvals``, ``[m*n, m*n]``."""
    m, n = A.shape
    return torch.autograd.functional.hessian(lambda x: torch.linalg.svdvals(_unvec(x, m, n))[k], vec(A))


def autograd_hessians_batched(A: torch.Tensor) -> torch.Tensor:
    """Reference Hessians of all singular values of a batch, ``A: [B, m, n] -> [B, r, m*n, m*n]``.

    Forward-over-reverse ``torch.func`` under ``vmap``: one call for every trial and every k, far
    faster than ``autograd_hessian`` in a loop (which is kept for the per-k figures).
    """
    from torch.func import jacfwd, jacrev, vmap

    B, m, n = A.shape
    f = lambda x: torch.linalg.svdvals(_unvec(x, m, n))  # noqa: E731
    return vmap(jacfwd(jacrev(f)))(A.transpose(1, 2).reshape(B, m * n))


def random_matrices(
    shape: tuple[int, int] = (6, 10),
    dist: str = "normal",
    trials: int | None = None,
    seed: int = 1,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Entries i.i.d. N(0, 1) or U(0, 1) from a private generator seeded with ``seed``.

    Returns ``[m, n]`` when ``trials`` is None, else ``[trials, m, n]``.
    """
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"unknown dist '{dist}'; choose one of {DISTRIBUTIONS}")
    g = torch.Generator().manual_seed(seed)
    size = tuple(shape) if trials is None else (trials, *shape)
    draw = torch.randn if dist == "normal" else torch.rand
    return draw(size, generator=g, dtype=dtype)


def _eps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Thesis eq. (3.280): 2-norm of a vector, spectral norm of a matrix."""
    d = (a - b).double()
    return float(torch.linalg.vector_norm(d) if d.ndim == 1 else torch.linalg.matrix_norm(d, ord=2))


def compare_derivatives(A: torch.Tensor, order: int = 1) -> list[dict]:
    """Per k: closed form vs autograd for one matrix (Figs. 3.2 with order 1, 3.3 with order 2).

    Rows ``{k, sigma, ours, autograd, eps}``; for order 1 ``ours``/``autograd`` are the ``[m*n]``
    Jacobians, for order 2 the ``[m*n, m*n]`` Hessians.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (Jacobian) or 2 (Hessian), got {order!r}")
    closed, ref = (singular_value_jacobian, autograd_jacobian) if order == 1 else (
        singular_value_hessian, autograd_hessian)
    s = torch.linalg.svdvals(A)
    rows = []
    for k in range(min(A.shape)):
        ours, gt = closed(A, k), ref(A, k)
        rows.append({"k": k, "sigma": float(s[k]), "ours": ours, "autograd": gt, "eps": _eps(ours, gt)})
    return rows


def error_trials(
    shape: tuple[int, int] = (6, 10),
    dist: str = "normal",
    trials: int = 500,
    seed: int = 1,
    order: int = 2,
    dtype: torch.dtype = torch.float64,
    chunk: int = 100,
) -> torch.Tensor:
    """Errors eps over random matrices (Fig. 3.4): ``[min(m, n), trials]``, row k for s_k.

    Order 2 uses ``autograd_hessians_batched`` as the reference (``chunk`` trials at a time, to bound
    memory); order 1 the batched reverse-mode Jacobian of ``svdvals``. Matrices are drawn by
    ``random_matrices(shape, dist, trials, seed)``.
    """
    from torch.func import jacrev, vmap

    if order not in (1, 2):
        raise ValueError(f"order must be 1 (Jacobian) or 2 (Hessian), got {order!r}")
    A = random_matrices(shape, dist, trials, seed, dtype)
    m, n = shape
    r = min(m, n)
    f = lambda x: torch.linalg.svdvals(_unvec(x, m, n))  # noqa: E731
    closed = singular_value_hessian if order == 2 else singular_value_jacobian
    err = torch.empty(r, trials, dtype=torch.float64)
    for start in range(0, trials, chunk):
        Ac = A[start:start + chunk]
        ref = autograd_hessians_batched(Ac) if order == 2 else vmap(jacrev(f))(Ac.transpose(1, 2).reshape(
            Ac.shape[0], m * n))
        for t in range(Ac.shape[0]):
            for k in range(r):
                err[k, start + t] = _eps(closed(Ac[t], k), ref[t, k])
    return err


def fig3_4_errors(
    trials: int = 500,
    seed: int = 1,
    shapes: tuple[tuple[int, int], ...] = ((6, 10), (10, 6), (8, 8)),
    dists: tuple[str, ...] = DISTRIBUTIONS,
    order: int = 2,
) -> dict[str, torch.Tensor]:
    """``{"normal 6x10": errors [r, trials], ...}``: Fig. 3.4 (6 x 10) extended to tall and square shapes."""
    return {f"{d} {m}x{n}": error_trials((m, n), d, trials, seed, order) for m, n in shapes for d in dists}


def error_summary(errors: dict[str, torch.Tensor]) -> list[dict]:
    """Rows ``{case, k, max, median, mean}`` from ``{case name: error_trials(...)}``."""
    rows = []
    for case, err in errors.items():
        for k in range(err.shape[0]):
            e = err[k]
            rows.append({"case": case, "k": k, "max": float(e.max()), "median": float(e.median()),
                         "mean": float(e.mean())})
    return rows
