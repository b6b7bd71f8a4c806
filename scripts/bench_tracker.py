"""Cost of the Chapter 4 tracker next to a plain SGD step and next to the per-sample-gradient peers
(issue 17), one table per model, all variants interleaved in one process.

Models (float32, random input of the datasets' shapes):
  convnet128, convnet256  the ConvNet of thesis Table 4.1, batch 128 and 256 (3 x 32 x 32);
  mlp                     the MLP of thesis Table 4.2 (784-512-256-10), batch 128 (1 x 28 x 28);
  resnet18                torchvision resnet18 (BatchNorm), batch 64, 3 x 32 x 32;
  resnet18_224            the same at its ImageNet input size, batch 64, 3 x 224 x 224 (not in the default
                          list: about 10 s a step on a 2-core CPU);
  transformer             Linear -> 2 TransformerEncoderLayers (d 128, 4 heads, ff 256) -> mean -> Linear,
                          batch 64, 32 tokens of 64 features.
Variants of one training step (each on its own copy of the model and optimiser, so no variant carries
another's hooks):
  plain     zero_grad, forward, mean of per-sample cross-entropy, backward, SGD step;
  track     the same step between DynamicsTracker.begin() and .end(): every term of every layer
            (sigma1, mu, kappa, lambda2, mu2, lambda2_full);
  floor     the plain step plus, per tracked weight, its float64 Gram matrix (the smaller side) and one
            Cholesky factor of that size, by the tracker's own kernels (lipexp.cpu_lapack, torch's otherwise): the
            linear algebra any exact per-step kappa needs (the tracker does this and a second factor, inverse
            iteration and the projections); not a method, a lower bound for these kernels;
  split     track with split=True (variance/covariance parts too; per-sample gradient chunks for convolutions);
  vmap      per-sample gradients of all parameters by torch.func.vmap(grad), the step from their mean;
  backpack  BackPACK's BatchGrad (per-sample gradients in backward), when backpack-for-pytorch is installed;
  opacus    Opacus' GradSampleModule (per-sample gradients in backward), when opacus is installed.
A peer that does not apply to a model (vmap(grad) on BatchNorm in training mode, BackPACK on attention)
is listed as n/a with the reason. None of the peers gives mu, kappa or lambda2: they stop at the
per-sample gradients the tracker never forms.

Time: the variants of a model run interleaved (order rotated every repeat); per variant the median and
minimum over repeats, their ratios to plain, and the median of the per-repeat ratios ("paired": the
variants of one repeat ran back to back, so load drift cancels). On CPU also the paired ratio of process
CPU time. Memory (unless --no-memory): each of plain/track (all variants with --memory-all) runs
three steps in a fresh subprocess; on CPU the growth of the peak RSS (VmHWM) over the state after setup,
on CUDA max_memory_allocated over what was allocated before the steps.

Writes results/bench/tracker_<device>.csv (one row per model, threads, variant) and tracker_<device>.png
(paired ratios, log scale).

    python scripts/bench_tracker.py [--models convnet128,convnet256,mlp,resnet18,transformer]
        [--device cpu|cuda] [--threads 1,2] [--costly-threads 1|all] [--repeats 3] [--warmup 1]
        [--no-peers] [--no-split] [--no-memory] [--memory-all] [--out results/bench]

The default run (3 repeats; split and the peers at the first thread setting only) took 2 min 23 s
on a 2-core CPU; --repeats 9 --costly-threads all for the full table (about 25 minutes).
On glibc, the default malloc returns large freed blocks to the kernel, so every step page-faults its
activations afresh; all variants pay it. To time without it, run with
MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736.
"""
from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lipexp.dynamics import DynamicsTracker, _cholesky, _gram, _shifted  # noqa: E402
from lipexp.layers import find_weights  # noqa: E402
from lipexp.models import convnet, mlp  # noqa: E402

