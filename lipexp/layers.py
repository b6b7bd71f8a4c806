"""Which parameters are the weight matrices of K(t), and their matrix view (theory.md §1)."""
from __future__ import annotations

import torch
from torch import nn

WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Matrix view of a weight: Linear ``out x in``; Conv2d ``out x (in*kh*kw)`` (Miyato's convention)."""
    return weight.reshape(weight.shape[0], -1)


def weight_layers(model: nn.Module, strict: bool = True) -> list[tuple[str, nn.Module]]:
    """``(parameter name, module)`` for every Linear/Conv2d weight, in ``named_parameters`` order.

    With ``strict``, any other parameter of two or more dimensions (an attention projection used
    through ``F.linear``, an embedding, a Conv1d...) is an error naming it, because leaving it out
    would make K(t) silently wrong.
    """
    owners = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            owners[(f"{mod_name}.{p_name}" if mod_name else p_name)] = (module, p_name)
    out = []
    for name, p in model.named_parameters():
        module, p_name = owners[name]
        if isinstance(module, WEIGHT_LAYERS) and p_name == "weight":
            out.append((name, module))
        elif strict and p.ndim >= 2:
            raise ValueError(
                f"parameter '{name}' ({type(module).__name__}, shape {tuple(p.shape)}) is a weight that "
                "lipexp cannot map to a Lipschitz factor; supported weight layers are nn.Linear and "
                "nn.Conv2d (pass strict=False to ignore it, knowing K(t) then leaves it out)"
            )
    return out


@torch.no_grad()
def sigma1(w: torch.Tensor) -> float:
    """Largest singular value of a matrix, as sqrt(lambda_max) of the smaller Gram matrix in float64.

    The top eigenvalue of W W^T is perfectly conditioned, so this matches a full SVD to ~1e-15 relative,
    at a fraction of the cost of ``svdvals`` for the wide matrices of a ConvNet (2-6x on this CPU).
    """
    w = w.double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return float(torch.linalg.eigvalsh(gram)[-1].clamp(min=0).sqrt())


def top_singular_values(model: nn.Module, strict: bool = True) -> dict[str, float]:
    """sigma_1 of every weight matrix (exact, float64)."""
    return {name: sigma1(weight_matrix(m.weight.detach())) for name, m in weight_layers(model, strict)}


def k_emp(sigmas: dict[str, float]) -> float:
    """K = prod_l sigma_1(W_l)."""
    out = 1.0
    for s in sigmas.values():
        out *= s
    return out
