"""Which parameters are the weight matrices of K(t), and their matrix view (theory.md §1).

Supported weights (one registered handler per layer type in ``lipexp.handlers``): ``nn.Linear`` (also on
sequences), ``nn.Conv1d/2d/3d`` (any stride, zero padding incl. 'same'/'valid', dilation, groups),
``nn.Embedding``, ``nn.MultiheadAttention`` (``in_proj_weight`` as the stacked 3E x E map, or
``q/k/v_proj_weight`` when kdim/vdim differ, and ``out_proj.weight``), and these with a
``torch.nn.utils.parametrize`` parametrisation (spectral_norm, weight_norm: the *effective* weight is
tracked, keyed ``'<module>.weight'``). A weight's matrix is ``weight.reshape(out, -1)``. A grouped
convolution is the block-diagonal operator of its groups' matrices (group g: rows ``g*out/G..``, columns
its ``in/G * k`` inputs), so its sigma1 is the largest group's: that is the operator the layer applies to the
unfolded patches, and what ``top_singular_values`` and the tracker report.

Skipped by rule (listed, not an error): biases and every parameter of fewer than two dimensions
(normalisation affine), parameters that belong to no module type with a handler and are not called
``weight`` (class tokens, positional embeddings). A weight (name containing ``weight``, two or more
dimensions) of a module type without a handler (``nn.LSTM``, ``nn.Bilinear``, a custom layer) is an error
with ``strict=True`` and skipped (listed) with ``strict=False``.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from lipexp import handlers

WEIGHT_LAYERS = tuple(handlers.HANDLERS)


@dataclass(frozen=True)
class WeightRef:
    """One tracked weight: its key, the module that uses it, and how to read it."""

    name: str  # named_parameters() name; '<module>.weight' for a parametrised (effective) weight
    module: nn.Module  # the registered module (the MultiheadAttention for its projections)
    attr: str  # path below ``module``: 'weight', 'in_proj_weight', 'out_proj.weight', ...
    handler: "handlers.Handler"
    groups: int = 1
    parametrized: bool = False
    uses: tuple = ()  # ((module, attr, handler), ...): every registered module that applies this weight

    def tensor(self) -> torch.Tensor:
        """The weight as the forward uses it (for a parametrised weight: recomputed, buffers untouched)."""
        if not self.parametrized:
            return _get(self.module, self.attr)
        with preserved_buffers(self.module):
            return _get(self.module, self.attr)

    def raw_parameters(self) -> list[nn.Parameter]:
        """The leaf parameters an optimiser updates for this weight."""
        if not self.parametrized:
            return [_get(self.module, self.attr)]
        return list(self.module.parametrizations[self.attr].parameters())


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


class preserved_buffers:
    """Read a parametrised weight without side effects: spectral_norm's power iteration updates its
    ``_u``/``_v`` buffers on every read in training mode; they are restored on exit."""

    def __init__(self, module: nn.Module):
        self.bufs = [b for b in module.parametrizations.buffers()] if hasattr(module, "parametrizations") else []

    def __enter__(self):
        self.saved = [b.detach().clone() for b in self.bufs]

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, s in zip(self.bufs, self.saved):
                b.copy_(s)


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Matrix view of a weight: Linear ``out x in``; ConvNd ``out x (in/groups * k...)`` (Miyato's convention)."""
    return weight.reshape(weight.shape[0], -1)


def group_blocks(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The groups' matrices of a (grouped conv) weight: ``(groups, out/groups, in/groups * k)``."""
    w = weight_matrix(weight)
    return w.reshape(groups, w.shape[0] // groups, w.shape[1])


def find_weights(model: nn.Module, strict: bool = True) -> tuple[list[WeightRef], list[tuple[str, str]]]:
    """Every tracked weight of ``model`` (``named_parameters`` order) and the skipped parameters with why."""
    names = {id(p): n for n, p in model.named_parameters()}  # the first name of a shared (tied) parameter
    claimed: dict[int, WeightRef] = {}
    uses: dict[int, list] = {}
    for mod_name, module in model.named_modules():
        handler = handlers.handler_for(module)
        if handler is None:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        for attr in handler.weights(module):
            path, _, leaf = attr.rpartition(".")
            owner = _get(module, path) if path else module
            par = parametrize.is_parametrized(owner, leaf)
            if par:
                if owner is not module:
                    raise ValueError(f"parameter '{prefix}{attr}' is parametrised inside {type(module).__name__}; "
                                     "the tracker supports parametrisations of a Linear/Conv/Embedding weight")
                key, ident = f"{prefix}{attr}", id(owner.parametrizations[leaf])
            else:
                p = _get(module, attr)
                key, ident = names.get(id(p), f"{prefix}{attr}"), id(p)
            handler.check(key, module)
            if ident in claimed:  # a tied weight: one entry, fed by every module that uses it
                uses[ident].append((module, attr, handler))
                continue
            claimed[ident] = WeightRef(key, module, attr, handler, getattr(module, "groups", 1), par)
            uses[ident] = [(module, attr, handler)]
            if par:
                for p in owner.parametrizations[leaf].parameters():
                    claimed[id(p)] = claimed[ident]
    for ident, ref in list(claimed.items()):
        if ident in uses:
            claimed[ident] = dataclasses.replace(ref, uses=tuple(uses[ident]))
    for ident, ref in list(claimed.items()):  # the raw parameters of a parametrisation point to the same ref
        if ident not in uses:
            claimed[ident] = next(r for r in claimed.values() if r.name == ref.name and r.uses)
    out, skipped, seen = [], [], set()
    owners = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), (module, p_name))
    for name, p in model.named_parameters():
        ref = claimed.get(id(p))
        if ref is not None:
            if ref.name not in seen:
                seen.add(ref.name)
                out.append(ref)
            continue
        module, p_name = owners[id(p)]
        if p.ndim < 2:
            skipped.append((name, "fewer than 2 dimensions (bias or normalisation affine)"))
        elif "weight" in p_name:
            if strict:
                raise ValueError(
                    f"parameter '{name}' ({type(module).__name__}, shape {tuple(p.shape)}) is a weight of a layer "
                    f"type lipexp has no handler for (supported: {', '.join(c.__name__ for c in WEIGHT_LAYERS)}); "
                    "pass strict=False (to DynamicsTracker, weight_layers or top_singular_values) to skip it, "
                    "knowing K(t) then leaves it out"
                )
            skipped.append((name, f"weight of {type(module).__name__}, which has no handler (strict=False)"))
        else:
            skipped.append((name, "not a weight of a registered layer (e.g. class token, positional embedding)"))
    return out, skipped


