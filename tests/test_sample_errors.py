"""The error pass as an op of its own (``rpo_fast.sample_errors``: per-sample m, r, delta with autograd) on every
backend, against a float64 reference from loops (``helpers.ref_errors``): fresh random inputs, R = 1, 5 and 7 rows
of N = 4*5*7 = 140 elements (no block's multiple), fp32 / bf16 / fp16, contiguous, channels_last, strided and
transposed layouts, with and without a reference, forward and backward (random upstream gradients on m and delta).

Tolerances: m, r, delta within 2e-6 absolute of float64 (fp32 accumulation of about 1-sized terms); the gradient
is ``helpers.GRAD_TOL``'s row for the dtype (the gradient is rounded to the input's dtype).
"""

import pytest
import torch
from helpers import DTYPES, GRAD_TOL, assert_close, layouts, make_pairs, ref_errors

from rpo_fast import objectives as O
from rpo_fast.loss import sample_errors

BACKENDS = ("eager", "triton", "native")


def _ref_grad(p, t, q, g_m, g_d):
    """d(sum g_m m + g_d delta)/dp in float64 from the formula's own code: 2/N (g_m + g_d)(p - t)."""
    p64 = p.detach().double().requires_grad_(True)
    e = O.per_sample_errors(p64, t.double(), None if q is None else q.double())
    total = (e.m * g_m.double()).sum() + (0 if q is None else (e.delta * g_d.double()).sum())
    total.backward()
    return p64.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,with_ref", [(1, True), (5, False), (7, True)], ids=["R1", "R5-noref", "R7"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_errors_match_float64(backend, rows, with_ref, dtype):
    p, t, q = make_pairs(rows, dtype=dtype, seed=70 + rows)
    p, t, q = p[:rows], t[:rows], q[:rows] if with_ref else None
    g = torch.Generator().manual_seed(rows)
    g_m, g_d = torch.randn(rows, generator=g), torch.randn(rows, generator=g)
    want_m, want_r = ref_errors(p, t, q)
    want_grad = _ref_grad(p, t, q, g_m, g_d)
    for name, p_, t_, q_ in [("contiguous", p, t, q), *layouts(p, t, q if with_ref else t)]:
        q_ = q_ if with_ref else None
        leaf = p_.detach().clone().requires_grad_(True)
        err = sample_errors(leaf, t_, q_, backend=backend)
        assert err.m.shape == (rows,) and err.m.dtype == torch.float32, name
        assert_close(f"m {name}", err.m, want_m, atol=2e-6, rtol=0)
        if with_ref:
            assert_close(f"r {name}", err.r, want_r, atol=2e-6, rtol=0)
            assert_close(f"delta {name}", err.delta, want_m - want_r, atol=2e-6, rtol=0)
            total = (err.m * g_m).sum() + (err.delta * g_d).sum()
        else:
            assert err.r is None and err.delta is None
            total = (err.m * g_m).sum()
        total.backward()
        assert leaf.grad.dtype == dtype and leaf.grad.shape == p.shape, name
        atol, rtol = GRAD_TOL[dtype]
        assert_close(f"grad {name}", leaf.grad, want_grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_r_has_no_gradient_and_delta_is_one_expression(backend):
    """r carries no gradient to p (only m and delta do); delta keeps the digits that m - r in fp32 loses."""
    p, t, _ = make_pairs(2, seed=3)
    q = p + 1e-4 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9))  # delta ~ 1e-4, m ~ 2
    leaf = p.clone().requires_grad_(True)
    err = sample_errors(leaf, t, q, backend=backend)
    if err.r.requires_grad:  # the custom ops' outputs all require grad; r's backward adds nothing
        err.r.sum().backward(retain_graph=True)
    assert leaf.grad is None or leaf.grad.abs().max() == 0
    want_m, want_r = ref_errors(p, t, q)
    rel = ((err.delta.double() - (want_m - want_r)).abs() / (want_m - want_r).abs()).max()
    assert rel < 1e-3, rel  # m - r of two fp32 means near 2 would be off by about 1e-7 / 1e-4 = 1e-3 or more


def test_sample_errors_refuses_bad_input():
    p, t, q = make_pairs(2, seed=1)
    with pytest.raises(ValueError, match="target shape"):
        sample_errors(p, t[:1], q)
    with pytest.raises(ValueError, match="floating-point"):
        sample_errors(p, t.long(), q)
    with pytest.raises(ValueError, match="backend must be one of"):
        sample_errors(p, t, q, backend="cuda")


@pytest.mark.parametrize("backend", ("triton", "native"))
def test_sample_errors_op_passes_opcheck(backend):
    from rpo_fast.kernels import native, preference_loss

    op = {"triton": preference_loss.sample_errors_op, "native": native.sample_errors_native_op}[backend]
    p, t, q = make_pairs(2, 2, 3, 3, seed=5)
    torch.library.opcheck(op, (p.requires_grad_(True), t, q))
