"""Datasets as in-memory uint8 tensors, from torchvision files, the offline mirror, or a download.

Resolution order for a dataset (``load_dataset``):
1. files already in the torchvision data root (``root``);
2. the offline mirror folder (``mirror``, e.g. ``$LIPEXP_DATA_MIRROR``), npz archives decoded once and
   cached under ``cache_dir``;
3. a torchvision download into ``root`` when ``download`` is true;
4. otherwise a ``DataUnavailable`` error that says both ways to get the data.
The source used is recorded in ``Dataset.source`` and ends up in every run's ``status.json``.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .models import DATASET_STATS
from .results import InputError

log = logging.getLogger(__name__)

DATASETS = ("mnist", "cifar10", "cifar100")
NUM_CLASSES = {"mnist": 10, "cifar10": 10, "cifar100": 100}
# Datasets a later issue adds through ``register_dataset`` (e.g. STL-10, Caltech-101, ImageNet folders).
_EXTRA_LOADERS: dict = {}

MIRROR_FILES = {"mnist": "mnist.npz", "cifar10": "cifar10_jpeg.npz"}


class DataUnavailable(RuntimeError):
    """The dataset is neither on disk, nor in the mirror, nor downloadable."""


@dataclass
class Dataset:
    """Images ``x`` (N x C x H x W, uint8, pixel scale 0..255) and labels ``y`` (N, int64)."""

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    source: str  # "torchvision-files" | "mirror:<file>" | "download"
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return DATASET_STATS[self.name]


def register_dataset(name: str, loader, num_classes: int, stats: tuple) -> None:
    """Add a dataset: ``loader(split, root, download) -> (x uint8 NCHW, y int64)``; ``stats`` = (mean, std)."""
    _EXTRA_LOADERS[name] = loader
    NUM_CLASSES[name] = num_classes
    DATASET_STATS[name] = stats


def load_dataset(
    name: str,
    split: str,
    root: str | os.PathLike = "data",
    mirror: str | os.PathLike | None = None,
    download: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Load ``split`` ('train' | 'test') of ``name`` following the resolution order of this module."""
    if name not in NUM_CLASSES:
        raise ValueError(f"unknown dataset '{name}'; choose one of {sorted(NUM_CLASSES)}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split '{split}'; choose 'train' or 'test'")
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise InputError(f"data root {root} is a file, not a folder; set data.root= (or LIPEXP_DATA_ROOT) to a folder")
    if mirror and Path(mirror).exists() and not Path(mirror).is_dir():
        raise InputError(f"data mirror {mirror} is a file, not a folder; point data.mirror= (or LIPEXP_DATA_MIRROR) "
                         "at the folder that holds the npz files")
    if name in _EXTRA_LOADERS:
        x, y = _EXTRA_LOADERS[name](split, root, download)
        return Dataset(name, split, x, y, NUM_CLASSES[name], "custom-loader")

    arrays = _from_torchvision(name, split, root, download=False)
    source = "torchvision-files"
    if arrays is None and mirror:
        arrays = _from_mirror(name, split, Path(mirror), Path(cache_dir or root / "lipexp_cache"))
        source = f"mirror:{MIRROR_FILES.get(name)}"
    if arrays is None and download:
        try:
            arrays = _from_torchvision(name, split, root, download=True)
            source = "download"
        except Exception as err:  # network errors come in many types
            raise DataUnavailable(_unavailable_message(name, root, mirror, f"download failed: {err}")) from err
    if arrays is None:
        raise DataUnavailable(_unavailable_message(name, root, mirror, "downloads are disabled (data.download=false)"))
    x, y = arrays
    return Dataset(name, split, torch.from_numpy(x), torch.from_numpy(y).long(), NUM_CLASSES[name], source)


def _unavailable_message(name, root, mirror, why) -> str:
    mirror_note = (
        f"the mirror folder {mirror} has no {MIRROR_FILES.get(name, 'file for it')}"
        if mirror
        else "no offline mirror is set (LIPEXP_DATA_MIRROR / data.mirror)"
    )
    return (
        f"dataset '{name}' is not available: no torchvision files under {root}, {mirror_note}, and {why}. "
        f"Either allow the torchvision download (data.download=true, needs internet) or point "
        f"LIPEXP_DATA_MIRROR (or data.mirror=) at a folder with the offline npz files."
    )


