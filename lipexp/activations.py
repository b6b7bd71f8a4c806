"""Lipschitz constants of activation functions (thesis Table 2.1): closed form vs a numerical supremum.

The constant of an elementwise activation is ``sup_x |phi'(x)|``; for softmax it is the supremum over
logit vectors of the l2 operator norm of its Jacobian ``diag(p) - p p^T`` (1/2, approached when two
probabilities are 1/2 and the rest 0). Numerical values come from autograd only: the derivative on a
dense grid, then gradient ascent (Adam) on ``|phi'(x)|`` from the best grid points (thesis eq. 2.45).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _bisect(f, lo: float, hi: float, iters: int = 200) -> float:
    flo = f(lo)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        fm = f(mid)
        if (fm > 0) == (flo > 0):
            lo, flo = mid, fm
        else:
            hi = mid
    return 0.5 * (lo + hi)


def swish_lipschitz() -> float:
    """sup of ``d/dx x*sigmoid(x) = s + x s (1-s)``; its maximiser solves ``2 + x (1 - 2 s(x)) = 0``."""
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    x = _bisect(lambda x: 2.0 + x * (1.0 - 2.0 * sig(x)), 2.0, 3.0)  # the root lies near 2.3994
    s = sig(x)
    return s + x * s * (1.0 - s)


def gelu_lipschitz() -> float:
    """sup of ``Phi(x) + x phi(x)``; ``phi(x)(2 - x^2) = 0`` gives x = sqrt(2): ``Phi(sqrt 2) + 1/(e sqrt(pi))``."""
    return 0.5 * (1.0 + math.erf(1.0)) + math.exp(-1.0) / math.sqrt(math.pi)


def closed_form(module: nn.Module) -> float:
    """Closed-form Lipschitz constant (l2) of an activation module; ValueError for an unknown one."""
    if isinstance(module, (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Tanh)):
        return 1.0
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(module.negative_slope))
    if isinstance(module, nn.Sigmoid):
        return 0.25
    if isinstance(module, nn.Softplus):
        return 1.0  # sigmoid(beta x) <= 1 for any beta
    if isinstance(module, nn.ELU):
        return max(1.0, module.alpha)  # derivative alpha e^x on x <= 0 (theory: alpha > 0)
    if isinstance(module, nn.SiLU):
        return swish_lipschitz()
    if isinstance(module, nn.GELU):
        if module.approximate != "none":
            raise ValueError("closed form is for the exact GELU (approximate='none'), "
                             f"got approximate='{module.approximate}'")
        return gelu_lipschitz()
    if isinstance(module, nn.Softmax):
        return 0.5
    raise ValueError(f"no closed-form Lipschitz constant for {type(module).__name__}; known: ReLU, ReLU6, "
                     "Hardtanh, Tanh, LeakyReLU, Sigmoid, Softplus, ELU, SiLU, GELU, Softmax")


def numerical_sup_derivative(
    fn, lo: float = -30.0, hi: float = 30.0, points: int = 600_001, steps: int = 300, starts: int = 5
) -> float:
    """``sup_x |fn'(x)|`` for an elementwise fn: autograd on a float64 grid, then Adam from the best points."""
    x = torch.linspace(lo, hi, points, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(fn(x).sum(), x)  # elementwise fn: the gradient of the sum is phi'(x)
    d = d.abs()
    best = float(d.max())
    z = x.detach()[d.topk(starts).indices].clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=1e-2)
    for _ in range(steps):
        (dz,) = torch.autograd.grad(fn(z).sum(), z, create_graph=True)
        obj = dz.abs()
        best = max(best, float(obj.detach().max()))
        opt.zero_grad()
        g = torch.autograd.grad(-obj.sum(), z, allow_unused=True)[0]
        if g is None:  # piecewise-linear activations: phi'' = 0, nothing to climb
            break
        z.grad = g
        opt.step()
    return best


def softmax_jacobian_norm(z: torch.Tensor) -> torch.Tensor:
    """l2 operator norm of the softmax Jacobian (by autograd) at each row of ``z: [B, d] -> [B]``."""
    from torch.func import jacrev

    # rows are independent, so the Jacobian of the row-sum holds every per-row Jacobian: d x B x d
    J = jacrev(lambda v: torch.softmax(v, dim=-1).sum(0))(z).permute(1, 0, 2)  # B x d x d, symmetric PSD
    return torch.linalg.eigvalsh(J)[..., -1]


def numerical_softmax_lipschitz(
    dim: int = 10, samples: int = 20_000, steps: int = 500, starts: int = 8, seed: int = 0
) -> float:
    """``sup_z ||J_softmax(z)||_2`` over logits in R^dim: random logits, then Adam from the best ones."""
    g = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(samples, dim, generator=g, dtype=torch.float64)
    norms = softmax_jacobian_norm(z)
    best = float(norms.max())
    z = z[norms.topk(min(starts, samples)).indices].clone().requires_grad_(True)
    # large steps and a short second-moment memory: the gradient towards the sup decays like the small p_j
    opt = torch.optim.Adam([z], lr=1.0, betas=(0.9, 0.99))
    for _ in range(steps):
        obj = softmax_jacobian_norm(z)
        best = max(best, float(obj.detach().max()))
        opt.zero_grad()
        (-obj.sum()).backward()
        opt.step()
    return best


def table2_1(
    leaky_slopes: tuple[float, ...] = (0.01, 2.0),
    elu_alphas: tuple[float, ...] = (1.0, 2.0),
    softmax_dim: int = 10,
) -> list[dict]:
    """Rows ``{name, closed_form, numerical, abs_err}`` for the activations of Table 2.1."""
    mods: list[tuple[str, nn.Module]] = [("ReLU", nn.ReLU())]
    mods += [(f"LeakyReLU(a={a:g})", nn.LeakyReLU(a)) for a in leaky_slopes]
    mods += [("Sigmoid", nn.Sigmoid()), ("Tanh", nn.Tanh()), ("Softplus", nn.Softplus())]
    mods += [(f"ELU(a={a:g})", nn.ELU(a)) for a in elu_alphas]
    mods += [("Swish/SiLU", nn.SiLU()), ("GELU", nn.GELU())]
    rows = []
    for name, mod in mods:
        c, v = closed_form(mod), numerical_sup_derivative(mod)
        rows.append({"name": name, "closed_form": c, "numerical": v, "abs_err": abs(c - v)})
    v = numerical_softmax_lipschitz(softmax_dim)
    rows.append({"name": f"Softmax(d={softmax_dim})", "closed_form": 0.5, "numerical": v, "abs_err": abs(0.5 - v)})
    return rows


__all__ = ["closed_form", "gelu_lipschitz", "numerical_softmax_lipschitz", "numerical_sup_derivative",
           "softmax_jacobian_norm", "swish_lipschitz", "table2_1"]
