"""Models of the thesis, written as plain ``nn.Sequential`` modules.

Parameter names follow ``nn.Sequential`` indices, so the weight matrices of the Chapter 4
ConvNet are e.g. ``'0.weight'`` (conv1) and the tracker's columns read ``sigma1/0.weight``.
Inputs are normalised inside the model (a fixed ``Normalize`` layer first) so that every
analysis, Fourier filtering included, works on pixel images in [0, 1].
"""
from __future__ import annotations

import torch
from torch import nn

# Per-dataset channel statistics of the training sets (pixel scale [0, 1]).
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class Normalize(nn.Module):
    """Fixed per-channel affine map ``(x - mean) / std`` (no parameters, a buffer only).

    Its Lipschitz constant ``1 / min(std)`` is a constant factor that K(t) (a product over
    weight matrices) leaves out, as the thesis does.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: N x C x H x W
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class Identity(nn.Identity):
    """Placeholder for a switched-off layer, so parameter indices never shift."""


def convnet(
    num_classes: int = 10,
    in_channels: int = 3,
    dropout: bool = False,
    batchnorm: bool = False,
    p_conv: float = 0.2,
    p_fc: float = 0.3,
) -> nn.Sequential:
    """Five-layer ConvNet of thesis Table 4.1 for 32x32 inputs (no input normalisation).

    Switched-off optional layers are kept as ``Identity`` so that parameter names
    (``0.weight, 3.weight, 7.weight, 11.weight, 14.weight``) do not depend on the
    regulariser, and runs with and without dropout/BatchNorm share column names.
    """
    drop = (lambda p: nn.Dropout(p)) if dropout else (lambda p: Identity())
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),  # 0
        nn.ReLU(),  # 1
        nn.MaxPool2d(kernel_size=2, stride=2),  # 2
        nn.Conv2d(32, 64, kernel_size=3, padding=1),  # 3
        drop(p_conv),  # 4
        nn.ReLU(),  # 5
        nn.MaxPool2d(kernel_size=2, stride=2),  # 6
        nn.Conv2d(64, 128, kernel_size=3, padding=1, stride=2),  # 7
        drop(p_conv),  # 8
        nn.BatchNorm2d(128, track_running_stats=False) if batchnorm else Identity(),  # 9
        nn.ReLU(),  # 10
        nn.Flatten(),  # (inserted before the classifier; the thesis' table leaves it implicit)
        nn.Linear(128 * 4 * 4, 256),
        nn.ReLU(),
        drop(p_fc),
        nn.Linear(256, num_classes),
    )


def mlp(in_features: int = 784, hidden: tuple[int, ...] = (512, 256), num_classes: int = 10) -> nn.Sequential:
    """MLP of thesis Table 4.2 (784-512-256-10, ReLU); takes N x 1 x 28 x 28 or N x 784."""
    layers: list[nn.Module] = [nn.Flatten()]
    widths = (in_features, *hidden)
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


def mlp_ch5(num_classes: int = 10) -> nn.Sequential:
    """MLP of thesis Table 5.1 (784-200-200-10 with LogSoftmax; the table's 768 is a typo)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 200),
        nn.ReLU(),
        nn.Linear(200, 200),
        nn.ReLU(),
        nn.Linear(200, num_classes),
        nn.LogSoftmax(dim=1),
    )


def convnet_ch5(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """ConvNet of thesis Table 5.2: three stride-2 convolutions, global average pool, two FC layers."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, kernel_size=3, stride=2),
        nn.ReLU(),
        nn.Conv2d(64, 128, kernel_size=3, stride=2),
        nn.ReLU(),
        nn.Conv2d(128, 256, kernel_size=3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def with_normalization(model: nn.Module, dataset: str) -> nn.Sequential:
    """Prepend the dataset's fixed normalisation; the result maps pixel images in [0, 1] to logits."""
    mean, std = DATASET_STATS[dataset]
    return nn.Sequential(Normalize(mean, std), model)
