"""Rollouts: the policy's own samples, recorded step by step, and each step's Gaussian transition.

A stochastic sampler step is Gaussian, x_(k+1) ~ N(mu_k, s_k^2 I) with mu_k = a_k x_k + b_k f(x_k) linear in the
denoiser's (guided) prediction f. Under two denoisers (the policy's p, the reference's q) at the same x_k, x_(k+1),
with e*_k = (x_(k+1) - a_k x_k) / b_k and the log-density a mean over the N latent elements (as the authors' code),

    log p_theta(x_(k+1) | x_k) - log p_ref(x_(k+1) | x_k) = -c_k * delta_k,    c_k = b_k^2 / (2 s_k^2)

where delta_k = mean_N (p - q)(p + q - 2 e*) is the error pass of (p, q, t = e*) (``rpo_fast.sample_errors``).
The two samplers (``transitions``):

DDIM with eta (the UNet families; diffusers' ``DDIMScheduler.step``, ``clip_sample`` and ``thresholding`` off),
abar the cumulative alphas at t and at the previous timestep t' (``final_alpha_cumprod`` past the first):

    s^2 = eta^2 (1 - abar') / (1 - abar) (1 - abar / abar'),   c' = sqrt(1 - abar' - s^2)
    epsilon:       a = sqrt(abar' / abar),                       b = c' - sqrt(abar' (1 - abar) / abar)
    v_prediction:  a = sqrt(abar') sqrt(abar) + c' sqrt(1 - abar),  b = c' sqrt(abar) - sqrt(abar') sqrt(1 - abar)

Flow-GRPO's SDE step (the flow families; flow_grpo/diffusers_patch/sd3_sde_with_logprob.py, lines 40-62), sigmas
s_0 > ... > s_(N-1) > s_N = 0 of the family's sampler, dt = s_(k+1) - s_k < 0, noise level l (0.7):

    std = l sqrt(s_k / (1 - s_k))   (s_k = 1 replaced by the grid's s_1, as the original)
    a = 1 + std^2 dt / (2 s_k),   b = (1 + std^2 (1 - s_k) / (2 s_k)) dt,   s = std sqrt(-dt)

Steps with s = 0 (DDIM's eta = 0) have no density and are never trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .seeding import seed_of

ROLLOUT_STREAM = 0x524F4C4C  # "ROLL": the seed stream of rollout noise


@dataclass(frozen=True)
class Transitions:
    """The N steps of one sampler: ``timesteps`` (N,) as the family's ``predict`` takes them (DDPM: integers;
    flow: 1000 s), and float64 (N,) mean coefficients ``a``, ``b`` and standard deviations ``std``."""

    timesteps: Tensor
    a: Tensor
    b: Tensor
    std: Tensor

    @property
    def scale(self) -> Tensor:
        """c_k = b_k^2 / (2 s_k^2): the log-ratio of step k is -c_k delta_k (float64, (N,))."""
        return self.b.square() / (2 * self.std.square())

    def log_prob(self, x: Tensor, x_next: Tensor, pred: Tensor, k: int) -> Tensor:
        """log N(x_next; a x + b pred, s^2), the mean over each row's elements (float64, (rows,))."""
        mu = self.a[k] * x.double() + self.b[k] * pred.double()
        s = self.std[k]
        lp = -((x_next.double() - mu) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
        return lp.flatten(1).mean(1)


def ddim_transitions(scheduler, steps: int, eta: float) -> Transitions:
    """DDIM's N = ``steps`` steps with ``eta`` from a ``DDIMScheduler`` (the pipeline's timesteps)."""
    scheduler.set_timesteps(steps)
    ts = scheduler.timesteps.long()
    abar_all = scheduler.alphas_cumprod.double()
    ratio = scheduler.config.num_train_timesteps // steps
    prev = ts - ratio
    abar = abar_all[ts]
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    abar_prev = torch.where(prev >= 0, abar_all[prev.clamp(min=0)], final)
    var = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
    std = eta * var.sqrt()
    c = (1 - abar_prev - std**2).sqrt()
    if scheduler.config.prediction_type == "epsilon":
        a, b = (abar_prev / abar).sqrt(), c - (abar_prev * (1 - abar) / abar).sqrt()
    elif scheduler.config.prediction_type == "v_prediction":
        a = abar_prev.sqrt() * abar.sqrt() + c * (1 - abar).sqrt()
        b = c * abar.sqrt() - abar_prev.sqrt() * (1 - abar).sqrt()
    else:
        raise ValueError(f"DDIM rollouts take epsilon or v_prediction, not {scheduler.config.prediction_type!r}")
    return Transitions(ts, a, b, std)


def flow_sde_transitions(sigmas: Tensor, noise_level: float, num_train_timesteps: int = 1000) -> Transitions:
    """Flow-GRPO's SDE steps over ``sigmas`` s_0 > ... > s_(N-1) (the final 0 appended here)."""
    s = sigmas.double()
    s_next = torch.cat([s[1:], s.new_zeros(1)])
    dt = s_next - s
    sigma_max = s[1] if len(s) > 1 else s[0]  # Flow-GRPO: self.sigmas[1]
    std_t = (s / (1 - torch.where(s == 1, sigma_max, s))).sqrt() * noise_level
    a = 1 + std_t**2 / (2 * s) * dt
    b = (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    return Transitions((s * num_train_timesteps).float(), a, b, std_t * (-dt).sqrt())


def transitions(family, steps: int, *, eta: float = 1.0, noise_level: float = 0.7, latent_shape=None) -> Transitions:
    """The family's stochastic sampler: DDIM with ``eta`` (DDPM families) or Flow-GRPO's SDE step with
    ``noise_level`` (flow families, at the token count of ``latent_shape``)."""
    if family.flow_matching:
        sigmas = family.sampler_sigmas(steps, family.tokens(latent_shape))
        return flow_sde_transitions(sigmas, noise_level, family.num_train_timesteps)
    from diffusers import DDIMScheduler

    return ddim_transitions(DDIMScheduler.from_config(family.config("scheduler")), steps, eta)


def cat_conditioning(a: dict, b: dict) -> dict:
    """Two conditionings' rows, ``a``'s then ``b``'s (nested dicts, as SDXL's added_cond_kwargs)."""
    return {k: cat_conditioning(v, b[k]) if isinstance(v, dict) else torch.cat([v, b[k]]) for k, v in a.items()}


def index_conditioning(cond: dict, rows: Tensor) -> dict:
    """A conditioning's ``rows`` (nested dicts)."""
    return {k: index_conditioning(v, rows) if isinstance(v, dict) else v[rows.to(v.device)] for k, v in cond.items()}


def guided(family, denoiser, x: Tensor, t: Tensor, cond: dict, uncond: dict | None, guidance: float) -> Tensor:
    """The classifier-free guided prediction f_u + w (f_c - f_u), both in one forward of 2 n rows (as the
    pipelines); ``uncond`` None or w = 1: f_c alone."""
    if uncond is None or guidance == 1.0:
        return family.predict(denoiser, x, t, cond)
    f_u, f_c = family.predict(denoiser, torch.cat([x, x]), torch.cat([t, t]), cat_conditioning(uncond, cond)).chunk(2)
    return f_u + guidance * (f_c - f_u)


@dataclass
class Trajectories:
    """Recorded rollouts of R rows: ``latents`` (R, N + 1, C, h, w) x_0 (noise) .. x_N (the sample), in the
    sampler's fp32; ``seeds`` (R,) the seed each row's noise came from. The transitions are the run's."""

    latents: Tensor
    seeds: Tensor


@torch.no_grad()
def sample_trajectories(
    family,
    denoiser,
    trans: Transitions,
    cond: dict,
    uncond: dict | None,
    seeds: list[int],
    latent_shape: tuple[int, int, int],
    *,
    guidance: float,
    dtype: torch.dtype = torch.float32,
) -> Trajectories:
    """Sample one trajectory per row of ``cond`` (rows: the prompts repeated K times), each from the generator
    seeded with its seed (initial noise, then one noise draw per step): x_(k+1) = a_k x_k + b_k f + s_k z. The
    latents stay fp32; the denoiser runs in ``dtype``."""
    from .models import cast_conditioning

    device = next(denoiser.parameters()).device
    rows = len(seeds)
    gens = [torch.Generator(device).manual_seed(s) for s in seeds]
    x = torch.stack([torch.randn(latent_shape, generator=g, device=device) for g in gens])
    out = [x]
    cond_d = cast_conditioning(cond, dtype)
    uncond_d = None if uncond is None else cast_conditioning(uncond, dtype)
    for k in range(len(trans.timesteps)):
        t = trans.timesteps[k].to(device).expand(rows)
        f = guided(family, denoiser, x.to(dtype), t, cond_d, uncond_d, guidance).float()
        z = torch.stack([torch.randn(latent_shape, generator=g, device=device) for g in gens])
        x = (trans.a[k] * x.double() + trans.b[k] * f.double() + trans.std[k] * z.double()).float()
        out.append(x)
    return Trajectories(torch.stack(out, 1), torch.tensor(seeds))


def rollout_seeds(seed: int, step: int, rank: int, rows: int) -> list[int]:
    """The seed of each rollout row of an optimizer step on a rank (a pure function: resumes redraw the same)."""
    return [seed_of(seed, ROLLOUT_STREAM, step, rank, i) for i in range(rows)]


def step_targets(trans: Transitions, latents: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For rows of ``latents`` (R, N + 1, ...) at their step ``k`` (R,): x_k, the error pass's target
    e* = (x_(k+1) - a_k x_k) / b_k (fp32, from float64) and c_k (R,) float64."""
    idx = torch.arange(latents.shape[0])
    x, x_next = latents[idx, k], latents[idx, k + 1]
    view = (-1, *[1] * (x.dim() - 1))
    a, b = trans.a[k].view(view), trans.b[k].view(view)
    target = ((x_next.double() - a * x.double()) / b).float()
    return x, target, trans.scale[k]
