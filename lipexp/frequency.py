"""Frequency masks and filters on pixel images (theory.md §4).

Frequencies follow ``torch.fft.fftfreq`` (unshifted spectra). The normalised radius of a
frequency (u, v) of an H x W image is ``max(|f_u|, |f_v|) / 0.5`` (l_inf, default) or
``sqrt(f_u^2 + f_v^2) / 0.5`` clipped to 1 (l_2); both lie in [0, 1]. Masks are symmetric under
(u, v) -> (-u, -v) up to the Nyquist row/column, so filtered images are real: we keep the real
part of the inverse FFT.
"""
from __future__ import annotations

import torch

PARTITIONS = ("linf", "l2")


def radius(h: int, w: int, partition: str = "linf", device=None) -> torch.Tensor:
    """Normalised radius r in [0, 1] of each frequency of an h x w spectrum, shape h x w."""
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition '{partition}'; choose one of {PARTITIONS}")
    fu = torch.fft.fftfreq(h, device=device, dtype=torch.float64).abs().view(h, 1)
    fv = torch.fft.fftfreq(w, device=device, dtype=torch.float64).abs().view(1, w)
    if partition == "linf":
        r = torch.maximum(fu.expand(h, w), fv.expand(h, w)) / 0.5
    else:
        r = torch.sqrt(fu**2 + fv**2) / 0.5
    return r.clamp(max=1.0)


def lowpass_mask(h: int, w: int, cutoff: float, partition: str = "linf", device=None) -> torch.Tensor:
    """1 where r <= cutoff (h x w, float)."""
    _check_cutoff(cutoff)
    return (radius(h, w, partition, device) <= cutoff + 1e-12).float()


def highpass_mask(h: int, w: int, cutoff: float, partition: str = "linf", device=None) -> torch.Tensor:
    """1 where r > cutoff (h x w, float): the complement of ``lowpass_mask``."""
    return 1.0 - lowpass_mask(h, w, cutoff, partition, device)


def band_masks(h: int, w: int, num_bands: int, partition: str = "linf", device=None) -> torch.Tensor:
    """I-ASIDE players: ``num_bands x h x w`` 0/1 masks, band i = {i/M <= r < (i+1)/M}, last band takes r = 1.

    The bands partition the spectrum: they sum to one at every frequency.
    """
    if num_bands < 1:
        raise ValueError(f"num_bands must be >= 1, got {num_bands}")
    r = radius(h, w, partition, device)
    idx = torch.clamp((r * num_bands + 1e-9).floor().long(), max=num_bands - 1)
    return torch.stack([(idx == i).float() for i in range(num_bands)])


def apply_mask(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Re IFFT(FFT(x) * mask) over the last two dims; images ... x H x W, mask H x W."""
    spec = torch.fft.fft2(images)
    return torch.fft.ifft2(spec * mask.to(spec.real.dtype)).real.to(images.dtype)


def lowpass(images: torch.Tensor, cutoff: float, partition: str = "linf") -> torch.Tensor:
    """Keep frequencies with r <= cutoff. cutoff = 1 keeps everything."""
    h, w = images.shape[-2:]
    return apply_mask(images, lowpass_mask(h, w, cutoff, partition, images.device))


def highpass(images: torch.Tensor, cutoff: float, partition: str = "linf") -> torch.Tensor:
    """Keep frequencies with r > cutoff (the DC component goes, so the result is zero-mean)."""
    h, w = images.shape[-2:]
    return apply_mask(images, highpass_mask(h, w, cutoff, partition, images.device))


def _check_cutoff(cutoff: float) -> None:
    if not 0.0 <= cutoff <= 1.0:
        raise ValueError(f"normalised cutoff must lie in [0, 1], got {cutoff}")
