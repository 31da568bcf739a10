"""The objectives held to their authors' code: each official loss block transcribed (repository, commit, file and
lines cited), and rpo_fast's objective run on the same random float64 inputs through every backend (eager, compile,
native, and Triton under the interpreter), loss and gradient with respect to model_pred.

``tests/helpers.py`` re-derives rpo_fast's own spec and catches drift between code and spec; this file catches a
wrong spec. The transcriptions keep the originals' variable names and operations; what was left out (model calls,
logging, casts to fp32) is said at each. Where rpo_fast departs on purpose, the mapping is stated and checked:

- Diffusion-DPO, Flow-GRPO's DPO, DSPO: rpo_fast's beta is the code's ``beta_dpo`` / ``config.train.beta``.
- RPO: the language-model trainer's log-ratios become the diffusion surrogate, log pi - log pi_ref = -delta / 2 per
  image (beta unchanged); its one matrix of prompt embeddings is rpo_fast's "text" mode (rows and columns alike);
  rpo_fast's other modes give rows (winners) and columns (losers) their own embeddings, the two-matrix form of the
  same authors' unpaired trainer. The global scope is this loss on the batch gathered from every rank
  (``test_fused.py::test_global_scope_equals_one_process``).
- Cal-DPO: the trainer's rewards (log-ratios) are rpo_fast's implicit rewards h = -(beta / 2) delta; its beta is
  rpo_fast's ``beta_cal``, its 0.5 rpo_fast's ``lam_cal``.
- Dense reward: the law of the sampled step index is the authors' ``policy_loss_weights``; with t drawn from it
  (``timestep_sampling="discounted"``) the offline loss of a pair is the authors' ListMLE over the pair's two
  logits, each the surrogate h = -(beta / 2) delta at the drawn step (their logit: temperature x the mean over
  sampled steps of the clipped per-step log-ratio; docs/objectives.md section 5).

Tolerances: eager and compile compute in float64: loss rtol 1e-10, gradient atol 1e-12 x max|g| and rtol 1e-9.
Triton and native accumulate in fp32 whatever the input: loss rtol 1e-5, gradient atol 1e-6 x max|g| and rtol 1e-4
(helpers' fp32 rows).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from rpo_fast import PreferenceLoss
from rpo_fast.objectives import discounted_timestep_probs

BACKENDS = ("eager", "compile", "triton", "native")
TOL = {"eager": ((0, 1e-10), (1e-12, 1e-9)), "compile": ((0, 1e-10), (1e-12, 1e-9))}
TOL |= {b: ((0, 1e-5), (1e-6, 1e-4)) for b in ("triton", "native")}
B, SHAPE = 3, (4, 5, 7)  # N = 140: odd sizes


def inputs(ref_noise: float, seed: int):
    """model_pred p (2B, C, H, W) [winners; losers], a per-row target t and ref_pred q = p + noise, float64."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(2 * B, *SHAPE, generator=g, dtype=torch.float64)
    t = torch.randn(2 * B, *SHAPE, generator=g, dtype=torch.float64)
    return p, t, p + ref_noise * torch.randn(2 * B, *SHAPE, generator=g, dtype=torch.float64)


def embeddings(seed: int, d: int = 16):
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randn(B, d, generator=g, dtype=torch.float64), torch.randn(B, d, generator=g, dtype=torch.float64)


def loss_and_grad(fn, p):
    """fn(leaf) -> scalar; the loss and d loss / d p, in float64."""
    leaf = p.clone().requires_grad_(True)
    loss = fn(leaf)
    (g,) = torch.autograd.grad(loss, leaf)
    return loss.detach().double(), g.double()


def hold(backend, ours, official, p):
    """rpo_fast's loss and gradient (``ours(p)``) equal the transcription's (``official(p)``)."""
    (lt, gt), want, got = TOL[backend], loss_and_grad(official, p), loss_and_grad(ours, p)
    assert_close(f"{backend} loss", got[0], want[0], atol=lt[0], rtol=lt[1])
    assert_close(f"{backend} grad", got[1], want[1], atol=gt[0], rtol=gt[1])


