"""Typed schema of the Hydra config, and the value checks that run before any training.

The dataclasses make OmegaConf reject unknown keys and wrong types while the config is composed;
``validate`` then checks values (a batch size of 0, an unknown model) and raises ``ConfigError`` with
one line that names the key, the bad value and the valid choices.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

MODELS = ("convnet", "mlp", "convnet_ch5", "mlp_ch5")
DATASETS = ("mnist", "cifar10", "cifar100")
FILTERS = ("none", "lowpass", "highpass")
SAMPLINGS = ("shuffle", "iid")  # lipexp.data.SAMPLINGS (not imported: the schema stays free of torch)
PROFILES = ("smoke", "quick", "paper")


class ConfigError(ValueError):
    """An invalid configuration value; the message is one line and names the valid choices."""


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: str = "${oc.env:LIPEXP_DATA_ROOT,data}"  # torchvision data root (files and downloads)
    mirror: Optional[str] = "${oc.env:LIPEXP_DATA_MIRROR,null}"  # offline npz folder
    download: bool = True
    cache_dir: Optional[str] = None  # decoded mirror cache; default <root>/lipexp_cache
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    batch_size: int = 256
    sampling: str = "shuffle"  # shuffle (epoch permutations) | iid (independent batches, as the SDE assumes)
    label_noise: float = 0.0  # uniform label corruption of the training labels
    filter: str = "none"  # none | lowpass | highpass (Chapter 5 frequency datasets)
    cutoff: float = 1.0


@dataclass
class ModelConfig:
    name: str = "convnet"
    dropout: bool = False  # Table 4.1's optional dropout layers (0.2 / 0.2 / 0.3)
    batchnorm: bool = False  # Table 4.1's BatchNorm2d(128, track_running_stats=False)


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass
class RegConfig:
    """Chapter 7 penalties (train=spectral_gap | train=alignment; lipexp.spectral_reg)."""

    beta: float = 0.0
    reduce: str = "per_layer"  # per_layer: sum_l |t_l| | sum: |sum_l t_l|
    sign: int = 1  # spectral gap only: +1 penalise the gap, -1 reward it
    iters: int = 1  # warm-started power / inverse iterations a step


@dataclass
class TrainConfig:
    regularizer: str = "none"
    steps: int = 1000
    mixup_alpha: float = 0.0
    label_smoothing: float = 0.0
    fgsm_eps: float = 0.0
    autoaugment: Optional[str] = None
    grad_rho: float = 1.0
    grad_noise: str = "none"
    log_every: int = 1
    eval_every: int = 0
    eval_samples: Optional[int] = 2000
    checkpoint_every: int = 1000
    snapshot_every: int = 0
    reg: RegConfig = field(default_factory=RegConfig)


@dataclass
class NoiseConfig:
    # Fig. 4.6's injected noise goes to the gradient (the update), or to the scalar loss, where it has no
    # gradient and so leaves the update as it is
    target: str = "gradient"


@dataclass
class TrackerConfig:
    mode: str = "full"  # off | sigma1 | full
    split: bool = False


@dataclass
class LoggerConfig:
    name: str = "csv"
    csv: bool = True
    wandb: bool = False
    project: str = "lipexp"
    entity: Optional[str] = None
    mode: str = "auto"  # auto (offline without an API key) | online | offline | disabled
    tags: List[str] = field(default_factory=list)


@dataclass
class SeedConfig:
    init: int = 1  # parameter initialisation
    sampling: int = 1  # mini-batch order, mixup partners, injected gradient noise
    data: int = 0  # subsets and label corruption


@dataclass
class ProfileConfig:
    name: str = "quick"
    description: str = ""


@dataclass
class Config:
    figure: Any = field(default_factory=lambda: {"id": "train"})
    scale: Any = None  # the figure's settings for the selected profile
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: SeedConfig = field(default_factory=SeedConfig)
    device: str = "auto"
    threads: Optional[int] = None  # torch CPU threads per job (None: torch's default); 1 with parallel jobs
    resume: bool = True  # continue an unfinished run in the same run directory
    force: bool = False  # rerun a completed run (the old directory is kept, renamed)
    aggregate_only: bool = False  # rebuild the figure from saved runs without training
    progress: bool = True
    results_dir: str = "results"


def register() -> None:
    ConfigStore.instance().store(name="lipexp_schema", node=Config)


def _choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(choices)}")


def _positive(key: str, value: Any, allow_none: bool = False, minimum: float = 1) -> None:
    if value is None and allow_none:
        return
    if value is None or value < minimum:
        raise ConfigError(f"{key}={value!r} is not valid; it must be >= {minimum}")


def validate(cfg: DictConfig) -> None:
    """Check values before anything runs; raises ``ConfigError`` (one line) on the first problem."""
    _choice("profile.name", cfg.profile.name, PROFILES)
    _choice("model.name", cfg.model.name, MODELS)
    _choice("data.name", cfg.data.name, DATASETS)
    _choice("data.filter", cfg.data.filter, FILTERS)
    _choice("data.sampling", cfg.data.sampling, SAMPLINGS)
    _choice("optim.name", cfg.optim.name, ("sgd", "adam"))
    _choice("tracker.mode", cfg.tracker.mode, ("off", "sigma1", "full"))
    _choice("train.grad_noise", cfg.train.grad_noise, ("none", "gaussian", "uniform"))
    _choice("noise.target", cfg.noise.target, ("gradient", "loss"))
    _choice("logger.mode", cfg.logger.mode, ("auto", "online", "offline", "disabled"))
    if cfg.train.autoaugment is not None:
        _choice("train.autoaugment", cfg.train.autoaugment, ("cifar10", "imagenet", "svhn"))
    _positive("data.batch_size", cfg.data.batch_size, minimum=2)
    _positive("data.train_subset", cfg.data.train_subset, allow_none=True)
    _positive("data.test_subset", cfg.data.test_subset, allow_none=True)
    _positive("train.steps", cfg.train.steps)
    _positive("train.log_every", cfg.train.log_every)
    _positive("train.checkpoint_every", cfg.train.checkpoint_every)
    _positive("train.eval_every", cfg.train.eval_every, minimum=0)
    _positive("threads", cfg.threads, allow_none=True)
    if not (cfg.optim.lr > 0 and math.isfinite(cfg.optim.lr)):
        raise ConfigError(f"optim.lr={cfg.optim.lr!r} is not valid; it must be a finite number > 0")
    for key in ("optim.momentum", "optim.weight_decay", "train.mixup_alpha", "train.fgsm_eps",
                "train.label_smoothing", "train.grad_rho", "data.label_noise", "data.cutoff"):
        group, name = key.split(".")
        if not math.isfinite(cfg[group][name]):
            raise ConfigError(f"{key}={cfg[group][name]!r} is not valid; it must be a finite number")
    for key in ("optim.momentum", "optim.weight_decay", "train.mixup_alpha", "train.fgsm_eps"):
        group, name = key.split(".")
        if cfg[group][name] < 0:
            raise ConfigError(f"{key}={cfg[group][name]!r} is not valid; it must be >= 0")
    for key in ("data.label_noise", "data.cutoff", "train.grad_rho"):
        group, name = key.split(".")
        if not 0.0 <= cfg[group][name] <= 1.0:
            raise ConfigError(f"{key}={cfg[group][name]!r} is not valid; it must lie in [0, 1]")
    if not 0.0 <= cfg.train.label_smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing={cfg.train.label_smoothing!r} is not valid; it must lie in [0, 1)")
    if cfg.tracker.mode == "full" and cfg.optim.name != "sgd":
        raise ConfigError(
            f"tracker.mode=full predicts K(t) for plain SGD only, but optim.name={cfg.optim.name!r}; "
            "use optim=sgd or tracker=sigma1"
        )
    if cfg.tracker.mode == "full" and cfg.optim.momentum != 0:
        raise ConfigError(
            f"tracker.mode=full predicts K(t) for SGD without momentum, but optim.momentum={cfg.optim.momentum}; "
            "set optim.momentum=0 or tracker=sigma1"
        )
    if cfg.tracker.mode == "full" and cfg.train.log_every != 1:
        raise ConfigError("tracker.mode=full integrates every step, so train.log_every must be 1")
    _choice("train.reg.reduce", cfg.train.reg.reduce, ("per_layer", "sum"))
    _choice("train.reg.sign", cfg.train.reg.sign, (1, -1))
    _positive("train.reg.beta", cfg.train.reg.beta, minimum=0)
    _positive("train.reg.iters", cfg.train.reg.iters)
    if cfg.train.regularizer == "alignment" and cfg.tracker.mode == "full":
        raise ConfigError("train=alignment backpropagates through the gradient, which tracker.mode=full's "
                          "per-sample hooks cannot follow; use tracker=sigma1 (align/<layer> columns give sigma1*mu)")
    if cfg.data.name in ("cifar10", "cifar100") and cfg.model.name == "mlp":
        raise ConfigError("model=mlp expects 28x28 grey images (MNIST); use data=mnist or model=convnet")
    if cfg.data.name == "mnist" and cfg.model.name in ("convnet", "convnet_ch5"):
        raise ConfigError(f"model={cfg.model.name} expects 32x32 RGB images; use data=cifar10/cifar100 or model=mlp")


# ---------------------------------------------------------------- override keys, before Hydra composes
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
FREE_FORM = ("figure", "scale")  # per-figure settings: any key
GROUPS = ("profile", "model", "data", "optim", "train", "tracker", "logger", "figure")


def _valid_children(node: Any) -> list[str] | None:
    """Field names of a schema node; None when the node takes any key."""
    if dataclasses.is_dataclass(node):
        return [f.name for f in dataclasses.fields(node)]
    return None


def closest_first(name: str, choices) -> list[str]:
    """All of ``choices``, the closest to ``name`` first (for "valid ones are ..." messages)."""
    choices = list(choices)
    return difflib.get_close_matches(name, choices, n=len(choices), cutoff=0.0)


def check_override_keys(overrides: list[str]) -> None:
    """Reject an override whose key the config does not have (``train.stepz=5``) or whose group option
    does not exist (``model=resnet``), with one line naming the valid keys, closest match first.

    Hydra would also refuse these, but in several lines that do not list the valid keys. ``+key=`` adds a
    key on purpose and ``hydra.*`` belongs to Hydra: both are left to it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # a syntax error: Hydra's own message says where
        return
    for ov in parsed:
        key = ov.key_or_group
        if ov.is_add() or ov.is_force_add() or ov.is_delete() or key.split(".")[0].split("/")[0] == "hydra":
            continue
        if "/" in key:
            continue  # a nested group (none of ours but hydra/...)
        if key in GROUPS and ov.package is None and "." not in key:
            _check_group_choice(key, ov)
            continue
        _check_dotted(key)


def _check_group_choice(group: str, ov) -> None:
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    try:
        values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.value()]
    except Exception:
        return
    for v in values:
        if isinstance(v, str) and options and v not in options:
            raise ConfigError(
                f"unknown {group} '{v}'; valid options of {group}: {', '.join(closest_first(v, options))}"
            )


def _check_dotted(key: str) -> None:
    node: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        children = _valid_children(node)
        if children is None:
            return
        if part not in children:
            where = ".".join(parts[:i])
            of = f"of {where}" if where else "at the top level"
            raise ConfigError(f"unknown key '{key}'; valid keys {of}: {', '.join(closest_first(part, children))}")
        if i == 0 and part in FREE_FORM:
            return
        f = {f.name: f for f in dataclasses.fields(node)}[part]
        node = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        node = type(node) if dataclasses.is_dataclass(node) else None
