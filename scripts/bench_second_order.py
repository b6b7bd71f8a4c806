"""Cost of the beyond-thesis terms (mu2 and the cross-layer lambda2_full) inside a tracked step.

ConvNet of thesis Table 4.1, batch 256, float32, CPU. Two measurements, interleaved repeats:
  extra   the added work alone, per step: for every layer ``dW^T u1`` (a matvec), ``second_order_drift``
          (one triangular solve with one right-hand side) and ``cross_layer_lambda2`` over the layers, on the
          tracker's own geometries and a random update of the right shape;
  track   a whole tracked SGD step (DynamicsTracker.begin/forward/backward/step/end), all terms.
Prints the medians and extra / track. On a shared machine the wall-clock numbers are noisy; process CPU
time is printed too.

    python scripts/bench_second_order.py [--repeats 15] [--batch 256] [--split]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lipexp.dynamics import DynamicsTracker, cross_layer_lambda2, second_order_drift  # noqa: E402
from lipexp.models import convnet  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--split", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = convnet()
    x = torch.rand(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    tracker = DynamicsTracker(model, args.lr, split=args.split, optimizer=opt)

    def track():
        tracker.begin()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction="none").mean().backward()
        opt.step()
        return tracker.end()

    track()
    layers = tracker.layers
    dws = [args.lr * torch.randn(l.shape) for l in layers]
    rows = [(torch.randn(args.batch, dtype=torch.float64), torch.zeros((), dtype=torch.float64)) for _ in layers]

    def extra():
        out = []
        for layer, dw in zip(layers, dws):
            geo = layer.geo
            d64 = dw.to(torch.float64)
            out.append(second_order_drift(geo, d64 @ geo.v1 / args.lr, d64.T @ geo.u1 / args.lr, args.lr))
        out += cross_layer_lambda2(rows)
        return torch.stack(out).tolist()

    for _ in range(2):
        track(), extra()
    wall = {"extra": [], "track": []}
    cpu = {"extra": [], "track": []}
    for r in range(args.repeats):
        for name, fn in ((("extra", extra), ("track", track)) if r % 2 else (("track", track), ("extra", extra))):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    tracker.close()
    print(f"ConvNet (Table 4.1), batch {args.batch}, float32, 1 thread, split={args.split}, {args.repeats} repeats")
    for title, t in (("wall-clock", wall), ("process CPU", cpu)):
        e, s = statistics.median(t["extra"]), statistics.median(t["track"])
        print(f"{title:12s}: extra {1e3 * e:7.2f} ms, tracked step {1e3 * s:8.1f} ms, extra / tracked step = {e / s:.4f}")


if __name__ == "__main__":
    main()
