"""Table 2.1: closed-form Lipschitz constants of activations against autograd suprema."""
import math

import pytest
import torch
from torch import nn

from lipexp.activations import (
    closed_form,
    gelu_lipschitz,
    numerical_softmax_lipschitz,
    numerical_sup_derivative,
    softmax_jacobian_norm,
    swish_lipschitz,
    table2_1,
)


pytestmark = pytest.mark.usefixtures("one_thread")


# Scalar activations: grid + ascent reaches the sup to rounding (measured <= 3e-15). Softmax: the sup is
# only approached as the other logits go to -inf; 500 Adam steps get within 6e-8 for d = 10.
TOL_SCALAR = 1e-9
TOL_SOFTMAX = 1e-6


def test_table_rows_agree():
    rows = table2_1()
    names = [r["name"] for r in rows]
    assert names[0] == "ReLU" and names[-1] == "Softmax(d=10)" and "GELU" in names
    for r in rows:
        assert set(r) == {"name", "closed_form", "numerical", "abs_err"}
        tol = TOL_SOFTMAX if r["name"].startswith("Softmax") else TOL_SCALAR
        assert r["abs_err"] < tol, r
    ref = {r["name"]: r["closed_form"] for r in rows}
    assert ref["Sigmoid"] == 0.25 and ref["Softmax(d=10)"] == 0.5
    assert ref["LeakyReLU(a=2)"] == 2.0 and ref["ELU(a=2)"] == 2.0 and ref["ELU(a=1)"] == 1.0


def test_swish_and_gelu_values():
    assert abs(swish_lipschitz() - 1.0998393) < 1e-7
    assert abs(gelu_lipschitz() - 1.1289041) < 1e-7
    # independent check of the closed forms by a dense grid of the analytic derivatives
    x = torch.linspace(-10, 10, 2_000_001, dtype=torch.float64)
    s = torch.sigmoid(x)
    assert abs(float((s + x * s * (1 - s)).max()) - swish_lipschitz()) < 1e-10  # grid step 1e-5: O(h^2) short
    pdf = torch.exp(-x**2 / 2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert abs(float((cdf + x * pdf).max()) - gelu_lipschitz()) < 1e-10


def test_numerical_detects_a_wrong_constant():
    # the numerical supremum is not just echoing 1: Sigmoid and a steep Softplus
    assert abs(numerical_sup_derivative(torch.sigmoid) - 0.25) < 1e-12
    assert abs(numerical_sup_derivative(lambda x: 3.0 * torch.tanh(x)) - 3.0) < 1e-12
    assert abs(numerical_sup_derivative(nn.Softplus(beta=5.0)) - closed_form(nn.Softplus(beta=5.0))) < 1e-9


def test_softmax_jacobian_norm_matches_explicit_formula():
    z = torch.randn(7, 5, dtype=torch.float64)
    p = torch.softmax(z, -1)
    J = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
    assert torch.allclose(softmax_jacobian_norm(z), torch.linalg.matrix_norm(J, ord=2), atol=1e-15)
    assert 0.5 - 1e-7 < numerical_softmax_lipschitz(dim=2, steps=100) <= 0.5 + 1e-15  # attained at z1 = z2
    assert (softmax_jacobian_norm(torch.randn(1000, 6, dtype=torch.float64)) <= 0.5 + 1e-15).all()


def test_closed_form_errors():
    with pytest.raises(ValueError, match="no closed-form"):
        closed_form(nn.LogSoftmax(dim=1))
    with pytest.raises(ValueError, match="approximate"):
        closed_form(nn.GELU(approximate="tanh"))