def _from_torchvision(name: str, split: str, root: Path, download: bool):
    """(x uint8 NCHW, y) from torchvision's files, or None when they are absent and download is off."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    try:
        ds = cls(str(root), train=(split == "train"), download=download)
    except RuntimeError:
        if download:
            raise
        return None
    data = ds.data.numpy() if torch.is_tensor(ds.data) else np.asarray(ds.data)
    x = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
    y = np.asarray(ds.targets, dtype=np.int64)
    return np.ascontiguousarray(x, dtype=np.uint8), y


def _from_mirror(name: str, split: str, mirror: Path, cache_dir: Path):
    """Decode the mirror's npz once into ``cache_dir``; None when the mirror lacks this dataset."""
    file = MIRROR_FILES.get(name)
    src = mirror / file if file else None
    if src is None or not src.exists():
        return None
    stat = src.stat()
    key = hashlib.sha1(f"{src.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:10]
    cached = cache_dir / f"{name}_{split}_{key}.npz"
    if cached.exists():
        try:
            with np.load(cached) as d:
                return d["x"], d["y"]
        except Exception as err:  # truncated or corrupt: decode again rather than fail on it forever
            log.warning("decoded cache %s is unreadable (%s: %s); rebuilding it from %s",
                        cached, type(err).__name__, err, src)
            cached.unlink(missing_ok=True)  # a concurrent job may have removed it already
    try:
        with np.load(src) as d:
            if name == "mnist":
                x = d[f"x_{split}"][:, None]
                y = d[f"y_{split}"].astype(np.int64)
            else:
                x = decode_jpeg_archive(d[f"{split}_jpeg"], d[f"{split}_offsets"])
                y = d[f"{split}_labels"].astype(np.int64)
    except Exception as err:
        raise InputError(
            f"mirror file {src} is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}); "
            "copy it again from the mirror, or unset LIPEXP_DATA_MIRROR / data.mirror to use torchvision files"
        ) from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, cached)  # atomic: a concurrent job never reads half a file
    return x, y


def decode_jpeg_archive(jpeg: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Concatenated JPEG bytes + offsets (n+1) -> n x 3 x H x W uint8 (RGB)."""
    from PIL import Image

    imgs = [
        np.asarray(Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
        for i in range(len(offsets) - 1)
    ]
    return np.ascontiguousarray(np.stack(imgs).transpose(0, 3, 1, 2))


def subset(ds: Dataset, n: int | None, seed: int = 0, stratified: bool = True) -> Dataset:
    """A deterministic subset of ``n`` samples (``None`` or ``n >= len`` keeps all).

    Stratified by default: the same number of samples per class (up to rounding), so small quick-profile
    subsets keep the class balance of the full set.
    """
    if n is None or n >= len(ds):
        return ds
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    g = torch.Generator().manual_seed(seed)
    if stratified:
        per_class = [torch.nonzero(ds.y == c).flatten() for c in range(ds.num_classes)]
        per_class = [idx[torch.randperm(len(idx), generator=g)] for idx in per_class]
        k = n // ds.num_classes
        idx = torch.cat([p[:k] for p in per_class])
        rest = torch.cat([p[k:] for p in per_class])
        idx = torch.cat([idx, rest[torch.randperm(len(rest), generator=g)[: n - len(idx)]]])
        idx = idx[torch.randperm(len(idx), generator=g)]
    else:
        idx = torch.randperm(len(ds), generator=g)[:n]
    info = {**ds.info, "subset": n, "subset_seed": seed}
    return Dataset(ds.name, ds.split, ds.x[idx], ds.y[idx], ds.num_classes, ds.source, info)


def corrupt_labels(y: torch.Tensor, eps: float, num_classes: int, seed: int) -> tuple[torch.Tensor, dict]:
    """Uniform label corruption: each label is, with probability ``eps``, redrawn uniformly from all classes.

    Returns the new labels and the realised fractions: ``resampled`` (labels redrawn) and ``changed``
    (labels that differ from the original; about ``eps * (1 - 1/num_classes)``).
    """
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label noise fraction must lie in [0, 1], got {eps}")
    g = torch.Generator().manual_seed(seed)
    redraw = torch.rand(y.shape, generator=g) < eps
    random_labels = torch.randint(0, num_classes, y.shape, generator=g)
    y_new = torch.where(redraw, random_labels, y)
    stats = {
        "label_noise": eps,
        "resampled_fraction": float(redraw.float().mean()),
        "changed_fraction": float((y_new != y).float().mean()),
    }
    return y_new, stats


def with_labels(ds: Dataset, y: torch.Tensor, info: dict) -> Dataset:
    return Dataset(ds.name, ds.split, ds.x, y, ds.num_classes, ds.source, {**ds.info, **info})


def normalize(x: torch.Tensor, dataset: str) -> torch.Tensor:
    """Pixel images in [0, 1] (N x C x H x W float) -> per-channel standardised inputs."""
    mean, std = DATASET_STATS[dataset]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of samples in ``epoch``: a function of (sampling seed, epoch) only, so resuming at any
    step reproduces the same mini-batches without saving sampler state."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


SAMPLINGS = ("shuffle", "iid")


def batch_indices(n: int, batch_size: int, seed: int, step: int, sampling: str = "shuffle") -> torch.Tensor:
    """Indices of the mini-batch of SGD step ``step`` (0-based), a function of (seed, step) only.

    ``shuffle``: epochs of ``n // batch_size`` full batches of a fresh permutation (the usual loader).
    ``iid``: every step draws ``batch_size`` indices uniformly with replacement, independently of other
    steps: the i.i.d. mini-batches the SDE of Chapter 4 assumes. Under ``shuffle`` the batches of one
    epoch together cover the data, so the first-order sampling noise cancels at each epoch's end and
    the spread of K across sampling seeds collapses there; ``iid`` has no such boundary.
    """
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} exceeds the {n} training samples; lower data.batch_size")
    if sampling == "iid":
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 500_009 * (int(step) + 1))
        return torch.randint(n, (batch_size,), generator=g)
    if sampling != "shuffle":
        raise ValueError(f"unknown sampling '{sampling}'; choose one of {SAMPLINGS}")
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    return epoch_permutation(n, seed, epoch)[i * batch_size : (i + 1) * batch_size]
