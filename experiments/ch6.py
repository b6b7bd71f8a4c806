"""Pieces shared by the Chapter 6 figures: the model zoo (trained once, cached), evaluation images,
cached per-sample Shapley values, SID statistics and correlations.

The zoo's settings live in ``conf/figure/fig6_zoo.yaml`` (``figure.zoo`` and ``figure.sid`` per profile);
every figure reads them from there, so Figs 6.7-6.16 use the same models. A CIFAR model is trained the
first time a figure needs it, under ``results/fig6_zoo/runs/<profile>/zoo/<name>-<hash>/`` (hash of its
settings, file lock against concurrent jobs, resumable checkpoints), and reused afterwards. Shapley values
are cached per sample (``psi/``), so a figure that needs a sample mean of any subset gets it for free:
the Shapley value is linear in the characteristic function, and ``v`` is a mean over samples.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lipexp import data as D
from lipexp import iaside, results, zoo
from lipexp.train import TrainSpec, resolve_device, train

log = logging.getLogger("lipexp")

ZOO_FIGURE = "fig6_zoo"
CONF_FILE = Path(__file__).resolve().parent.parent / "conf" / "figure" / f"{ZOO_FIGURE}.yaml"
IMAGENET_SAMPLE = "imagenet_sample224.npz"
JPEG_NOTE = ("The offline mirror's CIFAR-10 is a JPEG re-encoding (quality ~75): its highest frequencies are "
             "attenuated compared with the original PNG-like CIFAR-10, which shifts frequency-domain numbers.")


class ModelUnavailable(RuntimeError):
    """A pretrained model whose weights cannot be had here (offline, package missing)."""


# ------------------------------------------------------------------------------------ settings
def _zoo_figure_cfg(cfg: DictConfig) -> DictConfig:
    if cfg.figure.id == ZOO_FIGURE:
        return cfg.figure
    return OmegaConf.load(CONF_FILE).figure


def zoo_settings(cfg: DictConfig) -> DictConfig:
    """This profile's zoo (``figure.zoo.<profile>`` of fig6_zoo.yaml)."""
    return _zoo_figure_cfg(cfg).zoo[cfg.profile.name]


def sid_settings(cfg: DictConfig) -> DictConfig:
    """This profile's I-ASIDE settings for the zoo's SIDs (``figure.sid.<profile>`` of fig6_zoo.yaml)."""
    return _zoo_figure_cfg(cfg).sid[cfg.profile.name]


def zoo_root(cfg: DictConfig) -> Path:
    return Path(cfg.results_dir) / ZOO_FIGURE / "runs" / cfg.profile.name / "zoo"


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


@contextmanager
def _locked(path: Path):
    """An exclusive file lock (two jobs needing the same model: one trains it, the other waits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------ data
def data_kwargs(cfg: DictConfig) -> dict:
    return dict(root=cfg.data.root, mirror=cfg.data.mirror, download=cfg.data.download, cache_dir=cfg.data.cache_dir)


def cifar_sets(cfg: DictConfig, train_subset: int | None, test_subset: int | None) -> tuple[D.Dataset, D.Dataset]:
    """CIFAR-10 train/test (stratified subsets, seeded by ``seed.data``)."""
    kw = data_kwargs(cfg)
    tr = D.subset(D.load_dataset("cifar10", "train", **kw), train_subset, seed=cfg.seed.data)
    te = D.subset(D.load_dataset("cifar10", "test", **kw), test_subset, seed=cfg.seed.data + 1)
    return tr, te


def cifar_eval(cfg: DictConfig, n: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` test images of CIFAR-10 (pixels in [0, 1], class-stratified, fixed seed) and labels."""
    te = D.load_dataset("cifar10", "test", **data_kwargs(cfg))
    sub = D.subset(te, n, seed=seed)
    return sub.x.float() / 255, sub.y, te.source


def dataset_source(cfg: DictConfig, family: str) -> str:
    """Where a family's evaluation images come from (recorded in each figure's provenance)."""
    if family == "cifar":
        return D.load_dataset("cifar10", "test", **data_kwargs(cfg)).source
    folder = imagenet_val_dir(cfg)
    return f"imagenet-folder:{folder}" if folder else f"mirror:{IMAGENET_SAMPLE}"


