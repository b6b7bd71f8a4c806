"""Cost of the Chapter 4 tracker next to a plain SGD step: the ConvNet of thesis Table 4.1 (batch 256), a
torchvision resnet18 (batch 64, 32x32 images) and a small TransformerEncoder (batch 64, 32 tokens).

Three variants of one training step on CIFAR-shaped random input, float32:
  plain  zero_grad, forward, mean of per-sample cross-entropy, backward, SGD step;
  track  the same step between DynamicsTracker.begin() and .end() (all terms of every layer);
  vmap   per-sample gradients of all parameters by torch.func.vmap(grad), the step from their mean
         (the usual way to get what the tracker needs).
Time: the variants run interleaved (order rotated every repeat) in one process; we print the median
and the minimum over repeats, their ratios to the plain step, and the median of the per-repeat ratios
("paired", robust to load drift). On CPU also the process CPU time, which other processes on a
shared machine disturb far less than wall-clock time.
Memory: each variant runs in a fresh subprocess. On CPU it reports the growth of the peak resident set
size (VmHWM) over the process after setup (model, data, optimiser built), across three steps, i.e.
the step's own peak memory; on CUDA, max_memory_allocated above what was allocated before the steps.

    python scripts/bench_tracker.py [--models convnet,resnet18,transformer] [--device cpu|cuda] [--threads N]
                                    [--repeats 9] [--split]

The vmap variant and the memory probe run for the ConvNet only (vmap(grad) does not apply to BatchNorm in
training mode, and would dominate the run time for the other two).

On glibc, the default malloc returns large freed blocks to the kernel, so every step page-faults its
activations afresh (here ~70k faults, a third of a plain CPU step). Both variants pay it; to time
without it, run with MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lipexp.dynamics import DynamicsTracker  # noqa: E402
from lipexp.models import convnet  # noqa: E402

VARIANTS = ("plain", "track", "vmap")


class _Transformer(torch.nn.Module):
    """Tokens (M, 32, 64) -> Linear -> 2 TransformerEncoderLayers (d 128, 4 heads, ff 256) -> mean -> Linear."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(64, 128)
        layer = torch.nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)).mean(1))


def make_model(name: str, batch: int | None, dev):
    """(model, x, y) of a benchmark model on random input; ``batch`` None: the model's default batch."""
    if name == "convnet":
        batch = batch or 256
        model, x = convnet(), torch.rand(batch, 3, 32, 32)
    elif name == "resnet18":
        import torchvision

        batch = batch or 64
        model, x = torchvision.models.resnet18(num_classes=10), torch.rand(batch, 3, 32, 32)
    elif name == "transformer":
        batch = batch or 64
        model, x = _Transformer(), torch.randn(batch, 32, 64)
    else:
        raise SystemExit(f"unknown model {name!r}; choose convnet, resnet18, transformer")
    return model.to(dev), x.to(dev), torch.randint(0, 10, (batch,), device=dev)


def setup(args):
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model, x, y = make_model(args.model, args.batch, dev)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    tracker = DynamicsTracker(model, args.lr, split=args.split, optimizer=opt)
    params = dict(model.named_parameters())

    def loss_one(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def plain():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction="none").mean().backward()
        opt.step()

    def track():
        tracker.begin()
        plain()
        return tracker.end()

    def with_vmap():
        opt.zero_grad(set_to_none=True)
        grads = per_sample({k: v.detach() for k, v in params.items()}, x, y)
        for k, p in params.items():
            p.grad = grads[k].mean(0)
        opt.step()

    fns = {"plain": plain, "track": track, "vmap": with_vmap}
    return {v: fns[v] for v in args.variants}


def sync(args):
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def time_all(args) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU times of every repeat of every variant."""
    fns = setup(args)
    variants = tuple(fns)
    for _ in range(args.warmup):
        for v in variants:
            fns[v]()
    wall = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for r in range(args.repeats):
        k = r % len(variants)
        order = variants[k:] + variants[:k]
        for v in order:
            sync(args)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[v]()
            sync(args)
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    return wall, cpu


def report(title: str, times: dict[str, list[float]]) -> None:
    med = {v: statistics.median(t) for v, t in times.items()}
    mn = {v: min(t) for v, t in times.items()}
    # ratio within each repeat (the variants ran back to back), then the median: robust to load drift
    paired = {v: statistics.median(t / p for t, p in zip(times[v], times["plain"])) for v in times}
    print(f"{title}:")
    print(f"  {'variant':8s} {'median ms':>10s} {'min ms':>8s} {'x plain: median':>16s} {'min':>6s} {'paired':>7s}")
    for v in times:
        print(
            f"  {v:8s} {1e3 * med[v]:10.1f} {1e3 * mn[v]:8.1f} {med[v] / med['plain']:16.3f} "
            f"{mn[v] / mn['plain']:6.3f} {paired[v]:7.3f}"
        )


def peak_rss_kib() -> int:
    """Peak resident set size of this process (VmHWM; unlike ru_maxrss it starts afresh at exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss // 1024 if sys.platform == "darwin" else rss


def memory_probe(args) -> float:
    """Peak memory of three steps of one variant above the state after setup, in MiB."""
    fns = setup(args)
    fn = fns[args.memory_probe]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = peak_rss_kib()
    for _ in range(3):
        fn()
    return (peak_rss_kib() - base) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="convnet,resnet18,transformer",
                    help="comma-separated: convnet (Table 4.1, batch 256), resnet18 (batch 64), transformer (batch 64)")
    ap.add_argument("--model", default="convnet", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the model's, see --models)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch.set_num_threads; 0 keeps torch's default (1 by default: on a shared, oversubscribed machine "
        "OpenMP's spinning threads make multi-threaded timings meaningless)",
    )
    ap.add_argument("--split", action="store_true", help="track with the variance/covariance split too")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-probe", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.variants = VARIANTS
    if args.memory_probe:
        print(json.dumps({"mib": memory_probe(args)}))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but CUDA is not available")

    for name in args.models.split(","):
        args.model = name
        args.variants = VARIANTS if name == "convnet" else ("plain", "track")
        print(
            f"\n{name}, batch {args.batch or 'default'}, float32, device {args.device}, "
            f"{torch.get_num_threads()} threads, split={args.split}, {args.repeats} interleaved repeats"
        )
        wall, cpu = time_all(args)
        report("wall-clock time", wall)
        if args.device == "cpu":  # what this process computed, whatever else the machine's cores were doing
            report("process CPU time (user + system, all threads)", cpu)
    if args.no_memory or "convnet" not in args.models.split(","):
        return
    args.model = "convnet"
    mem = {}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--memory-probe", v, "--device", args.device, "--model", "convnet"]
        cmd += ["--batch", str(args.batch)] if args.batch else []
        cmd += ["--threads", str(torch.get_num_threads())] + (["--split"] if args.split else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        mem[v] = json.loads(out.strip().splitlines()[-1])["mib"]
    what = "peak RSS growth over setup" if args.device == "cpu" else "peak CUDA allocation over setup"
    print(f"memory ({what}, fresh process per variant, 3 steps):")
    for v in VARIANTS:
        print(f"{v:8s} {mem[v]:10.1f} MiB {mem[v] / mem['plain']:8.3f} x plain")


if __name__ == "__main__":
    main()
