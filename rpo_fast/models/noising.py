"""The two ways a family noises a latent and names the training target, as pieces a family picks by inheriting one:

    class SD15Family(DDPMNoising, ModelFamily): ...
    class FlowFamily(FlowMatchingNoising, ModelFamily): ...

DDPM (``DDPMNoising``; diffusers' DDPMScheduler from the folder's scheduler config), t an integer of 0..T-1:

    noisy = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps          (DDPMScheduler.add_noise)
    target = eps  (epsilon)   or   sqrt(abar_t) eps - sqrt(1 - abar_t) x0  (v_prediction, get_velocity)

Rectified flow (``FlowMatchingNoising``), s in (0, 1) and the trainer's t = 1000 s (float; high t = noisy):

    x_t = (1 - s) x0 + s eps,   target v = eps - x0        (FlowMatchEulerDiscreteScheduler.scale_noise)
    s = shift(u), u = sigmoid(n), n ~ N(0, 1)              (logit-normal, then the scheduler's shift:
        static  s = S u / (1 + (S - 1) u)
        dynamic s = e^mu / (e^mu + 1/u - 1), mu linear in the image's token count from base_shift at
                base_image_seq_len tokens to max_shift at max_image_seq_len)

Dense DPO's discount counts the steps of the family's own sampler, k = 0 the noisiest (``discount_timesteps``: the
integer timestep j of 0..T-1 whose k(j) = ((T - 1 - j) N) // T is that step). DDPM: t itself (DDIM's "leading"
timesteps 981, 961, ..., 1 are steps k = 0..49). Flow: the samplers step uniformly in the unshifted u (the pipelines'
sigmas from 1 down to about 1/N, then the shift), step i covering u in (u_(i+1), u_i], so j = ceil(T u) - 1 with
u = shift^-1(s) at the image's token count; the sampler's own 50 timesteps are k = 0..49, and an SD3 s = 0.5
(shift 3) is u = 0.25, step 37 of 50 (the plain floor(1000 s) would say 24).

With a ``probs`` law over 0..T-1 (``--timestep-sampling discounted``: P(k) proportional to gamma^k) both draw the
integer j from it, which replaces the training law (uniform; logit-normal): DDPM t = j; flow u = (j + 1/2) / T,
s = shift(u) (t = 1000 s), a point of sampler step k(j) at the image's token count.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor


class DDPMNoising:
    """DDPM noising with the scheduler's epsilon or v-prediction target (the UNet families)."""

    flow_matching: ClassVar[bool] = False

    @cached_property
    def scheduler(self):
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(self.config("scheduler"))
        if sched.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {sched.config.prediction_type!r} in {self.path}/scheduler")
        return sched

    @property
    def prediction_type(self) -> str:
        """ "epsilon" or "v_prediction" (the scheduler config's)."""
        return self.scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def sample_timesteps(self, gens, device, probs=None, latent_shape=None):
        """One integer t (B,) per pair from its generator: uniform over 0..T-1, or from ``probs``."""
        if probs is not None:
            return torch.cat([torch.multinomial(probs, 1, generator=g) for g in gens])
        T = self.num_train_timesteps
        return torch.cat([torch.randint(0, T, (1,), generator=g, device=device) for g in gens])

    def discount_timesteps(self, t, latent_shape=None):
        """The integer timesteps (B,) whose k(t) is the sampler step of t: t itself."""
        return t.long()

    def noisy_and_target(self, x0, noise, t):
        """x0 (2B, ...) [winners; losers], noise and t (B, ...) shared by a pair -> noisy (2B, ...) and the target:
        epsilon (B, ...), shared by winner and loser (the loss reads it once per pair), or the velocity (2B, ...)."""
        noise2, t2 = noise.repeat(2, *[1] * (noise.dim() - 1)), t.repeat(2)
        noisy = self.scheduler.add_noise(x0, noise2, t2)
        if self.prediction_type == "epsilon":
            return noisy, noise
        return noisy, self.scheduler.get_velocity(x0, noise2, t2)


