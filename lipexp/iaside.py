"""I-ASIDE: exact Shapley values of spectral bands (thesis Chapter 6, theory.md §4).

Players are the ``M`` frequency bands of ``lipexp.frequency.band_masks`` (band 0 lowest, DC
included). Coalition ``k`` (an integer bitmask, bit ``i`` set = band ``i`` present) filters an
image as ``x ⋈ S = Re IFFT(FFT(x) T(S) + b (1 - T(S)))`` with absence baseline ``b``. The
characteristic function is ``v(S) = mean_n log Q(y_n | x_n ⋈ S) - mean_n log Q(y_n | x_n ⋈ {})``
over one fixed set of samples and one fixed baseline per sample, so every coalition sees the
same samples. Filtered images are not clipped to [0, 1]: clipping would break the linearity
the band-sum path relies on, and the thesis does not clip.

Two paths give the same numbers:
- ``"bandsum"`` (default): filtering is linear in ``T(S)`` and the masks partition the
  spectrum, so ``x ⋈ S = base + sum_{i in S} (x_i - b_i)`` with band images
  ``x_i = Re IFFT(FFT(x) T_i)``, ``b_i = Re IFFT(b T_i)`` and ``base = Re IFFT(b)``. One FFT
  and M inverse FFTs per image; the 2^M coalition images then cost one addition each
  (subset sums by doubling).
- ``"fft"``: the literal per-coalition FFT filter, kept as a reference for tests and benchmarks.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lipexp.frequency import PARTITIONS, band_masks

ABSENCES = ("zero", "complex_gaussian", "replacement")
METHODS = ("bandsum", "fft")
MAX_BANDS = 16  # 2^16 forward passes per image is already far beyond any practical budget
BLOCK_ELEMENTS = 2**22  # coalition-image elements built at once by the band-sum path (16 MiB in float32)


# ----------------------------------------------------------------------------- validation


def check_pixel_images(images: torch.Tensor, name: str = "images") -> None:
    """Raise a ValueError unless ``images`` is a finite float N x C x H x W tensor in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(
            f"{name} must have shape N x C x H x W, got shape {tuple(images.shape)}; "
            "add a batch dimension with images.unsqueeze(0) for a single image"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    if not images.is_floating_point():
        raise ValueError(
            f"{name} must be a float tensor of pixels in [0, 1], got dtype {images.dtype}; "
            "convert uint8 images with images.float() / 255"
        )
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or inf")
    lo, hi = images.min().item(), images.max().item()
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name} must be pixel values in [0, 1] (normalisation belongs inside the model), "
            f"got range [{lo:.4g}, {hi:.4g}]"
        )


