"""Rollouts (``rpo_fast.rollout``): each sampler step's mean, standard deviation and so log-probability held to
diffusers' ``DDIMScheduler.step`` (the UNet families, epsilon and v-prediction) and to a transcription of
Flow-GRPO's ``sde_step_with_logprob`` (the flow families); the log-ratio of two denoisers at a recorded step is
-c delta of the error pass; the recorded trajectories are the DDIM pipeline's own samples, seed for seed.

Tolerances: coefficients against diffusers' fp32 step within 2e-5 relative (it computes in fp32, ours in
float64); log-probabilities within 1e-4 absolute of fp32 transcriptions (terms of size ~1 in fp32);
the log-ratio identity in float64 within 1e-9.
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from rpo_fast import objectives as O
from rpo_fast import rollout as R
from rpo_fast.testing.models import build_scheduler


def _ddim(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler.from_config(build_scheduler(prediction_type).config)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_steps_are_diffusers_step(prediction_type):
    sched = _ddim(prediction_type)
    steps, eta = 10, 1.0
    trans = R.ddim_transitions(sched, steps, eta)
    g = torch.Generator().manual_seed(11)
    for k, t in enumerate(sched.timesteps):
        x, f, z = (torch.randn(3, 4, 5, 7, generator=g) for _ in range(3))
        mean = sched.step(f, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        ours = trans.a[k] * x.double() + trans.b[k] * f.double()
        torch.testing.assert_close(ours, mean.double(), rtol=2e-5, atol=2e-5)
        prev = t - sched.config.num_train_timesteps // steps
        std = eta * sched._get_variance(t, prev).double().sqrt()
        torch.testing.assert_close(trans.std[k], std, rtol=2e-5, atol=0)
        assert int(trans.timesteps[k]) == int(t)
        if std == 0:  # the last step with set_alpha_to_one: no density (never trained on)
            assert k == steps - 1
            continue
        x_next = sched.step(f, t, x, eta=eta, variance_noise=z).prev_sample
        # the authors' log-prob (scheduling_ddim_extended.py step_logprob: Normal(mean, std).log_prob, mean over
        # C, H, W), in fp32 as theirs
        want = torch.distributions.Normal(mean, std.float()).log_prob(x_next).mean(dim=(1, 2, 3))
        torch.testing.assert_close(trans.log_prob(x, x_next, f, k), want.double(), rtol=0, atol=1e-4)


def sde_step_with_logprob(sigmas, model_output, step_index, sample, noise_level=0.7, prev_sample=None, z=None):
    """flow_grpo/diffusers_patch/sd3_sde_with_logprob.py lines 34-70 (yifan123/flow_grpo), transcribed: the
    scheduler's ``self.sigmas`` passed in (its N sigmas and the final 0), ``step_index`` for
    ``index_for_timestep(t)``, ``z`` for the generator's ``randn_tensor``."""
    model_output = model_output.float()
    sample = sample.float()
    if prev_sample is not None:
        prev_sample = prev_sample.float()
    step_index = [step_index] * sample.shape[0]
    prev_step_index = [step + 1 for step in step_index]
    sigma = sigmas[step_index].view(-1, 1, 1, 1)
    sigma_prev = sigmas[prev_step_index].view(-1, 1, 1, 1)
    sigma_max = sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    prev_sample_mean = (
        sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
        + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    if prev_sample is None:
        prev_sample = prev_sample_mean + std_dev_t * torch.sqrt(-1 * dt) * z
    log_prob = (
        -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
        - torch.log(std_dev_t * torch.sqrt(-1 * dt))
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sde_steps_are_flow_grpos(shift):
    n = 8
    u = torch.linspace(1, 1 / n, n, dtype=torch.float64)
    sig = shift * u / (1 + (shift - 1) * u)  # s_0 = 1: the original's sigma_max substitution is exercised
    trans = R.flow_sde_transitions(sig, 0.7)
    sigmas = torch.cat([sig, sig.new_zeros(1)]).float()
    g = torch.Generator().manual_seed(12)
    for k in range(n):
        x, v, z = (torch.randn(3, 4, 5, 7, generator=g) for _ in range(3))
        prev, lp, mean, std_t = sde_step_with_logprob(sigmas, v, k, x, z=z)
        ours = trans.a[k] * x.double() + trans.b[k] * v.double()
        torch.testing.assert_close(ours, mean.double(), rtol=2e-5, atol=2e-5)
        dt = sigmas[k + 1] - sigmas[k]
        torch.testing.assert_close(trans.std[k], (std_t.flatten()[0] * (-dt).sqrt()).double(), rtol=2e-5, atol=0)
        torch.testing.assert_close(trans.log_prob(x, prev, v, k), lp.double(), rtol=0, atol=1e-4)
    assert torch.allclose(trans.timesteps, (sig * 1000).float())


@pytest.mark.parametrize("kind", ["ddim", "flow"])
def test_log_ratio_is_minus_c_delta(kind):
    """log p_theta - log p_ref at a recorded step = -c_k delta_k of (p, q, e*), per row, in float64."""
    trans = (
        R.ddim_transitions(_ddim("epsilon"), 10, 1.0)
        if kind == "ddim"
        else R.flow_sde_transitions(torch.linspace(1, 0.1, 10, dtype=torch.float64), 0.7)
    )
    g = torch.Generator().manual_seed(13)
    steps = len(trans.timesteps)
    lat = torch.randn(3, steps + 1, 4, 5, 7, generator=g, dtype=torch.float64)
    k = torch.tensor([0, 4, steps - 2])
    x, target, c = R.step_targets(trans, lat, k)
    p, q = (torch.randn(3, 4, 5, 7, generator=g, dtype=torch.float64) for _ in range(2))
    x_next = lat[torch.arange(3), k + 1]
    want = (
        torch.stack(
            [trans.log_prob(x[i : i + 1], x_next[i : i + 1], p[i : i + 1], int(k[i])) for i in range(3)]
        ).flatten()
        - torch.stack(
            [trans.log_prob(x[i : i + 1], x_next[i : i + 1], q[i : i + 1], int(k[i])) for i in range(3)]
        ).flatten()
    )
    delta = O.per_sample_errors(p, ((x_next - trans.a[k].view(-1, 1, 1, 1) * x) / trans.b[k].view(-1, 1, 1, 1)), q)
    torch.testing.assert_close(-c * delta.delta, want, rtol=1e-9, atol=1e-9)
    assert target.dtype == torch.float32  # fp32 targets from float64 arithmetic


def test_trajectories_are_the_ddim_pipelines_samples(tiny_sd15):
    """Per-row generators seeded as the rollout's: the recorded last latent is StableDiffusionPipeline's with
    DDIMScheduler(eta=1), classifier-free guidance 7.5, output_type="latent" (rtol 1e-4: batched vs two forwards)."""
    from diffusers import StableDiffusionPipeline

    from rpo_fast.models import load_family

    fam = load_family(tiny_sd15)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    captions = ["a red square", "a blue circle"]
    enc = fam.encode_texts([(pipe.tokenizer, pipe.text_encoder)], captions + [""])
    cond = dict(encoder_hidden_states=enc["prompt_embeds"][:2])
    uncond = dict(encoder_hidden_states=enc["prompt_embeds"][2:].expand(2, -1, -1))
    trans = R.transitions(fam, 6, eta=1.0)
    seeds = R.rollout_seeds(0, 3, 0, 2)
    shape = (4, 8, 8)
    traj = R.sample_trajectories(fam, pipe.unet, trans, cond, uncond, seeds, shape, guidance=7.5)
    assert traj.latents.shape == (2, 7, *shape)
    again = R.sample_trajectories(fam, pipe.unet, trans, cond, uncond, seeds, shape, guidance=7.5)
    assert torch.equal(traj.latents, again.latents)  # seeded: the same bits
    out = pipe(
        prompt_embeds=cond["encoder_hidden_states"],
        negative_prompt_embeds=uncond["encoder_hidden_states"],
        num_inference_steps=6,
        guidance_scale=7.5,
        eta=1.0,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        height=8 * fam.vae_scale_factor,
        width=8 * fam.vae_scale_factor,
        output_type="latent",
    ).images
    torch.testing.assert_close(traj.latents[:, -1], out, rtol=1e-4, atol=1e-4)