def weight_layers(model: nn.Module, strict: bool = True) -> list[tuple[str, nn.Module]]:
    """``(weight name, module)`` for every tracked weight, in ``named_parameters`` order (see ``find_weights``)."""
    return [(ref.name, ref.module) for ref in find_weights(model, strict)[0]]


@torch.no_grad()
def sigma1(w: torch.Tensor) -> float:
    """Largest singular value of a matrix, as sqrt(lambda_max) of the smaller Gram matrix in float64.

    The top eigenvalue of W W^T is perfectly conditioned, so this matches a full SVD to ~1e-15 relative,
    at a fraction of the cost of ``svdvals`` for the wide matrices of a ConvNet (2-6x on this CPU).
    """
    w = w.double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return float(torch.linalg.eigvalsh(gram)[-1].clamp(min=0).sqrt())


@torch.no_grad()
def ref_sigma1(ref: WeightRef) -> float:
    """sigma1 of a tracked weight's matrix (grouped conv: the block-diagonal operator, max over groups)."""
    w = ref.tensor().detach()
    if ref.groups == 1:
        return sigma1(weight_matrix(w))
    blocks = group_blocks(w, ref.groups).double()
    gram = blocks @ blocks.transpose(1, 2) if blocks.shape[1] <= blocks.shape[2] else blocks.transpose(1, 2) @ blocks
    return float(torch.linalg.eigvalsh(gram)[:, -1].max().clamp(min=0).sqrt())


class SingularValues(dict):
    """``{weight name: sigma1}``; ``not_a_bound`` says why ``k_emp`` of these is not a Lipschitz bound (or None)."""

    not_a_bound: str | None = None


def top_singular_values(model: nn.Module, strict: bool = True) -> SingularValues:
    """sigma_1 of every weight matrix (exact, float64), with why their product is not a bound, if it is not."""
    out = SingularValues((ref.name, ref_sigma1(ref)) for ref in find_weights(model, strict)[0])
    out.not_a_bound = kemp_not_a_bound(model)
    return out


_CHAIN_SAFE = (nn.Linear, nn.Identity, nn.Flatten, nn.Dropout, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU,
               nn.ELU, nn.GELU, nn.SiLU, nn.Softplus, nn.MaxPool1d, nn.MaxPool2d)


def kemp_not_a_bound(model: nn.Module) -> str | None:
    """None if prod sigma1 of the weights bounds the model's l2 Lipschitz constant, else the reason.

    It is a bound for a plain feed-forward chain (nested ``nn.Sequential``) of Linear layers and
    1-Lipschitz activations, max-pooling and dropout (thesis Prop. 4.5.1); see ``bounds.network_bound``.
    """
    leaves = []

    def walk(m):
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            for c in m.children():
                if not walk(c):
                    return False
            return True
        if any(True for _ in m.children()):
            return False
        leaves.append(m)
        return True

    if not walk(model):
        return "the model is not a feed-forward chain (residual or parallel branches, attention)"
    for m in leaves:
        if isinstance(m, nn.modules.conv._ConvNd):
            return "the sigma1 of a reshaped convolution weight is not the convolution's operator norm"
        if not isinstance(m, _CHAIN_SAFE):
            return f"{type(m).__name__} is not a 1-Lipschitz activation/pool nor a Linear layer (e.g. BatchNorm)"
    return None


def k_emp(sigmas: dict[str, float]) -> float:
    """The thesis' K = prod_l sigma_1(W_l) (Chapter 4's K(t)). It bounds the Lipschitz constant only for a
    feed-forward chain of Linear layers; for ``top_singular_values`` of another model it warns (once per
    reason) and is still returned. ``lipexp.bounds.network_bound`` gives a bound."""
    if not sigmas:
        raise ValueError("k_emp of no weights: the model has no tracked weight matrix (see layers.find_weights)")
    reason = getattr(sigmas, "not_a_bound", None)
    if reason is not None:
        warnings.warn(f"K_emp = prod sigma1 is the thesis' quantity, not a Lipschitz bound here: {reason}; "
                      "use lipexp.bounds.network_bound for a bound", UserWarning, stacklevel=2)
    out = 1.0
    for s in sigmas.values():
        out *= s
    return out
