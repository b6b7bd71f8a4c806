"""Operator norms of layers and upper/lower Lipschitz bounds of sequential networks (l2 norms).

Per weight layer, three numbers:
(a) ``sigma_matrix``: s_1 of the reshaped weight (``out x in*kh*kw``), the factor of the theory's K(t);
    for a convolution it is NOT an upper bound of the layer's operator norm in general;
(a') ``unfold_bound``: ``sqrt(c) * sigma_matrix`` with c the largest number of patch entries that read the
    same input pixel (a convolution is the reshaped weight applied to the unfolded patches, and the
    unfold operator has norm sqrt(c)); an upper bound of (b);
(b) ``op_norm``: the true operator norm of the layer as a linear map on its actual input size, padding and
    stride, by power iteration through conv2d and its adjoint (conv_transpose2d);
(c) for circular padding and stride 1, all singular values by FFT (Sedghi et al., 2019), a check of (b).

Block power iteration on A^T A (``block`` = 4 start vectors by default) stops when the top Ritz pair has
relative eigen-residual ``||A^T A x - theta x|| / theta <= tol`` (default 1e-8; unit x, ``theta = ||A x||^2``).
Then theta is within ``tol * theta`` of an eigenvalue of A^T A (and within ``(tol * theta)^2 / gap`` of it),
which from a random start is the top one unless the start is unluckily orthogonal to it. The estimate
``sqrt(theta)`` never exceeds the true norm. A warning is raised if ``max_iter`` is hit.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lipexp.activations import closed_form
from lipexp.layers import weight_layers, weight_matrix

TOL = 1e-8
MAX_ITER = 10_000
BLOCK = 4


# ---------------------------------------------------------------------------------------------
# Linear maps and power iteration
# ---------------------------------------------------------------------------------------------

def power_iteration(forward, adjoint, x0: torch.Tensor, tol: float = TOL, max_iter: int = MAX_ITER
                    ) -> tuple[float, int]:
    """Largest singular value of a linear map given ``forward`` and its ``adjoint``: ``(value, iterations)``.

    Block power (subspace) iteration on ``M = A^T A`` with Rayleigh-Ritz: ``x0: [b, ...]`` holds b start
    vectors as a batch that ``forward`` accepts (b = 1 is plain power iteration). A block converges at the
    rate ``(s_{b+1}/s_1)^2`` instead of ``(s_2/s_1)^2``, which matters for convolutions, whose top singular
    values come in near-equal clusters. Stops when the top Ritz pair has ``||M x - theta x|| <= tol * theta``.
    The returned ``sqrt(theta)`` never exceeds s_1 (Ritz values interlace).
    """
    b = x0.shape[0]
    if b > math.prod(x0.shape[1:]):
        raise ValueError(f"block size {b} exceeds the input dimension {math.prod(x0.shape[1:])}")
    X = torch.linalg.qr(x0.reshape(b, -1).T).Q.T  # b orthonormal rows
    for it in range(1, max_iter + 1):
        Y = forward(X.reshape(x0.shape))
        Z = adjoint(Y).reshape(b, -1)  # rows: M x_i
        Yf = Y.reshape(b, -1)
        evals, evecs = torch.linalg.eigh(Yf @ Yf.T)  # Rayleigh-Ritz on span(X): X M X^T = Y Y^T
        theta, c = float(evals[-1]), evecs[:, -1]
        if theta <= 0.0:
            return 0.0, it
        res = float(torch.linalg.vector_norm(c @ Z - theta * (c @ X))) / theta
        if res <= tol:
            return math.sqrt(theta), it
        X = torch.linalg.qr(Z.T).Q.T
    warnings.warn(f"power iteration did not reach tol={tol:g} in {max_iter} iterations (last relative "
                  f"residual {res:.2e}); the value is a lower estimate", RuntimeWarning, stacklevel=2)
    return math.sqrt(theta), max_iter


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _start(input_shape, block: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    block = max(1, min(block, math.prod(input_shape)))
    return torch.randn((block, *input_shape), generator=_generator(seed), dtype=dtype)


def linear_map_norm(fn, input_shape: tuple[int, ...], tol: float = TOL, max_iter: int = MAX_ITER,
                    seed: int = 0, block: int = BLOCK, dtype: torch.dtype = torch.float64) -> tuple[float, int]:
    """Operator norm of a linear, per-sample ``fn`` on inputs ``input_shape``, adjoint by autograd (vjp)."""
    x0 = _start(input_shape, block, seed, dtype)
    _, vjp_fn = torch.func.vjp(fn, torch.zeros_like(x0))  # fn is linear: its vjp at any point is the adjoint
    return power_iteration(fn, lambda y: vjp_fn(y)[0], x0, tol, max_iter)


def _conv_weight(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().to(torch.float64)


def conv2d_operator(conv: nn.Conv2d, input_shape: tuple[int, int, int], batch: int = 1):
    """``(forward, adjoint)`` of a Conv2d without bias on inputs ``[batch, C, H, W]`` (float64).

    Zero padding given as numbers: adjoint by ``conv_transpose2d`` with the ``output_padding`` that restores
    H x W. Other padding modes or string padding ('same'): adjoint by autograd (vjp), exact for a linear map.
    """
    w = _conv_weight(conv)
    forward = lambda x: conv._conv_forward(x, w, None)  # noqa: E731  (handles every padding mode)
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        x0 = torch.zeros((batch, *input_shape), dtype=torch.float64)
        _, vjp_fn = torch.func.vjp(forward, x0)
        return forward, (lambda y: vjp_fn(y)[0])
    c, h, wd = input_shape
    out_pad = []
    for size, k, s, p, d in zip((h, wd), conv.kernel_size, conv.stride, conv.padding, conv.dilation):
        out = (size + 2 * p - d * (k - 1) - 1) // s + 1
        out_pad.append(size - ((out - 1) * s - 2 * p + d * (k - 1) + 1))  # rows the stride skipped
    adjoint = lambda y: F.conv_transpose2d(y, w, None, conv.stride, conv.padding, tuple(out_pad),  # noqa: E731
                                           conv.groups, conv.dilation)
    return forward, adjoint


def conv2d_operator_norm(conv: nn.Conv2d, input_shape: tuple[int, int, int], tol: float = TOL,
                         max_iter: int = MAX_ITER, seed: int = 0, block: int = BLOCK) -> tuple[float, int]:
    """(b): operator norm of a Conv2d (no bias) on inputs ``C x H x W``: ``(value, iterations)``."""
    _check_conv_input(conv, input_shape)
    x0 = _start(input_shape, block, seed)
    fwd, adj = conv2d_operator(conv, input_shape, batch=x0.shape[0])
    return power_iteration(fwd, adj, x0, tol, max_iter)


def _check_conv_input(conv: nn.Conv2d, input_shape) -> None:
    if len(input_shape) != 3 or input_shape[0] != conv.in_channels:
        raise ValueError(f"input_shape must be (C, H, W) with C = in_channels = {conv.in_channels}, "
                         f"got {tuple(input_shape)}")


def conv2d_dense_matrix(conv: nn.Conv2d, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """Explicit matrix of a Conv2d (no bias): ``[C_out*H_out*W_out, C*H*W]`` in float64 (small inputs only)."""
    _check_conv_input(conv, input_shape)
    n = math.prod(input_shape)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
    return conv._conv_forward(eye, _conv_weight(conv), None).reshape(n, -1).T


def circular_conv_singular_values(weight: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
    """(c): all singular values of a stride-1 circular convolution by FFT (Sedghi et al., 2019).

    ``weight: [C_out, C_in, kh, kw]``, input ``H x W`` with kh <= H, kw <= W. The operator is block-diagonal
    in the 2-D Fourier basis with ``C_out x C_in`` blocks ``sum_ab W[:, :, a, b] e^{-2 pi i (ua/H + vb/W)}``;
    the shift and flip of cross-correlation only change phases. Returns ``[H*W*min(C_out, C_in)]``, descending.
    """
    h, w = input_hw
    if weight.shape[-2] > h or weight.shape[-1] > w:
        raise ValueError(f"kernel {tuple(weight.shape[-2:])} is larger than the input {h}x{w}: the "
                         "circular operator then wraps the kernel; this function does not handle it")
    blocks = torch.fft.fft2(weight.detach().to(torch.float64), s=(h, w)).permute(2, 3, 0, 1)  # H x W x Co x Ci
    return torch.linalg.svdvals(blocks).reshape(-1).sort(descending=True).values


def conv2d_fft_singular_values(conv: nn.Conv2d, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """(c) for a Conv2d layer; ValueError unless circular padding, stride 1, dilation 1, groups 1 and 'same' size."""
    _check_conv_input(conv, input_shape)
    ok = (conv.padding_mode == "circular" and conv.stride == (1, 1) and conv.dilation == (1, 1)
          and conv.groups == 1 and not isinstance(conv.padding, str)
          and all(2 * p == k - 1 for p, k in zip(conv.padding, conv.kernel_size)))
    if not ok:
        raise ValueError("the FFT spectrum needs padding_mode='circular', stride 1, dilation 1, groups 1 and "
                         "padding (k-1)/2 (output size = input size); got "
                         f"padding_mode={conv.padding_mode!r}, stride={conv.stride}, dilation={conv.dilation}, "
                         f"groups={conv.groups}, padding={conv.padding}, kernel={conv.kernel_size}")
    return circular_conv_singular_values(conv.weight, input_shape[1:])


def patch_multiplicity(kernel_size, stride, padding, dilation, input_hw, padding_mode: str = "zeros") -> int:
    """Largest number of patch entries (over all output positions) that read one input pixel.

    Computed exactly as the max of ``U^T 1`` for the 0/1 pad-and-unfold operator U (one channel).
    """
    h, w = input_hw
    x = torch.zeros(1, 1, h, w, dtype=torch.float64, requires_grad=True)
    if padding_mode == "zeros":
        patches = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    else:
        ph, pw = padding
        xp = F.pad(x, (pw, pw, ph, ph), mode=padding_mode)
        patches = F.unfold(xp, kernel_size, dilation=dilation, stride=stride)
    (g,) = torch.autograd.grad(patches.sum(), x)
    return int(round(float(g.max())))


def conv2d_unfold_factor(conv: nn.Conv2d, input_shape: tuple[int, int, int]) -> float:
    """sqrt(c), c = the conv's ``patch_multiplicity`` on this input: ``||conv|| <= sqrt(c) * s_1(weight matrix)``.

    c is the max of ``U^T 1`` with U the conv's own pad-and-unfold (any padding mode or string padding),
    obtained as the adjoint of a one-channel all-ones convolution. Holds for grouped convolutions too
    (block-diagonal over groups, each block's matrix a row block of the weight matrix).
    """
    _check_conv_input(conv, input_shape)
    ones = torch.ones(1, 1, *conv.kernel_size, dtype=torch.float64)
    if conv.padding_mode != "zeros":
        f = lambda x: F.conv2d(F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode),  # noqa
                               ones, None, conv.stride, 0, conv.dilation)
    else:
        f = lambda x: F.conv2d(x, ones, None, conv.stride, conv.padding, conv.dilation)  # noqa: E731
    x = torch.zeros(1, 1, *input_shape[1:], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(f(x).sum(), x)
    return math.sqrt(round(float(g.max())))


# ---------------------------------------------------------------------------------------------
# Network bounds
# ---------------------------------------------------------------------------------------------

_ONE_LIPSCHITZ = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_LINEAR_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


def chain_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaves of a (nested) ``nn.Sequential`` in call order; ValueError for anything that is not a chain."""
    if isinstance(model, nn.Sequential):
        if type(model).forward is not nn.Sequential.forward:
            raise ValueError(f"{type(model).__name__} overrides Sequential.forward: cannot treat it as a chain")
        out = []
        for name, child in model.named_children():
            out += [(f"{name}.{n}" if n else name, m) for n, m in chain_modules(child)]
        return out
    if any(True for _ in model.children()):
        raise ValueError(f"{type(model).__name__} has submodules but is not an nn.Sequential: a product of "
                         "layer norms bounds only a chain of layers (no residual or parallel branches)")
    return [("", model)]


def _batch_coupled(model: nn.Module) -> bool:
    """True if a BatchNorm normalises with batch statistics in eval mode (track_running_stats=False)."""
    return any(isinstance(m, _BatchNorm) and (m.running_var is None or not m.track_running_stats)
               for m in model.modules())


def _bn_factor(bn: _BatchNorm) -> tuple[float, str]:
    if bn.running_var is None or not bn.track_running_stats:
        return math.nan, ("batch statistics (track_running_stats=False): no fixed linear map and no finite "
                          "per-sample Lipschitz constant; upper bounds with BN are undefined")
    scale = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    if bn.affine:
        scale = bn.weight.detach().double().abs() * scale
    return float(scale.max()), "eval mode: diagonal scaling max |gamma| / sqrt(running_var + eps)"


def _other_factor(module: nn.Module, input_shape, tol, max_iter) -> tuple[float, str]:
    from lipexp.models import Normalize

    if isinstance(module, _ONE_LIPSCHITZ):
        return 1.0, "identity in eval mode" if "Dropout" in type(module).__name__ else "isometry"
    if isinstance(module, Normalize):
        return float(1.0 / module.std.double().min()), "fixed normalisation: 1 / min(std)"
    if isinstance(module, nn.MaxPool2d):
        if module.ceil_mode:
            raise ValueError("MaxPool2d with ceil_mode=True is not supported")
        pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
        c = patch_multiplicity(pair(module.kernel_size), pair(module.stride), pair(module.padding),
                               pair(module.dilation), input_shape[1:])
        return math.sqrt(c), f"max over windows: sqrt(max windows per pixel = {c})"
    if isinstance(module, _LINEAR_POOLS):
        value, it = linear_map_norm(lambda x: module(x), input_shape, tol, max_iter)
        return value, f"linear pooling, power iteration ({it} it)"
    try:
        return closed_form(module), "activation, closed form (Table 2.1)"
    except ValueError as e:
        raise ValueError(f"no Lipschitz factor known for {type(module).__name__} ({e}); supported: Linear, "
                         "Conv2d, BatchNorm, Normalize, activations of Table 2.1, MaxPool2d, average pools, "
                         "Dropout, Flatten, Identity") from None


def layer_bounds(model: nn.Module, sample: torch.Tensor, tol: float = TOL, max_iter: int = MAX_ITER
                 ) -> list[dict]:
    """One row per module of a sequential model, input shapes recorded on ``sample`` (``[1, ...]`` or ``[B, ...]``).

    Weight rows: ``{name, kind='weight', type, input_shape, sigma_matrix, unfold_bound, op_norm,
    iterations, fft_max}``; other rows: ``{name, kind='batchnorm'|'other', type, input_shape, factor, note}``.
    The model is copied to float64 in eval mode.
    """
    net = copy.deepcopy(model).double().eval()
    leaves = chain_modules(net)
    names = {id(m): n for n, m in weight_layers(net, strict=True)}
    shapes: dict[int, tuple[int, ...]] = {}

    def record(mod, inp):  # a pre-hook must return None, or it replaces the input
        shapes.setdefault(id(mod), tuple(inp[0].shape[1:]))

    hooks = [m.register_forward_pre_hook(record) for _, m in leaves]
    try:
        with torch.no_grad():
            net(sample[:1].double())
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, m in leaves:
        shape = shapes.get(id(m))
        if shape is None:
            raise ValueError(f"module '{name}' was not called by the forward pass")
        row = {"name": name, "type": type(m).__name__, "input_shape": shape}
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            s = float(torch.linalg.matrix_norm(weight_matrix(m.weight.detach()), ord=2))
            row.update(kind="weight", name=names[id(m)], sigma_matrix=s, fft_max=None)
            if isinstance(m, nn.Linear):
                row.update(unfold_bound=s, op_norm=s, iterations=0)  # exact: it is the matrix itself
            else:
                value, it = conv2d_operator_norm(m, shape, tol, max_iter)
                row.update(unfold_bound=conv2d_unfold_factor(m, shape) * s, op_norm=value, iterations=it)
                try:
                    row["fft_max"] = float(conv2d_fft_singular_values(m, shape)[0])
                except ValueError:
                    pass
        elif isinstance(m, _BatchNorm):
            f, note = _bn_factor(m)
            row.update(kind="batchnorm", factor=f, note=note)
        else:
            f, note = _other_factor(m, shape, tol, max_iter)
            row.update(kind="other", factor=f, note=note)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Lower bounds
# ---------------------------------------------------------------------------------------------

def _per_sample_fn(net: nn.Module):
    """The model as a function of each sample on its own.

    Without batch coupling one batched call is block-diagonal in the samples. With BatchNorm on batch
    statistics, each sample is run as a batch of one (the only per-sample function there is).
    """
    if not _batch_coupled(net):
        return net
    return lambda x: torch.cat([net(x[i:i + 1]) for i in range(x.shape[0])])


def _frozen_copy(model: nn.Module) -> nn.Module:
    net = copy.deepcopy(model).double().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _norms(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.flatten(1), dim=1)


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / _norms(t).clamp_min(1e-300).view(-1, *([1] * (t.ndim - 1)))


def _jacobian_power(f, x: torch.Tensor, tol: float, max_iter: int, seed: int):
    """Per-sample power iteration on J^T J: ``(sigma [B], unit top right-singular vectors like x, info)``.

    The estimate ``||J v||`` rises to sigma_1 from below at the rate (sigma_2 / sigma_1)^2.
    """
    v = _unit(torch.randn(x.shape, generator=_generator(seed), dtype=x.dtype).to(x.device))
    _, vjp_fn = torch.func.vjp(f, x)
    prev = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    info = {"method": "power", "iterations": max_iter, "converged": False}
    for k in range(1, max_iter + 1):
        _, jv = torch.func.jvp(f, (x,), (v,))
        sigma = _norms(jv)
        (w,) = vjp_fn(jv)
        v = _unit(w)
        if bool(((sigma - prev).abs() <= tol * sigma).all()):
            info.update(iterations=k, converged=True)
            break
        prev = sigma
    return sigma, v, info


def _jacobian_exact(f, x: torch.Tensor) -> torch.Tensor:
    """sigma_1 of every sample's full Jacobian (C x d, from C vmapped vjps of one forward): ``[B]``."""
    out, vjp_fn = torch.func.vjp(f, x)
    if out.ndim != 2:
        raise ValueError(f"exact input Jacobians need B x C outputs, got shape {tuple(out.shape)}; "
                         "use method='power'")
    b, c = out.shape
    basis = torch.eye(c, dtype=out.dtype, device=out.device)[:, None, :].expand(c, b, c)
    (rows,) = torch.func.vmap(vjp_fn)(basis)  # C x B x ...: row k of every J_i
    jac = rows.reshape(c, b, -1).transpose(0, 1)  # B x C x d
    return torch.linalg.eigvalsh(jac @ jac.transpose(1, 2))[:, -1].clamp_min(0).sqrt()


def input_jacobian_norms(model: nn.Module, x: torch.Tensor, method: str = "auto", tol: float = 1e-6,
                         max_iter: int = 300, seed: int = 0, max_exact_outputs: int = 64
                         ) -> tuple[torch.Tensor, dict]:
    """l2 operator norm of the input Jacobian at each sample, ``x: [B, ...] -> ([B] float64, info)``.

    Computed in float64 on a frozen eval-mode copy (the model itself is untouched). ``method="exact"``
    builds each J_i (C x d) from C vector-Jacobian products and takes sqrt(lambda_max(J_i J_i^T)).
    ``"power"``: power iteration on J^T J with ``torch.func.jvp``/``vjp``, all samples at once, until
    every relative change is at most ``tol``; each value is ``||J v||`` for a unit v, so a lower bound of
    the local norm whether or not it converged. ``"auto"``: exact when C <= ``max_exact_outputs``.
    ``info``: method, iterations, converged.
    """
    if method not in ("auto", "exact", "power"):
        raise ValueError(f"unknown method {method!r}; choose 'auto', 'exact' or 'power'")
    net = _frozen_copy(model)
    f = _per_sample_fn(net)
    x = x.detach().double()
    if method == "auto":
        with torch.no_grad():
            n_out = f(x[:1]).flatten(1).shape[1]
        method = "exact" if n_out <= max_exact_outputs else "power"
    if method == "exact":
        return _jacobian_exact(f, x), {"method": "exact", "iterations": 1, "converged": True}
    sigma, _, info = _jacobian_power(f, x, tol, max_iter, seed)
    return sigma, info


def jacobian_norms(model: nn.Module, x: torch.Tensor, tol: float = 1e-6, max_iter: int = 300,
                   seed: int = 0) -> torch.Tensor:
    """Power-iteration input-Jacobian norms ``[B]`` (see ``input_jacobian_norms``): lower bounds of K."""
    return input_jacobian_norms(model, x, "power", tol, max_iter, seed)[0]


def lipschitz_ascent(model: nn.Module, x: torch.Tensor, steps: int = 200, lr: float = 1e-2,
                     radius: float = 1e-3, clamp: tuple[float, float] | None = None, seed: int = 0) -> float:
    """Lower bound by gradient ascent on pairs (thesis eq. 2.45): ``max ||f(a)-f(b)|| / ||a-b||``.

    Pairs ``a, b = a + radius * d/||d||`` start at the data with d the top right-singular vector of the
    input Jacobian there; Adam moves the point a and the direction d (``clamp`` keeps a and b in a box).
    Every evaluated ratio is an exact lower bound; the best is returned. Pairs at a finite distance, not
    ``||f'(a)||`` itself, because a ReLU network has zero second derivatives almost everywhere, so ascent
    on the Jacobian norm would not move.
    """
    net = _frozen_copy(model)
    f = _per_sample_fn(net)
    x0 = x.detach().double()
    _, v, _ = _jacobian_power(f, x0, 1e-4, 50, seed)
    scale = math.sqrt(x0[0].numel())  # d with O(1) entries suits Adam's per-coordinate steps
    a = x0.clone().requires_grad_(True)
    d = (v * scale).requires_grad_(True)
    opt = torch.optim.Adam([a, d], lr=lr)
    best = 0.0
    for _ in range(steps + 1):
        b = a + radius * _unit(d)
        if clamp is not None:
            b = b.clamp(*clamp)
        ratio = _norms(f(a) - f(b)) / _norms(a - b).clamp_min(1e-300)
        best = max(best, float(ratio.detach().max()))
        opt.zero_grad()
        (-torch.log(ratio.clamp_min(1e-300)).sum()).backward()
        opt.step()
        if clamp is not None:
            with torch.no_grad():
                a.clamp_(*clamp)
    return best


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------

def bounds_table(model: nn.Module, data: torch.Tensor, tol: float = TOL, max_iter: int = MAX_ITER,
                 ascent_steps: int = 200, ascent_lr: float = 1e-2, ascent_starts: int = 8,
                 clamp: tuple[float, float] | None = None, seed: int = 0) -> dict:
    """Upper and lower Lipschitz bounds of a sequential model on ``data: [B, ...]``.

    Returns ``{"layers": layer_bounds rows, "summary": {...}}``. Summary: ``K_matrix`` = prod (a) (the
    theory's K, not a bound for convolutions), ``K_unfold`` = prod (a'), ``K_operator`` = prod (b);
    ``bn_factor`` and ``other_factor`` (activations, pools, normalisation) as products; ``upper_operator``
    and ``upper_unfold`` include both factors (nan with batch-statistics BatchNorm); ``lower_jacobian``
    (max over data), ``lower_ascent`` (from the ``ascent_starts`` samples of largest Jacobian norm),
    ``lower`` = their max, and ``lower_le_upper``.
    """
    rows = layer_bounds(model, data, tol, max_iter)
    prod = lambda vals: math.prod(vals) if vals else 1.0  # noqa: E731
    w = [r for r in rows if r["kind"] == "weight"]
    s = {
        "K_matrix": prod([r["sigma_matrix"] for r in w]),
        "K_unfold": prod([r["unfold_bound"] for r in w]),
        "K_operator": prod([r["op_norm"] for r in w]),
        "bn_factor": prod([r["factor"] for r in rows if r["kind"] == "batchnorm"]),
        "other_factor": prod([r["factor"] for r in rows if r["kind"] == "other"]),
    }
    for key in ("matrix", "unfold", "operator"):
        s[f"upper_{key}"] = s[f"K_{key}"] * s["bn_factor"] * s["other_factor"]
    jac = jacobian_norms(model, data, seed=seed)
    s["lower_jacobian"] = float(jac.max())
    starts = data[jac.topk(min(ascent_starts, len(jac))).indices]
    s["lower_ascent"] = lipschitz_ascent(model, starts, ascent_steps, ascent_lr, clamp=clamp, seed=seed)
    s["lower"] = max(s["lower_jacobian"], s["lower_ascent"])
    s["lower_le_upper"] = bool(s["lower"] <= s["upper_operator"] * (1 + 1e-6)) if not math.isnan(
        s["upper_operator"]) else None
    return {"layers": rows, "summary": s}


def summary_rows(summary: dict) -> list[dict]:
    """The summary of ``bounds_table`` as rows ``{quantity, value, role}`` for a printed table."""
    roles = {"upper_operator": "upper bound (b)", "upper_unfold": "upper bound (a')",
             "upper_matrix": "theory K x factors (not a bound for conv)", "K_matrix": "theory K(t)",
             "K_unfold": "weights only (a')", "K_operator": "weights only (b)", "bn_factor": "BatchNorm factor",
             "other_factor": "activations/pools/normalisation", "lower_jacobian": "lower bound (max Jacobian)",
             "lower_ascent": "lower bound (ascent, eq 2.45)", "lower": "lower bound"}
    return [{"quantity": k, "value": summary[k], "role": roles[k]} for k in roles]


# ---------------------------------------------------------------------------------------------
# Initial K(0), Section 4.8.2
# ---------------------------------------------------------------------------------------------

INITS = ("default", "kaiming_normal")


def init_std(n: int, init: str) -> float:
    """Entry std of a weight with fan-in n: PyTorch default U(+-1/sqrt n) -> 1/sqrt(3n); Kaiming normal sqrt(2/n)."""
    if init == "default":
        return 1.0 / math.sqrt(3 * n)
    if init == "kaiming_normal":
        return math.sqrt(2.0 / n)
    raise ValueError(f"unknown init '{init}'; choose one of {INITS}")


def init_k0(model_fn, init: str = "default", seeds=range(10)) -> dict:
    """Predicted ``K(0) = prod (sqrt m + sqrt n) s_l`` vs measured s_1 at init over seeds.

    ``model_fn()`` builds a fresh model (PyTorch default init); for ``kaiming_normal`` every weight is redrawn
    with ``kaiming_normal_(mode='fan_in', nonlinearity='relu')``. m x n is the weight matrix (conv:
    ``out x in*kh*kw``). The global RNG is forked, so the caller's random state is untouched. Returns
    ``{"layers": [{name, m, n, std, predicted, measured_mean, measured_std, ratio}], "network": {...}}``.
    """
    init_std(1, init)  # validate early
    seeds = list(seeds)
    sig: dict[str, list[float]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    ks = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_fn()
            layers = weight_layers(model, strict=True)
            if init == "kaiming_normal":
                with torch.no_grad():
                    for _, m in layers:
                        nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        k = 1.0
        for name, m in layers:
            W = weight_matrix(m.weight.detach()).double()
            s1 = float(torch.linalg.matrix_norm(W, ord=2))
            sig.setdefault(name, []).append(s1)
            shapes[name] = tuple(W.shape)
            k *= s1
        ks.append(k)
    rows, pred_k = [], 1.0
    for name, vals in sig.items():
        m, n = shapes[name]
        std = init_std(n, init)
        pred = (math.sqrt(m) + math.sqrt(n)) * std
        t = torch.tensor(vals, dtype=torch.float64)
        mean, sd = float(t.mean()), float(t.std()) if len(vals) > 1 else 0.0
        rows.append({"name": name, "m": m, "n": n, "std": std, "predicted": pred, "measured_mean": mean,
                     "measured_std": sd, "ratio": mean / pred})
        pred_k *= pred
    t = torch.tensor(ks, dtype=torch.float64)
    mean = float(t.mean())
    network = {"name": "network", "predicted": pred_k, "measured_mean": mean,
               "measured_std": float(t.std()) if len(ks) > 1 else 0.0, "ratio": mean / pred_k,
               "seeds": len(seeds), "init": init}
    return {"layers": rows, "network": network}


# ---------------------------------------------------------------------------------------------
# A bound for the whole network (chains, residual blocks), or why there is none
# ---------------------------------------------------------------------------------------------

@dataclass
class NetworkBound:
    """An upper bound of the l2 Lipschitz constant of a model in eval mode, and how it was built.

    ``value`` is None when no bound applies, with ``reason``. ``parts``: the factors of the top-level
    product, rows ``{name, type, factor, note}``; a residual block's row carries its ``branch`` and
    ``shortcut`` rows.
    """

    value: float | None
    method: str
    parts: list[dict] = field(default_factory=list)
    reason: str | None = None


DENSE_LIMIT = 1024  # convolutions on inputs of at most this many entries: exact norm from the dense matrix


class _NoBound(Exception):
    pass


_ATTENTION = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
              nn.TransformerDecoder, nn.Transformer)


def _residual_types() -> tuple:
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    except ImportError:  # torchvision is optional here
        return (), ()
    return (BasicBlock, Bottleneck), (ResNet,)


def _leaf_factor(name, m, shape, tol, max_iter) -> dict:
    row = {"name": name, "type": type(m).__name__}
    if isinstance(m, nn.Linear):
        w = m.weight.detach().double()
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        return {**row, "factor": float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt()),
                "note": "sigma1 of the weight (exact)"}
    if isinstance(m, nn.modules.conv._ConvNd):
        n_in = math.prod(shape)
        if n_in <= DENSE_LIMIT and m.padding_mode == "zeros":  # small input: the operator's matrix, exactly
            mat = _conv_dense(m, shape)
            gram = mat @ mat.T if mat.shape[0] <= mat.shape[1] else mat.T @ mat
            value = float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt())
            return {**row, "factor": value, "note": f"operator norm on input {tuple(shape)}, dense matrix (exact)"}
        if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            value, it = conv2d_operator_norm(m, shape, tol, max_iter)
        else:
            w = m.weight.detach().double()
            value, it = linear_map_norm(lambda x: m._conv_forward(x, w, None), shape, tol, max_iter)
        return {**row, "factor": value, "note": f"operator norm on input {tuple(shape)}, power iteration ({it} it)"}
    if isinstance(m, _BatchNorm):
        f, note = _bn_factor(m)
        if math.isnan(f):
            raise _NoBound(f"BatchNorm '{name}' uses batch statistics: {note}")
        return {**row, "factor": f, "note": note}
    if isinstance(m, _ATTENTION):
        raise _NoBound(f"'{name}' ({type(m).__name__}) is dot-product attention, which is not globally "
                       "Lipschitz (Kim et al., 2021): no upper bound applies")
    if isinstance(m, nn.Embedding):
        raise _NoBound(f"'{name}' is an embedding: its input is discrete indices, no l2 Lipschitz constant")
    try:
        f, note = _other_factor(m, shape, tol, max_iter)
    except ValueError as e:
        raise _NoBound(str(e)) from None
    return {**row, "factor": f, "note": note}


