"""Layer handlers of the Chapter 4 tracker: one per layer type, as BackPACK extends (theory.md §2).

A handler knows, for its module type, (1) which of the module's parameters are tracked weight matrices
(``weights``), (2) which configurations it cannot treat exactly (``check``: one clear line), and (3) how to
hook a forward call and turn the layer input and the gradient of its output into the per-sample
projections ``a_i = G_i v1`` (M x rows), ``b_i = G_i^T u1`` (M x n), optionally ``W b_i`` (M x m), and, for the
variance/covariance split, per-sample gradient chunks (``install``). The hooks hand these to a *sink*
(the tracker's per-weight state, ``lipexp.dynamics._Layer``), which sums them over the calls of one step:
a module called twice, or a weight shared by two modules (tied embeddings), has the per-sample gradient
``G_i = sum over uses``, and a, b, W b are linear in G.

Sink interface used here: ``sink.u1`` (m,), ``sink.v1`` (n,), ``sink.s1``, ``sink.shape`` (m, n),
``sink.group`` (top group of a grouped conv), ``sink.capture(module, output) -> bool`` (armed, grad,
dtype checks; counts the call), ``sink.add(rows, a, b, wb, per_sample, per_sample_elems)`` with
``rows = (r0, r1)`` the rows of the matrix this use produced.

Adding a layer type: write a handler with these three methods, register it in ``HANDLERS`` and add its
brute-force test (tests/test_handlers.py).
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import activation as _activation

__all__ = ["HANDLERS", "handler_for", "ConvGeom", "conv_geometry", "conv_b_projection"]


def _batch_first(t: torch.Tensor, batch_dim: int) -> torch.Tensor:
    return t if batch_dim == 0 else t.movedim(batch_dim, 0)


def _wb_from_output(sink, positions: int) -> bool:
    """Whether a hook passes the layer's output to ``_linear_use`` for W b (see there). Decided at the
    forward, so that a hook keeps the output alive only when it will be read: held to the backward, a 3 MB
    attention in-projection output could not be reused by the allocator and was faulted in afresh each step."""
    m_full, n = sink.shape
    return m_full <= n and 16 * positions <= n


def _dot_last(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``t @ v`` (M, T) for t (M, T, C), v (C,). Attention's tensors lie position-major ((T, M, C) in memory):
    ``t @ v`` on that view copied t first (0.33 / 0.61 ms of the bench's in-projection gradient, 2 / 1 threads,
    in a step), the product in memory order took 0.07 ms. (bmm handles the strided view without a copy.)"""
    if not t.is_contiguous() and t.transpose(0, 1).is_contiguous():
        return (t.transpose(0, 1) @ v).T.contiguous()  # (M, T) small; a strided one slowed the bmm after it
    return t @ v


