"""The online objectives (``dense-reward``, ``online-dpo``, ``online-rpo``: the group layout, K samples of G prompts at
S sampled steps) on the error pass: a float64 transcription of the dense-reward authors' loss block, float64
references from loops for all three, every backend and dtype, and the group layout's checks.

Tolerances: the transcription in float64 within 1e-9 relative (theirs subtracts two log-probabilities, ours reads
-c delta: the same number in float64); backends and dtypes against the float64 reference on the same rounded
inputs: the loss within 1e-5 relative, the gradient within ``helpers.GRAD_TOL``'s row (fp32 accumulation of
about 1-sized terms; the log-ratios are ~1e-2 of them).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPES, GRAD_TOL, assert_close
from test_transcriptions import list_mle_loss  # reward_loss.py lines 6-33, transcribed

from rpo_fast import PreferenceLoss
from rpo_fast.objectives import rpo_weights

ONLINE = ("dense-reward", "online-dpo", "online-rpo")
BACKENDS = ("eager", "triton", "native")


def make_group(s=2, g=3, k=4, shape=(4, 5, 7), *, seed=0, step=0.05, dtype=torch.float64):
    """A batch of S steps x G prompts x K samples, step-major: x_k, x_(k+1), the policy's and reference's
    predictions, the step coefficients a, b, std, and rewards (distinct)."""
    gen = torch.Generator().manual_seed(seed)
    rows = s * g * k
    x = torch.randn(rows, *shape, generator=gen, dtype=torch.float64)
    f_ref = torch.randn(rows, *shape, generator=gen, dtype=torch.float64)
    f_pol = f_ref + step * torch.randn(rows, *shape, generator=gen, dtype=torch.float64)
    a = 1 + 0.1 * torch.rand(s, generator=gen, dtype=torch.float64).repeat_interleave(g * k)
    b = -(0.05 + 0.1 * torch.rand(s, generator=gen, dtype=torch.float64)).repeat_interleave(g * k)
    std = (0.02 + 0.05 * torch.rand(s, generator=gen, dtype=torch.float64)).repeat_interleave(g * k)
    view = (-1, 1, 1, 1)
    x_next = (
        a.view(view) * x
        + b.view(view) * f_ref
        + std.view(view) * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    )
    rewards = torch.randperm(g * k, generator=gen).double().view(g, k) + 0.1 * torch.rand(
        g, k, generator=gen, dtype=torch.float64
    )
    embeds = torch.randn(g * k, 16, generator=gen)
    return dict(
        x=x,
        x_next=x_next,
        f_pol=f_pol.to(dtype),
        f_ref=f_ref.to(dtype),
        a=a,
        b=b,
        std=std,
        rewards=rewards,
        embeds=embeds,
        s=s,
        g=g,
        k=k,
    )


def loss_inputs(d, objective):
    """PreferenceLoss's inputs: target e* = (x' - a x) / b, c = b^2 / (2 std^2), embeddings of best / worst."""
    view = (-1, 1, 1, 1)
    target = ((d["x_next"] - d["a"].view(view) * d["x"]) / d["b"].view(view)).to(d["f_pol"].dtype)
    kw = dict(rewards=d["rewards"].float(), log_ratio_scale=(d["b"] ** 2 / (2 * d["std"] ** 2)).float())
    if objective == "online-rpo":
        best = d["rewards"].argmax(1) + torch.arange(d["g"]) * d["k"]
        worst = d["rewards"].argmin(1) + torch.arange(d["g"]) * d["k"]
        kw.update(embeds_w=d["embeds"][best], embeds_l=d["embeds"][worst])
    return target, kw


# ---------------------------------------------------------------------------------------------- the authors' code


def authors_loss(d, f_pol, *, temp, clip):
    """preference_based_policy_learner.py ``get_pl_loss_logit`` lines 258-316 (reg_to_pi_init on, reg_to_pi_old
    off, no warm-up: the defaults) and ``calculate_pl_loss_and_backward`` lines 334-339 with all K trajectories
    in one tuple ("K choose K", the default), in float64; log_prob / log_prob_init are the DDIM step's
    Normal(mean, std).log_prob mean over C, H, W (scheduling_ddim_extended.py step_logprob lines 175-181)."""
    s, g, k = d["s"], d["g"], d["k"]
    view = (-1, 1, 1, 1)

    def log_prob(f):
        mean = d["a"].view(view) * d["x"] + d["b"].view(view) * f
        lp = torch.distributions.Normal(mean, d["std"].view(view)).log_prob(d["x_next"])
        return lp.mean(dim=(1, 2, 3)).view(s, g, k)  # [sampled step, prompt (p_batch), trajectory]

    lp, lp_init = log_prob(f_pol.double()), log_prob(d["f_ref"].double())
    logits = []
    for traj_idx in range(k):
        log_diff = 0.0
        for time_idx in range(s):
            log_pi_theta_minus_log_pi_init = torch.clamp(
                lp[time_idx, :, traj_idx] - lp_init[time_idx, :, traj_idx], min=-clip, max=clip
            )
            log_diff += log_pi_theta_minus_log_pi_init / s
        logits.append(log_diff * temp)
    logits = torch.column_stack(logits)
    return list_mle_loss(y_pred=logits, y_true=d["rewards"])


@pytest.mark.parametrize(
    "clip,step", [(1e-4, 1e-3), (3e-3, 0.05), (1.0, 0.05)], ids=["clip-1e-4", "clip-3e-3", "unclipped"]
)
def test_dense_reward_is_the_authors_loss(clip, step):
    d = make_group(seed=1, step=step)
    target, kw = loss_inputs(d, "dense-reward")
    kw["rewards"], kw["log_ratio_scale"] = d["rewards"], d["b"] ** 2 / (2 * d["std"] ** 2)
    p = d["f_pol"].clone().requires_grad_(True)
    fn = PreferenceLoss("dense-reward", backend="eager", temperature=10.0, log_ratio_clip=clip)
    out = fn(p, target, d["f_ref"], **kw)
    out.loss.backward()
    p2 = d["f_pol"].clone().requires_grad_(True)
    want = authors_loss(d, p2, temp=10.0, clip=clip)
    want.backward()
    assert 0.0 < out.metrics["clip_fraction"] < 1.0 or clip == 1.0  # the clips cut some log-ratios, not all
    assert p.grad.abs().max() > 0
    torch.testing.assert_close(out.loss, want, rtol=1e-9, atol=0)
    torch.testing.assert_close(p.grad, p2.grad, rtol=1e-7, atol=1e-12 * p2.grad.abs().max().item())


# ---------------------------------------------------------------------------------------------- float64 loops


def ref_online(objective, d, f_pol, *, beta=10.0, temp=10.0, clip=1e-4, tau=0.5):
    """float64 from loops: Delta per (step, prompt, sample) from the two log-probabilities; then each loss."""
    s, g, k = d["s"], d["g"], d["k"]
    c = d["b"] ** 2 / (2 * d["std"] ** 2)
    view = (-1, 1, 1, 1)
    e_star = (d["x_next"] - d["a"].view(view) * d["x"]) / d["b"].view(view)
    delta = {}
    for r in range(s * g * k):
        m = ((f_pol[r].double() - e_star[r]) ** 2).mean()
        q = ((d["f_ref"][r].double() - e_star[r]) ** 2).mean()
        delta[r // (g * k), (r // k) % g, r % k] = -c[r] * (m - q)
    clipped = {key: v.clamp(-clip, clip) for key, v in delta.items()}
    rw = d["rewards"]
    best, worst = [int(rw[i].argmax()) for i in range(g)], [int(rw[i].argmin()) for i in range(g)]
    if objective == "dense-reward":
        total = 0.0
        for i in range(g):
            order = sorted(range(k), key=lambda j: -float(rw[i, j]))
            logit = [temp * sum(clipped[t, i, j] for t in range(s)) / s for j in order]
            total = total + sum(torch.logsumexp(torch.stack(logit[n:]), 0) - logit[n] for n in range(k))
        return total / g
    if objective == "online-dpo":
        terms = [
            -F.logsigmoid(beta * (clipped[t, i, best[i]] - clipped[t, i, worst[i]])) for t in range(s) for i in range(g)
        ]
        return sum(terms) / len(terms)
    ew = d["embeds"][[best[i] + i * k for i in range(g)]].double()
    el = d["embeds"][[worst[i] + i * k for i in range(g)]].double()
    w = torch.softmax(-(1 - F.normalize(ew, dim=1) @ F.normalize(el, dim=1).T) / tau, dim=1)
    terms = [
        -F.logsigmoid(w[i, j] * beta * (clipped[t, i, best[i]] - clipped[t, j, worst[j]]))
        for t, i, j in itertools.product(range(s), range(g), range(g))
    ]
    return sum(terms) / len(terms)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("objective", ONLINE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_online_objectives_match_float64(backend, objective, dtype):
    d = make_group(s=2, g=3, k=3, seed=2, dtype=dtype)
    target, kw = loss_inputs(d, objective)
    opts = dict(log_ratio_clip=1.0)  # the clip's edge would make the rounded dtypes' gradients disagree by a whole term
    p = d["f_pol"].clone().requires_grad_(True)
    out = PreferenceLoss(objective, backend=backend, **opts)(p, target, d["f_ref"], **kw)
    (1.7 * out.loss).backward()
    p64 = d["f_pol"].double().requires_grad_(True)
    d64 = dict(d, x_next=d["a"].view(-1, 1, 1, 1) * d["x"] + d["b"].view(-1, 1, 1, 1) * target.double())
    want = ref_online(objective, d64, p64, clip=1.0)
    (1.7 * want).backward()
    assert out.loss.dtype == torch.float32 and p.grad.dtype == dtype
    assert_close("loss", out.loss, want, atol=0, rtol=1e-5)
    atol, rtol = GRAD_TOL[dtype]
    assert_close("grad", p.grad, p64.grad, atol=atol, rtol=rtol)
    assert set(out.metrics) == set(PreferenceLoss(objective).spec.metrics)


@pytest.mark.parametrize("objective", ONLINE)
def test_online_objectives_clip_as_float64_loops(objective):
    d = make_group(s=3, g=2, k=4, seed=4, step=0.05)
    target, kw = loss_inputs(d, objective)
    kw["rewards"], kw["log_ratio_scale"] = d["rewards"], d["b"] ** 2 / (2 * d["std"] ** 2)
    out = PreferenceLoss(objective, backend="eager", log_ratio_clip=3e-3)(d["f_pol"], target, d["f_ref"], **kw)
    want = ref_online(objective, d, d["f_pol"], clip=3e-3)
    assert 0.0 < out.metrics["clip_fraction"] < 1.0
    torch.testing.assert_close(out.loss, want, rtol=1e-9, atol=0)


def test_online_rpo_with_distant_images_is_online_dpo():
    """tau -> 0 with each prompt's best image nearest its own worst: the weights are the identity, and the "outside"
    weighting gives online-dpo's loss."""
    d = make_group(seed=5)
    target, kw = loss_inputs(d, "online-rpo")
    e = torch.eye(d["g"], 16)
    kw.update(embeds_w=e, embeds_l=e)
    rpo = PreferenceLoss("online-rpo", backend="eager", tau=1e-3, weighting="outside")(
        d["f_pol"], target, d["f_ref"], **kw
    )
    kw.pop("embeds_w"), kw.pop("embeds_l")
    dpo = PreferenceLoss("online-dpo", backend="eager")(d["f_pol"], target, d["f_ref"], **kw)
    torch.testing.assert_close(rpo.loss, dpo.loss.to(rpo.loss.dtype), rtol=1e-6, atol=0)
    assert rpo_weights(e, e, tau=1e-3).diagonal().min() > 0.999