VARIANTS = ("plain", "floor", "track", "split", "vmap", "backpack", "opacus")
MODELS = ("convnet128", "convnet256", "mlp", "resnet18", "transformer")
ALWAYS = ("plain", "floor", "track")  # the variants timed at every thread setting
PEER_PACKAGES = {"backpack": "backpack", "opacus": "opacus"}  # variant -> import name (the `bench` extra)


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


def make_model(name: str, dev: torch.device):
    """(model, x, y) of a benchmark model on random input, seeded."""
    torch.manual_seed(0)
    if name.startswith("convnet"):
        batch = int(name[len("convnet"):] or 256)
        model, x = convnet(), torch.rand(batch, 3, 32, 32)
    elif name == "mlp":
        model, x = mlp(), torch.rand(128, 1, 28, 28)
    elif name in ("resnet18", "resnet18_224"):
        import torchvision

        side = 224 if name == "resnet18_224" else 32
        model, x = torchvision.models.resnet18(num_classes=10), torch.rand(64, 3, side, side)
    elif name == "transformer":
        model, x = _Transformer(), torch.randn(64, 32, 64)
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}, resnet18_224 "
                         "(convnet<batch> for another batch)")
    return model.to(dev), x.to(dev), torch.randint(0, 10, (x.shape[0],), device=dev)


def _has_batchnorm(model) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _has_attention(model) -> bool:
    return any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())


def build_variant(variant: str, base: torch.nn.Module, x, y, lr: float):
    """A zero-argument step function of ``variant`` on its own copy of ``base``, or a string saying why the
    variant does not apply."""
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def plain():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction="none").mean().backward()
        opt.step()

    if variant == "plain":
        return plain
    if variant == "floor":
        refs = find_weights(model)[0]

        def floor():
            plain()
            with torch.no_grad():
                for ref in refs:
                    w = ref.tensor().detach()
                    w = w.reshape(w.shape[0], -1).to(torch.float64)
                    g = _gram(w if w.shape[0] <= w.shape[1] else w.T)
                    _cholesky(_shifted(g, 1.01 * g.diagonal().sum()))  # SPD: trace > lambda_max; the tracker's route

        return floor
    if variant in ("track", "split"):
        tracker = DynamicsTracker(model, lr, split=variant == "split", optimizer=opt)

        def track():
            tracker.begin()
            plain()
            return tracker.end()

        return track
    if variant == "vmap":
        if _has_batchnorm(model):
            return "n/a: vmap(grad) per sample cannot run BatchNorm in training mode (it couples the samples)"
        params = dict(model.named_parameters())

        def loss_one(p, xi, yi):
            return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

        per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

        def with_vmap():
            opt.zero_grad(set_to_none=True)
            grads = per_sample({k: v.detach() for k, v in params.items()}, x, y)
            for k, p in params.items():
                p.grad = grads[k].mean(0)
            opt.step()

        return with_vmap
    if importlib.util.find_spec(PEER_PACKAGES[variant]) is None:
        return f"n/a: {PEER_PACKAGES[variant]} not installed (pip install -e '.[bench]')"
    if variant == "backpack":
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad

        if _has_batchnorm(model) or _has_attention(model):
            return "n/a: BackPACK's BatchGrad has no extension for BatchNorm in training mode or attention"
        model_bp, loss_bp = extend(model), extend(torch.nn.CrossEntropyLoss())

        def with_backpack():
            opt.zero_grad(set_to_none=True)
            with backpack(BatchGrad()):
                loss_bp(model_bp(x), y).backward()
            opt.step()

        return with_backpack
    from opacus import GradSampleModule

    if _has_attention(model):
        return "n/a: Opacus needs its DPMultiheadAttention in place of nn.MultiheadAttention"
    try:
        gsm = GradSampleModule(model)
    except Exception as e:  # noqa: BLE001 - the peer's own refusal, reported in the table
        return f"n/a: Opacus refuses the model ({type(e).__name__}: {str(e).splitlines()[0][:80]})"

    def with_opacus():
        opt.zero_grad(set_to_none=True)
        gsm.zero_grad(set_to_none=True)  # drops grad_sample too
        F.cross_entropy(gsm(x), y, reduction="none").mean().backward()
        opt.step()

    return with_opacus