def _check_labels(labels: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match the images, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    if labels.min().item() < 0:
        raise ValueError(f"labels must be >= 0, got {labels.min().item()}")
    return labels.long()


def _check_num_bands(num_bands: int, h: int, w: int, partition: str) -> torch.Tensor:
    if isinstance(num_bands, bool) or not isinstance(num_bands, int):
        raise TypeError(f"num_bands must be an int, got {num_bands!r}")
    if not 1 <= num_bands <= MAX_BANDS:
        raise ValueError(f"num_bands must lie in [1, {MAX_BANDS}] (2^M coalitions), got {num_bands}")
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition '{partition}'; choose one of {PARTITIONS}")
    masks = band_masks(h, w, num_bands, partition)
    empty = [i for i in range(num_bands) if masks[i].sum() == 0]
    if empty:
        raise ValueError(
            f"bands {empty} contain no frequency of a {h}x{w} image with M = {num_bands} "
            f"({partition} partition); use fewer bands or larger images"
        )
    return masks


def _model_device(model: nn.Module, images: torch.Tensor) -> torch.device:
    p = next(iter(model.parameters()), None)
    if p is None:
        p = next(iter(model.buffers()), None)
    return p.device if p is not None else images.device


def _check_batch_independent(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats:
            raise ValueError(
                f"module '{name}' is a BatchNorm without running statistics: even in eval mode its output "
                "depends on the other images of the batch, so v(S) would depend on how coalitions are "
                "batched; use a model with running statistics (track_running_stats=True)"
            )


def _check_model_output(logits: torch.Tensor, labels: torch.Tensor) -> int:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model must return logits of shape N x num_classes, got {shape}")
    k = logits.shape[1]
    if labels.max().item() >= k:
        raise ValueError(
            f"labels must be < the model's number of logits ({k}), got a label {labels.max().item()}"
        )
    return k


# ------------------------------------------------------------------------ coalitions, Shapley


def coalition_matrix(num_bands: int) -> torch.Tensor:
    """``2^M x M`` 0/1 float matrix: row k marks the bands present in coalition k (bit i = band i)."""
    k = torch.arange(2**num_bands).view(-1, 1)
    return ((k >> torch.arange(num_bands).view(1, -1)) & 1).float()


def shapley_weights(num_bands: int) -> torch.Tensor:
    """Weight ``(1/M) / C(M-1, s)`` of a coalition of size s = 0..M-1 not containing the player (float64)."""
    m = num_bands
    return torch.tensor([1.0 / (m * math.comb(m - 1, s)) for s in range(m)], dtype=torch.float64)


def shapley_values(values: torch.Tensor) -> torch.Tensor:
    """Exact Shapley values ``psi`` (length M) from coalition values ``v`` (length 2^M, bitmask order)."""
    n = values.shape[-1]
    m = n.bit_length() - 1
    if values.dim() != 1 or n != 2**m or m < 1:
        raise ValueError(f"values must be a vector of length 2^M (M >= 1), got shape {tuple(values.shape)}")
    v = values.to(torch.float64)
    k = torch.arange(n)
    size = coalition_matrix(m).sum(1).long()
    w = shapley_weights(m)
    psi = torch.empty(m, dtype=torch.float64)
    for i in range(m):
        without = k[(k >> i) & 1 == 0]
        psi[i] = (w[size[without]] * (v[without | (1 << i)] - v[without])).sum()
    return psi


# -------------------------------------------------------------------------------- baselines


def absence_spectrum(
    images: torch.Tensor,
    absence: str = "zero",
    *,
    seed: int = 0,
    noise_std: float = 1.0,
    replacement_images: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Baseline spectrum ``b`` (complex128, N x C x H x W) filling absent bands; None for "zero".

    - "complex_gaussian": ``b ~ N(0, s^2/2) + i N(0, s^2/2)`` per frequency, ``s = noise_std``, in
      the units of ``torch.fft.fft2`` (unnormalised), i.e. pixel noise of std about
      ``s / sqrt(2 H W)``.
    - "replacement": ``b = FFT(x')`` with ``x'`` another image: a seeded random cyclic permutation
      of ``images`` (no image is its own replacement), or seeded draws from ``replacement_images``.
    """
    if absence not in ABSENCES:
        raise ValueError(f"unknown absence '{absence}'; choose one of {ABSENCES}")
    if absence == "zero":
        return None
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    if absence == "complex_gaussian":
        if noise_std <= 0:
            raise ValueError(f"noise_std must be > 0, got {noise_std}")
        shape = tuple(images.shape)
        re = torch.randn(shape, generator=g, dtype=torch.float64)
        im = torch.randn(shape, generator=g, dtype=torch.float64)
        return (torch.complex(re, im) * (noise_std / math.sqrt(2.0))).to(images.device)
    if replacement_images is None:
        if n < 2:
            raise ValueError(
                "absence='replacement' needs at least two images (each is replaced by another one), "
                "or pass replacement_images"
            )
        order = torch.randperm(n, generator=g)
        src = torch.empty(n, dtype=torch.long)
        src[order] = order.roll(-1)  # one random cycle: never a fixed point
        pool = images
    else:
        check_pixel_images(replacement_images, "replacement_images")
        if replacement_images.shape[1:] != images.shape[1:]:
            raise ValueError(
                f"replacement_images must have the images' C x H x W {tuple(images.shape[1:])}, "
                f"got {tuple(replacement_images.shape[1:])}"
            )
        src = torch.randint(replacement_images.shape[0], (n,), generator=g)
        pool = replacement_images
    return torch.fft.fft2(pool[src.to(pool.device)].to(images.device, torch.float64))


# --------------------------------------------------------------------------------- filtering


def coalition_filter(
    images: torch.Tensor,
    coalition: int,
    num_bands: int,
    partition: str = "linf",
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference filter ``x ⋈ S`` by one FFT round trip (images N x C x H x W, coalition a bitmask)."""
    h, w = images.shape[-2:]
    masks = band_masks(h, w, num_bands, partition, images.device).double()
    present = coalition_matrix(num_bands)[coalition].to(images.device, torch.float64)
    t = torch.einsum("m,mhw->hw", present, masks)
    spec = torch.fft.fft2(images.to(torch.float64)) * t
    if baseline is not None:
        spec = spec + baseline * (1.0 - t)
    return torch.fft.ifft2(spec).real.to(images.dtype)


def band_images(
    images: torch.Tensor,
    num_bands: int,
    partition: str = "linf",
    spectrum: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Re IFFT(S T_i)`` for each band, ``S = FFT(x)`` or the given complex ``spectrum``: N x M x C x H x W (float64).

    ``masks`` (M x H x W) may be passed to skip rebuilding ``band_masks``.
    """
    h, w = images.shape[-2:]
    if masks is None:
        masks = band_masks(h, w, num_bands, partition, images.device)
    masks = masks.to(images.device, torch.float64)
    if spectrum is None:  # real x and symmetric masks: the half spectrum (rfft) holds everything
        half = torch.fft.rfft2(images.to(torch.float64)).unsqueeze(1)
        return torch.fft.irfft2(half * masks[..., : w // 2 + 1].view(1, num_bands, 1, h, -1), s=(h, w))
    return torch.fft.ifft2(spectrum.unsqueeze(1) * masks.view(1, num_bands, 1, h, w)).real


def _subset_sums(base: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """All 2^M subset sums ``base + sum_{i in k} parts[:, i]``: base n x D, parts n x M x D -> 2^M x n x D.

    Doubling: the coalitions with top bit j are those below 2^j plus part j, so each of the 2^M
    outputs costs one addition.
    """
    m = parts.shape[1]
    out = base.new_empty((2**m, *base.shape))
    out[0] = base
    for j in range(m):
        torch.add(out[: 2**j], parts[:, j].unsqueeze(0), out=out[2**j : 2 ** (j + 1)])
    return out


def _coalition_batches(
    images: torch.Tensor,
    num_bands: int,
    partition: str,
    baseline: torch.Tensor | None,
    batch_size: int,
    method: str,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(filtered images B x C x H x W, image index B, coalition index B)`` covering all 2^M x N pairs."""
    n = images.shape[0]
    ncoal = 2**num_bands
    dev = images.device
    if method == "fft":  # one FFT round trip per (coalition, image) pair, same batching of pairs
        h, w = images.shape[-2:]
        masks = band_masks(h, w, num_bands, partition, dev).to(torch.float64)
        cmat = coalition_matrix(num_bands).to(dev, torch.float64)
        k_all = torch.arange(ncoal, device=dev).repeat_interleave(n)
        n_all = torch.arange(n, device=dev).repeat(ncoal)
        for t in range(0, ncoal * n, batch_size):
            k_idx, n_idx = k_all[t : t + batch_size], n_all[t : t + batch_size]
            tk = torch.einsum("bm,mhw->bhw", cmat[k_idx], masks).unsqueeze(1)
            spec = torch.fft.fft2(images[n_idx].to(torch.float64)) * tk
            if baseline is not None:
                spec = spec + baseline[n_idx] * (1.0 - tk)
            yield torch.fft.ifft2(spec).real.to(images.dtype), n_idx, k_idx
        return
    # Images per block: a block holds all 2^M coalition images of its images. Blocks bigger than a
    # batch mean fewer, larger tensor ops (per-op latency dominates on small images).
    nb = max(1, batch_size // ncoal, BLOCK_ELEMENTS // (ncoal * images[0].numel()))
    masks = band_masks(*images.shape[-2:], num_bands, partition, dev)
    for s in range(0, n, nb):
        idx = torch.arange(s, min(s + nb, n), device=dev)
        x = images[idx]
        parts = band_images(x, num_bands, partition, masks=masks)
        if baseline is None:
            base = torch.zeros_like(x)
        else:
            b = baseline[idx]
            parts = parts - band_images(x, num_bands, partition, spectrum=b, masks=masks)
            base = torch.fft.ifft2(b).real.to(x.dtype)
        flat = _subset_sums(base.flatten(1), parts.to(x.dtype).flatten(2))  # 2^M x nb x D
        flat = flat.view(ncoal * len(idx), *x.shape[1:])
        n_idx = idx.repeat(ncoal)
        k_idx = torch.arange(ncoal, device=dev).repeat_interleave(len(idx))
        for t in range(0, flat.shape[0], batch_size):
            yield flat[t : t + batch_size], n_idx[t : t + batch_size], k_idx[t : t + batch_size]


def coalition_images(
    images: torch.Tensor,
    num_bands: int = 8,
    absence: str = "zero",
    partition: str = "linf",
    *,
    seed: int = 0,
    noise_std: float = 1.0,
    replacement_images: torch.Tensor | None = None,
) -> torch.Tensor:
    """All coalition images ``x ⋈ S``: 2^M x N x C x H x W, index k = bitmask of present bands (Fig. 6.6)."""
    check_pixel_images(images)
    _check_num_bands(num_bands, *images.shape[-2:], partition)
    b = absence_spectrum(
        images, absence, seed=seed, noise_std=noise_std, replacement_images=replacement_images
    )
    n = images.shape[0]
    out = images.new_empty((2**num_bands, *images.shape))
    for x, n_idx, k_idx in _coalition_batches(images, num_bands, partition, b, n * 2**num_bands, "bandsum"):
        out[k_idx, n_idx] = x
    return out


# ---------------------------------------------------------------------------- Shapley values


def coalition_values(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_bands: int = 8,
    absence: str = "zero",
    partition: str = "linf",
    batch_size: int = 256,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    method: str = "bandsum",
    noise_std: float = 1.0,
    replacement_images: torch.Tensor | None = None,
) -> torch.Tensor:
    """Characteristic function ``v`` of all 2^M coalitions (float64, bitmask order, ``v[0] = 0``).

    The model runs in eval mode under ``no_grad`` (its mode is restored afterwards) so that
    BatchNorm and dropout do not make ``v`` depend on how coalitions are batched.
    """
    check_pixel_images(images)
    n = images.shape[0]
    labels = _check_labels(labels, n)
    _check_num_bands(num_bands, *images.shape[-2:], partition)
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of {METHODS}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dev = torch.device(device) if device is not None else _model_device(model, images)
    images, labels = images.to(dev), labels.to(dev)
    baseline = absence_spectrum(
        images, absence, seed=seed, noise_std=noise_std, replacement_images=replacement_images
    )
    _check_batch_independent(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _check_model_output(model(images[:1]), labels)
            total = torch.zeros(2**num_bands, dtype=torch.float64, device=dev)
            for x, n_idx, k_idx in _coalition_batches(images, num_bands, partition, baseline, batch_size, method):
                logp = F.log_softmax(model(x).to(torch.float64), dim=1)
                total.index_add_(0, k_idx, logp.gather(1, labels[n_idx].view(-1, 1)).squeeze(1))
    finally:
        model.train(was_training)
    mean = total.cpu() / n
    if not torch.isfinite(mean).all():
        raise ValueError("log Q(y | x ⋈ S) is not finite for some coalition; check the model's logits")
    return mean - mean[0]


def spectral_importance(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_bands: int = 8,
    absence: str = "zero",
    partition: str = "linf",
    batch_size: int = 256,
    **kwargs,
) -> torch.Tensor:
    """Raw Shapley values ``psi`` (float64, length M, band 0 lowest) of the M spectral bands.

    ``images`` N x C x H x W pixels in [0, 1]; ``labels`` N class indices; ``model`` maps pixel
    images to N x num_classes logits. Extra keywords go to ``coalition_values``: ``seed`` (baselines),
    ``device``, ``method`` ("bandsum" or the reference "fft"), ``noise_std``, ``replacement_images``.
    Efficiency holds exactly: ``psi.sum() == v(all bands)``.
    """
    v = coalition_values(model, images, labels, num_bands, absence, partition, batch_size, **kwargs)
    return shapley_values(v)


def spectral_importance_reference(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_bands: int = 8,
    absence: str = "zero",
    partition: str = "linf",
    batch_size: int = 256,
    **kwargs,
) -> torch.Tensor:
    """``spectral_importance`` by one FFT round trip per coalition (slow reference path)."""
    return spectral_importance(
        model, images, labels, num_bands, absence, partition, batch_size, method="fft", **kwargs
    )


# ------------------------------------------------------------------------------- SID and SRS


def spectral_importance_distribution(psi: torch.Tensor) -> torch.Tensor:
    """SID ``(psi - min psi) / |psi - min psi|_1`` over the last dimension (batched ... x M allowed).

    Undefined when all ``psi`` are equal (0/0): that is an error rather than a made-up value.
    """
    psi = torch.as_tensor(psi)
    if psi.dim() == 0 or psi.shape[-1] < 1:
        raise ValueError(f"psi must have shape ... x M, got {tuple(psi.shape)}")
    if not torch.isfinite(psi).all():
        raise ValueError("psi contains NaN or inf")
    if not psi.is_floating_point():
        psi = psi.double()
    d = psi - psi.min(dim=-1, keepdim=True).values
    norm = d.sum(dim=-1, keepdim=True)
    if (norm <= 0).any():
        raise ValueError(
            "the SID is undefined when all Shapley values of a row are equal (psi - min psi = 0)"
        )
    return d / norm


def spectral_robustness_score(sid: torch.Tensor, beta: float = 0.75) -> torch.Tensor:
    """SRS (thesis eq. 6.11): ``|beta_bar . sid - eta| / (1 - eta)`` over the last dimension.

    ``beta_i = beta^i``, ``beta_bar = beta / |beta|_2``, ``eta = |beta|_1 / (M |beta|_2)``. A uniform
    SID scores 0. As written, the score is not onto [0, 1]: its largest value, at
    ``sid = e_0``, is ``(1/|beta|_2 - eta) / (1 - eta)`` (0.5217 for M = 8, beta = 0.75), and the
    absolute value also gives a positive score to SIDs that favour high frequencies.
    """
    sid = torch.as_tensor(sid)
    if not sid.is_floating_point():
        sid = sid.double()
    if sid.dim() == 0:
        raise ValueError("sid must have shape ... x M")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must lie in (0, 1), got {beta}")
    if (sid < -1e-12).any() or not torch.allclose(sid.sum(-1), torch.ones((), dtype=sid.dtype), atol=1e-6):
        raise ValueError(
            "sid must be a distribution (non-negative, summing to 1 over the last dimension); "
            "pass spectral_importance_distribution(psi), not psi"
        )
    m = sid.shape[-1]
    b = beta ** torch.arange(m, dtype=sid.dtype, device=sid.device)
    b2 = b.norm()
    eta = b.sum() / (m * b2)
    return ((sid @ (b / b2)) - eta).abs() / (1.0 - eta)