# --------------------------------------------------------------------------------------------------
# SalesforceAIResearch/DiffusionDPO, commit 5233e75, train.py lines 1119-1145 (the loss block; ref_unet's forward
# replaced by ref_pred, the logging lines left out)
# --------------------------------------------------------------------------------------------------


def diffusion_dpo_train_py(model_pred, target, ref_pred, beta_dpo, train_method="dpo"):
    if train_method == "sft":  # SFT, casting for F.mse_loss (the .float() casts left out: float64 here)
        loss = F.mse_loss(model_pred, target, reduction="mean")
        return loss
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l  # These are both LBS (as is t)
    with torch.no_grad():
        ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    loss = -1 * F.logsigmoid(inside_term).mean()
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta_dpo", [100.0, 5000.0])
def test_dpo_is_diffusion_dpo_train_py(backend, beta_dpo):
    """beta = beta_dpo (5000: the launchers'; 100 keeps the sigmoid off its flat ends at these inputs)."""
    p, t, q = inputs(0.1 if beta_dpo < 1000 else 0.003, seed=1)
    ours = PreferenceLoss("dpo", backend=backend, beta=beta_dpo)
    hold(backend, lambda x: ours(x, t, q).loss, lambda x: diffusion_dpo_train_py(x, t, q, beta_dpo), p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sft_is_diffusion_dpo_train_py(backend):
    """Their SFT batch holds the preferred images only (train.py line 828): rpo_fast's winners-only layout."""
    p, t, _ = (x[:B] for x in inputs(0.1, seed=2))
    ours = PreferenceLoss("sft", backend=backend)
    hold(backend, lambda x: ours(x, t).loss, lambda x: diffusion_dpo_train_py(x, t, None, None, "sft"), p)


# --------------------------------------------------------------------------------------------------
# yifan123/flow_grpo, commit ac4c86e, scripts/train_sd3_dpo.py lines 924-937 (config/dpo.py line 53: beta = 100):
# the flow families' DPO and their default beta (the .float() casts left out: float64 here)
# --------------------------------------------------------------------------------------------------


def flow_grpo_train_sd3_dpo(model_pred, model_pred_ref, target, beta, bsz):
    theta_mse = ((model_pred - target) ** 2).reshape(target.shape[0], -1).mean(dim=1)
    ref_mse = ((model_pred_ref - target) ** 2).reshape(target.shape[0], -1).mean(dim=1)
    model_w_err = theta_mse[:bsz]
    model_l_err = theta_mse[bsz:]
    ref_w_err = ref_mse[:bsz]
    ref_l_err = ref_mse[bsz:]
    w_diff = model_w_err - ref_w_err
    l_diff = model_l_err - ref_l_err
    w_l_diff = w_diff - l_diff
    inside_term = -0.5 * beta * w_l_diff
    loss = -F.logsigmoid(inside_term)
    loss = torch.mean(loss)
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_is_flow_grpo_train_sd3_dpo(backend):
    """beta = config.train.beta: 100, rpo_fast's default for the flow families, unchanged (the same convention as
    Diffusion-DPO's: per-element means, -0.5 beta)."""
    p, t, q = inputs(0.1, seed=3)
    ours = PreferenceLoss("dpo", backend=backend, beta=100.0)
    hold(backend, lambda x: ours(x, t, q).loss, lambda x: flow_grpo_train_sd3_dpo(x, q, t, 100.0, B), p)


# --------------------------------------------------------------------------------------------------
# huaishengzhu/DSPO, commit 8b4e09b, train.py lines 1141-1169 (the loss block; ref_unet's forward replaced by ref_pred)
# --------------------------------------------------------------------------------------------------


def dspo_train_py(model_pred, target, ref_pred, beta_dpo, sdxl):
    model_diff_w, model_diff_l = (model_pred - target).chunk(2)
    model_losses_w = model_diff_w.pow(2).mean(dim=[1, 2, 3])
    model_losses_l = model_diff_l.pow(2).mean(dim=[1, 2, 3])
    model_diff = model_losses_w - model_losses_l  # These are both LBS (as is t)
    with torch.no_grad():
        ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    pred2, _ = (model_pred - ref_pred).chunk(2)
    if sdxl:
        if pred2.pow(2).mean(dim=[1, 2, 3]).mean() >= 0.1:
            loss = ((1 - F.sigmoid(inside_term)[:, None, None, None]) * pred2).pow(2).mean(dim=[1, 2, 3]).mean()
        else:
            loss = (1 - F.sigmoid(inside_term)[:, None, None, None]).pow(2).mean(dim=[1, 2, 3]).mean()
    else:
        loss = (
            (model_diff_w - beta_dpo * (1 - F.sigmoid(inside_term)[:, None, None, None]) * pred2)
            .pow(2)
            .mean(dim=[1, 2, 3])
            .mean()
        )
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "form,beta,ref_noise",
    [
        ("sd15", 0.001, 0.1),  # the SD1.5 launcher's beta
        ("sd15", 20.0, 0.1),  # a beta where the gate s and the correction both matter
        ("sdxl", 20.0, 0.5),  # mean |d^w|^2 ~ 0.25 >= 0.1: the score branch
        ("sdxl", 200.0, 0.1),  # mean |d^w|^2 ~ 0.01 < 0.1: the gate-only branch
    ],
)
def test_dspo_is_dspo_train_py(backend, form, beta, ref_noise):
    """One flag, beta_dpo, is rpo_fast's beta: lam_in = beta / 2 inside the logit and lam_out = beta outside (the
    defaults rpo_fast derives from beta). Both forms, both sides of the SDXL form's 0.1 switch (asserted)."""
    p, t, q = inputs(ref_noise, seed=4)
    side = (p - q)[:B].pow(2).mean() >= 0.1
    assert bool(side) == (ref_noise == 0.5)
    ours = PreferenceLoss("dspo", backend=backend, form=form, beta=beta)
    assert ours.options["lam_in"] == beta / 2 and ours.options["lam_out"] == beta
    hold(backend, lambda x: ours(x, t, q).loss, lambda x: dspo_train_py(x, t, q, beta, form == "sdxl"), p)


