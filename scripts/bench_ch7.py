"""Cost of a training step with the Chapter 7 penalties against a plain SGD step (printed ratios).

Usage: PYTHONPATH=. python scripts/bench_ch7.py [--batch 128] [--repeats 7] [--threads 1]

For the MLP (Table 4.2, MNIST-sized inputs) and the ConvNet (Table 4.1, CIFAR-sized inputs) it times,
interleaved over repeats, one step = forward, loss (+ penalty), backward, SGD update:
- plain: no penalty (1.0x);
- spectral_gap: + one power iteration (sigma_max) and one Gram + Cholesky with 4 solves (sigma_min) a layer;
- alignment (double backward): dL/dW with create_graph=True, then backward of loss + penalty;
- alignment (plain + separate HVP): for reference, the same gradient as a plain backward plus a second
  forward/backward for the Hessian-vector product (what a tracker-compatible two-pass form costs).
Inputs are random (timings do not depend on pixel values); models are randomly initialised.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lipexp import models
from lipexp import spectral_reg as sr
from lipexp.layers import weight_layers


def make_step(model, x, y, kind):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    pen = sr.Penalty(model, kind, 0.01) if kind in ("spectral_gap", "alignment") else None
    ws = [m.weight for _, m in weight_layers(model)]
    state = sr.SpectralState()

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        if kind == "two_pass":
            loss.backward()
            loss2 = F.cross_entropy(model(x), y)
            t = sr.alignment_terms(model, loss2, state)
            hv = torch.autograd.grad(0.01 * torch.stack(list(t.values())).abs().sum(), ws)
            for w, h in zip(ws, hv):
                w.grad.add_(h)
        else:
            (loss if pen is None else loss + pen(loss)).backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kinds = ("plain", "spectral_gap", "alignment", "two_pass")
    setups = {
        "MLP 784-512-256-10": (lambda: models.mlp(), (1, 28, 28)),
        "ConvNet (Table 4.1)": (lambda: models.convnet(), (3, 32, 32)),
    }
    print(f"batch {args.batch}, {args.threads} thread(s), min / median of {args.repeats} repeats x {args.inner} steps")
    for name, (build, shape) in setups.items():
        g = torch.Generator().manual_seed(0)
        x = torch.rand(args.batch, *shape, generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        steps = {}
        for k in kinds:
            torch.manual_seed(0)
            steps[k] = make_step(build(), x, y, k)
            steps[k]()  # warm-up (first-call init of the warm-start vectors)
        times = {k: [] for k in kinds}
        for _ in range(args.repeats):
            for k in kinds:
                t0 = time.perf_counter()
                for _ in range(args.inner):
                    steps[k]()
                times[k].append((time.perf_counter() - t0) / args.inner)
        base_min, base_med = min(times["plain"]), statistics.median(times["plain"])
        print(f"== {name}")
        for k in kinds:
            mn, md = min(times[k]), statistics.median(times[k])
            print(f"  {k:<14} {1e3 * mn:8.1f} ms (min) {1e3 * md:8.1f} ms (median)   "
                  f"ratio {mn / base_min:5.2f}x (min) {md / base_med:5.2f}x (median)")


if __name__ == "__main__":
    main()
