"""Benchmark the I-ASIDE engine: band-sum path vs per-coalition FFT path, filtering vs forward time.

Usage: PYTHONPATH=. python scripts/bench_iaside.py [--images 32] [--bands 8] [--repeats 3] [--threads 1]
(``--threads 1`` gives steadier numbers on a shared machine: small ops suffer from thread hand-offs.)

For each model it times, interleaved over repeats (min and median reported):
- filtering alone: producing all 2^M x N coalition images by each path, without the model;
- the forward pass on one batch of coalition images, scaled to the 2^M x N images of a full run;
- end to end (``spectral_importance`` with each path) for the models in ``--e2e``.
CIFAR images come from the data mirror (``$LIPEXP_DATA_MIRROR/cifar10_jpeg.npz``) when present,
otherwise uniform noise (timings do not depend on pixel values). Models are randomly initialised.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from lipexp import iaside, zoo


def cifar_images(n: int) -> tuple[torch.Tensor, str]:
    path = Path(os.environ.get("LIPEXP_DATA_MIRROR", "../shared/data")) / "cifar10_jpeg.npz"
    if not path.is_file():
        return torch.rand(n, 3, 32, 32), "uniform noise (no data mirror found)"
    from PIL import Image

    with np.load(path) as z:
        jpeg, off = z["test_jpeg"], z["test_offsets"]
        imgs = [np.asarray(Image.open(io.BytesIO(jpeg[off[i]:off[i + 1]].tobytes())).convert("RGB")) for i in range(n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255, f"CIFAR-10 test images ({path})"


def imagenet_images(n: int) -> tuple[torch.Tensor, str]:
    path = Path(os.environ.get("LIPEXP_DATA_MIRROR", "../shared/data")) / "imagenet_sample224.npz"
    if not path.is_file():
        return torch.rand(n, 3, 224, 224), "uniform noise (no data mirror found)"
    cache = Path(os.environ.get("LIPEXP_CACHE", Path.home() / ".cache" / "lipexp"))
    x, _ = zoo.load_imagenet_sample(path, cache, n=n)
    return x.float() / 255, f"ImageNet sample ({path})"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def drain(images, m, batch_size, method, baseline=None):
    for x, _, _ in iaside._coalition_batches(images, m, "linf", baseline, batch_size, method):
        x.sum()  # touch the data so lazy work cannot be skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--bands", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="convnet,resnet18",
                    help="CIFAR zoo names, or efficientnet_lite0 (ImageNet sample at 224x224)")
    ap.add_argument("--e2e", default="convnet", help="models timed end to end (comma list, may be empty)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    m, bs, n = args.bands, args.batch_size, args.images
    total = n * 2**m
    y = torch.zeros(n, dtype=torch.long)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n} images; "
          f"M = {m} ({2**m} coalitions, {total} coalition images); batch {bs}; {args.repeats} interleaved repeats")
    for name in [s for s in args.models.split(",") if s]:
        torch.manual_seed(0)
        if name == "efficientnet_lite0":
            model = zoo.efficientnet_lite(0)
            x, source = imagenet_images(n)
        else:
            model = zoo.cifar_model(name).eval()
            x, source = cifar_images(n)
        batch = next(iaside._coalition_batches(x, m, "linf", None, bs, "bandsum"))[0]
        with torch.no_grad():
            model(batch)  # warm-up
        t = {"filter_bandsum": [], "filter_fft": [], "forward_batch": [], "e2e_bandsum": [], "e2e_fft": []}
        for _ in range(args.repeats):
            t["filter_bandsum"].append(timed(lambda: drain(x, m, bs, "bandsum")))
            t["filter_fft"].append(timed(lambda: drain(x, m, bs, "fft")))
            with torch.no_grad():
                t["forward_batch"].append(timed(lambda: model(batch)))
            if name in args.e2e.split(","):
                kw = dict(num_bands=m, batch_size=bs)
                t["e2e_bandsum"].append(timed(lambda: iaside.spectral_importance(model, x, y, **kw)))
                t["e2e_fft"].append(timed(lambda: iaside.spectral_importance(model, x, y, method="fft", **kw)))
        fwd = {k: v * total / batch.shape[0] for k, v in
               (("min", min(t["forward_batch"])), ("median", statistics.median(t["forward_batch"])))}
        print(f"\n[{name}] {zoo.parameter_count(model):,} parameters; {tuple(x.shape[1:])} {source}")
        for key in ("min", "median"):
            agg = min if key == "min" else statistics.median
            fb, ff = agg(t["filter_bandsum"]), agg(t["filter_fft"])
            print(f"  {key:6s} filtering: band-sum {fb:7.3f} s, per-coalition FFT {ff:7.3f} s "
                  f"(filtering speed-up {ff / fb:5.1f}x); forward of all {total} images {fwd[key]:8.2f} s "
                  f"(from one batch of {batch.shape[0]}); filtering / forward: band-sum {100 * fb / fwd[key]:.2f}%, "
                  f"FFT {100 * ff / fwd[key]:.2f}%")
            if t["e2e_bandsum"]:
                eb, ef = agg(t["e2e_bandsum"]), agg(t["e2e_fft"])
                print(f"  {key:6s} end to end: band-sum {eb:7.2f} s, per-coalition FFT {ef:7.2f} s (speed-up {ef / eb:.2f}x)")


if __name__ == "__main__":
    main()