def test_group_layout_checks():
    d = make_group(s=1, g=2, k=3, dtype=torch.float32)
    target, kw = loss_inputs(d, "dense-reward")
    fn = PreferenceLoss("dense-reward")
    p, q = d["f_pol"], d["f_ref"]
    with pytest.raises(ValueError, match=r"needs rewards \(G, K\)"):
        fn(p, target, q, log_ratio_scale=kw["log_ratio_scale"])
    with pytest.raises(ValueError, match="K >= 2"):
        fn(p, target, q, rewards=kw["rewards"].view(6, 1), log_ratio_scale=kw["log_ratio_scale"])
    with pytest.raises(ValueError, match="not a multiple of G K"):
        fn(p[:5], target[:5], q[:5], rewards=kw["rewards"], log_ratio_scale=kw["log_ratio_scale"][:5])
    with pytest.raises(ValueError, match="log_ratio_scale must be"):
        fn(p, target, q, rewards=kw["rewards"], log_ratio_scale=kw["log_ratio_scale"][:3])
    with pytest.raises(ValueError, match="needs ref_pred"):
        fn(p, target, None, **kw)
    with pytest.raises(ValueError, match="needs embeds_w"):
        PreferenceLoss("online-rpo")(p, target, q, **kw)
    with pytest.raises(ValueError, match="online objectives"):
        PreferenceLoss("dpo")(p, target, q, rewards=kw["rewards"])
