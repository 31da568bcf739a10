"""The preference objectives in plain PyTorch: the reference every other backend is tested against.

The math and its sources: ``docs/objectives.md``; each function's docstring carries its formula. The table at the
end (``OBJECTIVE_TABLE``) declares once what each objective needs and takes: ``PreferenceLoss``, the kernels'
dispatch and the trainer read it instead of branching on names.

Shared notation (spec section 0). A batch holds B pairs; ``model_pred`` and ``ref_pred`` are (2B, C, H, W)
with winners first, then losers (one concatenated UNet forward per model). ``target`` is (2B, C, H, W), or
(B, C, H, W) shared by winner and loser (right for epsilon-prediction only: a v-prediction target depends on
x_0, which differs between winner and loser). With N = C*H*W and fp32 accumulation whatever the input dtype:

    m_k     = mean_N (p_k - t_k)^2                      policy error of sample k
    r_k     = mean_N (q_k - t_k)^2                      reference error (q = ref_pred)
    delta_k = mean_N (p_k - q_k) * (p_k + q_k - 2 t_k)  = m_k - r_k, from one expression per element
    h_k     = -(beta / 2) * delta_k                     implicit reward of image k
    u_i     = h^w_i - h^l_i                             pair logit (Salesforce DiffusionDPO beta convention)

Every objective uses delta where it needs m - r: with beta in the thousands, subtracting two nearly equal
fp32 means loses digits. Gradients flow to ``model_pred`` only.

This module imports neither triton nor any engine; float64 inputs are computed in float64 (for checks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

PAIR_METRICS = (
    "loss",
    "implicit_acc",
    "reward_margin",
    "reward_w",
    "reward_l",
    "mse_w",
    "mse_l",
    "ref_mse_w",
    "ref_mse_l",
)
# What each metric is (the documentation's table of metrics.jsonl keys is built from this). m, r: the policy's and the
# reference's per-sample errors; h the implicit reward (DPO: -(beta / 2)(m - r); each objective's in
# docs/objectives.md); u = h_w - h_l.
METRIC_HELP = {
    "loss": "the objective's loss (what is backpropagated)",
    "implicit_acc": "the fraction of pairs with u > 0, ties counted 1/2 (0.5 at step 0)",
    "reward_margin": "the mean of u = h_w - h_l, the implicit reward margin",
    "reward_w": "the mean implicit reward of the winners, h_w (DPO: -(beta / 2)(m_w - r_w))",
    "reward_l": "the same for the losers",
    "mse_w": "the policy's mean error on the winners, m_w",
    "mse_l": "the policy's mean error on the losers, m_l",
    "ref_mse_w": "the reference's mean error on the winners, r_w",
    "ref_mse_l": "the reference's mean error on the losers, r_l",
    "weight_diag": "RPO: the mean diagonal of the B x B weight matrix (the weight of each winner's own loser)",
    "log_ratio": "online: the mean per-step log-ratio log p_theta - log p_ref = -c delta before clipping (an estimate "
    "of the per-element KL to the reference on the replayed samples)",
    "clip_fraction": "online: the fraction of per-step log-ratios outside the clip (no gradient there)",
}
ONLINE_METRICS = ("loss", "implicit_acc", "reward_margin", "log_ratio", "clip_fraction", "mse_w", "ref_mse_w")


class SampleErrors(NamedTuple):
    """Per-sample errors, each (R,) in fp32 (float64 for float64 inputs). ``r`` and ``delta`` are None
    when no reference prediction was given."""

    m: Tensor
    r: Tensor | None
    delta: Tensor | None


@dataclass
class LossOutput:
    """``loss``: the scalar to backpropagate. ``metrics``: detached scalar tensors (names in docs/loss.md)."""

    loss: Tensor
    metrics: dict[str, Tensor]


def acc_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (the checks), else float32: the dtype errors accumulate in."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _rows(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.reshape(x.shape[0], -1).to(dtype)  # (R, N)


def _expand_target(t: Tensor, rows: int) -> Tensor:
    """A target of B rows shared by winner i and loser i becomes (2B, N): [t; t]."""
    return t if t.shape[0] == rows else torch.cat([t, t], dim=0)


def per_sample_errors(model_pred: Tensor, target: Tensor, ref_pred: Tensor | None = None) -> SampleErrors:
    """Per-sample mean squared errors, accumulated in fp32 whatever the input dtype.

        m_k     = mean_N (p_k - t_k)^2
        r_k     = mean_N (q_k - t_k)^2
        delta_k = mean_N (p_k - q_k)(p_k + q_k - 2 t_k)        (= m_k - r_k, without the cancellation)

    Args:
        model_pred: (R, C, H, W) policy prediction p.
        target: (R, C, H, W), or (R/2, C, H, W) shared by the winner and loser of each pair.
        ref_pred: (R, C, H, W) reference prediction q, or None.
    Returns:
        ``SampleErrors(m, r, delta)``, each (R,); ``r`` and ``delta`` are None without ``ref_pred``.
    """
    dtype = acc_dtype(model_pred, target, ref_pred)
    p = _rows(model_pred, dtype)
    t = _expand_target(_rows(target, dtype).detach(), p.shape[0])
    m = (p - t).square().mean(1)
    if ref_pred is None:
        return SampleErrors(m, None, None)
    q = _rows(ref_pred, dtype).detach()
    return SampleErrors(m, (q - t).square().mean(1), ((p - q) * (p + q - 2 * t)).mean(1))


# --------------------------------------------------------------------------------------------------
# Metrics shared by the pair objectives
# --------------------------------------------------------------------------------------------------


def implicit_accuracy(u: Tensor) -> Tensor:
    """mean(u > 0) + 0.5 * mean(u == 0): at step 0 the policy is the reference, every u is 0, and the
    accuracy reads 0.5 (the diffusers DPO script's tie rule)."""
    return (u > 0).to(u.dtype).mean() + 0.5 * (u == 0).to(u.dtype).mean()


def pair_metrics(loss: Tensor, u: Tensor, h_w: Tensor, h_l: Tensor, err: SampleErrors) -> dict[str, Tensor]:
    b = u.shape[0]
    out = dict(
        loss=loss,
        implicit_acc=implicit_accuracy(u),
        reward_margin=u.mean(),
        reward_w=h_w.mean(),
        reward_l=h_l.mean(),
        mse_w=err.m[:b].mean(),
        mse_l=err.m[b:].mean(),
        ref_mse_w=err.r[:b].mean(),
        ref_mse_l=err.r[b:].mean(),
    )
    return {k: v.detach().float() for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# The objectives on per-sample scalars (delta split into winners and losers)
# --------------------------------------------------------------------------------------------------


def dpo_loss(err: SampleErrors, *, beta: float, weights: Tensor | None = None) -> LossOutput:
    """Diffusion-DPO (Wallace et al. 2023; SalesforceAIResearch/DiffusionDPO train.py):

        L = mean_i -log sigmoid(s_i * u_i),    u_i = -(beta / 2) * (delta^w_i - delta^l_i)

    Where:
        s_i: optional per-pair weight (1 without ``weights``);
        beta: 2000-5000 in the reference launchers (the diffusers research script's beta_dpo is beta / 2).
    """
    b = err.m.shape[0] // 2
    h_w, h_l = -(beta / 2) * err.delta[:b], -(beta / 2) * err.delta[b:]
    u = h_w - h_l
    if weights is not None:
        u = weights.to(u.dtype) * u
    loss = -F.logsigmoid(u).mean()
    return LossOutput(loss, pair_metrics(loss, u, h_w, h_l, err))


def sft_loss(err: SampleErrors) -> LossOutput:
    """Supervised fine-tuning on the winners (the papers' baseline): L = mean_i m^w_i. No reference model;
    ``model_pred`` and ``target`` hold winners only."""
    loss = err.m.mean()
    return LossOutput(loss, {"loss": loss.detach().float(), "mse_w": err.m.mean().detach().float()})


def discount_weights(
    timesteps: Tensor, *, gamma: float, num_inference_steps: int = 50, num_train_timesteps: int = 1000
) -> Tensor:
    """Temporal discount of the dense-reward view (Yang, Chen, Zhou 2024), offline form:

        k(t) = ((T - 1 - t) * N) // T     (integer arithmetic; k = 0 is the noisiest step)
        w(t) = gamma ** k(t)

    Where T = num_train_timesteps, N = num_inference_steps. Returns fp32 weights, shape of ``timesteps``.
    """
    k = ((num_train_timesteps - 1 - timesteps.long()) * num_inference_steps) // num_train_timesteps
    return torch.pow(torch.tensor(gamma, dtype=torch.float64, device=timesteps.device), k).float()


def discounted_timestep_probs(
    *, gamma: float, num_inference_steps: int = 50, num_train_timesteps: int = 1000
) -> Tensor:
    """P(t) proportional to w(t) over t = 0..T-1: the alternative to weighting, sampling the emphasised
    timesteps more often (``torch.multinomial(probs, B, replacement=True)``). Each step index k holds T / N
    timesteps, so k is drawn with P(k) = gamma^k / sum_j gamma^j: the law of the authors' sampled steps
    (Dense_Reward_T2I's ``policy_loss_weights``). A loss on timesteps drawn so carries no weight of its own
    (``dense_dpo_loss(..., timestep_sampling="discounted")``)."""
    t = torch.arange(num_train_timesteps)
    w = discount_weights(
        t, gamma=gamma, num_inference_steps=num_inference_steps, num_train_timesteps=num_train_timesteps
    ).double()
    return w / w.sum()


def dense_dpo_loss(
    err: SampleErrors,
    timesteps: Tensor,
    *,
    beta: float,
    gamma: float = 0.9,
    num_inference_steps: int = 50,
    num_train_timesteps: int = 1000,
    timestep_sampling: str = "uniform",
    weights: Tensor | None = None,
) -> LossOutput:
    """Dense-reward DPO with temporal discounting, offline form (spec section 5). The discount enters once,
    by one of two estimators of the same discounted objective:

        "uniform"     (t uniform):           u_i = -(beta / 2) * w(t_i) * (delta^w_i - delta^l_i)
        "discounted"  (t drawn ~ w(t), the   u_i = -(beta / 2) * (delta^w_i - delta^l_i)
                       authors' estimator):
        L = mean_i -log sigmoid(s_i * u_i)

    Where w(t) = gamma ** k(t) (``discount_weights``; the caller draws t with ``discounted_timestep_probs`` for
    "discounted") and s_i is the optional per-pair weight. The reported rewards are h_k = u's terms,
    -(beta / 2) * w(t_i) * delta_k ("uniform") or -(beta / 2) * delta_k. gamma = 1 gives DPO.
    """
    b = err.m.shape[0] // 2
    wt = discount_weights(
        timesteps,
        gamma=gamma if timestep_sampling == "uniform" else 1.0,
        num_inference_steps=num_inference_steps,
        num_train_timesteps=num_train_timesteps,
    ).to(err.delta.dtype)
    h_w, h_l = -(beta / 2) * wt * err.delta[:b], -(beta / 2) * wt * err.delta[b:]
    u = h_w - h_l
    if weights is not None:
        u = weights.to(u.dtype) * u
    loss = -F.logsigmoid(u).mean()
    return LossOutput(loss, pair_metrics(loss, u, h_w, h_l, err))


def cal_dpo_loss(
    err: SampleErrors, *, beta: float, beta_cal: float = 0.5, lam_cal: float = 0.5, weights: Tensor | None = None
) -> LossOutput:
    """Cal-DPO adapted to diffusion (our adaptation of Xiao et al. 2024; spec section 6):

        L = mean_i [ -log sigmoid(s_i * (h^w_i - h^l_i)) + lam_cal * ((h^w_i - c)^2 + (h^l_i + c)^2) ]

    Where h_k = -(beta / 2) * delta_k, c = 1 / (2 beta_cal) (c = 1 by default: a logit-sized target) and
    s_i the optional per-pair weight (on the -log sigmoid term only). lam_cal = 0 gives DPO.
    """
    b = err.m.shape[0] // 2
    h_w, h_l = -(beta / 2) * err.delta[:b], -(beta / 2) * err.delta[b:]
    u = h_w - h_l
    if weights is not None:
        u = weights.to(u.dtype) * u
    c = 1.0 / (2.0 * beta_cal)
    loss = (-F.logsigmoid(u) + lam_cal * ((h_w - c).square() + (h_l + c).square())).mean()
    return LossOutput(loss, pair_metrics(loss, u, h_w, h_l, err))


def rpo_weights(embeds_w: Tensor, embeds_l: Tensor, *, tau: float) -> Tensor:
    """Row-softmax weights of Diffusion-RPO over cosine distances (B_rows, B_cols), no grad:

    d_ij = 1 - cos(e^w_i, e^l_j),    w_ij = exp(-d_ij / tau) / sum_k exp(-d_ik / tau)
    """
    dtype = acc_dtype(embeds_w, embeds_l)
    ew = F.normalize(embeds_w.detach().to(dtype), dim=1)
    el = F.normalize(embeds_l.detach().to(dtype), dim=1)
    return torch.softmax(-(1.0 - ew @ el.T) / tau, dim=1)


def rpo_loss(
    err: SampleErrors,
    embeds_w: Tensor,
    embeds_l: Tensor,
    *,
    beta: float,
    tau: float = 0.5,
    weighting: str = "inside",
) -> LossOutput:
    """Diffusion-RPO (Gu et al. 2024; weighting of yinyueqin/relative-preference-optimization):
    every winner i contrasted with every loser j of the batch,

        D_ij = -(beta / 2) * (delta^w_i - delta^l_j)              (B x B; D_ii = u_i)
        w_ij = softmax_j( -(1 - cos(e^w_i, e^l_j)) / tau )        (``rpo_weights``; diagonal kept)
        "inside"  (default, the authors' RPO code):  L = mean_{i,j} -log sigmoid(w_ij * D_ij)
        "outside":                                   L = mean_i sum_j w_ij * (-log sigmoid(D_ij))

    Where e^w (B, D) embeds the rows (winners), e^l (B, D) the columns (losers); both are constants.
    With "inside" each row of w sums to 1, so the effective beta per entry is about beta / B and the
    gradient scale changes with the number of columns (with the world size in global scope); as
    tau -> 0 (nearest loser = own loser) L -> L_DPO / B + (B - 1)/B * log 2. "outside" tends to L_DPO.
    Metrics are those of the diagonal (own pairs), plus ``weight_diag`` = mean_i w_ii.
    """
    b = err.m.shape[0] // 2
    h_w, h_l = -(beta / 2) * err.delta[:b], -(beta / 2) * err.delta[b:]
    d = h_w[:, None] - h_l[None, :]  # (B, B)
    w = rpo_weights(embeds_w, embeds_l, tau=tau).to(d.dtype)
    if weighting == "inside":
        loss = -F.logsigmoid(w * d).mean()
    else:
        loss = (w * -F.logsigmoid(d)).sum(1).mean()
    u = torch.diagonal(d)
    metrics = pair_metrics(loss, u, h_w, h_l, err)
    metrics["weight_diag"] = torch.diagonal(w).mean().detach().float()
    return LossOutput(loss, metrics)


def dspo_loss(
    model_pred: Tensor,
    target: Tensor,
    ref_pred: Tensor,
    err: SampleErrors,
    *,
    form: str,
    lam_in: float,
    lam_out: float,
) -> LossOutput:
    """DSPO (Zhu, Xiao, Honavar, ICLR 2025; huaishengzhu/DSPO train.py), score-matching form:

        u_i = -lam_in * (delta^w_i - delta^l_i),   s_i = sigmoid(-u_i)
        "sd15":  L = mean_i mean_N (e^w_i - lam_out * s_i * d^w_i)^2
        "sdxl":  L = mean_i s_i^2 * mean_N (d^w_i)^2   if mean_i mean_N (d^w_i)^2 >= 0.1
                 L = mean_i s_i^2                       otherwise

    Where e^w = p^w - t^w, d^w = p^w - q^w (vectors). The reference code uses lam_in = beta/2 and
    lam_out = beta (the paper one lambda). Gradients flow through u (to winner and loser) and through
    e^w and d^w. Implicit rewards for the metrics: h_k = -lam_in * delta_k.
    """
    b = err.m.shape[0] // 2
    dtype = err.m.dtype
    h_w, h_l = -lam_in * err.delta[:b], -lam_in * err.delta[b:]
    u = h_w - h_l
    s = torch.sigmoid(-u)
    p = _rows(model_pred, dtype)[:b]
    q = _rows(ref_pred, dtype)[:b].detach()
    t = _rows(target, dtype)[:b].detach()
    d = p - q
    if form == "sd15":
        loss = ((p - t) - lam_out * s[:, None] * d).square().mean(1).mean()
    else:
        dd = d.square().mean(1)
        loss = torch.where(dd.mean() >= 0.1, (s.square() * dd).mean(), s.square().mean())
    return LossOutput(loss, pair_metrics(loss, u, h_w, h_l, err))


# --------------------------------------------------------------------------------------------------
# The online objectives: K samples of each of G prompts, S sampled steps (the group layout)
# --------------------------------------------------------------------------------------------------


def group_log_ratios(err: SampleErrors, scale: Tensor, rewards: Tensor) -> Tensor:
    """The per-step log-ratios Delta (S, G, K) of the group layout: rows step-major, row s G K + g K + k is sample
    k of prompt g at sampled step s, and Delta = log p_theta(x_(k+1) | x_k) - log p_ref(x_(k+1) | x_k) =
    -c delta, with c = b^2 / (2 sigma^2) the step's scale (``rollout.Transitions.scale``)."""
    g, k = rewards.shape
    return (-scale.to(err.delta.dtype) * err.delta).view(-1, g, k)


def best_and_worst(rewards: Tensor) -> tuple[Tensor, Tensor]:
    """Each group's highest- and lowest-reward sample (G,), ties to the lower index (a stable descending sort)."""
    order = torch.sort(rewards, dim=1, descending=True, stable=True).indices
    return order[:, 0], order[:, -1]


def list_mle(logits: Tensor, rewards: Tensor) -> Tensor:
    """ListMLE (Plackett-Luce) of each group's logits (G, K) under the ranking by ``rewards`` (G, K), the mean over
    groups: with s the logits sorted by descending reward (ties to the lower index),

        L = mean_g sum_i [ log sum_(j >= i) exp(s_gj) - s_gi ]

    (Dense_Reward_T2I's ``listMLELoss``: the same, with a random tie order and 1e-10 inside the log)."""
    order = torch.sort(rewards, dim=1, descending=True, stable=True).indices
    s = logits.gather(1, order)
    tail = torch.logcumsumexp(s.flip(1), dim=1).flip(1)
    return (tail - s).sum(1).mean()


def _online_metrics(loss: Tensor, u: Tensor, delta_raw: Tensor, clip: float, err: SampleErrors) -> dict:
    out = dict(
        loss=loss,
        implicit_acc=implicit_accuracy(u),
        reward_margin=u.mean(),
        log_ratio=delta_raw.mean(),
        clip_fraction=(delta_raw.abs() > clip).to(delta_raw.dtype).mean(),
        mse_w=err.m.mean(),
        ref_mse_w=err.r.mean(),
    )
    return {k: v.detach().float() for k, v in out.items()}


def dense_reward_loss(
    err: SampleErrors, scale: Tensor, rewards: Tensor, *, temperature: float = 10.0, clip: float = 1e-4
) -> LossOutput:
    """The dense-reward method as its authors train it online (Yang, Chen, Zhou, ICML 2024;
    Shentao-YANG/Dense_Reward_T2I ``get_pl_loss_logit`` and ``listMLELoss``): each trajectory's logit is the
    temperature times the mean over the S sampled steps (drawn with P(k) proportional to gamma^k by the caller) of
    the clipped log-ratio, and the loss is ListMLE over each prompt's K trajectories ranked by reward:

        l_gk = temperature * mean_s clip(Delta_sgk, -clip, clip),    Delta = -c delta   (``group_log_ratios``)
        L = mean_g ListMLE(l_g, rewards_g)                                             (``list_mle``)

    Defaults: the single-prompt setting (temperature 10, clip 1e-4, 3 steps); multi-prompt: 12.5, 5e-4, 1 step.
    Delta comes from delta in one expression (the authors subtract two bf16 log-probabilities, whose rounding is
    larger than the 1e-4 clip). Metrics: u = l_best - l_worst per group (implicit_acc: u > 0), the mean unclipped
    Delta (``log_ratio``) and the fraction clipped."""
    d = group_log_ratios(err, scale, rewards)
    logits = temperature * d.clamp(-clip, clip).mean(0)
    loss = list_mle(logits, rewards)
    best, worst = best_and_worst(rewards)
    u = logits.gather(1, best[:, None])[:, 0] - logits.gather(1, worst[:, None])[:, 0]
    return LossOutput(loss, _online_metrics(loss, u, d, clip, err))


def _best_worst_steps(d: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor]:
    best, worst = best_and_worst(rewards)
    idx = torch.arange(rewards.shape[0], device=d.device)
    return d[:, idx, best], d[:, idx, worst]  # (S, G) each


def online_dpo_loss(
    err: SampleErrors, scale: Tensor, rewards: Tensor, *, beta: float = 10.0, clip: float = 1e-4
) -> LossOutput:
    """Online DPO (as D3PO, Yang et al. 2024, on the model's own samples): each prompt's best sample against its
    worst, at every sampled step,

        u_sg = beta * (clip(Delta_s,g,best) - clip(Delta_s,g,worst)),    L = mean_(s,g) -log sigmoid(u_sg)

    with Delta = -c delta the per-step log-ratio to the reference (D3PO's is to the sampling policy; ours is held
    to the reference as the dense-reward method's), clipped at +-clip as the dense-reward method."""
    d = group_log_ratios(err, scale, rewards)
    dw, dl = _best_worst_steps(d.clamp(-clip, clip), rewards)
    u = beta * (dw - dl)
    loss = -F.logsigmoid(u).mean()
    return LossOutput(loss, _online_metrics(loss, u.mean(0), d, clip, err))


def online_rpo_loss(
    err: SampleErrors,
    scale: Tensor,
    rewards: Tensor,
    embeds_w: Tensor,
    embeds_l: Tensor,
    *,
    beta: float = 10.0,
    clip: float = 1e-4,
    tau: float = 0.5,
    weighting: str = "inside",
) -> LossOutput:
    """Online RPO (ours: Diffusion-RPO's cross-prompt contrast applied to the model's own samples): every prompt's
    best sample i contrasted with every prompt's worst sample j of the batch, at every sampled step, weighted by
    the similarity of their images as RPO,

        D_sij = beta * (clip(Delta_s,i,best) - clip(Delta_s,j,worst))              (S x G x G; D_sii = online-dpo's u)
        w_ij = softmax_j( -(1 - cos(e^w_i, e^l_j)) / tau )                          (``rpo_weights``)
        "inside":  L = mean_(s,i,j) -log sigmoid(w_ij D_sij)
        "outside": L = mean_(s,i) sum_j w_ij (-log sigmoid(D_sij))

    Where e^w (G, D) embeds each prompt's best image and e^l (G, D) its worst (``best_and_worst`` picks them)."""
    d = group_log_ratios(err, scale, rewards)
    dw, dl = _best_worst_steps(d.clamp(-clip, clip), rewards)
    dd = beta * (dw[:, :, None] - dl[:, None, :])  # (S, G, G)
    w = rpo_weights(embeds_w, embeds_l, tau=tau).to(dd.dtype)
    if weighting == "inside":
        loss = -F.logsigmoid(w * dd).mean()
    else:
        loss = (w * -F.logsigmoid(dd)).sum(2).mean()
    metrics = _online_metrics(loss, torch.diagonal(dd, dim1=1, dim2=2).mean(0), d, clip, err)
    metrics["weight_diag"] = torch.diagonal(w).mean().detach().float()
    return LossOutput(loss, metrics)


# --------------------------------------------------------------------------------------------------
# The objective table: what each objective needs, its options, its eager function
# --------------------------------------------------------------------------------------------------


class LossInputs(NamedTuple):
    """The validated inputs of one loss call (see ``PreferenceLoss.forward``)."""

    model_pred: Tensor
    target: Tensor
    ref_pred: Tensor | None = None
    embeds_w: Tensor | None = None
    embeds_l: Tensor | None = None
    weights: Tensor | None = None
    timesteps: Tensor | None = None
    rewards: Tensor | None = None
    log_ratio_scale: Tensor | None = None


PAIR_INPUTS = 7  # the fields of LossInputs the pair objectives' fused ops take (the rest are the group layout's)


def positive(name: str, v: Any) -> float:
    if not (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite positive number, got {v!r}")
    return float(v)


def non_negative(name: str, v: Any) -> float:
    if not (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite non-negative number, got {v!r}")
    return float(v)


def count(name: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


def discount(name: str, v: Any) -> float:
    v = positive(name, v)
    if v > 1:
        raise ValueError(f"{name} must be in (0, 1], got {v}")
    return v


class one_of:  # noqa: N801 (used like the other checks: one_of("a", "b")(name, value))
    """A check that the value is one of ``choices`` (the CLIs read ``choices`` for argparse)."""

    def __init__(self, *choices: str):
        self.choices = choices

    def __call__(self, name: str, v: Any) -> str:
        if v not in self.choices:
            raise ValueError(f"{name} must be one of {self.choices}, got {v!r}")
        return v


@dataclass(frozen=True)
class Layout:
    """How the rows of a loss call's predictions are arranged: ``per_unit`` rows per unit (a pair, or a winner
    alone), the units' first rows first. Per-unit inputs (weights, timesteps, embeddings, a shared target) have
    one row per unit."""

    name: str
    per_unit: int
    description: str

    def units(self, rows: int) -> int | None:
        """The units in ``rows`` rows, or None where ``rows`` does not fit the layout."""
        return rows // self.per_unit if rows % self.per_unit == 0 else None


PAIRS = Layout("pairs", 2, "2B rows, the B winners first and then the B losers")
WINNERS = Layout("winners", 1, "B rows, the winners only")
GROUPS = Layout(
    "groups",
    1,
    "S G K rows, step-major: row s G K + g K + k is sample k of prompt g at sampled step s (rewards (G, K))",
)


@dataclass(frozen=True)
class Objective:
    """One objective, declared once.

    ``options``: name -> (default, check); a default of None is filled by ``defaults`` (options that depend on
    others, as DSPO's do). ``eager(err, inputs, opts)`` is its plain-torch loss. What it needs: ``reference``
    (a ref_pred), ``embeddings`` (embeds_w / embeds_l: RPO's weight matrix), ``timesteps`` (B,),
    ``weights`` (takes optional per-pair weights). ``layout``: how its rows are arranged (``PAIRS``, ``WINNERS``).
    ``fused``: a fused kernel exists (Triton and native; ``rpo_fast.kernels.shared.KERNEL_BRANCH``); without one
    the objective runs eagerly or compiled, and ``backend="auto"`` picks compile on CUDA. ``score_terms``: it reads
    <e, d> and |d|^2 of the winners, and its gradient has a term in (p - q) (DSPO). ``metrics``: the names it
    reports. ``online``: it trains on the model's own samples (the ``GROUPS`` layout: ``rewards`` (G, K) and
    ``log_ratio_scale`` (rows,) inputs); every backend runs its error pass (``sample_errors``: fused on Triton and
    native) and its eager function combines the per-sample errors."""

    name: str
    eager: Callable[[SampleErrors, LossInputs, dict], LossOutput]
    options: dict[str, tuple[Any, Callable[[str, Any], Any]]] = field(default_factory=dict)
    defaults: Callable[[dict], dict] | None = None
    reference: bool = True
    embeddings: bool = False
    timesteps: bool = False
    weights: bool = False
    layout: Layout = PAIRS
    fused: bool = True
    score_terms: bool = False
    metrics: tuple[str, ...] = PAIR_METRICS
    online: bool = False

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """Check the options and fill in the defaults."""
        unknown = set(given) - set(self.options)
        if unknown:
            allowed = ", ".join(self.options) or "none"
            raise ValueError(f"unknown option(s) {sorted(unknown)} for objective {self.name!r} (it takes: {allowed})")
        opts = {k: given.get(k, default) for k, (default, _) in self.options.items()}
        if self.defaults is not None:
            opts = self.defaults(opts)
        return {k: self.options[k][1](k, v) for k, v in opts.items()}


def _rpo_eager(err: SampleErrors, x: LossInputs, o: dict) -> LossOutput:
    """RPO's eager entry: in global scope the matrix spans every rank's pairs (errors gathered with autograd,
    embeddings as constants, all in one all-gather; the backward is one reduce-scatter)."""
    from . import distributed

    ew, el = x.embeds_w, x.embeds_l
    if o["scope"] == "global" and distributed.world_size() > 1:
        b = err.m.shape[0] // 2
        rows = torch.stack([h for v in err for h in (v[:b], v[b:])], dim=1)  # (b, 2 x fields): winners, losers
        rows, ew, el = distributed.gather_rows_packed(rows, ew, el)  # one all-gather per micro-step
        err = SampleErrors(*(torch.cat([rows[:, 2 * i], rows[:, 2 * i + 1]]) for i in range(len(err))))
    return rpo_loss(err, ew, el, beta=o["beta"], tau=o["tau"], weighting=o["weighting"])


DSPO_DEFAULT_BETA = {"sd15": 0.001, "sdxl": 5000.0}  # the DSPO reference launchers


def _dspo_defaults(o: dict) -> dict:
    form = one_of("sd15", "sdxl")("form", o["form"])
    beta = DSPO_DEFAULT_BETA[form] if o["beta"] is None else o["beta"]
    lam_in = beta / 2 if o["lam_in"] is None else o["lam_in"]
    return dict(o, beta=beta, lam_in=lam_in, lam_out=beta if o["lam_out"] is None else o["lam_out"])


BETA = (5000.0, positive)
ONLINE = dict(layout=GROUPS, fused=False, online=True, metrics=ONLINE_METRICS)
OBJECTIVE_TABLE: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective(
            "dpo",
            lambda err, x, o: dpo_loss(err, beta=o["beta"], weights=x.weights),
            dict(beta=BETA),
            weights=True,
        ),
        Objective("sft", lambda err, x, o: sft_loss(err), reference=False, layout=WINNERS, metrics=("loss", "mse_w")),
        Objective(
            "rpo",
            _rpo_eager,
            dict(
                beta=BETA,
                tau=(0.5, positive),
                weighting=("inside", one_of("inside", "outside")),
                scope=("global", one_of("local", "global")),
            ),
            embeddings=True,
            metrics=PAIR_METRICS + ("weight_diag",),
        ),
        Objective(
            "dspo",
            lambda err, x, o: dspo_loss(
                x.model_pred, x.target, x.ref_pred, err, form=o["form"], lam_in=o["lam_in"], lam_out=o["lam_out"]
            ),
            dict(
                beta=(None, positive),
                form=("sd15", one_of("sd15", "sdxl")),
                lam_in=(None, positive),
                lam_out=(None, positive),
            ),
            defaults=_dspo_defaults,
            score_terms=True,
        ),
        Objective(
            "dense-dpo",
            lambda err, x, o: dense_dpo_loss(
                err,
                x.timesteps,
                beta=o["beta"],
                gamma=o["gamma"],
                num_inference_steps=o["num_inference_steps"],
                num_train_timesteps=o["num_train_timesteps"],
                timestep_sampling=o["timestep_sampling"],
                weights=x.weights,
            ),
            dict(
                beta=BETA,
                gamma=(0.9, discount),
                num_inference_steps=(50, count),
                num_train_timesteps=(1000, count),
                timestep_sampling=("uniform", one_of("uniform", "discounted")),
            ),
            timesteps=True,
            weights=True,
        ),
        Objective(
            "cal-dpo",
            lambda err, x, o: cal_dpo_loss(
                err, beta=o["beta"], beta_cal=o["beta_cal"], lam_cal=o["lam_cal"], weights=x.weights
            ),
            dict(beta=BETA, beta_cal=(0.5, positive), lam_cal=(0.5, non_negative)),
            weights=True,
        ),
        Objective(
            "dense-reward",
            lambda err, x, o: dense_reward_loss(
                err, x.log_ratio_scale, x.rewards, temperature=o["temperature"], clip=o["log_ratio_clip"]
            ),
            dict(temperature=(10.0, positive), log_ratio_clip=(1e-4, positive)),
            **ONLINE,
        ),
        Objective(
            "online-dpo",
            lambda err, x, o: online_dpo_loss(
                err, x.log_ratio_scale, x.rewards, beta=o["beta"], clip=o["log_ratio_clip"]
            ),
            dict(beta=(10.0, positive), log_ratio_clip=(1e-4, positive)),
            **ONLINE,
        ),
        Objective(
            "online-rpo",
            lambda err, x, o: online_rpo_loss(
                err,
                x.log_ratio_scale,
                x.rewards,
                x.embeds_w,
                x.embeds_l,
                beta=o["beta"],
                clip=o["log_ratio_clip"],
                tau=o["tau"],
                weighting=o["weighting"],
            ),
            dict(
                beta=(10.0, positive),
                log_ratio_clip=(1e-4, positive),
                tau=(0.5, positive),
                weighting=("inside", one_of("inside", "outside")),
            ),
            embeddings=True,
            **dict(ONLINE, metrics=ONLINE_METRICS + ("weight_diag",)),
        ),
    )
}
OBJECTIVES = tuple(OBJECTIVE_TABLE)


def register(objective: Objective) -> Objective:
    """Add an objective to the table (an extension, or a test's throwaway one): from then on ``PreferenceLoss``,
    the trainer's ``--objective`` (in processes that register it before parsing) and the kernels' dispatch see it.
    Without ``fused`` it runs on the eager and compile backends only."""
    if objective.name in OBJECTIVE_TABLE:
        raise ValueError(f"objective {objective.name!r} is already in the table")
    OBJECTIVE_TABLE[objective.name] = objective
    return objective


def objective(name: str) -> Objective:
    """The table's entry for ``name``, or a ValueError listing the objectives."""
    if name not in OBJECTIVE_TABLE:
        raise ValueError(f"unknown objective {name!r}; choose one of {OBJECTIVES}")
    return OBJECTIVE_TABLE[name]
