"""Every layer handler of the tracker against brute force (float64): per-sample gradients by
torch.func.vmap(grad), the explicit noise covariance and the autograd Hessian of sigma_1 (tests/test_dynamics.py)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parametrizations

from lipexp.dynamics import DynamicsTracker, KIntegrator, step_terms
from lipexp.layers import find_weights, preserved_buffers, top_singular_values
from tests.test_dynamics import assert_terms, brute, ce, rel

pytestmark = [pytest.mark.usefixtures("one_thread")]
TOL = 1e-8
KEYS = ("sigma1", "mu", "kappa", "lambda2", "kappa_var", "lambda2_var")


def per_sample(model, x, y, loss=ce):
    model = copy.deepcopy(model)  # functional_call on a module used twice does not restore its weight
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss1(p, xi, yi):
        return loss(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    return vmap(grad(loss1), in_dims=(None, 0, 0))(params, x, y)


def check(model, x, y, lr=0.05, blocks=None, loss=ce, **kw):
    """step_terms of every weight against brute force; ``blocks`` maps a grouped weight to its group size."""
    grads = per_sample(model, x, y, loss)
    got = step_terms(model, loss, x, y, lr, split=True, **kw)
    params = dict(model.named_parameters())
    assert set(got) == {r.name for r in find_weights(model)[0]}
    for name, t in got.items():
        w, g = params[name].detach(), grads[name]
        w2, g2 = w.reshape(w.shape[0], -1), g.reshape(g.shape[0], w.shape[0], -1)
        groups = (blocks or {}).get(name, 1)
        if groups > 1:  # the block-diagonal operator: terms of the group with the largest sigma1
            mg = w.shape[0] // groups
            top = max(range(groups), key=lambda k: float(torch.linalg.svdvals(w2[k * mg:(k + 1) * mg])[0]))
            w2, g2 = w2[top * mg:(top + 1) * mg], g2[:, top * mg:(top + 1) * mg]
        assert_terms(t, brute(w2, g2, lr), KEYS, tol=TOL, label=name)
    return got


def data(shape, m=6, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, *shape, generator=g, dtype=dtype), torch.randint(0, classes, (m,), generator=g)


def test_conv1d_and_conv3d_against_brute_force():
    torch.manual_seed(0)
    net1 = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Conv1d(3, 4, 2, padding="same"),
                         nn.Tanh(), nn.Conv1d(4, 2, 3, dilation=2, padding=2), nn.Flatten(), nn.Linear(2 * 5, 3))
    check(net1.double(), *data((2, 9)))
    net3 = nn.Sequential(nn.Conv3d(2, 3, 3, stride=(2, 1, 2), padding=1), nn.Tanh(),
                         nn.Conv3d(3, 2, (2, 3, 1), padding="same", dilation=(1, 2, 1)), nn.Flatten(),
                         nn.Linear(2 * 3 * 4 * 3, 3))
    check(net3.double(), *data((2, 5, 4, 5)))


def test_grouped_and_depthwise_conv_are_the_block_diagonal_operator():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Tanh(),
                        nn.Conv2d(6, 6, 3, stride=2, groups=6), nn.Tanh(),  # depthwise
                        nn.Flatten(), nn.Linear(6 * 2 * 2, 3)).double()
    check(net, *data((4, 6, 6)), blocks={"0.weight": 2, "2.weight": 6})
    sig = top_singular_values(net)
    blocks = net[0].weight.detach().reshape(2, 3, -1)
    assert rel(sig["0.weight"], float(torch.linalg.svdvals(blocks).max())) <= 1e-13


def test_linear_on_sequence_first_batches_and_embedding():
    class Tok(nn.Module):
        def __init__(self, tie=False):
            super().__init__()
            self.emb = nn.Embedding(7, 5, padding_idx=0)
            self.mid = nn.Linear(5, 5)
            self.head = nn.Linear(5, 7, bias=False)
            if tie:  # a tied output layer: the per-sample gradient sums both uses
                self.head.weight = self.emb.weight

        def forward(self, ids):  # (M, T) ids
            h = torch.tanh(self.mid(self.emb(ids)))
            return self.head(h).mean(1)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 7, (6, 4), generator=g)
    ids[0, :2] = 0  # padding tokens: their row gets no gradient
    y = torch.randint(0, 7, (6,), generator=g)
    for tie in (False, True):
        torch.manual_seed(0)
        model = Tok(tie).double()
        got = check(model, ids, y)
        assert ("head.weight" in got) != tie

    class SeqFirst(nn.Module):  # (T, M, n) inputs: batch_dim=1
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x.transpose(0, 1))).mean(0))

    torch.manual_seed(0)
    net = SeqFirst().double()
    x, y = data((5, 4))
    grads = per_sample(net, x, y)
    # the model's own input is batch first here; inside, the Linear layers see (T, M, n)
    got = step_terms(net, ce, x, y, 0.05, split=True, batch_dim=1)
    for name in got:
        w = dict(net.named_parameters())[name]
        assert_terms(got[name], brute(w, grads[name], 0.05), KEYS, tol=TOL, label=name)


@pytest.mark.parametrize("positions", [2, 4])
def test_wide_linear_on_sequences_both_routes_to_w_b(positions, monkeypatch):
    # W b_i of a wide weight comes from the layer's output when the sequence is short next to the input
    # (T = 2: 16 T <= n = 40) and from the product with W in end() otherwise (T = 4): both exact
    import lipexp.handlers as handlers

    seen = []
    orig = handlers._linear_use

    def spy(sink, x, delta, out, rows):
        orig(sink, x, delta, out, rows)
        seen.append((sink.name, sink.wb is not None))

    monkeypatch.setattr(handlers, "_linear_use", spy)

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.wide, self.head = nn.Linear(40, 5), nn.Linear(5, 3)

        def forward(self, x):  # (M, T, 40)
            return self.head(torch.tanh(self.wide(x)).mean(1))

    torch.manual_seed(0)
    x, y = data((positions, 40))
    check(Seq().double(), x, y)
    assert dict(seen)["wide.weight"] == (positions == 2)  # the route its size calls for


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_self_and_cross_against_brute_force(batch_first):
    class Attn(nn.Module):
        def __init__(self, cross, kdim=None):
            super().__init__()
            self.cross = cross
            self.mha = nn.MultiheadAttention(4, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
            self.kv = nn.Linear(4, kdim or 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x):  # x (M, T, 4)
            x = x if batch_first else x.transpose(0, 1)
            kv = torch.tanh(self.kv(x)) if self.cross else x
            q = x
            h = self.mha(q, kv, kv, need_weights=self.cross)[0]
            h = h if batch_first else h.transpose(0, 1)
            return self.out(h.mean(1))

    for cross, kdim in ((False, None), (True, None), (True, 3)):
        torch.manual_seed(0)
        model = Attn(cross, kdim).double()
        x, y = data((5, 4))
        got = check(model, x, y, batch_dim=0 if batch_first else 1)
        expect = {"mha.in_proj_weight"} if kdim is None else {"mha.q_proj_weight", "mha.k_proj_weight",
                                                              "mha.v_proj_weight"}
        assert expect | {"mha.out_proj.weight"} <= set(got)


def test_reused_module_sums_uses():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(4, 3)).double()
    check(model, *data((3,)))


def _effective_copy(model):
    """A plain copy with the effective weights as parameters (those of the tracked step's forward)."""
    out = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        for k in (0, 2, 4):
            with preserved_buffers(model[k]):
                out[k].weight.copy_(model[k].weight)
            out[k].bias.copy_(model[k].bias)
    return out


def test_parametrised_weights_track_the_effective_weight():
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.spectral_norm(nn.Linear(5, 6)), nn.Tanh(),
                          parametrizations.weight_norm(nn.Linear(6, 4)), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = data((5,))
    sn = model[0].parametrizations.weight
    state = [b.clone() for b in sn.buffers()]
    ref_model = _effective_copy(model)
    w_sn = ref_model[0].weight.detach()
    with preserved_buffers(model[0]), torch.no_grad():  # u, v after the forward's power iteration
        model[0].weight
        u, v = sn[0]._u.clone(), sn[0]._v.clone()
    grads = per_sample(ref_model, x, y)
    lr = 0.05
    got = step_terms(model, ce, x, y, lr, split=True)
    assert set(got) == {"0.weight", "2.weight", "4.weight"}
    assert all(torch.equal(b, s) for b, s in zip(sn.buffers(), state)), "step_terms must not move spectral_norm's u, v"
    # the first-order change of the effective weight under dV = -lr * grad of the raw parameters
    orig = sn.original
    sigma = float(u @ orig.detach() @ v)
    dv = -lr * orig.grad
    dw_sn = dv / sigma - orig.detach() * float(u @ dv @ v) / sigma**2
    wn = model[2].parametrizations.weight
    g0, v0 = wn.original0.detach(), wn.original1.detach()
    dg, dv2 = -lr * wn.original0.grad, -lr * wn.original1.grad
    nv = v0.norm(dim=1, keepdim=True)
    dw_wn = dg * v0 / nv + g0 * (dv2 / nv - v0 * (v0 * dv2).sum(1, keepdim=True) / nv**3)
    for name, w, dw in (("0.weight", w_sn, dw_sn), ("2.weight", ref_model[2].weight, dw_wn),
                        ("4.weight", ref_model[4].weight, None)):
        ref = brute(w, grads[name], lr, dw=dw)
        if name == "0.weight":  # s1(V / sigma(V)) ~ 1 whatever V: mu cancels to ~1e-10, compare on its scale
            scale = float(dw.norm()) / (ref["sigma1"] * lr)
            assert abs(got[name]["mu"] - ref["mu"]) <= TOL * scale and abs(ref["mu"]) < 1e-6 * scale
            assert_terms(got[name], ref, [k for k in KEYS if k != "mu"], tol=TOL, label=name)
        else:
            assert_terms(got[name], ref, KEYS, tol=TOL, label=name)


def test_step_terms_keeps_batchnorm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    model = model.double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step_terms(model, ce, *data((2, 6, 6)), 0.05)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_one_sample_batch_skips_noise_terms_and_takes_the_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).double()
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = DynamicsTracker(model, lr, optimizer=opt, split=True)
    integ = KIntegrator(lr)
    rows = []
    for m in (4, 1, 4):
        x, y = data((2, 6, 6), m=m, seed=m)
        w0 = model[0].weight.detach().clone()
        tracker.begin()
        opt.zero_grad()
        ce(model(x), y).mean().backward()
        opt.step()
        terms = tracker.end()
        assert not torch.equal(w0, model[0].weight)  # the step was taken
        rows.append(integ.update(terms))
        for t in terms.values():
            # the drift terms come from the applied update and stand; the noise terms need 2 samples
            assert math.isfinite(t["sigma1"]) and math.isfinite(t["mu"]) and math.isfinite(t["mu2"])
            assert all(math.isnan(t[k]) for k in t if k not in ("sigma1", "mu", "mu2")) == (m == 1)
    tracker.close()
    assert all(math.isfinite(r["K_pred"]) for r in rows) and math.isfinite(integ.prediction()["K_pred"])
    assert rows[1]["kappa_Z"] == 0.0 and rows[1]["mu_Z"] != 0.0


