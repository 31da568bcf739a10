"""The eager objectives against the independent float64 computation of ``helpers``, the limits the spec
states, metrics, and input validation."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BETA,
    CASE_IDS,
    CASES,
    DTYPES,
    GRAD_TOL,
    LOSS_TOL,
    assert_close,
    call_case,
    make_embeds,
    make_pairs,
    ref_errors,
    ref_loss_and_grad,
)

from rpo_fast import PreferenceLoss, per_sample_errors
from rpo_fast.objectives import discount_weights, discounted_timestep_probs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("objective,opts,needs", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("b,shared", [(1, False), (3, True), (7, False)], ids=["B1", "B3-shared", "B7"])
def test_value_and_gradient_match_float64(objective, opts, needs, b, shared, dtype):
    p, t, q = make_pairs(b, dtype=dtype, shared_target=shared, seed=b)
    loss_fn, kw, ref_kw, p, t, q = call_case(objective, opts, needs, b, p, t, q, seed=b)
    full = loss_fn.options
    p = p.clone().requires_grad_(True)
    out = loss_fn(p, t, q, **kw)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    grad_out = torch.tensor(1.7)  # "not last": the upstream gradient is not 1
    (out.loss * grad_out).backward()
    assert p.grad.dtype == dtype and p.grad.shape == p.shape
    ref, ref_grad = ref_loss_and_grad(objective, p, t, q, **ref_kw, **full)
    assert_close("loss", out.loss, ref, atol=LOSS_TOL[dtype][0], rtol=LOSS_TOL[dtype][1])
    assert_close("grad", p.grad, grad_out * ref_grad, atol=GRAD_TOL[dtype][0], rtol=GRAD_TOL[dtype][1])


@pytest.mark.parametrize("objective,opts,needs", CASES, ids=CASE_IDS)
def test_gradcheck_float64(objective, opts, needs):
    b = 3
    p, t, q = make_pairs(b, 2, 3, 3, dtype=torch.float64, seed=11)
    loss_fn, kw, _, p, t, q = call_case(objective, opts, needs, b, p, t, q, seed=11)
    kw = {k: v.double() if v.is_floating_point() else v for k, v in kw.items()}
    p = p.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, t, q, **kw).loss, (p,), eps=1e-6, atol=1e-6)


def test_gradients_reach_model_pred_only():
    p, t, q = make_pairs(2)
    for x in (p, t, q):
        x.requires_grad_(True)
    ew, el = make_embeds(2)
    ew.requires_grad_(True)
    for objective, kw in (("dpo", {}), ("rpo", dict(embeds_w=ew, embeds_l=el)), ("dspo", {})):
        out = PreferenceLoss(objective, backend="eager", beta=BETA)(p, t, q, **kw)
        out.loss.backward()
        assert p.grad is not None and p.grad.abs().sum() > 0
        assert t.grad is None and q.grad is None and ew.grad is None, objective


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [False, True])
def test_per_sample_errors_match_float64(dtype, shared):
    p, t, q = make_pairs(3, dtype=dtype, shared_target=shared, seed=5)
    err = per_sample_errors(p, t, q)
    m, r = ref_errors(p, t, q)
    for name, x in zip(("m", "r", "delta"), err):
        assert x.dtype == torch.float32 and x.shape == (6,), name
    assert_close("m", err.m, m, atol=1e-7, rtol=1e-5)
    assert_close("r", err.r, r, atol=1e-7, rtol=1e-5)
    assert_close("delta", err.delta, m - r, atol=1e-6, rtol=1e-4)
    assert per_sample_errors(p, t).r is None


def test_delta_keeps_digits_that_m_minus_r_loses():
    # policy and reference 1e-4 apart: m - r in fp32 cancels; delta from one expression does not.
    g = torch.Generator().manual_seed(0)
    p = torch.randn(2, 4, 64, 64, generator=g) * 3
    t = torch.randn(2, 4, 64, 64, generator=g)
    q = p + 1e-4 * torch.randn(2, 4, 64, 64, generator=g)
    err = per_sample_errors(p, t, q)
    m, r = ref_errors(p, t, q)
    exact = m - r
    naive = (err.m - err.r).double()
    assert (err.delta.double() - exact).abs().max() < 0.05 * (naive - exact).abs().max()


# --------------------------------------------------------------------------------------------------
# Limits stated by the spec
# --------------------------------------------------------------------------------------------------


def _grad(loss_fn, p, t, q, **kw):
    p = p.clone().requires_grad_(True)
    out = loss_fn(p, t, q, **kw)
    out.loss.backward()
    return out, p.grad


@pytest.mark.parametrize("b", [2, 5])
def test_rpo_small_tau_tends_to_dpo(b):
    p, t, q = make_pairs(b, seed=3)
    e = torch.randn(b, 16)  # embeds_w == embeds_l, distinct rows: each row's nearest loser is its own
    dpo_out, dpo_g = _grad(PreferenceLoss("dpo", backend="eager", beta=BETA), p, t, q)
    common = dict(beta=BETA, tau=1e-3, scope="local")
    ins, ins_g = _grad(
        PreferenceLoss("rpo", backend="eager", weighting="inside", **common), p, t, q, embeds_w=e, embeds_l=e
    )
    out, out_g = _grad(
        PreferenceLoss("rpo", backend="eager", weighting="outside", **common), p, t, q, embeds_w=e, embeds_l=e
    )
    assert_close("inside grad", ins_g, dpo_g / b, atol=1e-6, rtol=1e-4)
    assert_close("outside grad", out_g, dpo_g, atol=1e-6, rtol=1e-4)
    const = (b - 1) / b * math.log(2)
    assert_close("inside loss", ins.loss, dpo_out.loss / b + const, atol=1e-7, rtol=1e-5)
    assert_close("outside loss", out.loss, dpo_out.loss, atol=1e-7, rtol=1e-5)
    assert ins.metrics["weight_diag"] > 0.999


@pytest.mark.parametrize("weighting", ["inside", "outside"])
def test_rpo_with_one_pair_equals_dpo(weighting):
    p, t, q = make_pairs(1, seed=8)
    ew, el = make_embeds(1)
    dpo_out, dpo_g = _grad(PreferenceLoss("dpo", backend="eager", beta=BETA), p, t, q)
    rpo_out, rpo_g = _grad(
        PreferenceLoss("rpo", backend="eager", beta=BETA, weighting=weighting), p, t, q, embeds_w=ew, embeds_l=el
    )
    assert_close("loss", rpo_out.loss, dpo_out.loss, atol=0, rtol=1e-6)
    assert_close("grad", rpo_g, dpo_g, atol=0, rtol=1e-5)
    for k, v in dpo_out.metrics.items():
        assert_close(k, rpo_out.metrics[k], v, atol=0, rtol=1e-6)


def test_dense_dpo_with_gamma_one_equals_dpo():
    p, t, q = make_pairs(4, seed=9)
    ts = torch.randint(0, 1000, (4,))
    dpo_out, dpo_g = _grad(PreferenceLoss("dpo", backend="eager", beta=BETA), p, t, q)
    dense_out, dense_g = _grad(
        PreferenceLoss("dense-dpo", backend="eager", beta=BETA, gamma=1.0), p, t, q, timesteps=ts
    )
    assert_close("loss", dense_out.loss, dpo_out.loss, atol=0, rtol=1e-6)
    assert_close("grad", dense_g, dpo_g, atol=0, rtol=1e-6)


def test_cal_dpo_with_lam_zero_equals_dpo():
    p, t, q = make_pairs(4, seed=10)
    w = torch.rand(4) + 0.5
    dpo_out, dpo_g = _grad(PreferenceLoss("dpo", backend="eager", beta=BETA), p, t, q, weights=w)
    cal_out, cal_g = _grad(PreferenceLoss("cal-dpo", backend="eager", beta=BETA, lam_cal=0.0), p, t, q, weights=w)
    assert_close("loss", cal_out.loss, dpo_out.loss, atol=0, rtol=1e-6)
    assert_close("grad", cal_g, dpo_g, atol=0, rtol=1e-6)


@pytest.mark.parametrize("side", [-1, 1])
def test_dspo_sdxl_form_switches_at_0_1(side):
    b = 3
    p, t, _ = make_pairs(b, seed=12)
    z = torch.randint(0, 2, p.shape, generator=torch.Generator().manual_seed(1)).float() * 2 - 1
    c = math.sqrt(0.1 * (1 + side * 1e-3))
    q = p - c * z  # d = p - q = c * z exactly, so mean_N d^2 = c^2 = 0.1 * (1 +- 1e-3) for every winner
    fn = PreferenceLoss("dspo", backend="eager", form="sdxl", beta=BETA)
    out = fn(p, t, q)
    err = per_sample_errors(p, t, q)
    u = -fn.options["lam_in"] * (err.delta[:b] - err.delta[b:])
    s2 = torch.sigmoid(-u).square()
    dd = (p - q)[:b].double().square().flatten(1).mean(1)
    expected = (s2 * dd).mean() if side > 0 else s2.mean()
    assert_close("dspo sdxl", out.loss, expected, atol=0, rtol=1e-5)
    other = s2.mean() if side > 0 else (s2 * dd).mean()
    assert (out.loss.double() - other).abs() > 1e-3 * other


def test_discount_weights_and_sampler():
    ts = torch.tensor([999, 980, 979, 500, 0])
    k = torch.tensor([0, 0, 1, 24, 49])  # ((999 - t) * 50) // 1000
    assert torch.equal(discount_weights(ts, gamma=0.9), (0.9 ** k.double()).float())
    probs = discounted_timestep_probs(gamma=0.9)
    assert probs.shape == (1000,) and abs(probs.sum().item() - 1) < 1e-12
    assert probs[999] > probs[500] > probs[0]


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

PAIR_KEYS = {
    "loss",
    "implicit_acc",
    "reward_margin",
    "reward_w",
    "reward_l",
    "mse_w",
    "mse_l",
    "ref_mse_w",
    "ref_mse_l",
}


@pytest.mark.parametrize("objective,opts,needs", CASES, ids=CASE_IDS)
def test_metric_names_and_values(objective, opts, needs):
    b = 4
    p, t, q = make_pairs(b, seed=13)
    loss_fn, kw, _, p, t, q = call_case(objective, opts, needs, b, p, t, q)
    out = loss_fn(p, t, q, **kw)
    expected_keys = (
        {"loss", "mse_w"} if objective == "sft" else PAIR_KEYS | ({"weight_diag"} if objective == "rpo" else set())
    )
    assert set(out.metrics) == expected_keys
    for k, v in out.metrics.items():
        assert v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad, k
    assert_close("loss metric", out.metrics["loss"], out.loss, atol=0, rtol=0)
    m, r = ref_errors(p, t, q)
    assert_close("mse_w", out.metrics["mse_w"], m[:b].mean(), atol=0, rtol=1e-5)
    if objective == "sft":
        return
    assert_close("mse_l", out.metrics["mse_l"], m[b:].mean(), atol=0, rtol=1e-5)
    assert_close("ref_mse_w", out.metrics["ref_mse_w"], r[:b].mean(), atol=0, rtol=1e-5)
    assert_close("ref_mse_l", out.metrics["ref_mse_l"], r[b:].mean(), atol=0, rtol=1e-5)
    if objective in ("dpo", "rpo", "cal-dpo") and "weights" not in needs:
        beta = loss_fn.options["beta"]
        d = m - r
        u = -beta / 2 * (d[:b] - d[b:])
        assert_close("reward_margin", out.metrics["reward_margin"], u.mean(), atol=1e-6, rtol=1e-4)
        assert_close("reward_w", out.metrics["reward_w"], (-beta / 2 * d[:b]).mean(), atol=1e-6, rtol=1e-4)
        assert_close("implicit_acc", out.metrics["implicit_acc"], (u > 0).double().mean(), atol=0, rtol=0)


@pytest.mark.parametrize("objective", ["dpo", "rpo", "cal-dpo", "dspo"])
def test_implicit_accuracy_is_one_half_at_step_zero(objective):
    p, t, _ = make_pairs(4)
    kw = dict(zip(("embeds_w", "embeds_l"), make_embeds(4))) if objective == "rpo" else {}
    out = PreferenceLoss(objective, backend="eager")(p, t, p.clone(), **kw)  # policy == reference
    assert out.metrics["implicit_acc"] == 0.5
    assert out.metrics["reward_margin"] == 0


# --------------------------------------------------------------------------------------------------
# Validation: ValueError naming the problem
# --------------------------------------------------------------------------------------------------


def _bad_calls():
    p, t, q = make_pairs(2)
    ew, el = make_embeds(2)
    yield "odd first dimension", "dpo", {}, (p[:3], t[:3], q[:3]), {}
    yield "ref_pred shape", "dpo", {}, (p, t, q[:, :2]), {}
    yield "target shape", "dpo", {}, (p, t[:, :, :3], q), {}
    yield "target shape", "dpo", {}, (p, t[:3], q), {}
    yield "needs ref_pred", "dpo", {}, (p, t, None), {}
    yield "needs embeds_w", "rpo", {}, (p, t, q), {}
    yield "embeds_w must be", "rpo", {}, (p, t, q), dict(embeds_w=ew[:1], embeds_l=el)
    yield "differ in width", "rpo", {}, (p, t, q), dict(embeds_w=ew, embeds_l=el[:, :3])
    yield "apply to objective 'rpo', 'online-rpo' only", "dpo", {}, (p, t, q), dict(embeds_w=ew, embeds_l=el)
    yield "per-pair weights apply", "rpo", {}, (p, t, q), dict(embeds_w=ew, embeds_l=el, weights=torch.ones(2))
    yield "per-pair weights apply", "sft", {}, (p[:2], t[:2], None), dict(weights=torch.ones(2))
    yield "per-pair weights apply", "dspo", {}, (p, t, q), dict(weights=torch.ones(2))
    yield "weights must be", "dpo", {}, (p, t, q), dict(weights=torch.ones(3))
    yield "needs timesteps", "dense-dpo", {}, (p, t, q), {}
    yield "integer tensor", "dense-dpo", {}, (p, t, q), dict(timesteps=torch.ones(2))
    yield "timesteps apply", "dpo", {}, (p, t, q), dict(timesteps=torch.ones(2, dtype=torch.long))
    yield "floating-point", "dpo", {}, (p.long(), t, q), {}
    yield "floating-point", "dpo", {}, (p, t.int(), q), {}
    yield "uses no reference", "sft", {}, (p, t, q), {}
    yield "winners only", "sft", {}, (p, t[:2], None), {}
    yield "empty", "dpo", {}, (p[:0], t[:0], q[:0]), {}


@pytest.mark.parametrize(
    "message,objective,opts,args,kw", list(_bad_calls()), ids=[f"{c[0]}-{i}" for i, c in enumerate(_bad_calls())]
)
def test_bad_input_raises_value_error(message, objective, opts, args, kw):
    with pytest.raises(ValueError, match=message):
        PreferenceLoss(objective, backend="eager", **opts)(*args, **kw)


@pytest.mark.parametrize(
    "message,objective,opts",
    [
        ("unknown objective", "ppo", {}),
        ("unknown option", "dpo", dict(tau=0.5)),
        ("unknown option", "sft", dict(beta=1.0)),
        ("beta must be", "dpo", dict(beta=-1.0)),
        ("beta must be", "dpo", dict(beta=float("nan"))),
        ("tau must be", "rpo", dict(tau=0.0)),
        ("weighting must be", "rpo", dict(weighting="middle")),
        ("scope must be", "rpo", dict(scope="world")),
        ("form must be", "dspo", dict(form="sd21")),
        ("gamma must be", "dense-dpo", dict(gamma=1.5)),
        ("num_inference_steps must be", "dense-dpo", dict(num_inference_steps=0)),
        ("lam_cal must be", "cal-dpo", dict(lam_cal=-0.1)),
        ("backend must be", "dpo", dict(backend="cuda")),
    ],
)
def test_bad_options_raise_value_error(message, objective, opts):
    with pytest.raises(ValueError, match=message):
        PreferenceLoss(objective, **opts)


def test_dspo_defaults_follow_form():
    assert PreferenceLoss("dspo", form="sd15").options == dict(beta=0.001, form="sd15", lam_in=0.0005, lam_out=0.001)
    assert PreferenceLoss("dspo", form="sdxl").options == dict(beta=5000.0, form="sdxl", lam_in=2500.0, lam_out=5000.0)
    assert PreferenceLoss("dspo", beta=10.0, lam_in=1.0).options["lam_out"] == 10.0


def test_compile_backend_matches_eager():
    """The compile backend runs a compiled graph (Dynamo reset first: past its recompile limit, left by earlier tests
    in the process, it would run eagerly and compare eager with eager) and gives eager's loss and gradient."""
    from torch._dynamo.utils import counters

    p, t, q = make_pairs(3, seed=21)
    ew, el = make_embeds(3)
    for objective, kw in (("dpo", {}), ("rpo", dict(embeds_w=ew, embeds_l=el))):
        torch._dynamo.reset()
        counters.clear()
        eager = _grad(PreferenceLoss(objective, backend="eager", beta=BETA), p, t, q, **kw)
        comp = _grad(PreferenceLoss(objective, backend="compile", beta=BETA), p, t, q, **kw)
        assert counters["stats"]["unique_graphs"] >= 1, objective
        assert_close("loss", comp[0].loss, eager[0].loss, atol=0, rtol=1e-5)
        assert_close("grad", comp[1], eager[1], atol=1e-6, rtol=1e-4)


def test_function_form_equals_module():
    from rpo_fast import preference_loss

    p, t, q = make_pairs(2, seed=4)
    a = preference_loss("cal-dpo", p, t, q, backend="eager", beta=BETA)
    b = PreferenceLoss("cal-dpo", backend="eager", beta=BETA)(p, t, q)
    assert torch.equal(a.loss, b.loss)


def test_logsigmoid_is_stable_at_large_beta():
    p, t, q = make_pairs(3, seed=2)
    out = PreferenceLoss("dpo", backend="eager", beta=1e7)(p, t, q)
    assert torch.isfinite(out.loss)
    u = -1e7 / 2 * (lambda d: d[:3] - d[3:])(per_sample_errors(p, t, q).delta)
    assert_close("large beta", out.loss, -F.logsigmoid(u.double()).mean(), atol=0, rtol=1e-5)
