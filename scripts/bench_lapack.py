"""The tracker's float64 kernels on one CPU thread: torch (MKL in the pinned wheel) next to the SciPy
route of lipexp.cpu_lapack (its bundled OpenBLAS pinned to one thread), interleaved, at the weight sizes of
the bench models (k x N: k the smaller side of the weight matrix).

    python scripts/bench_lapack.py [--repeats 15]

Prints, per size, median milliseconds of each route and the ratio torch / SciPy, for the Gram matrix
(torch: lipexp.dynamics' blocked product; SciPy: dsyrk) and the Cholesky factor (torch.linalg.cholesky_ex;
SciPy: dpotrf in place). `make bench` runs it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lipexp import cpu_lapack  # noqa: E402
from lipexp.dynamics import _gram_torch, _shifted  # noqa: E402

# (k, N): MLP 512 x 784 and 256 x 512; resnet18 512 x 4608 and 256 x 2304; Transformer 128 x 384
SIZES = ((512, 784), (256, 512), (512, 4608), (256, 2304), (128, 384))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    probe = torch.zeros(1, dtype=torch.float64)
    if not cpu_lapack.available(probe):
        print("SciPy's BLAS could not be pinned to one thread here (threadpoolctl found none or several): "
              "the tracker uses torch's kernels, nothing to compare")
        return
    lib = cpu_lapack._controller()
    print(f"torch {torch.__version__}, 1 thread; SciPy BLAS: {lib.internal_api} {lib.version} ({Path(lib.filepath).name})")
    print(f"{'k x N':>12s} {'gram torch':>11s} {'gram scipy':>11s} {'ratio':>6s} {'chol torch':>11s} {'chol scipy':>11s} {'ratio':>6s}")
    gen = torch.Generator().manual_seed(0)
    for k, n in SIZES:
        w = torch.randn(k, n, generator=gen, dtype=torch.float64)
        g = w @ w.T
        shift = 1.01 * float(g.diagonal().sum())
        fns = {
            "gram torch": lambda: _gram_torch(w),
            "gram scipy": lambda: cpu_lapack.gram(w),
            "chol torch": lambda: torch.linalg.cholesky_ex(_shifted(g, shift)),
            "chol scipy": lambda: cpu_lapack.cholesky_lower(_shifted(g, shift)),
        }
        times = {name: [] for name in fns}
        for name, f in fns.items():
            f()
        for r in range(args.repeats):
            for name, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
        med = {name: 1e3 * statistics.median(v) for name, v in times.items()}
        print(f"{k:5d} x {n:<5d} {med['gram torch']:11.2f} {med['gram scipy']:11.2f} "
              f"{med['gram torch'] / med['gram scipy']:6.2f} {med['chol torch']:11.2f} {med['chol scipy']:11.2f} "
              f"{med['chol torch'] / med['chol scipy']:6.2f}")


if __name__ == "__main__":
    main()