@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                                  lambda p: torch.optim.Adam(p, lr=0.05)])
def test_non_sgd_updates_are_refused_without_the_optimizer(make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = make(model.parameters())
    tracker = DynamicsTracker(model, 0.05)  # the optimiser is not passed
    with pytest.raises(ValueError, match="not -lr \\* grad"):
        for step in range(3):  # momentum equals SGD on its first step; Adam differs at once
            x, y = data((4,), seed=step)
            tracker.begin()
            opt.zero_grad()
            ce(model(x), y).mean().backward()
            opt.step()
            tracker.end()
    tracker.close()
    tracker = DynamicsTracker(model, 0.05, check_update=False)  # deliberately off: the drift is still exact
    x, y = data((4,), seed=9)
    before = model[0].weight.detach().clone()
    tracker.begin()
    opt.zero_grad()
    ce(model(x), y).mean().backward()
    opt.step()
    terms = tracker.end()
    tracker.close()
    svd = torch.linalg.svd(before)
    dw = model[0].weight.detach() - before
    assert rel(terms["0.weight"]["mu"], float(svd.U[:, 0] @ dw @ svd.Vh[0]) / (float(svd.S[0]) * 0.05)) <= 1e-10


def test_sgd_with_weight_decay_float32_passes_the_update_check():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, weight_decay=5e-4)
    tracker = DynamicsTracker(model, 1e-3)
    for step in range(3):
        x, y = data((2, 6, 6), m=8, seed=step, dtype=torch.float32)
        tracker.begin()
        opt.zero_grad()
        ce(model(x), y).mean().backward()
        opt.step()
        opt.zero_grad()  # .grad dropped before end(): the check uses the gradient the backward produced
        tracker.end()
    tracker.close()


