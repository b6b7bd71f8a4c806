"""The Chapter 4 regularisers (thesis Table 4.3) as small functions on a mini-batch.

Every function works on pixel images in [0, 1] and leaves normalisation to ``input_fn`` (the map from
pixels to model inputs), so the FGSM radius is measured in pixel units as in the thesis.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

AUTOAUGMENT_POLICIES = ("cifar10", "imagenet", "svhn")


def per_sample_cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0, mix: tuple | None = None
) -> torch.Tensor:
    """Per-sample losses (M,). ``mix = (y_b, lam)`` gives the mixup loss lam*CE(y) + (1-lam)*CE(y_b)."""
    loss = F.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)
    if mix is not None:
        y_b, lam = mix
        loss = lam * loss + (1.0 - lam) * F.cross_entropy(
            logits, y_b, reduction="none", label_smoothing=label_smoothing
        )
    return loss


def mixup(
    x: torch.Tensor, y: torch.Tensor, alpha: float, gen: torch.Generator
) -> tuple[torch.Tensor, tuple[torch.Tensor, float]]:
    """Mixup (Zhang et al., 2018): one lam ~ Beta(alpha, alpha) per batch, partner = a random permutation."""
    # torch.distributions takes no generator; Beta = G1 / (G1 + G2) with seeded gamma draws keeps runs resumable.
    g1, g2 = _gamma(alpha, gen), _gamma(alpha, gen)
    lam = g1 / (g1 + g2)
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    return lam * x + (1.0 - lam) * x[perm], (y[perm], lam)


def _gamma(shape: float, gen: torch.Generator) -> float:
    """One Gamma(shape, 1) draw from ``gen`` (Marsaglia-Tsang; boosted for shape < 1)."""
    boost = 1.0
    if shape < 1.0:
        u = float(torch.rand((), generator=gen))
        boost = u ** (1.0 / shape)
        shape += 1.0
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        z = float(torch.randn((), generator=gen))
        v = (1.0 + c * z) ** 3
        if v <= 0:
            continue
        u = float(torch.rand((), generator=gen))
        if math.log(u) < 0.5 * z * z + d - d * v + d * math.log(v):
            return d * v * boost


def fgsm(
    model: torch.nn.Module,
    input_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """FGSM adversarial examples x + eps * sign(grad_x CE) clipped to [0, 1] (Goodfellow et al., 2015).

    Parameter gradients from this extra pass are discarded; the training step that follows uses
    only the adversarial batch.
    """
    x_adv = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(input_fn(x_adv)), y)
    (grad,) = torch.autograd.grad(loss, x_adv)
    return (x + eps * grad.sign()).clamp_(0.0, 1.0).detach()


def autoaugment(x_uint8: torch.Tensor, policy: str) -> torch.Tensor:
    """Per-image AutoAugment (torchvision) on a uint8 batch N x C x H x W; uses torch's global RNG."""
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy

    if policy not in AUTOAUGMENT_POLICIES:
        raise ValueError(f"unknown AutoAugment policy '{policy}'; choose one of {AUTOAUGMENT_POLICIES}")
    aa = AutoAugment(AutoAugmentPolicy(policy))
    return torch.stack([aa(img) for img in x_uint8])


def inject_gradient_noise(
    params: list[torch.Tensor], rho: float, noise: str, gen: torch.Generator
) -> None:
    """In place: grad <- sqrt(rho) * grad + sqrt(1 - rho) * n, n ~ N(0, 1), U[-0.5, 0.5] or 0 per coordinate
    (thesis Section 4.8.4, Fig. 4.6)."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"gradient mixing rho must lie in [0, 1], got {rho}")
    a, b = math.sqrt(rho), math.sqrt(1.0 - rho)
    for p in params:
        if p.grad is None:
            continue
        p.grad.mul_(a)
        if noise == "none" or b == 0.0:
            continue
        if noise == "gaussian":
            n = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        elif noise == "uniform":
            n = torch.rand(p.shape, generator=gen, dtype=p.dtype) - 0.5
        else:
            raise ValueError(f"unknown gradient noise '{noise}'; choose none, gaussian or uniform")
        p.grad.add_(n.to(p.device), alpha=b)


def noise_variance(noise: str) -> float:
    """Per-coordinate variance of the injected noise distribution before the sqrt(1 - rho) factor."""
    return {"none": 0.0, "gaussian": 1.0, "uniform": 1.0 / 12.0}[noise]
