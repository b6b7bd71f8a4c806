"""Timings of the Chapter 3 derivatives and of the layer operator norms, measured side by side.

Usage: PYTHONPATH=. python scripts/bench_spectral.py [--repeats 5]
Prints minima over interleaved repeats (the machine is shared, so medians/means are noisy).
"""
from __future__ import annotations

import argparse
import time

import torch

from lipexp import models
from lipexp.bounds import conv2d_operator_norm
from lipexp.spectral import (
    autograd_hessian,
    autograd_hessians_batched,
    error_trials,
    random_matrices,
    singular_value_hessian,
)


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--trials", type=int, default=100)
    args = ap.parse_args()

    A = random_matrices((6, 10), trials=args.trials, seed=1)
    cases = {
        "closed form (all k)": lambda: [singular_value_hessian(a, k) for a in A for k in range(6)],
        "autograd.functional.hessian loop": lambda: [autograd_hessian(a, k) for a in A[:10] for k in range(6)],
        "torch.func vmap(jacfwd(jacrev))": lambda: autograd_hessians_batched(A),
    }
    per = {"closed form (all k)": args.trials, "autograd.functional.hessian loop": 10,
           "torch.func vmap(jacfwd(jacrev))": args.trials}
    best = {k: float("inf") for k in cases}
    autograd_hessians_batched(A[:2])  # warm-up of the functorch transforms
    for _ in range(args.repeats):
        for name, fn in cases.items():
            best[name] = min(best[name], _time(fn) / per[name])
    base = best["closed form (all k)"]
    print("6x10 Hessians of all 6 singular values, seconds per matrix (min over repeats):")
    for name, t in best.items():
        print(f"  {name:34s} {t * 1e3:8.2f} ms  ({t / base:6.1f}x closed form)")
    t = _time(lambda: error_trials((6, 10), "normal", 500, seed=1))
    print(f"error_trials 6x10, 500 trials x 6 k (closed form + batched autograd + spectral norms): {t:.1f} s")

    net = models.convnet()
    shapes = {"0": (3, 32, 32), "3": (32, 16, 16), "7": (64, 8, 8)}
    print("ConvNet (Table 4.1) conv layers at init, block power iteration to tol 1e-8:")
    for idx, shape in shapes.items():
        conv = net[int(idx)]
        for block in (1, 4, 8):
            out = {}
            t = _time(lambda: out.update(v=conv2d_operator_norm(conv, shape, tol=1e-8, max_iter=20_000,
                                                                block=block)))
            v, it = out["v"]
            print(f"  layer {idx} {shape}: block {block}: {v:.10f} in {it:5d} iterations, {t:.2f} s")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