def test_skipped_parameters_are_listed():
    class ViTish(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
            self.norm = nn.LayerNorm(4)
            self.enc = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x):  # (M, 2, 4)
            t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
            return self.head(self.norm(self.enc(t))[:, 0])

    torch.manual_seed(0)
    model = ViTish().double()
    refs, skipped = find_weights(model)
    names = [r.name for r in refs]
    assert names == ["enc.self_attn.in_proj_weight", "enc.self_attn.out_proj.weight", "enc.linear1.weight",
                     "enc.linear2.weight", "head.weight"]
    assert {"cls_token", "pos_embed", "norm.weight", "enc.norm1.weight"} <= {n for n, _ in skipped}
    check(model, *data((2, 4)))


def test_deepcopy_while_tracking_runs_its_own_attention_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    tracker = DynamicsTracker(model, 0.1)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].self_attn.in_proj_weight.mul_(2.0)
        ref = nn.Sequential(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)).double()
        ref.load_state_dict(twin.state_dict())
    assert torch.allclose(twin(x), ref(x), atol=1e-12)
    tracker.close()
    assert "forward" not in model[0].self_attn.__dict__


@pytest.mark.parametrize("kind", ["mlp", "conv_attention_embedding"])
def test_tracked_steps_keep_no_tensor_alive(kind):
    """The hooks' closures must not hold a layer's output: that was a cycle through autograd which kept every
    step's activations (1.4 MB a step for the MLP of Table 4.2: 11 GB in a quick sweep, far more in a long run)."""
    import gc

    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
        x, y = torch.randn(6, 1, 12), torch.randint(0, 3, (6,))
    else:
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb, self.conv = nn.Embedding(9, 8), nn.Conv1d(8, 8, 3, padding=1)
                self.att, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

            def forward(self, ids):
                h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
                return self.head(self.att(h, h, h, need_weights=False)[0].mean(1))

        model = Net()
        x, y = torch.randint(0, 9, (6, 5)), torch.randint(0, 3, (6,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    tracker = DynamicsTracker(model, 1e-2, optimizer=opt)

    def step():
        tracker.begin()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y, reduction="none").mean().backward()
        opt.step()
        tracker.end()

    def live():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    for _ in range(2):
        step()
    before = live()
    for _ in range(4):
        step()
    assert live() == before
    tracker.close()


@pytest.mark.parametrize("positions", [1, 5])
def test_position_contractions_match_einsum_in_every_memory_layout(positions):
    """The hooks' x . v1 and sum_t w_t t_t (handlers._dot_last, _weighted_sum) take each tensor in its own
    memory order: batch-major, position-major (attention's), or neither; all must give the einsum's values."""
    from lipexp.handlers import _dot_last, _weighted_sum

    g = torch.Generator().manual_seed(3)
    m, c = 4, 6
    base = torch.randn(m, positions, c, generator=g, dtype=torch.float64)
    layouts = {
        "batch-major": base,
        "position-major": base.transpose(0, 1).contiguous().transpose(0, 1),
        "strided": torch.randn(m, positions, 2 * c, generator=g, dtype=torch.float64)[..., ::2],
    }
    v = torch.randn(c, generator=g, dtype=torch.float64)
    w = torch.randn(m, positions, generator=g, dtype=torch.float64)
    for name, t in layouts.items():
        assert torch.allclose(_dot_last(t, v), torch.einsum("mtc,c->mt", t, v), rtol=0, atol=1e-12), name
        assert torch.allclose(_weighted_sum(w, t), torch.einsum("mt,mtc->mc", w, t), rtol=0, atol=1e-12), name
    if positions > 1:
        assert layouts["position-major"].transpose(0, 1).is_contiguous() and not layouts["position-major"].is_contiguous()