class FlowMatchingNoising:
    """Rectified-flow noising with a velocity target and the scheduler config's shift (the transformer families).
    ``patch``: latent pixels per token side, for the dynamic shift's token count."""

    flow_matching: ClassVar[bool] = True
    prediction_type: ClassVar[str] = "flow"  # the velocity eps - x0
    patch: ClassVar[int] = 2

    @cached_property
    def scheduler_config(self) -> dict:
        return self.config("scheduler")

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler_config.get("num_train_timesteps", 1000)

    def shift_factor(self, tokens: int) -> float:
        """The factor S of the shift s = S u / (1 + (S - 1) u): the config's ``shift``, or e^mu for the dynamic shift
        (mu linear in the token count; e^mu / (e^mu + 1/u - 1) is the same map)."""
        sched = self.scheduler_config
        if sched.get("use_dynamic_shifting"):
            lo, hi = sched.get("base_image_seq_len", 256), sched.get("max_image_seq_len", 4096)
            b0, b1 = sched.get("base_shift", 0.5), sched.get("max_shift", 1.15)
            return math.exp(b0 + (b1 - b0) * (tokens - lo) / (hi - lo))
        return sched.get("shift", 1.0)

    def shift(self, u: Tensor, tokens: int) -> Tensor:
        """The scheduler's timestep shift of u in (0, 1) for an image of ``tokens`` transformer tokens."""
        f = self.shift_factor(tokens)
        return f * u / (1 + (f - 1) * u)

    def unshift(self, s: Tensor, tokens: int) -> Tensor:
        """The inverse of ``shift``: u = s / (S - (S - 1) s)."""
        f = self.shift_factor(tokens)
        return s / (f - (f - 1) * s)

    def sampler_u(self, steps: int) -> Tensor:
        """The sampler's steps before the shift, u_i = 1 - i/N for i = 0..N-1 (the pipelines' sigmas
        linspace(1, 1/N, N)); float64."""
        return torch.linspace(1, 1 / steps, steps, dtype=torch.float64)

    def sampler_sigmas(self, steps: int, tokens: int) -> Tensor:
        """The sampler's sigmas s_0 > ... > s_(N-1) at an image of ``tokens`` tokens: the shifted grid."""
        return self.shift(self.sampler_u(steps), tokens)

    def discount_timesteps(self, t, latent_shape=None):
        """The integer timesteps (B,) whose k(t) is the sampler step of t = 1000 s: ceil(T shift^-1(s)) - 1. A
        sampler's own step sits on the top edge of its interval (FLUX's u = 1 - i/N): 1e-3 of a timestep absorbs
        the fp32 rounding of t = 1000 s there."""
        T = self.num_train_timesteps
        u = self.unshift(t.double() / T, self.tokens(latent_shape))
        return ((u * T - 1e-3).ceil().long() - 1).clamp(0, T - 1)

    def tokens(self, latent_shape=None) -> int:
        """Transformer tokens of one latent (C, h, w) in patches of ``patch`` x ``patch`` (None: the default
        resolution's latent)."""
        shape = latent_shape if latent_shape is not None else self.dummy_latent_shape()
        return (shape[-2] // self.patch) * (shape[-1] // self.patch)

    def sample_timesteps(self, gens, device, probs=None, latent_shape=None):
        """t = 1000 s (B,) fp32, one per pair from its generator: logit-normal, shifted (see the module doc)."""
        T = self.num_train_timesteps
        if probs is not None:  # a point of the drawn sampler step (the module doc)
            u = (torch.cat([torch.multinomial(probs, 1, generator=g) for g in gens]).double() + 0.5) / T
        else:
            u = torch.sigmoid(torch.cat([torch.randn(1, generator=g, device=device) for g in gens])).double()
        return (self.shift(u, self.tokens(latent_shape)) * T).float()

    def dummy_latent_shape(self) -> tuple[int, int, int]:
        size = self.default_resolution // self.vae_scale_factor
        return (self.latent_channels, size, size)

    def noisy_and_target(self, x0, noise, t):
        """x_t = (1 - s) x0 + s eps and v = eps - x0, s = t / 1000 per pair."""
        n = x0.shape[0] // noise.shape[0]
        s = (t / self.num_train_timesteps).repeat(n).view(-1, *[1] * (x0.dim() - 1)).to(x0.dtype)
        eps = noise.repeat(n, *[1] * (noise.dim() - 1))
        return (1 - s) * x0 + s * eps, eps - x0
