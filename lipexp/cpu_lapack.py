"""Single-threaded float64 Gram matrices and Cholesky factors through SciPy's BLAS/LAPACK.

Why: the tracker's ``begin()`` is a float64 Gram matrix and two Cholesky factors per weight. torch's CPU
build ships Intel MKL, which on the AMD EPYC of the project's machines ran these 1.0-1.3x (Gram) and
1.4-1.8x (``potrf``) slower than the OpenBLAS that SciPy ships, one thread each, interleaved in one process
(``scripts/bench_lapack.py``, results/bench/lapack_cpu.txt). In the tracker (paired A/B in one process, one
thread) this route alone took 7.5% off the MLP of Table 4.2 and 6% off resnet18 (32x32); with the inverse
iteration's triangular solves (dynamics._chol_solve) besides, the MLP went 6.7x -> 5.4x a plain step and resnet18
2.6x -> 2.2x.

The Cholesky factor takes this route at any torch thread count: on two threads, after a parallel torch op
(as inside a training step), OpenBLAS's one-thread ``potrf`` took 39 / 173 / 1135 us for k = 128 / 256 / 512
where torch's two-thread ``cholesky_ex`` took 87 / 377 / 2131 us. The Gram matrix takes it on one thread
only: on two, torch's parallel product is faster (140 vs 169 us for 128 x 384, 2391 vs 4225 us for
512 x 784). OpenBLAS is pinned to one thread for each call: a second thread pool spinning next to torch's
OpenMP pool on the same cores made single calls 3-10x slower. The price: OpenBLAS allocates its
work buffers once per process (the bench's peak-memory probe grew by 12-20 MiB; alone, 512 x 784 Gram and
512 x 512 factor calls raised the peak RSS by 18 MiB over the first 21 calls and not at all over the next 500).

``available(t)`` says whether a float64 CPU tensor may take this route: SciPy's BLAS library could be found
and pinned to one thread for the call (threadpoolctl); ``gram_available(t)`` adds that torch runs on one
thread. Otherwise the callers use torch, and results agree to rounding either way.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

__all__ = ["available", "gram_available", "gram", "cholesky_lower"]

@functools.cache
def _controller():
    """SciPy's BLAS as a threadpoolctl controller, looked up once per process (the lookup takes ms); None
    when it cannot be found unambiguously."""
    try:
        from scipy.linalg import blas  # noqa: F401 - loads SciPy's BLAS so threadpoolctl sees it
        from threadpoolctl import ThreadpoolController

        blas_libs = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
        # SciPy's wheels bundle their own OpenBLAS under scipy.libs/ (numpy's sits beside it, in numpy.libs/)
        own = [c for c in blas_libs if "/scipy" in c.filepath.replace("\\", "/")]
        libs = own or blas_libs  # one shared BLAS (a conda environment): that one
        return libs[0] if len(libs) == 1 else None
    except Exception:  # noqa: BLE001 - no SciPy/threadpoolctl or an unknown BLAS: torch's route
        return None


def available(t: torch.Tensor) -> bool:
    """Whether ``cholesky_lower`` may take the float64 CPU tensor ``t``."""
    return t.device.type == "cpu" and t.dtype == torch.float64 and _controller() is not None


def gram_available(t: torch.Tensor) -> bool:
    """Whether ``gram`` should take ``t``: ``available`` and torch on one thread (else its product is faster)."""
    return torch.get_num_threads() == 1 and available(t)


@contextmanager
def _one_thread():
    lib = _controller()
    old = lib.get_num_threads()
    if old != 1:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        if old != 1:
            lib.set_num_threads(old)


def gram(w: torch.Tensor) -> torch.Tensor:
    """``w @ w.T`` (k x k) of a k x N float64 CPU matrix (``available(w)``; row- or column-major), by ``dsyrk``."""
    from scipy.linalg import blas

    a = w.numpy()
    if not (a.flags.c_contiguous or a.flags.f_contiguous):
        a = a.copy()
    with _one_thread():  # a row-major k x N matrix is a column-major N x k one: syrk with trans
        c = blas.dsyrk(1.0, a, trans=0, lower=0) if a.flags.f_contiguous else blas.dsyrk(1.0, a.T, trans=1, lower=0)
    g = torch.from_numpy(c.T)  # row-major view: the lower triangle holds the result, the upper is zero
    return g.add_(g.tril(-1).mT)


def cholesky_lower(a: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(L, ok)``: the lower Cholesky factor of the symmetric float64 CPU matrix ``a`` (``available(a)``),
    computed in place in ``a``; ``ok`` False (L then meaningless) when ``a`` is not positive definite."""
    from scipy.linalg import lapack

    arr = a.numpy()
    with _one_thread():  # the transposed view is column-major: its upper factor is a's lower one
        c, info = lapack.dpotrf(arr.T, lower=0, overwrite_a=1, clean=1)
    if info != 0:
        return a, False
    in_place = c.ctypes.data == arr.ctypes.data  # f2py overwrites a column-major float64 array; else c is a copy
    return (a if in_place else torch.from_numpy(c.T.copy())), True