def _weighted_sum(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sum_t w[m, t] t[m, t, :]`` (M, C) for w (M, T), t (M, T, C): a product for one position, else one
    bmm (6 us less per call than the einsum, which dispatched about ten ops, at the bench's sizes)."""
    return t[:, 0] * w if t.shape[1] == 1 else torch.bmm(w[:, None], t)[:, 0]


def _linear_use(sink, x, delta, out, rows):
    """A linear map ``y_t = W[r0:r1] x_t (+ bias)`` over T positions per sample: x (M, T, n), delta (M, T, r),
    ``out = (y, bias)`` with y (M, T, m) the layer's output for all rows, passed where ``_wb_from_output``
    holds (else None: W b is then the product in end())."""
    r0, r1 = rows
    z = _dot_last(x, sink.v1)  # (M, T): x_t . v1
    du = _dot_last(delta, sink.u1[r0:r1])  # (M, T): u1 . delta_t
    a = _weighted_sum(z, delta)
    b = _weighted_sum(du, x)
    # W b_i = sum_t (W x_t) du_t = sum_t y_t du_t - bias sum_t du_t: from the layer's output, no M x n x m product.
    # Only a wide matrix's kappa uses it, and only with few positions per sample is one more pass over the
    # output (T m per sample, from memory) cheaper than that product in end() (n m per sample, small W):
    # on the bench's 2-layer Transformer (T = 32) leaving it out saved 3.9 / 2.1 ms a step (1 / 2 threads, paired).
    wb = None
    if out is not None:
        y, bias = out
        wb = _weighted_sum(du, y)
        if bias is not None:
            wb = wb - du.sum(1, keepdim=True) * bias

    def per_sample(i, j):
        return delta[i:j].transpose(1, 2) @ x[i:j]  # (s, r, n)

    def moments():  # sum_i G_i^2, sum_i G_i for one position per sample, without per-sample gradients
        d2, x2 = delta[:, 0], x[:, 0]
        return (d2 * d2).T @ (x2 * x2), d2.T @ x2

    sink.add(rows, a, b, wb, per_sample, x.shape[2] * (r1 - r0), moments if x.shape[1] == 1 else None)


# ----------------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------------
class LinearHandler:
    module_type = nn.Linear

    def weights(self, module):
        return ["weight"]

    def check(self, name, module):
        _check_forward(name, module, nn.Linear)

    def install(self, module, sinks, env):
        sink = sinks["weight"]

        def fwd(mod, args, kwargs, output):
            if not sink.capture(mod, output):
                return None
            x = args[0] if args else kwargs["input"]
            if x.dim() < 2:
                raise ValueError(f"layer '{sink.name}' got an unbatched input of shape {tuple(x.shape)}; "
                                 "the tracker needs a batch dimension")
            bd = env.batch_dim if x.dim() > 2 else 0  # a 2-d input is (batch, features)
            n, m = x.shape[-1], output.shape[-1]
            xs = _batch_first(x.detach(), bd)
            mb = xs.shape[0]
            xs = xs.reshape(mb, -1, n)
            # the output, a view (batch first, no copy), only where W b is taken from it
            y = _batch_first(output.detach(), bd).reshape(mb, -1, m) if _wb_from_output(sink, xs.shape[1]) else None
            bias = mod.bias.detach() if mod.bias is not None else None
            # version checks on detached aliases (they share the version counter): a hook that held ``output``
            # itself would keep it, its graph and everything captured here alive (a cycle through autograd)
            x_alias, out_alias = x.detach(), (output.detach() if y is not None else None)  # an alias holds storage
            version, out_version = x._version, output._version

            def grad_hook(g):
                if not env.armed:
                    return None
                if x_alias._version != version:
                    raise RuntimeError(f"the input of layer '{sink.name}' was modified in place after its forward")
                with torch.no_grad():
                    delta = _batch_first(g, bd).reshape(mb, -1, m)
                    # an in-place op on the output (ReLU(inplace=True)) after the forward: W b from b instead
                    same = y is not None and out_alias._version == out_version
                    _linear_use(sink, xs, delta, (y, bias) if same else None, (0, m))
                return None

            output.register_hook(grad_hook)
            return None

        return [module.register_forward_hook(fwd, with_kwargs=True)]


def _check_forward(name, module, base):
    if type(module).forward is not base.forward:
        raise ValueError(
            f"layer '{name}' ({type(module).__name__}) overrides the forward of nn.{base.__name__}; the tracker "
            "cannot know how its weight is used"
        )


# ----------------------------------------------------------------------------------------------
# Convolutions (1d, 2d, 3d; grouped as the block-diagonal operator: the top group's block)
# ----------------------------------------------------------------------------------------------
@dataclass
class ConvGeom:
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pad: tuple[int, ...]  # F.pad order: last dim (left, right), then the one before, ...


def conv_geometry(name: str, mod: nn.modules.conv._ConvNd) -> ConvGeom:
    if mod.padding_mode != "zeros":
        raise ValueError(
            f"layer '{name}' uses padding_mode='{mod.padding_mode}'; the tracker supports zero padding only"
        )
    ks, dil = tuple(mod.kernel_size), tuple(mod.dilation)
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            pads = [(0, 0)] * len(ks)
        else:  # 'same' (stride 1): PyTorch puts the odd extra pixel at the end
            pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(ks, dil)]
    else:
        pads = [(p, p) for p in mod.padding]
    flat = tuple(v for pr in reversed(pads) for v in pr)
    return ConvGeom(ks, tuple(mod.stride), dil, flat)


def _conv_geometry(name, mod):  # the 2-d geometry used by conv_b_projection (kept name for callers)
    return conv_geometry(name, mod)


def conv_b_projection(
    x: torch.Tensor, du: torch.Tensor, geo: ConvGeom, cache: dict | None = None, method: str = "auto"
) -> torch.Tensor:
    """``b_i = G_i^T u1 = sum_p x_{i,p} du_{i,p}`` (M x C*kh*kw) for a Conv2d, from its input ``x``
    (M x C x H x W) and ``du`` (M x Ho x Wo, ``u1 . delta`` at every output position).

    It is the weight gradient of a one-output-channel convolution, per sample. Two exact routes:
    ``"grouped"``: every (sample, channel) pair is its own group, correlated with the sample's ``du`` as
    kernel, dilated by the stride (theory.md §2); cheap for few input channels. ``"scatter"``: scatter
    ``du`` into a (M, kh*kw, H*W) matrix D (entry (k, q) holds du at the output position that reads input
    pixel q through kernel tap k; taps landing in the zero padding are dropped), then one batched
    product ``D x_i^T``; no padded copy of x, and it wins once C >= kh*kw. ``"auto"`` picks by that rule.
    """
    mb, c, h, w = x.shape
    ho, wo = du.shape[1:]
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.stride, geo.dilation
    pl, pr, pt, pb = geo.pad
    if method == "auto":
        method = "scatter" if c >= kh * kw else "grouped"
    if method == "scatter":
        key = (h, w, ho, wo, du.device)
        if cache is None or key not in cache:
            ki, kj = (t.reshape(-1, 1) for t in torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij"))
            oh, ow = (t.reshape(1, -1) for t in torch.meshgrid(torch.arange(ho), torch.arange(wo), indexing="ij"))
            r, q = sh * oh + dh * ki - pt, sw * ow + dw * kj - pl  # input pixel read by tap k at output p
            valid = (r >= 0) & (r < h) & (q >= 0) & (q < w)
            tgt = (torch.arange(kh * kw).reshape(-1, 1) * (h * w) + r * w + q)[valid]
            src = torch.arange(ho * wo).expand(kh * kw, -1)[valid]
            entry = (tgt.to(du.device), src.to(du.device))
            if cache is not None:
                cache[key] = entry
        else:
            entry = cache[key]
        tgt, src = entry
        d = du.new_zeros(mb, kh * kw * h * w)
        d.index_copy_(1, tgt, du.reshape(mb, -1).index_select(1, src))
        out = torch.matmul(d.view(mb, kh * kw, h * w), x.reshape(mb, c, h * w).transpose(1, 2))  # (M, K, C)
        return out.transpose(1, 2).reshape(mb, c * kh * kw)
    kern = du.view(mb, 1, ho, wo).expand(mb, c, ho, wo).reshape(mb * c, 1, ho, wo)
    if pl == pr and pt == pb:  # symmetric: let the convolution pad (no copy), drop unreached offsets
        out = F.conv2d(x.reshape(1, mb * c, h, w), kern, dilation=(sh, sw), padding=(pt, pl), groups=mb * c)
        out = out[..., : dh * (kh - 1) + 1, : dw * (kw - 1) + 1]
    else:  # pad, and crop what the strided windows never reach, in one copy (negative pads crop)
        hneed, wneed = sh * (ho - 1) + dh * (kh - 1) + 1, sw * (wo - 1) + dw * (kw - 1) + 1
        xp = F.pad(x, (pl, pr - (w + pl + pr - wneed), pt, pb - (h + pt + pb - hneed)))
        out = F.conv2d(xp.view(1, mb * c, hneed, wneed), kern, dilation=(sh, sw), groups=mb * c)
    if dh > 1 or dw > 1:
        out = out[..., ::dh, ::dw]
    return out.reshape(mb, c * kh * kw)


def _patches(x: torch.Tensor, geo: ConvGeom) -> torch.Tensor:
    """Unfolded patches of an N-d input as a view of its padded copy: (s, C, *out, *kernel)."""
    xp = F.pad(x, geo.pad)
    nd = len(geo.kernel)
    for d, (k, s, dl) in enumerate(zip(geo.kernel, geo.stride, geo.dilation)):
        xp = xp.unfold(2 + d, dl * (k - 1) + 1, s)
    sl = (slice(None),) * (2 + nd) + tuple(slice(None, None, dl) for dl in geo.dilation)
    return xp[sl]


class ConvHandler:
    """Conv1d (as a Conv2d of height 1), Conv2d (the scatter/grouped routes), Conv3d (unfolded patches)."""

    def __init__(self, module_type, nd):
        self.module_type, self.nd = module_type, nd

    def weights(self, module):
        return ["weight"]

    def check(self, name, module):
        _check_forward(name, module, self.module_type)
        conv_geometry(name, module)

    def install(self, module, sinks, env):
        sink = sinks["weight"]
        geo = conv_geometry(sink.name, module)
        if self.nd == 1:  # a Conv2d of height 1: the fast 2-d routes, exactly
            geo = ConvGeom((1,) + geo.kernel, (1,) + geo.stride, (1,) + geo.dilation, geo.pad + (0, 0))
        nd = max(self.nd, 2)
        cache: dict = {}
        groups = module.groups

        def fwd(mod, args, kwargs, output):
            if not sink.capture(mod, output):
                return None
            x = args[0] if args else kwargs["input"]
            if x.dim() != self.nd + 2:
                raise ValueError(f"layer '{sink.name}' got input of shape {tuple(x.shape)}; the tracker needs a "
                                 f"batch N x C x ({self.nd} spatial dims)")
            version = x._version
            g0 = sink.group
            cin, cout = x.shape[1] // groups, output.shape[1] // groups
            xs = x.detach()[:, g0 * cin:(g0 + 1) * cin]
            y = output.detach()[:, g0 * cout:(g0 + 1) * cout]
            if self.nd == 1:
                xs, y = xs.unsqueeze(2), y.unsqueeze(2)
            mb = y.shape[0]
            # x_{i,p} . v1 = u1 . (W x_{i,p}) / s1, since v1 = W^T u1 / s1: from the layer's own output
            z = torch.matmul(sink.u1, y.reshape(mb, cout, -1))  # (M, P)
            if mod.bias is not None:
                z = z - sink.u1 @ mod.bias.detach()[g0 * cout:(g0 + 1) * cout]
            z = z / sink.s1.to(z.dtype)

            def grad_hook(g):
                if not env.armed:
                    return None
                if x._version != version:
                    raise RuntimeError(f"the input of layer '{sink.name}' was modified in place after its forward")
                with torch.no_grad():
                    gg = g[:, g0 * cout:(g0 + 1) * cout]
                    if self.nd == 1:
                        gg = gg.unsqueeze(2)
                    delta = gg.reshape(mb, cout, -1)  # (M, m, P)
                    a = torch.matmul(z.unsqueeze(1), delta.transpose(1, 2)).squeeze(1)
                    du = torch.matmul(sink.u1, delta)  # (M, P)
                    if nd == 2:
                        b = conv_b_projection(xs, du.view(mb, *gg.shape[2:]), geo, cache)
                    else:
                        pt = _patches(xs, geo)  # (M, C, *out, *k)
                        b = torch.einsum("mcpk,mp->mck", pt.reshape(mb, cin, du.shape[1], -1), du).reshape(mb, -1)

                    def per_sample(i, j):
                        if nd == 2:
                            cols = F.unfold(F.pad(xs[i:j], geo.pad), geo.kernel, dilation=geo.dilation,
                                            stride=geo.stride)  # (s, n, P)
                        else:
                            p = _patches(xs[i:j], geo)
                            npos = du.shape[1]
                            cols = p.reshape(j - i, cin, npos, -1).transpose(2, 3).reshape(j - i, -1, npos)
                        return torch.bmm(delta[i:j], cols.transpose(1, 2))  # (s, m, n)

                    n = sink.shape[1]
                    sink.add((0, cout), a, b, None, per_sample, n * du.shape[1] + cout * n)
                return None

            output.register_hook(grad_hook)
            return None

        return [module.register_forward_hook(fwd, with_kwargs=True)]


# ----------------------------------------------------------------------------------------------
# Embedding: G_i = sum_t e_{idx_t} delta_t^T, a scatter of the output gradients into rows
# ----------------------------------------------------------------------------------------------
class EmbeddingHandler:
    module_type = nn.Embedding

    def weights(self, module):
        return ["weight"]

    def check(self, name, module):
        _check_forward(name, module, nn.Embedding)
        bad = [k for k in ("max_norm", "scale_grad_by_freq", "sparse") if getattr(module, k)]
        if bad:
            raise ValueError(f"embedding '{name}' sets {', '.join(bad)}: the weight is renormalised in place, the "
                             "gradient couples the samples or is sparse; the tracker supports none of these")

    def install(self, module, sinks, env):
        sink = sinks["weight"]

        def fwd(mod, args, kwargs, output):
            if not sink.capture(mod, output):
                return None
            idx = args[0] if args else kwargs["input"]
            if idx.dim() < 1:
                raise ValueError(f"embedding '{sink.name}' got a 0-d index; the tracker needs a batch dimension")
            bd = env.batch_dim if idx.dim() > 1 else 0
            ids = _batch_first(idx, bd)
            mb = ids.shape[0]
            ids = ids.reshape(mb, -1)
            keep = None if mod.padding_idx is None else (ids != mod.padding_idx)
            e = output.shape[-1]

            def grad_hook(g):
                if not env.armed:
                    return None
                with torch.no_grad():
                    delta = _batch_first(g, bd).reshape(mb, -1, e)
                    if keep is not None:  # the padding row gets no gradient
                        delta = delta * keep.unsqueeze(-1).to(delta.dtype)
                    v = sink.shape[0]
                    a = delta.new_zeros(mb, v).scatter_add_(1, ids, delta @ sink.v1)
                    b = _weighted_sum(sink.u1[ids], delta)

                    def per_sample(i, j):
                        out = delta.new_zeros(j - i, v, e)
                        return out.scatter_add_(1, ids[i:j, :, None].expand(-1, -1, e), delta[i:j])

                    sink.add((0, v), a, b, None, per_sample, v * e)
                return None

            output.register_hook(grad_hook)
            return None

        return [module.register_forward_hook(fwd, with_kwargs=True)]


# ----------------------------------------------------------------------------------------------
# MultiheadAttention: PyTorch's own forward, run with a ``linear`` that reports the projections
# ----------------------------------------------------------------------------------------------
class _Proxy:
    """A stand-in for ``torch.nn.functional`` with some names replaced."""

    def __init__(self, base, **over):
        self._base, self._over = base, over

    def __getattr__(self, k):
        return self._over[k] if k in self._over else getattr(self._base, k)


def _rebind(fn, globs):
    out = types.FunctionType(fn.__code__, globs, fn.__name__, fn.__defaults__, fn.__closure__)
    out.__kwdefaults__ = fn.__kwdefaults__
    return out


def _mha_forward_with(linear):
    """``nn.MultiheadAttention.forward`` and ``F.multi_head_attention_forward`` (their very code) with the
    module-global ``linear`` of the in- and out-projections replaced: exact, and every projection is seen."""
    g = dict(F.__dict__)
    g["linear"] = linear
    g["_in_projection_packed"] = _rebind(F._in_projection_packed, g)
    g["_in_projection"] = _rebind(F._in_projection, g)
    mha = _rebind(F.multi_head_attention_forward, g)
    ga = dict(_activation.__dict__)
    ga["F"] = _Proxy(F, multi_head_attention_forward=mha)
    return _rebind(nn.MultiheadAttention.forward, ga)


class MultiheadAttentionHandler:
    """``in_proj_weight`` (3E x E, x -> [q; k; v]) or ``q/k/v_proj_weight``, and ``out_proj.weight``.

    Inside F.multi_head_attention_forward the inputs are sequence-first (L, N, E) (batch_first inputs are
    transposed before), and the out-projection input is (L*N, E) in the same order; so sample n is column
    n of the (-1, N, E) view. Self-attention projects with the full 3E x E matrix (one full-row use; W b
    from the output); cross-attention with row blocks of it (q: rows 0..E, k, v: the rest).
    """

    module_type = nn.MultiheadAttention

    def weights(self, module):
        w = ["in_proj_weight"] if module._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        return w + ["out_proj.weight"]

    def check(self, name, module):
        _check_forward(name, module, nn.MultiheadAttention)
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError(f"attention '{name}' uses add_bias_kv/add_zero_attn; the tracker does not support them")

    def install(self, module, sinks, env):
        by_id = {id(_weight_of(module, attr)): sinks[attr] for attr in sinks}
        state = {"bsz": None}

        def probe(x, w, b=None):
            out = F.linear(x, w, b)
            base = w if id(w) in by_id else getattr(w, "_base", None)
            sink = by_id.get(id(base)) if base is not None else None
            if sink is None or not sink.capture(module, out):
                return out
            r0 = (w.storage_offset() - base.storage_offset()) // base.stride(0)
            rows = (r0, r0 + w.shape[0])
            bsz = state["bsz"]
            n, r = x.shape[-1], out.shape[-1]
            xs = x.detach().reshape(-1, bsz, n).transpose(0, 1)  # (N, T, n)
            full = rows == (0, sink.shape[0]) and _wb_from_output(sink, xs.shape[1])
            y = out.detach().reshape(-1, bsz, r).transpose(0, 1) if full else None  # see _wb_from_output
            bias = b.detach() if b is not None else None
            x_alias, out_alias = x.detach(), (out.detach() if full else None)  # not x, out: see the Linear handler
            version, out_version = x._version, out._version

            def grad_hook(g):
                if not env.armed:
                    return None
                if x_alias._version != version:
                    raise RuntimeError(f"an input of '{sink.name}' was modified in place after its forward")
                with torch.no_grad():
                    keep = full and out_alias._version == out_version
                    _linear_use(sink, xs, g.reshape(-1, bsz, r).transpose(0, 1), (y, bias) if keep else None, rows)
                return None

            out.register_hook(grad_hook)
            return out

        tracked_forward = _mha_forward_with(probe)

        def forward(self, *args, **kwargs):
            q = args[0] if args else kwargs["query"]
            state["bsz"] = 1 if q.dim() == 2 else q.shape[0 if self.batch_first else 1]
            return tracked_forward(self, *args, **kwargs)

        # an instance attribute, removed by the handle; a bound method, so that a deepcopy of the model made
        # while tracking runs its own weights (the probe ignores weights that are not tracked)
        module.forward = types.MethodType(forward, module)

        class _Handle:
            def remove(self):
                module.__dict__.pop("forward", None)

        return [_Handle()]


def _weight_of(module, attr):
    for part in attr.split("."):
        module = getattr(module, part)
    return module


HANDLERS: dict[type, object] = {
    nn.Linear: LinearHandler(),
    nn.Conv1d: ConvHandler(nn.Conv1d, 1),
    nn.Conv2d: ConvHandler(nn.Conv2d, 2),
    nn.Conv3d: ConvHandler(nn.Conv3d, 3),
    nn.Embedding: EmbeddingHandler(),
    nn.MultiheadAttention: MultiheadAttentionHandler(),
}


def handler_for(module: nn.Module):
    """The handler of the nearest registered class in the module's MRO (a parametrised Linear is a Linear)."""
    for cls in type(module).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    return None


class Handler(Protocol):
    """What a layer handler provides (see the module docstring)."""

    module_type: type

    def weights(self, module: nn.Module) -> list[str]: ...

    def check(self, name: str, module: nn.Module) -> None: ...

    def install(self, module: nn.Module, sinks: dict, env) -> list: ...
