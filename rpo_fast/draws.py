"""The random draws of a pair and the model inputs they make, shared by the trainer and the reference pass
(``python -m rpo_fast.reference``): the same seed, pair and epoch give the same inputs in both, on any number of ranks.

Every draw of a pair (its latent sample, noise, timestep, caption drop) comes from one generator seeded with
``seed_of(seed, salt, epoch, pair)``: salt 0 for training, 1 + repeat for the evaluation's fixed draws (epoch 0). The
sampler's permutation and twin flips come from (seed, epoch) and a pair falls at most once in an epoch, so every input
a run will see is known before it starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data.loader import Pick
from .models import cast_conditioning
from .seeding import seed_of


def pair_seeds(seed: int, picks: list[Pick], salt: int = 0) -> list[int]:
    """One seed per pair: ``seed_of(seed, salt, epoch, index)``."""
    return [seed_of(seed, salt, p.epoch, p.index) for p in picks]


@dataclass
class ModelInputs:
    """A micro-batch's denoiser inputs: ``noisy`` (R, C, h, w) in the model's dtype and ``target`` for R rows
    ([winners; losers], or the winners only), ``t`` (B,) one timestep per pair and ``t_rows`` (R,) per row, ``cond``
    the conditioning in the model's dtype."""

    noisy: torch.Tensor
    target: torch.Tensor
    t: torch.Tensor
    t_rows: torch.Tensor
    cond: dict


def model_inputs(
    family,
    batch: dict,
    seeds: list[int],
    *,
    dtype: torch.dtype,
    empty: dict,
    drop_prob: float,
    timestep_probs: torch.Tensor | None = None,
    pairs: bool = True,
) -> ModelInputs:
    """The draws of each pair from its seed (on the batch's device), and the noisy latents, targets, timesteps and
    conditioning they make: a sample of each cached latent distribution, one noise draw and timestep per pair (winner
    and loser share them), the caption dropped with probability ``drop_prob``. ``pairs``: winners and losers
    ([winners; losers]), else the winners only."""
    b, dev = batch["latent_mean"].shape[0], batch["latent_mean"].device
    gens = [torch.Generator(dev).manual_seed(s) for s in seeds]
    shape = batch["latent_mean"].shape[1:]  # (2, C, h, w)
    eps = torch.stack([torch.randn(shape, generator=g, device=dev) for g in gens])
    noise = torch.stack([torch.randn(shape[1:], generator=g, device=dev) for g in gens])
    t = family.sample_timesteps(gens, dev, timestep_probs, latent_shape=shape[1:])
    u = torch.cat([torch.rand(1, generator=g, device=dev) for g in gens])
    drop = u < drop_prob
    z = batch["latent_mean"] + batch["latent_std"] * eps  # (B, 2, C, h, w): a sample of each latent distribution
    x0 = family.latents(z).transpose(0, 1).flatten(0, 1)  # (2B, C, h, w) [winners; losers]
    noisy, target = family.noisy_and_target(x0, noise, t)
    noisy = noisy.to(dtype)
    cond = cast_conditioning(family.conditioning(batch, drop, empty, pairs=pairs), dtype)
    if pairs:
        return ModelInputs(noisy, target, t, t.repeat(2), cond)
    return ModelInputs(noisy[:b], target[:b], t, t, cond)
