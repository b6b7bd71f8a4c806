"""Corruptions, adversarial attacks and the mean prediction error (thesis §6.1, Def. 6.4.1).

Every function takes pixel images N x C x H x W in [0, 1] and returns perturbed images of the
same shape in [0, 1] (noises are clipped unless ``clip=False``). Randomness comes from an
explicit ``seed``. Attacks run the model in eval mode and restore its mode afterwards.
FGSM and PGD are implemented here (a few lines, bit-compatible with torchattacks and seedable);
SparseFool, OnePixel and Pixle come from torchattacks.
"""
from __future__ import annotations

import contextlib
import random
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn

from lipexp.iaside import _check_labels, check_pixel_images


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _global_seed(seed: int):
    """Seed torch/numpy/random for libraries that only use global RNGs, then restore their states."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------- corruptions


def white_noise(images: torch.Tensor, sigma: float, *, seed: int = 0, clip: bool = True) -> torch.Tensor:
    """``x + N(0, sigma^2)`` per pixel and channel."""
    check_pixel_images(images)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    noise = torch.randn(images.shape, generator=_generator(seed), dtype=images.dtype).to(images.device)
    out = images + sigma * noise
    return out.clamp(0.0, 1.0) if clip else out


def poisson_noise(images: torch.Tensor, photons: float = 60.0, *, seed: int = 0, clip: bool = True) -> torch.Tensor:
    """Shot noise ``Poisson(photons * x) / photons`` (fewer photons = stronger noise)."""
    check_pixel_images(images)
    if photons <= 0:
        raise ValueError(f"photons must be > 0, got {photons}")
    rate = (images.detach().cpu().double() * photons)
    out = (torch.poisson(rate, generator=_generator(seed)) / photons).to(images.device, images.dtype)
    return out.clamp(0.0, 1.0) if clip else out


def salt_and_pepper(
    images: torch.Tensor, amount: float, *, salt_fraction: float = 0.5, seed: int = 0
) -> torch.Tensor:
    """Set a random ``amount`` fraction of pixel locations (all channels) to 1 (salt) or 0 (pepper)."""
    check_pixel_images(images)
    if not 0.0 <= amount <= 1.0 or not 0.0 <= salt_fraction <= 1.0:
        raise ValueError(f"amount and salt_fraction must lie in [0, 1], got {amount}, {salt_fraction}")
    n, _, h, w = images.shape
    g = _generator(seed)
    hit = torch.rand((n, 1, h, w), generator=g) < amount
    salt = torch.rand((n, 1, h, w), generator=g) < salt_fraction
    out = images.clone()
    out = torch.where(hit.to(images.device) & salt.to(images.device), torch.ones_like(out), out)
    return torch.where(hit.to(images.device) & ~salt.to(images.device), torch.zeros_like(out), out)


def gaussian_blur(images: torch.Tensor, kernel_size: int, sigma: float | None = None) -> torch.Tensor:
    """Gaussian blur with an odd ``kernel_size`` (thesis: 3..7), reflect padding.

    ``sigma`` defaults to OpenCV's rule ``0.3 ((k - 1) / 2 - 1) + 0.8`` (0.8, 1.1, 1.4 for k = 3, 5, 7).
    """
    check_pixel_images(images)
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
    if sigma is None:
        sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return TF.gaussian_blur(images, [kernel_size, kernel_size], [sigma, sigma])


# -------------------------------------------------------------------------------------- attacks


def _input_grad(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), labels)
    return torch.autograd.grad(loss, x)[0]


def _check_attack(images, labels, eps):
    check_pixel_images(images)
    labels = _check_labels(labels, images.shape[0]).to(images.device)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return labels


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """FGSM (Goodfellow et al., 2015): ``clip(x + eps sign(grad_x CE))`` in one step."""
    labels = _check_attack(images, labels, eps)
    with _eval_mode(model):
        g = _input_grad(model, images, labels)
    return (images + eps * g.sign()).clamp(0.0, 1.0).detach()


def pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    alpha: float | None = None,
    steps: int = 10,
    *,
    random_start: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """L_inf PGD (Madry et al., 2018): ``steps`` signed-gradient steps of size ``alpha``, projected
    on the eps-ball around x and on [0, 1]. ``alpha`` defaults to ``2.5 eps / steps``."""
    labels = _check_attack(images, labels, eps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    alpha = 2.5 * eps / steps if alpha is None else alpha
    x0 = images.detach()
    adv = x0.clone()
    if random_start:
        start = torch.rand(x0.shape, generator=_generator(seed), dtype=x0.dtype).to(x0.device)
        adv = (adv + (2.0 * start - 1.0) * eps).clamp(0.0, 1.0)
    with _eval_mode(model):
        for _ in range(steps):
            adv = adv + alpha * _input_grad(model, adv, labels).sign()
            adv = (x0 + (adv - x0).clamp(-eps, eps)).clamp(0.0, 1.0).detach()
    return adv


def _torchattacks_run(attack, images, labels, seed):
    with _global_seed(seed):
        out = attack(images, labels)
    return out.detach().to(images.dtype)


def sparsefool(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 10,
    lam: float = 3.0,
    overshoot: float = 0.02,
) -> torch.Tensor:
    """SparseFool (Modas et al., 2019) via ``torchattacks.SparseFool``: a sparse (L0) perturbation.

    Runs image by image with DeepFool inside (one Jacobian per step), so it is slow for big models.
    """
    import torchattacks

    labels = _check_attack(images, labels, 0.0)
    attack = torchattacks.SparseFool(model, steps=steps, lam=lam, overshoot=overshoot)
    with warnings.catch_warnings():  # torchattacks 3.5.1 passes a tensor to np.unravel_index
        warnings.simplefilter("ignore", DeprecationWarning)
        return _torchattacks_run(attack, images, labels, 0)


def one_pixel(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    pixels: int = 1,
    steps: int = 10,
    popsize: int = 10,
    *,
    seed: int = 0,
) -> torch.Tensor:
    """One-pixel attack (Su et al., 2019) via ``torchattacks.OnePixel``: differential evolution
    over the position and colour of ``pixels`` pixels."""
    import torchattacks

    labels = _check_attack(images, labels, 0.0)
    attack = torchattacks.OnePixel(model, pixels=pixels, steps=steps, popsize=popsize)
    return _torchattacks_run(attack, images, labels, seed)


def pixle(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    restarts: int = 20,
    max_iterations: int = 10,
    *,
    seed: int = 0,
) -> torch.Tensor:
    """Pixle (Pomponi et al., 2022; the thesis' "Pixel" attack) via ``torchattacks.Pixle``:
    moves patches of pixels within the image, a black-box L0 attack."""
    import torchattacks

    labels = _check_attack(images, labels, 0.0)
    attack = torchattacks.Pixle(model, restarts=restarts, max_iterations=max_iterations)
    return _torchattacks_run(attack, images, labels, seed)


PERTURBATIONS = ("white_noise", "poisson_noise", "salt_and_pepper", "gaussian_blur",
                 "fgsm", "pgd", "sparsefool", "one_pixel", "pixle")
_NEEDS_MODEL = {"fgsm", "pgd", "sparsefool", "one_pixel", "pixle"}


def perturb(
    name: str,
    images: torch.Tensor,
    *,
    model: nn.Module | None = None,
    labels: torch.Tensor | None = None,
    **params,
) -> torch.Tensor:
    """Apply the perturbation ``name`` (one of ``PERTURBATIONS``) with its keyword ``params``."""
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation '{name}'; choose one of {PERTURBATIONS}")
    fn = globals()[name]
    if name in _NEEDS_MODEL:
        if model is None or labels is None:
            raise ValueError(f"perturbation '{name}' is an attack: pass model= and labels=")
        return fn(model, images, labels, **params)
    return fn(images, **params)


# ------------------------------------------------------------------------- energy and errors


def scale_to_energy(delta: torch.Tensor, images: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Rescale each perturbation so that ``|delta_n|^2 = fraction * |x_n|^2`` (sums over C, H, W).

    The result is a perturbation, not an image: ``x + delta`` may leave [0, 1] (Fig. 6.2 analyses
    the perturbation's spectrum, not a clipped image). A zero perturbation cannot be scaled and is an
    error (e.g. an L0 attack that left an image unchanged: drop that image).
    """
    if delta.shape != images.shape or delta.dim() < 2:
        raise ValueError(
            f"delta and images must share a shape N x ..., got {tuple(delta.shape)} and {tuple(images.shape)}"
        )
    if fraction < 0:
        raise ValueError(f"fraction must be >= 0, got {fraction}")
    e_delta = delta.to(torch.float64).flatten(1).square().sum(1)
    e_x = images.to(torch.float64).flatten(1).square().sum(1)
    zero = (e_delta == 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(f"perturbations {zero} are zero and cannot be scaled to an energy fraction")
    factor = torch.sqrt(fraction * e_x / e_delta).view(-1, *([1] * (delta.dim() - 1)))
    return (delta.to(torch.float64) * factor).to(delta.dtype)


def true_class_probability(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """``Q(y_n | x_n)``: softmax probability of the true label, length N (float64, eval mode)."""
    check_pixel_images(images)
    labels = _check_labels(labels, images.shape[0]).to(images.device)
    out = []
    with _eval_mode(model), torch.no_grad():
        for s in range(0, images.shape[0], batch_size):
            logits = model(images[s : s + batch_size])
            if logits.dim() != 2 or labels.max().item() >= logits.shape[1]:
                raise ValueError(
                    f"the model must return N x num_classes logits with num_classes > max label, "
                    f"got shape {tuple(logits.shape)} and max label {labels.max().item()}"
                )
            p = F.softmax(logits.to(torch.float64), dim=1)
            out.append(p.gather(1, labels[s : s + batch_size].view(-1, 1)).squeeze(1))
    return torch.cat(out)


def mean_prediction_error(
    model: nn.Module,
    images: torch.Tensor,
    perturbed: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 256,
) -> float:
    """mPE ``E |Q(y|x) - Q(y|x*)|`` (thesis Def. 6.4.1), Q the softmax probability of the true label."""
    if images.shape != perturbed.shape:
        raise ValueError(
            f"images and perturbed must have the same shape, got {tuple(images.shape)} and {tuple(perturbed.shape)}"
        )
    check_pixel_images(perturbed, "perturbed")
    q = true_class_probability(model, images, labels, batch_size)
    q_star = true_class_probability(model, perturbed, labels, batch_size)
    return (q - q_star).abs().mean().item()