# --------------------------------------------------------------------------------------------------
# yinyueqin/relative-preference-optimization, commit c1b5163, trainers.py: RPOTrainer.loss lines 801-831 (paired:
# one matrix of prompt embeddings), RPOUnpairedTrainer.loss lines 858-869 (the distance of two embedding matrices),
# the batch's mean at line 716 (get_batch_metrics returns losses.mean())
# --------------------------------------------------------------------------------------------------


def rpo_trainer_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                     beta, distance_temperature, prompts_emb=None, chosen_emb=None, rejected_emb=None):  # fmt: skip
    chosen_logdiffs = policy_chosen_logps - reference_chosen_logps
    rejected_logdiffs = policy_rejected_logps - reference_rejected_logps
    logits = chosen_logdiffs.view(-1, 1) - rejected_logdiffs.view(1, -1)
    if prompts_emb is not None:  # RPOTrainer (lines 815-820)
        prompts_emb = torch.as_tensor(prompts_emb, dtype=policy_chosen_logps.dtype)
        norm_prompts_emb = F.normalize(prompts_emb, p=2, dim=1)
        cos_distance = 1 - torch.mm(norm_prompts_emb, norm_prompts_emb.t())
        distance_weights = F.softmax(-cos_distance / distance_temperature, dim=1)
    else:  # RPOUnpairedTrainer (lines 858-863): rows and columns from their own embeddings
        norm_chosen_emb = F.normalize(chosen_emb, p=2, dim=1)
        norm_rejected_emb = F.normalize(rejected_emb, p=2, dim=1)
        cos_distance = 1 - torch.mm(norm_chosen_emb, norm_rejected_emb.t())
        distance_weights = F.softmax(-cos_distance / distance_temperature, dim=1)
    weighted_logits = logits * distance_weights.to(logits.device)
    losses = -F.logsigmoid(beta * weighted_logits).mean(-1)
    return losses.mean()