def _conv_dense(m: nn.modules.conv._ConvNd, shape) -> torch.Tensor:
    """The matrix of a zero-padded ConvNd (no bias) on inputs ``shape`` (C, *spatial): (out*P, C*prod(spatial)).

    Tap k at output position p reads input pixel q (or the padding): the block (p, q) adds W[:, :, k].
    """
    from lipexp.handlers import conv_geometry

    geo = conv_geometry("conv", m)
    spatial = shape[1:]
    pads = [geo.pad[2 * (len(spatial) - 1 - d)] for d in range(len(spatial))]  # leading pad of each dim
    outs = [(n + geo.pad[2 * (len(spatial) - 1 - d)] + geo.pad[2 * (len(spatial) - 1 - d) + 1]
             - dl * (k - 1) - 1) // s + 1
            for d, (n, k, s, dl) in enumerate(zip(spatial, geo.kernel, geo.stride, geo.dilation))]
    w = m.weight.detach().double()  # (out, C/groups, *k)
    g, cout, cin = m.groups, w.shape[0], shape[0]
    a = torch.zeros(cout, math.prod(outs), cin, math.prod(spatial), dtype=torch.float64)
    import itertools

    for pi, p in enumerate(itertools.product(*[range(o) for o in outs])):
        for k in itertools.product(*[range(kk) for kk in geo.kernel]):
            q = [pp * s + kk * dl - pd for pp, kk, s, dl, pd in zip(p, k, geo.stride, geo.dilation, pads)]
            if all(0 <= qq < n for qq, n in zip(q, spatial)):
                qi = 0
                for qq, n in zip(q, spatial):
                    qi = qi * n + qq
                for gi in range(g):  # block-diagonal over groups
                    o0, o1, c0 = gi * cout // g, (gi + 1) * cout // g, gi * cin // g
                    a[o0:o1, pi, c0:c0 + cin // g, qi] += w[(slice(o0, o1), slice(None)) + k]
    return a.reshape(cout * math.prod(outs), -1)


def _bound_rows(name, m, shapes, tol, max_iter) -> list[dict]:
    """Rows whose factors multiply to a bound of ``m`` (each row one factor of a chain)."""
    blocks, nets = _residual_types()
    if isinstance(m, _ATTENTION):
        return [_leaf_factor(name, m, None, tol, max_iter)]
    if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
        out = []
        for child_name, child in m.named_children():
            out += _bound_rows(f"{name}.{child_name}" if name else child_name, child, shapes, tol, max_iter)
        return out
    if blocks and isinstance(m, nets):  # torchvision ResNet.forward: this chain (flatten is an isometry)
        out = []
        for key in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"):
            out += _bound_rows(f"{name}.{key}" if name else key, getattr(m, key), shapes, tol, max_iter)
        return out
    if blocks and isinstance(m, blocks):  # relu(branch(x) + shortcut(x)): K <= K(branch) + K(shortcut)
        keys = ("conv1", "bn1", "relu", "conv2", "bn2") + (("relu", "conv3", "bn3") if hasattr(m, "conv3") else ())
        branch = [r for k in keys for r in _bound_rows(f"{name}.{k}", getattr(m, k), shapes, tol, max_iter)]
        shortcut = ([] if m.downsample is None else
                    _bound_rows(f"{name}.downsample", m.downsample, shapes, tol, max_iter))
        kb, ks = math.prod(r["factor"] for r in branch), math.prod(r["factor"] for r in shortcut)
        note = f"residual: K(shortcut) + K(branch) = {ks:.4g} + {kb:.4g}" + ("" if shortcut else " (identity)")
        return [{"name": name, "type": type(m).__name__, "factor": ks + kb, "note": note, "branch": branch,
                 "shortcut": shortcut}]
    if any(True for _ in m.children()):
        raise _NoBound(f"'{name or type(m).__name__}' ({type(m).__name__}) has submodules and its own forward: "
                       "no rule to combine them (supported: nn.Sequential chains, torchvision ResNet blocks)")
    if id(m) not in shapes:
        raise _NoBound(f"module '{name}' was not called by the forward pass")
    return [_leaf_factor(name, m, shapes[id(m)], tol, max_iter)]


def network_bound(model: nn.Module, input_shape: tuple[int, ...], tol: float = TOL,
                  max_iter: int = MAX_ITER) -> NetworkBound:
    """Upper bound of the l2 Lipschitz constant of ``model`` (eval mode, float64 copy) on inputs ``input_shape``.

    Built as: product of the factors of a feed-forward chain (nested ``nn.Sequential``); ``K(shortcut) +
    K(branch)`` per residual block (torchvision ``BasicBlock``/``Bottleneck``: 1 + K(branch) with an
    identity shortcut; ``ResNet`` itself as its chain); Linear layers by sigma1 of the weight; convolutions
    by their true operator norm on the actual input size (power iteration to ``tol``; the reshaped weight's
    sigma1 is not a bound), eval-mode BatchNorm by max |gamma| / sqrt(var + eps), activations and pools by
    ``layer_bounds``' factors. ``value=None`` with a ``reason`` where no bound applies (attention,
    embeddings, batch-statistics BatchNorm, an unknown composite module).
    """
    net = copy.deepcopy(model).double().eval()
    shapes: dict[int, tuple[int, ...]] = {}

    def record(mod, args):
        if args and torch.is_tensor(args[0]):
            shapes.setdefault(id(mod), tuple(args[0].shape[1:]))

    hooks = [m.register_forward_pre_hook(record) for m in net.modules()]
    try:
        with torch.no_grad():
            net(torch.zeros((1, *input_shape), dtype=torch.float64))
    finally:
        for h in hooks:
            h.remove()
    method = ("product over the chain; K(shortcut) + K(branch) per residual block; convolutions by their "
              "operator norm (power iteration), Linear by sigma1, eval-mode BatchNorm by max |gamma|/sqrt(var+eps)")
    try:
        rows = _bound_rows("", net, shapes, tol, max_iter)
    except _NoBound as e:
        return NetworkBound(None, "none", [], str(e))
    return NetworkBound(math.prod(r["factor"] for r in rows), method, rows, None)
