"""Where ``lipexp.train.train`` gets its mini-batches and evaluation samples.

Three kinds of data are accepted, each wrapped once by ``as_source``:

- the project's in-memory ``lipexp.data.Dataset`` (uint8 images): batches are indexed straight from its
  tensors, turned into pixels in [0, 1] and standardised with ``normalize(x, name)``;
- any map-style ``torch.utils.data.Dataset`` whose items are ``(x, y)`` with tensors (or numbers) of any
  shape (``TensorDataset``, torchvision datasets with a ``ToTensor`` transform, ``FakeData``...): the
  batch of step ``k`` is ``batch_indices(len(ds), batch_size, sampling_seed, k, sampling)``, its items
  are collated with ``default_collate``, and the tensors reach the model unchanged (no normalisation);
- a ``torch.utils.data.DataLoader``: its batches in the order it yields them, a new pass when it is
  exhausted. The loader owns the order, so ``sampling``/``sampling_seed`` do not apply to it.

So batches of the first two kinds are a pure function of (sampling seed, step): a resumed run sees the
same batches as an uninterrupted one. A DataLoader is replayed instead: on resume its first ``start``
batches are loaded again and dropped, which repeats the run exactly when the loader's order is fixed by
its construction (``shuffle=False``, or ``shuffle=True`` with a seeded ``generator=`` and deterministic
transforms). A loader drawing from torch's global RNG resumes with another order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.utils.data as tud

from .data import Dataset, batch_indices, normalize


def to_pixels(xb: torch.Tensor, device) -> torch.Tensor:
    """uint8 images -> float pixels in [0, 1]; float images (e.g. frequency-filtered) pass through."""
    x = xb.to(device)
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def eval_indices(n_total: int, limit: int | None) -> torch.Tensor:
    """The evaluation samples: all, or a fixed seeded selection of ``limit`` (a dataset may be sorted by class)."""
    n = n_total if limit is None else min(limit, n_total)
    if n == n_total:
        return torch.arange(n)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(0))[:n]


def _check_item(item: Any, what: str) -> None:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(
            f"{what}: items must be (x, y) pairs; item 0 is {type(item).__name__}"
            + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
        )
    x = item[0]
    if not torch.is_tensor(x):
        hint = " (give the dataset a transform such as torchvision.transforms.ToTensor())" if not isinstance(
            x, (int, float)) else ""
        raise ValueError(f"{what}: x of item 0 is {type(x).__name__}, not a tensor{hint}")


def _collate(ds: tud.Dataset, idx: torch.Tensor, collate_fn: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(ds, tud.TensorDataset) and len(ds.tensors) == 2:  # same values as collating, without the loop
        return ds.tensors[0][idx], ds.tensors[1][idx]
    xb, yb = collate_fn([ds[int(i)] for i in idx])
    return xb, yb


@dataclass
class BatchSource:
    """One training or test set as ``train`` sees it.

    ``kind``: ``project`` (``lipexp.data.Dataset``), ``map`` (map-style torch Dataset) or ``loader``.
    ``to_model(xb, device)`` turns a raw batch into what the loop works on (pixels in [0, 1] for the
    project's images, the tensor itself otherwise); ``input_fn`` maps that to the model's input
    (``normalize`` for the project's images, identity otherwise).
    """

    kind: str
    data: Any
    name: str | None  # the project dataset's name (for normalize), else None
    collate_fn: Callable = tud.default_collate
    _iter: Iterator | None = None
    _pos: int = 0  # batches a loader has yielded so far

    def describe(self) -> dict:
        d = self.data.dataset if self.kind == "loader" else self.data
        out = {"kind": self.kind, "type": type(d).__name__}
        if not isinstance(d, tud.IterableDataset):
            out["n"] = len(d)
        return out

    # -- training batches ----------------------------------------------------------------------------
    def batch(self, step: int, batch_size: int, seed: int, sampling: str) -> tuple[torch.Tensor, Any]:
        """Raw (x, y) of SGD step ``step`` (CPU tensors as the data holds them)."""
        if self.kind == "project":
            idx = batch_indices(len(self.data), batch_size, seed, step, sampling)
            return self.data.x[idx], self.data.y[idx]
        if self.kind == "map":
            idx = batch_indices(len(self.data), batch_size, seed, step, sampling)
            return _collate(self.data, idx, self.collate_fn)
        return self._loader_batch(step)

    def _loader_batch(self, step: int):
        if step < self._pos:
            raise RuntimeError(f"a DataLoader cannot go back to step {step} (at batch {self._pos})")
        while True:
            if self._iter is None:
                self._iter = iter(self.data)
            try:
                item = next(self._iter)
            except StopIteration:
                if self._pos == 0:
                    raise ValueError("the training DataLoader yields no batches") from None
                self._iter = None
                continue
            self._pos += 1
            if self._pos > step:  # earlier ones are the replay of a resumed run
                if not isinstance(item, (tuple, list)) or len(item) != 2:
                    raise ValueError(f"the training DataLoader must yield (x, y) batches; got {type(item).__name__}")
                return item[0], item[1]

    def to_model(self, xb: torch.Tensor, device) -> torch.Tensor:
        return to_pixels(xb, device) if self.kind == "project" else xb.to(device)

    def input_fn(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.name) if self.kind == "project" else x

    # -- evaluation ------------------------------------------------------------------------------------
    def eval_batches(self, batch_size: int, limit: int | None, device) -> Iterator[tuple[torch.Tensor, Any]]:
        """Model-ready (input, y) of the evaluation samples, ``batch_size`` at a time.

        A loader over a map-style dataset is evaluated through its dataset (the same seeded selection,
        its collate_fn), so evaluating never advances the loader's own order; a loader over an
        IterableDataset is iterated from its start until ``limit`` samples.
        """
        ds, collate = self.data, self.collate_fn
        if self.kind == "loader":
            ds, collate = self.data.dataset, self.data.collate_fn
            if isinstance(ds, tud.IterableDataset):
                yield from self._iterable_eval(limit, device)
                return
        idx = eval_indices(len(ds), limit)
        for i in range(0, len(idx), batch_size):
            sel = idx[i : i + batch_size]
            if self.kind == "project":
                yield self.input_fn(to_pixels(ds.x[sel], device)), ds.y[sel].to(device)
            else:
                xb, yb = _collate(ds, sel, collate)
                yield xb.to(device), _to(yb, device)

    def _iterable_eval(self, limit, device):
        seen = 0
        for xb, yb in self.data:
            if limit is not None and seen >= limit:
                return
            if limit is not None and seen + len(xb) > limit:
                xb, yb = xb[: limit - seen], yb[: limit - seen]
            seen += len(xb)
            yield xb.to(device), _to(yb, device)


def _to(y: Any, device):
    return y.to(device) if torch.is_tensor(y) else y


def as_source(data: Any, role: str) -> BatchSource:
    """Wrap a training/test set (``role`` names it in errors); see the module docstring for the kinds."""
    if isinstance(data, Dataset):
        return BatchSource("project", data, data.name)
    if isinstance(data, tud.DataLoader):
        return BatchSource("loader", data, None)
    if isinstance(data, tud.IterableDataset):
        raise ValueError(
            f"the {role} is an IterableDataset, which has no indices to draw batches from; "
            "wrap it in a torch.utils.data.DataLoader(batch_size=...)"
        )
    sequence = hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (dict, str, bytes))
    if isinstance(data, tud.Dataset) or sequence:
        if len(data) == 0:
            raise ValueError(f"the {role} is empty")
        _check_item(data[0], f"the {role} ({type(data).__name__})")
        return BatchSource("map", data, None)
    raise ValueError(
        f"the {role} is a {type(data).__name__}; pass a lipexp.data.Dataset, a torch.utils.data.Dataset "
        "returning (x, y), or a DataLoader"
    )