def diffusion_logps(model_pred, target, ref_pred):
    """The surrogate log-likelihoods of the images: log pi = -m / 2, log pi_ref = -r / 2 (per-element mean errors);
    (winners, losers) of each."""
    m = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    r = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
    return (-m / 2).chunk(2), (-r / 2).chunk(2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("embedding", ["text", "rows-and-columns"])
@pytest.mark.parametrize("tau", [0.5, 0.25])
def test_rpo_is_the_language_model_rpo_trainer(backend, embedding, tau):
    """rpo_fast's default weighting (not passed: "inside") and tau = distance_temperature; beta unchanged. "text": the
    caption embedding for rows and columns (RPOTrainer's prompts_emb); otherwise rows from the winners' embeddings and
    columns from the losers' (the unpaired trainer's two matrices). Local scope: this process's batch."""
    p, t, q = inputs(0.1, seed=5)
    ew, el = embeddings(5)
    if embedding == "text":
        el = ew
    ours = PreferenceLoss("rpo", backend=backend, beta=100.0, tau=tau, scope="local")

    def official(x):
        (pw, pl), (rw, rl) = diffusion_logps(x, t, q)
        emb = dict(prompts_emb=ew) if embedding == "text" else dict(chosen_emb=ew, rejected_emb=el)
        return rpo_trainer_loss(pw, pl, rw, rl, 100.0, tau, **emb)

    hold(backend, lambda x: ours(x, t, q, embeds_w=ew, embeds_l=el).loss, official, p)


# --------------------------------------------------------------------------------------------------
# tengxiao1/Cal-DPO, commit 7d16b46, scripts/dpo_trainer.py: dpo_loss lines 1182-1218 (loss_type "Cal-DPO"), the
# batch's mean at line 1386 (get_batch_loss_metrics returns losses.mean())
# --------------------------------------------------------------------------------------------------


def cal_dpo_trainer_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                         beta):  # fmt: skip
    chosen_rewards = policy_chosen_logps - reference_chosen_logps
    rejected_rewards = policy_rejected_logps - reference_rejected_logps
    DPO_loss = -F.logsigmoid(chosen_rewards - rejected_rewards)  # noqa: N806 (the original's name)
    Cal_loss = F.mse_loss(chosen_rewards, torch.tensor(1.0 / (2.0 * beta)).to(chosen_rewards)) + F.mse_loss(  # noqa: N806
        rejected_rewards, torch.tensor(-1.0 / (2.0 * beta)).to(rejected_rewards)
    )
    losses = DPO_loss + 0.5 * Cal_loss
    return losses.mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta_cal", [0.5, 0.25])
def test_cal_dpo_is_the_cal_dpo_trainer(backend, beta_cal):
    """The trainer's rewards are rpo_fast's h = -(beta / 2) delta: its log-ratios are h (log pi = -(beta / 2) m,
    log pi_ref = -(beta / 2) r); its beta is beta_cal, its 0.5 rpo_fast's default lam_cal."""
    beta = 100.0
    p, t, q = inputs(0.1, seed=6)
    ours = PreferenceLoss("cal-dpo", backend=backend, beta=beta, beta_cal=beta_cal)
    assert ours.options["lam_cal"] == 0.5

    def official(x):
        (pw, pl), (rw, rl) = diffusion_logps(x, t, q)  # -m/2, -r/2: times beta gives -(beta/2) m, -(beta/2) r
        return cal_dpo_trainer_loss(beta * pw, beta * pl, beta * rw, beta * rl, beta_cal)

    hold(backend, lambda x: ours(x, t, q).loss, official, p)


# --------------------------------------------------------------------------------------------------
# Shentao-YANG/Dense_Reward_T2I, commit 863a383: the step law (train_t2i.py lines 361-367, [gamma^0, ..., gamma^49];
# preference_based_policy_learner.py line 68, normalised with + 1e-8; lines 251-256, steps drawn with
# p=self.policy_loss_weights), and reward_loss.py lines 6-33 (listMLELoss)
# --------------------------------------------------------------------------------------------------


def dense_reward_policy_loss_weights(pl_gamma, num_denosing_steps):
    policy_loss_weights = torch.tensor(pl_gamma).pow(torch.tensor(range(num_denosing_steps), dtype=torch.float)).numpy()
    return policy_loss_weights / (policy_loss_weights.sum() + 1e-8)


DEFAULT_EPS = 1e-10