def imagenet_val_dir(cfg: DictConfig) -> str | None:
    """An ImageNet validation folder (class sub-folders named by synset) from ``figure.imagenet_val``
    of the figure or of fig6_zoo.yaml, or ``$LIPEXP_IMAGENET_VAL``; None: use the mirror's sample."""
    import os

    path = cfg.figure.get("imagenet_val") or _zoo_figure_cfg(cfg).get("imagenet_val")
    return path or os.environ.get("LIPEXP_IMAGENET_VAL") or None


def imagenet_eval(cfg: DictConfig, n: int, image_size: int = 224, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` ImageNet validation images (pixels in [0, 1], ``image_size`` square) and labels.

    From the folder of ``imagenet_val_dir`` when set (resize 256, centre crop 224), otherwise from the
    offline mirror's 1,000-image sample; a seeded random subset. Raises ``DataUnavailable`` when neither.
    """
    folder = imagenet_val_dir(cfg)
    if folder:
        x, y = _imagenet_folder(Path(folder), n, seed)
        source = f"imagenet-folder:{folder}"
    else:
        mirror = cfg.data.mirror
        path = Path(mirror) / IMAGENET_SAMPLE if mirror else None
        if path is None or not path.is_file():
            raise D.DataUnavailable(
                "no ImageNet images: set figure.imagenet_val= (or LIPEXP_IMAGENET_VAL) to an ImageNet validation "
                f"folder with one sub-folder per synset, or point LIPEXP_DATA_MIRROR at a folder with {IMAGENET_SAMPLE}"
            )
        cache = Path(cfg.data.cache_dir or Path(cfg.data.root) / "lipexp_cache")
        xa, ya = zoo.load_imagenet_sample(path, cache)
        idx = torch.randperm(len(ya), generator=torch.Generator().manual_seed(seed))[: min(n, len(ya))]
        x, y = xa[idx].float() / 255, ya[idx]
        source = f"mirror:{IMAGENET_SAMPLE}"
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp(0.0, 1.0)
    return x, y, source


def _imagenet_folder(folder: Path, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import datasets, transforms

    if not folder.is_dir():
        raise D.DataUnavailable(f"ImageNet validation folder {folder} does not exist")
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    ds = datasets.ImageFolder(str(folder), transform=tf)
    if len(ds.classes) != 1000:
        raise D.DataUnavailable(f"{folder} has {len(ds.classes)} class folders; ImageNet needs the 1,000 synsets")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[: min(n, len(ds))]
    xs, ys = zip(*(ds[int(i)] for i in idx))
    return torch.stack(xs), torch.tensor(ys)


# ------------------------------------------------------------------------------------ the zoo
@dataclass
class Entry:
    """One zoo model: ``family`` 'cifar' (trained here) or 'imagenet' (pretrained)."""

    key: str
    family: str
    spec: dict

    @property
    def arch(self) -> str:
        if self.family == "cifar":
            return self.spec["arch"]
        return f"efficientnet_lite{self.spec['variant']}" if self.spec["kind"] == "lite" else self.spec["name"]

    @property
    def is_transformer(self) -> bool:
        return any(t in self.arch for t in ("vit", "swin", "maxvit"))


def zoo_entries(cfg: DictConfig, families=("cifar", "imagenet"), keys=None) -> list[Entry]:
    zs = zoo_settings(cfg)
    out = []
    for fam in families:
        for key, spec in (zs.get(fam) or {}).items():
            if keys is None or key in keys:
                out.append(Entry(str(key), fam, OmegaConf.to_container(spec, resolve=True)))
    if keys is not None:
        missing = set(keys) - {e.key for e in out}
        if missing:
            raise ValueError(f"zoo models {sorted(missing)} are not in this profile's zoo "
                             f"({[e.key for e in zoo_entries(cfg, families)]}); see conf/figure/fig6_zoo.yaml")
    return out


def entry_dir(cfg: DictConfig, entry: Entry) -> Path:
    zs = zoo_settings(cfg)
    ident = {"spec": entry.spec, "family": entry.family}
    if entry.family == "cifar":
        ident.update(train_subset=zs.train_subset, seed=OmegaConf.to_container(cfg.seed))
    else:
        ident.update(image_size=zs.image_size)
    return zoo_root(cfg) / f"{entry.key}-{_hash(ident)}"


def _build_cifar(entry: Entry, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.cifar_model(entry.spec["arch"], num_classes=10, **entry.spec.get("kwargs", {}))


def _build_imagenet(cfg: DictConfig, entry: Entry, pretrained: bool = True) -> nn.Module:
    size = int(zoo_settings(cfg).image_size)
    try:
        if entry.spec["kind"] == "lite":
            return zoo.efficientnet_lite(int(entry.spec["variant"]), image_size=size)
        if not pretrained:
            import torchvision

            from lipexp.models import DATASET_STATS, Normalize

            net = torchvision.models.get_model(entry.spec["name"], weights=None)
            return nn.Sequential(Normalize(*DATASET_STATS["imagenet"]), net).eval()
        return zoo.torchvision_pretrained(entry.spec["name"], allow_download=cfg.data.download,
                                          weights=entry.spec.get("weights", "DEFAULT"))
    except (ImportError, RuntimeError, OSError) as err:
        raise ModelUnavailable(f"{entry.key}: {err}") from err


def train_spec(cfg: DictConfig, spec: dict, eval_samples: int | None) -> TrainSpec:
    opt = spec.get("optimizer", "adam")
    return TrainSpec(
        steps=int(spec["steps"]), lr=float(spec["lr"]), batch_size=int(spec["batch_size"]), optimizer=opt,
        momentum=float(spec.get("momentum", 0.9 if opt == "sgd" else 0.0)),
        weight_decay=float(spec.get("weight_decay", 0.0)), tracker="off", log_every=10, eval_every=0,
        eval_samples=eval_samples, checkpoint_every=int(spec.get("checkpoint_every", 100)),
        sampling_seed=int(cfg.seed.sampling), aux_seed=int(cfg.seed.sampling) + 7919,
        progress=bool(cfg.progress) and sys.stderr.isatty(),
    )


def load_model(cfg: DictConfig, entry: Entry) -> tuple[nn.Module, dict]:
    """The trained (or pretrained) zoo model in eval mode on the run's device, and its info
    (params, accuracy, training budget). CIFAR models are trained here on first use."""
    device = resolve_device(cfg.device)
    d = entry_dir(cfg, entry)
    with _locked(d.parent / ".locks" / f"{d.name}.lock"):
        info = results.read_json(d / "info.json")
        if entry.family == "cifar":
            model = _build_cifar(entry, int(cfg.seed.init))
            if info is None:
                info = _train_cifar(cfg, entry, model, d, device)
            model.load_state_dict(results.load_torch(d / "model.pt"))
        else:
            model = _build_imagenet(cfg, entry)
            if info is None:
                info = _imagenet_info(cfg, entry, model, device)
                results.write_json(d / "info.json", info)
    return model.to(device).eval(), info


def _train_cifar(cfg, entry: Entry, model: nn.Module, d: Path, device) -> dict:
    zs = zoo_settings(cfg)
    train_set, test_set = cifar_sets(cfg, zs.train_subset, zs.test_subset)
    log.info("zoo: training %s (%s) for %d steps in %s", entry.key, entry.arch, entry.spec["steps"], d)
    # The zoo models normalise inside (model[0]); train() normalises itself, so it trains model[1].
    summary = train(model[1], train_set, test_set, train_spec(cfg, entry.spec, zs.test_subset), d, device)
    torch.save(model.state_dict(), d / "model.pt")
    info = {
        "key": entry.key, "family": "cifar", "arch": entry.arch, "kwargs": entry.spec.get("kwargs", {}),
        "params": zoo.parameter_count(model), "steps": int(entry.spec["steps"]),
        "batch_size": int(entry.spec["batch_size"]), "optimizer": entry.spec.get("optimizer", "adam"),
        "lr": float(entry.spec["lr"]), "train_subset": zs.train_subset,
        "train_acc": summary.get("final_train_acc"), "test_acc": summary.get("final_test_acc"),
        "eval_samples": zs.test_subset, "wall_time_s": summary.get("wall_time_s"),
        "data_source": train_set.source, "dataset": "cifar10", "image_size": 32,
    }
    results.write_json(d / "info.json", info)
    return info


def _imagenet_info(cfg, entry: Entry, model: nn.Module, device) -> dict:
    zs = zoo_settings(cfg)
    x, y, source = imagenet_eval(cfg, int(zs.imagenet_eval_samples), int(zs.image_size), seed=99)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), 50):
            correct += int((model.to(device)(x[i:i + 50].to(device)).argmax(1).cpu() == y[i:i + 50]).sum())
    return {"key": entry.key, "family": "imagenet", "arch": entry.arch, "params": zoo.parameter_count(model),
            "test_acc": correct / len(y), "eval_samples": len(y), "data_source": source, "dataset": "imagenet",
            "image_size": int(zs.image_size), "weights": entry.spec.get("weights", "package")}


def random_model(cfg: DictConfig, entry: Entry, seed: int = 0) -> nn.Module:
    """The entry's architecture with Kaiming-normal weights (``lipexp.zoo.kaiming_init_``), eval mode."""
    model = _build_cifar(entry, seed) if entry.family == "cifar" else _build_imagenet(cfg, entry, pretrained=False)
    return zoo.kaiming_init_(model, seed=seed).to(resolve_device(cfg.device)).eval()


def eval_images(cfg: DictConfig, entry: Entry, n: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The evaluation images of an entry's dataset (CIFAR-10 test set or ImageNet validation)."""
    if entry.family == "cifar":
        return cifar_eval(cfg, n, seed)
    return imagenet_eval(cfg, n, int(zoo_settings(cfg).image_size), seed)


# ------------------------------------------------------------------------------------ Shapley values
def per_sample_psi(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_bands: int = 8,
    absence: str = "zero",
    partition: str = "linf",
    batch_size: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    """Exact Shapley values of each sample alone: N x M (float64); their mean over any subset is the
    subset's ``spectral_importance``. ``replacement`` draws each image's baseline from the other images."""
    out = []
    for i in range(images.shape[0]):
        kw = {}
        if absence == "replacement":
            kw["replacement_images"] = torch.cat([images[:i], images[i + 1:]])
        v = iaside.coalition_values(model, images[i:i + 1], labels[i:i + 1], num_bands, absence, partition,
                                    batch_size, seed=seed + i, **kw)
        out.append(iaside.shapley_values(v))
    return torch.stack(out)


def cached_psi(cfg: DictConfig, model_id: str, model_fn, images_fn, *, n: int, num_bands: int,
               absence: str = "zero", partition: str = "linf", batch_size: int = 256, seed: int = 0) -> np.ndarray:
    """Per-sample psi (n x M) of a zoo model, computed once and cached under the zoo's ``psi/`` folder.

    ``model_id`` names the model and its weights (e.g. the entry directory name); ``model_fn()`` and
    ``images_fn(n) -> (x, y, source)`` are only called on a cache miss.
    """
    settings = {"model": model_id, "n": n, "M": num_bands, "absence": absence, "partition": partition, "seed": seed}
    path = zoo_root(cfg) / "psi" / f"{model_id}_{absence}_{partition}_M{num_bands}_n{n}_s{seed}.npz"
    with _locked(path.parent / ".locks" / f"{path.name}.lock"):
        if path.exists():
            with np.load(path) as z:
                return z["psi"]
        model = model_fn()
        x, y, _ = images_fn(n)
        psi = per_sample_psi(model, x, y, num_bands, absence, partition, batch_size, seed).numpy()
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, psi=psi, settings=json.dumps(settings))
        tmp.replace(path)
    return psi


def zoo_psi(cfg: DictConfig, entry: Entry, *, random_init: bool = False, absence: str = "zero",
            partition: str = "linf", n: int | None = None, seed: int = 0) -> np.ndarray:
    """Per-sample psi of a zoo model (trained, or a Kaiming-initialised copy) with the zoo's I-ASIDE settings."""
    ss = sid_settings(cfg)
    if n is None:
        n = int(ss.n_random if random_init else (ss.n_cifar if entry.family == "cifar" else ss.n_imagenet))
        if random_init and entry.family == "imagenet":
            n = min(n, int(ss.n_imagenet))
    model_id = entry_dir(cfg, entry).name + ("-kaiming0" if random_init else "")
    model_fn = (lambda: random_model(cfg, entry, 0)) if random_init else (lambda: load_model(cfg, entry)[0])
    # large images: smaller batches (allocating huge activation buffers costs more than it saves)
    batch = int(ss.batch_size if entry.family == "cifar" else ss.get("batch_size_imagenet", ss.batch_size))
    return cached_psi(cfg, model_id, model_fn, lambda k: eval_images(cfg, entry, k), n=n,
                      num_bands=int(ss.num_bands), absence=absence, partition=partition, batch_size=batch, seed=seed)


# ------------------------------------------------------------------------------------ statistics
def sid_stats(psi: np.ndarray | torch.Tensor, beta: float = 0.75) -> dict:
    """SID of the mean psi with its SRS, total-variation distance to the uniform SID and normalised entropy."""
    p = torch.as_tensor(np.asarray(psi), dtype=torch.float64)
    if p.dim() == 2:
        p = p.mean(0)
    sid = iaside.spectral_importance_distribution(p)
    m = sid.shape[-1]
    nz = sid[sid > 0]
    return {
        "sid": sid.numpy(),
        "srs": float(iaside.spectral_robustness_score(sid, beta)),
        "tv_uniform": float(0.5 * (sid - 1.0 / m).abs().sum()),
        "entropy": float(-(nz * nz.log()).sum() / math.log(m)),
        "low_half": float(sid[: m // 2].sum()),
    }


def correlation(x, y) -> dict:
    """Pearson and Spearman correlations (with p-values) of paired values; NaN with fewer than 3 pairs."""
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": int(len(x)), "pearson": float("nan"), "pearson_p": float("nan"),
                "spearman": float("nan"), "spearman_p": float("nan")}
    pr, sr = stats.pearsonr(x, y), stats.spearmanr(x, y)
    return {"n": int(len(x)), "pearson": float(pr[0]), "pearson_p": float(pr[1]),
            "spearman": float(sr[0]), "spearman_p": float(sr[1])}


def model_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    dev = next(iter(model.parameters())).device
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            correct += int((model(x[i:i + batch_size].to(dev)).argmax(1).cpu() == y[i:i + batch_size]).sum())
    return correct / len(y)


def band_labels(m: int) -> list[str]:
    return [f"I{i}" for i in range(m)]


def sid_columns(sid, prefix: str = "sid") -> dict:
    return {f"{prefix}_{i}": float(v) for i, v in enumerate(sid)}


def first_ok(runs):
    return next((r for r in runs if r.ok), None)


def skipped_findings(runs) -> list[str]:
    """One line per run that did not complete (skipped for missing data, failed)."""
    return [f"`{r.path.name}`: {r.status.get('status')}: {r.status.get('reason')}" for r in runs if not r.ok]


def save_table(run_dir: Path, name: str, df: pd.DataFrame) -> None:
    results.write_csv(run_dir / name, df)


def load_table(run, name: str, **kwargs) -> pd.DataFrame:
    p = run.path / name
    return pd.read_csv(p, **kwargs) if p.exists() else pd.DataFrame()



def bootstrap_ci(psi: np.ndarray, stat: str = "tv_uniform", reps: int = 200, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval (over samples) of a ``sid_stats`` statistic of per-sample psi (n x M)."""
    rng = np.random.default_rng(seed)
    n = psi.shape[0]
    vals = []
    for _ in range(reps):
        try:
            vals.append(sid_stats(psi[rng.integers(0, n, n)])[stat])
        except ValueError:  # all psi equal in a resample: SID undefined
            continue
    if not vals:
        return float("nan"), float("nan")
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def zoo_sid_rows(cfg: DictConfig, entries: list[Entry], *, random_init: bool = False, absence: str = "zero",
                 partition: str = "linf", ci: bool = False) -> tuple[list[dict], list[str], set]:
    """One row per zoo model: its info (params, accuracy), SID, SRS, distance to uniform (psi cached).

    Returns (rows, notes on models that could not be had, data sources).
    """
    rows, notes, sources = [], [], set()
    for e in entries:
        try:
            info = load_model(cfg, e)[1] if not random_init else {"params": None}
            if random_init:
                info["params"] = zoo.parameter_count(random_model(cfg, e, 0))
            psi = zoo_psi(cfg, e, random_init=random_init, absence=absence, partition=partition)
        except ModelUnavailable as err:
            notes.append(f"{e.key} skipped: {err}")
            continue
        st = sid_stats(psi)
        row = {"model": e.key, "family": e.family, "arch": e.arch, "transformer": e.is_transformer,
               "init": "kaiming" if random_init else "trained", "params": info.get("params"),
               "test_acc": info.get("test_acc"), "n": int(psi.shape[0]), "absence": absence, "partition": partition,
               "srs": st["srs"], "tv_uniform": st["tv_uniform"], "entropy": st["entropy"],
               "low_half": st["low_half"], **sid_columns(st["sid"])}
        if ci:
            row["tv_uniform_lo"], row["tv_uniform_hi"] = bootstrap_ci(psi)
        rows.append(row)
        sources.add(dataset_source(cfg, e.family))
    return rows, notes, sources


def sid_matrix(df: pd.DataFrame) -> np.ndarray:
    cols = sorted((c for c in df.columns if c.startswith("sid_")), key=lambda c: int(c.split("_")[1]))
    return df[cols].to_numpy(float)


# ------------------------------------------------------------------------------------ Figs 6.9 / 6.10
def perturbation_grid(cfg: DictConfig) -> list[tuple[str, str, float, dict]]:
    """(perturbation, swept parameter, value, full keyword arguments) from ``figure.perturbations``:
    ``{name: {param: <swept key>, values: [...], fixed: {...}}}``."""
    out = []
    for name, spec in OmegaConf.to_container(cfg.figure.perturbations, resolve=True).items():
        for v in spec["values"]:
            out.append((name, spec["param"], v, {**(spec.get("fixed") or {}), spec["param"]: v}))
    return out


def robustness_run(cfg: DictConfig, run_dir: Path, table_name: str) -> dict:
    """SRS of every zoo model of ``figure.families`` and its mPE under each perturbation of the grid."""
    from lipexp import perturbations as P

    entries = zoo_entries(cfg, families=tuple(cfg.figure.families[cfg.profile.name]))
    rows, notes, sources = zoo_sid_rows(cfg, entries)
    by_key = {r["model"]: r for r in rows}
    grid = perturbation_grid(cfg)
    out = []
    for e in entries:
        if e.key not in by_key:
            continue
        model, _ = load_model(cfg, e)
        x, y, _ = eval_images(cfg, e, int(cfg.scale.n), seed=21)
        dev = next(model.parameters()).device
        x, y = x.to(dev), y.to(dev)
        base = {k: by_key[e.key][k] for k in ("model", "family", "arch", "transformer", "params", "test_acc", "srs",
                                              "tv_uniform", "low_half")}
        q_clean = P.true_class_probability(model, x, y)
        base["q_clean"] = float(q_clean.mean())
        for name, param, value, kw in grid:
            # clamp: a blur can overshoot [0, 1] by float rounding, which the probability check rejects
            xs = P.perturb(name, x, model=model, labels=y, **kw).clamp(0.0, 1.0)
            q = P.true_class_probability(model, xs, y)
            out.append({**base, "perturbation": name, "param": param, "level": value,
                        "mpe": float((q_clean - q).abs().mean()), "acc_perturbed": float(
                            (model_logits_argmax(model, xs) == y).float().mean()), "n_mpe": int(len(y))})
    results.update_status(run_dir, data_source=", ".join(sorted(sources)))
    save_table(run_dir, table_name, pd.DataFrame(out))
    return {"notes": notes}


def model_logits_argmax(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])


def robustness_aggregate(cfg: DictConfig, fig_dir: Path, runs, table_name: str, notes: list[str]) -> None:
    """Scatter SRS against mPE per perturbation level, Pearson/Spearman per level and family."""
    import matplotlib.pyplot as plt

    from . import plots
    from .common import write_outputs

    r = first_ok(runs)
    df = load_table(r, table_name) if r else pd.DataFrame()
    findings, corr_rows = [], []
    if not len(df):
        fig = plt.figure()
    else:
        kinds = list(dict.fromkeys(df["perturbation"]))
        fig, axes = plt.subplots(2, len(kinds), figsize=(4.6 * len(kinds), 7.4), squeeze=False)
        for j, kind in enumerate(kinds):
            d = df[df["perturbation"] == kind]
            ax, ax2 = axes[0, j], axes[1, j]
            for (fam, level), g in d.groupby(["family", "level"], sort=True):
                c = correlation(g["srs"], g["mpe"])
                cq = correlation(g["q_clean"], g["mpe"])
                corr_rows.append({"perturbation": kind, "param": g["param"].iloc[0], "level": level, "family": fam, **c,
                                  "mpe_min": g["mpe"].min(), "mpe_max": g["mpe"].max(),
                                  "pearson_qclean_mpe": cq["pearson"]})
                ax.plot(g["srs"], g["mpe"], "o", ms=5, label=f"{g['param'].iloc[0]} = {level:g} ({fam}): "
                        f"r = {c['pearson']:.2f}, rho = {c['spearman']:.2f}")
                for _, row in g.iterrows():
                    ax.annotate(row["model"], (row["srs"], row["mpe"]), fontsize=5, xytext=(2, 2),
                                textcoords="offset points")
            ax.set_xlabel("spectral robustness score (SRS)", fontsize=8)
            ax.set_ylabel(f"mPE under {kind}", fontsize=8)
            ax.legend(fontsize=5)
            ax.set_title(f"(a) {kind}: SRS vs mPE", fontsize=8)
            for mname, g in d.groupby("model", sort=False):
                ax2.plot(g["level"], g["mpe"], "-", lw=0.8, color="0.6")
                ax2.scatter(g["level"], g["mpe"], s=600 * g["srs"].clip(lower=0.005), alpha=0.5, label=mname)
            ax2.set_xlabel(d["param"].iloc[0], fontsize=8)
            ax2.set_ylabel("mPE", fontsize=8)
            ax2.set_title(f"(b) {kind}: mPE per level, circle size ~ SRS", fontsize=8)
            ax2.legend(fontsize=5, markerscale=0.3)
        fig.tight_layout()
        corr = pd.DataFrame(corr_rows)
        for _, c in corr.iterrows():
            findings.append(f"{c['perturbation']} {c['param']} = {c['level']:g} ({c['family']}, {int(c['n'])} models): "
                            f"Pearson r(SRS, mPE) = {c['pearson']:.3f} (p = {c['pearson_p']:.2g}), Spearman rho = "
                            f"{c['spearman']:.3f} (p = {c['spearman_p']:.2g}); mPE {c['mpe_min']:.3f}..{c['mpe_max']:.3f}")
        neg = int((corr["spearman"] < 0).sum())
        defined = int(corr["spearman"].notna().sum())
        findings.insert(0, f"{neg} of {defined} settings (with a defined correlation; {len(corr)} in all) have a "
                           f"negative Spearman correlation between SRS and mPE "
                           f"(a higher score going with a smaller prediction error, as the thesis claims); median "
                           f"Pearson {corr['pearson'].median():.3f}, median Spearman {corr['spearman'].median():.3f}")
        findings.append(f"for comparison, the mean clean confidence Q(y|x) of each model against its mPE: median "
                        f"Pearson r = {corr['pearson_qclean_mpe'].median():.3f} over the settings (mPE cannot exceed "
                        f"Q(y|x) when an attack only lowers it)")
        df = df.merge(corr[["perturbation", "level", "family", "pearson", "spearman"]],
                      on=["perturbation", "level", "family"], how="left")
    notes = list(notes) + (r.summary.get("notes", []) if r else [])
    write_outputs(cfg, fig_dir, fig, df, runs, findings or skipped_findings(runs) or ["no run"], notes=notes)


# ------------------------------------------------------------------------------------ datasets beyond the mirror
def _torchvision_or_unavailable(name: str, fn):
    try:
        return fn()
    except Exception as err:  # RuntimeError (not found), URLError/OSError (offline), ...
        raise D.DataUnavailable(
            f"dataset '{name}' is not available offline (no mirror file) and the torchvision download failed or is "
            f"off (data.download): {type(err).__name__}: {err}. Run with internet access, or use profile=quick "
            f"(CIFAR-10 from the mirror)") from err


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x[:2000].float() / 255
    return tuple(xf.mean(dim=(0, 2, 3)).tolist()), tuple(xf.std(dim=(0, 2, 3)).tolist())


def stl10_sets(cfg: DictConfig) -> tuple[D.Dataset, D.Dataset]:
    """STL-10 (96 x 96, 5,000 train / 8,000 test labelled images) through torchvision (download when allowed)."""
    from torchvision import datasets

    from lipexp.models import DATASET_STATS

    root = Path(cfg.data.root)

    def load(split):
        ds = datasets.STL10(str(root), split=split, download=bool(cfg.data.download))
        return torch.from_numpy(np.asarray(ds.data)), torch.from_numpy(np.asarray(ds.labels)).long()

    (xtr, ytr), (xte, yte) = (_torchvision_or_unavailable("stl10", lambda s=s: load(s)) for s in ("train", "test"))
    DATASET_STATS.setdefault("stl10", _channel_stats(xtr))  # train() normalises by the dataset's name
    return (D.Dataset("stl10", "train", xtr, ytr, 10, "torchvision:stl10"),
            D.Dataset("stl10", "test", xte, yte, 10, "torchvision:stl10"))


def caltech101_sets(cfg: DictConfig, test_fraction: float = 0.2) -> tuple[D.Dataset, D.Dataset]:
    """Caltech-101 through torchvision (download when allowed): RGB, resize 256 + centre crop 224, a seeded
    per-class split (the dataset has no official one). Decoded once and cached under the data cache."""
    from torchvision import datasets, transforms

    from lipexp.models import DATASET_STATS

    root = Path(cfg.data.root)
    cache = Path(cfg.data.cache_dir or root / "lipexp_cache") / "caltech101_224.npz"
    if cache.exists():
        with np.load(cache) as z:
            x, y = torch.from_numpy(z["x"]), torch.from_numpy(z["y"]).long()
    else:
        ds = _torchvision_or_unavailable(
            "caltech101", lambda: datasets.Caltech101(str(root), target_type="category", download=bool(cfg.data.download)))
        tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])
        xs, ys = zip(*((tf(img.convert("RGB")), t) for img, t in ds))
        x, y = torch.stack(xs), torch.tensor(ys)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, x=x.numpy(), y=y.numpy())
    g = torch.Generator().manual_seed(int(cfg.seed.data))
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(int(y.max()) + 1):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: max(1, int(round(test_fraction * len(idx))))]] = True
    DATASET_STATS.setdefault("caltech101", DATASET_STATS["imagenet"])
    n_cls = int(y.max()) + 1
    return (D.Dataset("caltech101", "train", x[~test], y[~test], n_cls, "torchvision:caltech101"),
            D.Dataset("caltech101", "test", x[test], y[test], n_cls, "torchvision:caltech101"))


def dataset_sets(cfg: DictConfig, name: str, train_subset=None, test_subset=None) -> tuple[D.Dataset, D.Dataset]:
    """Train/test sets of cifar10 (mirror or torchvision), stl10 or caltech101 (torchvision downloads)."""
    if name == "cifar10":
        return cifar_sets(cfg, train_subset, test_subset)
    tr, te = {"stl10": stl10_sets, "caltech101": caltech101_sets}[name](cfg)
    return (D.subset(tr, train_subset, seed=cfg.seed.data), D.subset(te, test_subset, seed=cfg.seed.data + 1))


def build_arch(arch: str, num_classes: int, kwargs: dict, seed: int, dataset: str) -> nn.Module:
    """A CIFAR zoo builder by name, or ``torchvision:<name>`` (random init, ImageNet-style input) wrapped with
    the dataset's normalisation; the result maps pixels in [0, 1] to logits."""
    from lipexp.models import DATASET_STATS, Normalize

    torch.manual_seed(seed)
    if arch.startswith("torchvision:"):
        import torchvision

        name = arch.split(":", 1)[1]
        extra = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra, **kwargs)
        return nn.Sequential(Normalize(*DATASET_STATS[dataset]), net)
    model = zoo.cifar_model(arch, num_classes=num_classes, **kwargs)
    if dataset != "cifar10":  # the CIFAR builders normalise with CIFAR-10 statistics
        model[0] = Normalize(*DATASET_STATS[dataset])
    return model
