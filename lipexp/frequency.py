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


# ------------------------------------------------------------------ radial energy spectra (Figs. 6.1, 6.2)


def ring_index(h: int, w: int, device=None) -> torch.Tensor:
    """Integer l2 radius ``round(sqrt(du^2 + dv^2))`` of each frequency of an h x w spectrum (h x w, long).

    ``du, dv`` are signed frequency indices (``fftfreq * n``), i.e. distances from the centre of
    the ``fftshift``-ed spectrum, so the rings equal those drawn on a centred spectrum.
    """
    du = torch.fft.fftfreq(h, d=1.0 / h, device=device, dtype=torch.float64).view(h, 1)
    dv = torch.fft.fftfreq(w, d=1.0 / w, device=device, dtype=torch.float64).view(1, w)
    return torch.sqrt(du**2 + dv**2).round().long()


def radial_esd(images: torch.Tensor, max_radius: int | None = None) -> torch.Tensor:
    """ESD_r: mean of ``|fft2(x)|^2`` over the ring of integer radius r = 0..R; ... x H x W -> ... x (R+1).

    ``R = max_radius`` defaults to ``min(H, W) // 2`` (rings that lie wholly inside the spectrum).
    The FFT is unnormalised (``torch.fft.fft2``'s default), so ratios such as the SNR do not depend on it.
    """
    h, w = images.shape[-2:]
    rmax = min(h, w) // 2 if max_radius is None else int(max_radius)
    ring = ring_index(h, w, images.device)
    if not 0 <= rmax <= int(ring.max()):
        raise ValueError(f"max_radius must lie in [0, {int(ring.max())}] for a {h}x{w} image, got {rmax}")
    energy = torch.fft.fft2(images.to(torch.float64)).abs().square().flatten(-2)
    keep = (ring <= rmax).flatten()
    idx = ring.flatten()[keep]
    sums = energy.new_zeros((*energy.shape[:-1], rmax + 1)).index_add_(-1, idx, energy[..., keep])
    counts = torch.bincount(idx, minlength=rmax + 1).to(sums.dtype)
    return sums / counts


def spectral_snr_db(
    images: torch.Tensor, perturbations: torch.Tensor, max_radius: int | None = None, reduce: bool = True
) -> torch.Tensor:
    """Spectral SNR ``10 log10(ESD_r(x) / ESD_r(dx))`` in dB for r = 0..R.

    With ``reduce`` the ESDs are first averaged over all leading dimensions (images, channels),
    giving one curve of length R+1; otherwise one curve per leading index. A ring where the
    perturbation has no energy gives +inf.
    """
    if images.shape != perturbations.shape:
        raise ValueError(
            f"images and perturbations must have the same shape, got {tuple(images.shape)} "
            f"and {tuple(perturbations.shape)}"
        )
    ex, ed = radial_esd(images, max_radius), radial_esd(perturbations, max_radius)
    if reduce:
        ex, ed = ex.reshape(-1, ex.shape[-1]).mean(0), ed.reshape(-1, ed.shape[-1]).mean(0)
    return 10.0 * torch.log10(ex / ed)


def power_law_fit(esd: torch.Tensor, r_min: int = 1, r_max: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares fit ``log ESD_r = c + slope * log r`` over ``r_min <= r <= r_max``; returns (slope, c).

    ``esd`` is ... x (R+1) indexed by radius (``radial_esd``); r = 0 (the DC term) cannot enter a
    log-log fit, hence ``r_min >= 1``. Natural logs; works on leading dimensions in parallel.
    """
    n = esd.shape[-1]
    r_max = n - 1 if r_max is None else r_max
    if not 1 <= r_min < r_max <= n - 1:
        raise ValueError(f"need 1 <= r_min < r_max <= {n - 1}, got r_min={r_min}, r_max={r_max}")
    seg = esd[..., r_min : r_max + 1].to(torch.float64)
    if (seg <= 0).any():
        raise ValueError("ESD values must be > 0 for a log-log fit")
    lx = torch.log(torch.arange(r_min, r_max + 1, dtype=torch.float64, device=esd.device))
    ly = torch.log(seg)
    xc = lx - lx.mean()
    slope = ((ly - ly.mean(-1, keepdim=True)) * xc).sum(-1) / xc.square().sum()
    return slope, ly.mean(-1) - slope * lx.mean()