def list_mle_loss(y_pred, y_true, listmle_temp=1.0):
    y_pred = y_pred / listmle_temp
    random_indices = torch.randperm(y_pred.shape[-1])
    y_pred_shuffled = y_pred[:, random_indices]
    y_true_shuffled = y_true[:, random_indices]
    y_true_sorted, indices = y_true_shuffled.sort(descending=True, dim=-1)
    preds_sorted_by_true = torch.gather(y_pred_shuffled, dim=1, index=indices)
    max_pred_values, _ = preds_sorted_by_true.max(dim=1, keepdim=True)
    preds_sorted_by_true_minus_max = preds_sorted_by_true - max_pred_values
    cumsums = torch.cumsum(preds_sorted_by_true_minus_max.exp().flip(dims=[1]), dim=1).flip(dims=[1])
    observation_loss = torch.log(cumsums + DEFAULT_EPS) - preds_sorted_by_true_minus_max
    return torch.mean(torch.sum(observation_loss, dim=1))


@pytest.mark.parametrize("gamma,steps", [(0.9, 50), (0.8, 20)])
def test_discounted_sampling_draws_the_authors_step_law(gamma, steps):
    """The step index k = ((T - 1 - t) N) // T of t ~ discounted_timestep_probs has the authors' law (to their
    fp32 powers), and so do the steps the trainer's DDPM families draw from it over 20,000 pairs (each k within 4.5
    standard deviations of its count); the flow families map their drawn points back to the drawn index
    (test_flow.py::test_dense_dpo_counts_the_samplers_steps)."""
    from rpo_fast.models.noising import DDPMNoising

    probs = discounted_timestep_probs(gamma=gamma, num_inference_steps=steps)
    k = ((999 - torch.arange(1000)) * steps) // 1000
    law = torch.zeros(steps, dtype=torch.float64).index_add_(0, k, probs)
    want = torch.from_numpy(dense_reward_policy_loss_weights(gamma, steps)).double()
    assert_close("P(k)", law, want, atol=0, rtol=1e-5)  # theirs: fp32 powers (about 1e-6 off at k = 49), + 1e-8

    class Family(DDPMNoising):
        num_train_timesteps = 1000

    n = 20_000
    t = Family().sample_timesteps([torch.Generator().manual_seed(i) for i in range(n)], "cpu", probs)
    drawn = torch.bincount(((999 - t) * steps) // 1000, minlength=steps).double()
    sd = (n * want * (1 - want)).sqrt()
    assert ((drawn - n * want).abs() <= 4.5 * sd + 1).all(), (drawn[:5], n * want[:5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_dpo_discounted_is_the_authors_list_mle_on_a_pair(backend):
    """With t drawn from the step law, a pair's loss is the authors' ListMLE over its two logits (winner ranked
    first), each logit the surrogate h = -(beta / 2) delta at the drawn step: -log sigmoid(h_w - h_l) up to their
    1e-10 inside the log. No w(t) in the loss (the timesteps passed change nothing)."""
    p, t, q = inputs(0.1, seed=7)
    beta = 100.0
    ours = PreferenceLoss("dense-dpo", backend=backend, beta=beta, timestep_sampling="discounted")
    ts = torch.tensor([999, 500, 3])

    def official(x):
        m = (x - t).pow(2).mean(dim=[1, 2, 3])
        r = (q - t).pow(2).mean(dim=[1, 2, 3])
        h = -(beta / 2) * (m - r)
        y_pred = torch.stack([h[:B], h[B:]], dim=1)  # (pairs, 2 trajectories)
        y_true = torch.tensor([[1.0, 0.0]] * B, dtype=torch.float64)  # the reward ranks the winner first
        return list_mle_loss(y_pred, y_true)

    (lt, gt) = TOL[backend]
    want, got = loss_and_grad(official, p), loss_and_grad(lambda x: ours(x, t, q, timesteps=ts).loss, p)
    assert_close(f"{backend} loss", got[0], want[0], atol=0, rtol=max(lt[1], 1e-9))  # their EPS: ~1e-10 absolute
    assert_close(f"{backend} grad", got[1], want[1], atol=max(gt[0], 1e-9), rtol=max(gt[1], 1e-8))