def setup(name: str, variants, dev, lr):
    """{variant: step function or 'n/a: why'} for one model."""
    base, x, y = make_model(name, dev)
    return {v: build_variant(v, base, x, y, lr) for v in variants}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_all(fns: dict, dev, repeats: int, warmup: int):
    """Wall-clock and process CPU times of every repeat of every runnable variant, interleaved."""
    variants = tuple(fns)
    for _ in range(warmup):
        for v in variants:
            fns[v]()
    wall = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for r in range(repeats):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[v]()
            sync(dev)
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    return wall, cpu


def summarise(wall, cpu) -> dict[str, dict[str, float]]:
    def paired(t, v):
        return statistics.median(a / p for a, p in zip(t[v], t["plain"]))

    out = {}
    for v in wall:
        med, mn = statistics.median(wall[v]), min(wall[v])
        out[v] = {
            "median_ms": 1e3 * med, "min_ms": 1e3 * mn,
            "x_median": med / statistics.median(wall["plain"]), "x_min": mn / min(wall["plain"]),
            "x_paired": paired(wall, v), "x_paired_cpu": paired(cpu, v),
        }
    return out


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
    dev = torch.device(args.device)
    fn = setup(args.model, (args.memory_probe,), dev, args.lr)[args.memory_probe]
    if isinstance(fn, str):
        return float("nan")
    if dev.type == "cuda":
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


def measure_memory(name: str, variants, args, threads: int) -> dict[str, float]:
    mem = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--memory-probe", v, "--device", args.device, "--model", name,
               "--threads", str(threads), "--lr", str(args.lr)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        mem[v] = json.loads(out.strip().splitlines()[-1])["mib"]
    return mem


def print_table(name, threads, stats, notes, mem, dev):
    x = make_model(name, torch.device("cpu"))[1]
    print(f"\n{name}: batch {x.shape[0]}, input {tuple(x.shape[1:])}, float32, {dev}, {threads} thread(s)")
    head = f"  {'variant':9s} {'median ms':>10s} {'min ms':>9s} {'x median':>9s} {'x min':>7s} {'x paired':>9s}"
    head += f" {'x cpu':>7s}" if dev.type == "cpu" else ""
    head += f" {'peak MiB':>9s} {'x mem':>6s}" if mem else ""
    print(head)
    for v, s in stats.items():
        line = (f"  {v:9s} {s['median_ms']:10.1f} {s['min_ms']:9.1f} {s['x_median']:9.3f} {s['x_min']:7.3f} "
                f"{s['x_paired']:9.3f}")
        line += f" {s['x_paired_cpu']:7.3f}" if dev.type == "cpu" else ""
        if mem:
            m = mem.get(v)
            line += f" {m:9.1f} {m / mem['plain']:6.3f}" if m is not None else f" {'-':>9s} {'-':>6s}"
        print(line)
    for v, why in notes.items():
        print(f"  {v:9s} {why}")


def write_outputs(rows: list[dict], out_dir: Path, dev) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"tracker_{dev.type}.csv"
    keys = ["model", "batch", "device", "threads", "variant", "median_ms", "min_ms", "x_median", "x_min",
            "x_paired", "x_paired_cpu", "peak_mib", "x_mem", "note"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    print(f"\nwrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no bar chart")
        return
    timed = [r for r in rows if r.get("x_paired") not in (None, "")]
    groups = list(dict.fromkeys((r["model"], r["threads"]) for r in timed))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in timed)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups)), 4))
    width = 0.8 / max(len(variants), 1)
    for j, v in enumerate(variants):
        xs, hs = [], []
        for i, g in enumerate(groups):
            hit = [r for r in timed if (r["model"], r["threads"]) == g and r["variant"] == v]
            if hit:
                xs.append(i + (j - (len(variants) - 1) / 2) * width)
                hs.append(hit[0]["x_paired"])
        ax.bar(xs, hs, width, label=v)
    ax.axhline(1.1, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), [f"{m}\n{t} thr" for m, t in groups], fontsize=8)
    ax.set_ylabel("step time / plain step (paired median)")
    ax.set_title(f"tracker vs per-sample-gradient peers ({dev.type}; dashed: 1.1x)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    png = out_dir / f"tracker_{dev.type}.png"
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--model", default="convnet256", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", default="1,2", help="comma-separated torch.set_num_threads settings to run")
    ap.add_argument("--costly-threads", default=None,
                    help="thread settings at which split and the peers run too (default: the first of --threads; "
                    "'all' for every setting); the others time plain, floor and track only")
    ap.add_argument("--no-peers", action="store_true", help="plain, floor, track, split only")
    ap.add_argument("--no-split", action="store_true", help="leave out the split variant")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-all", action="store_true", help="peak memory of the peers too (slow: fresh process each)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"), help="folder for the CSV and PNG ('' for none)")
    ap.add_argument("--memory-probe", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        torch.set_num_threads(int(args.threads.split(",")[0]))
        print(json.dumps({"mib": memory_probe(args)}))
        return
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but CUDA is not available")
    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        sys.exit(f"--threads takes comma-separated integers, e.g. 1,2; got {args.threads!r}")
    variants = [v for v in VARIANTS if not (args.no_peers and v not in ALWAYS + ("split",))
                and not (args.no_split and v == "split")]
    missing = [p for v, p in PEER_PACKAGES.items() if v in variants and importlib.util.find_spec(p) is None]
    if missing:
        print(f"note: {', '.join(missing)} not installed: those peers are skipped (pip install -e '.[bench]')")
    print(f"torch {torch.__version__}; timings by wall clock, variants interleaved; 'x paired' is the median over "
          f"{args.repeats} repeats of the ratio to the plain step of the same repeat")
    costly = threads if args.costly_threads == "all" else (
        [int(t) for t in args.costly_threads.split(",")] if args.costly_threads else threads[:1])
    rows = []
    t_start = time.perf_counter()
    for name in args.models.split(","):
        for nt in threads:
            torch.set_num_threads(nt)
            these = variants if nt in costly else [v for v in variants if v in ALWAYS]
            built = setup(name, these, dev, args.lr)
            fns = {v: f for v, f in built.items() if not isinstance(f, str)}
            notes = {v: f for v, f in built.items() if isinstance(f, str)}
            wall, cpu = time_all(fns, dev, args.repeats, args.warmup)
            stats = summarise(wall, cpu)
            del fns, built
            mem = {}
            if not args.no_memory and nt == threads[0]:
                mem_vars = [v for v in stats if args.memory_all or v in ("plain", "track")]
                mem = measure_memory(name, mem_vars, args, nt)
            print_table(name, nt, stats, notes, mem, dev)
            batch = make_model(name, torch.device("cpu"))[1].shape[0]
            for v, s in stats.items():
                m = mem.get(v)
                rows.append({"model": name, "batch": batch, "device": dev.type, "threads": nt, "variant": v,
                             **{k: round(val, 4) for k, val in s.items()},
                             "peak_mib": "" if m is None else round(m, 1),
                             "x_mem": "" if m is None else round(m / mem["plain"], 3)})
            for v, why in notes.items():
                rows.append({"model": name, "batch": batch, "device": dev.type, "threads": nt, "variant": v,
                             "note": why})
    print(f"\nbench time {time.perf_counter() - t_start:.0f} s")
    if args.out:
        write_outputs(rows, Path(args.out), dev)


if __name__ == "__main__":
    main()
