"""Z-Image (``zimage``; Tongyi-MAI/Z-Image-Turbo and Z-Image, diffusers' ``ZImageTransformer2DModel`` and
``ZImagePipeline``): a 6.15 B single-stream transformer over FLUX.1's 16-channel VAE, rectified flow with the
scheduler config's shift (Z-Image-Turbo's: static, S = 3), one Qwen3 text encoder.

Noising, target and timestep law are the flow families' (``noising.FlowMatchingNoising``: x_t = (1 - s) x0 + s eps,
v = eps - x0, s logit-normal then shifted). What differs is the transformer's interface, as ZImagePipeline drives it:

    model input   a list of latents (C, 1, h, w) (a frame axis), the time 1 - s (ZImagePipeline: (1000 - t) / 1000),
                  a list of caption states (L_i, D), each caption's own length (no padding)
    model output  a list of (C, 1, h, w), the NEGATED velocity: the pipeline steps with -output

so ``predict`` returns -output, the velocity v = eps - x0 the objectives take (the same sign as SD3 and FLUX).

Text (``ZImagePipeline.encode_prompt``): the caption in Qwen3's chat template (one user turn, the generation prompt,
``enable_thinking=True``), padded to ``max_sequence_length`` (512), the encoder's second-to-last hidden state, the
padding dropped. The cache keeps the padded states (``prompt_embeds`` (512, 2560)) and the caption's token count
(``prompt_length``): ``predict`` cuts each caption to its length, which reads the lengths on the host once per
forward (a transformer whose sequence length is each caption's own cannot avoid it), and ``--reference-graphs`` is
refused (``fixed_shapes`` False). The empty caption of caption dropping is the chat template around "", as the
pipeline's negative prompt.

Evaluation samples with the pipeline's defaults: 50 steps at guidance 5.0 (Z-Image-Turbo's card: 9 steps at guidance
0, ``--steps 9 --guidance 0``). Beta defaults to the flow families' 100 (mean velocity errors); DSPO is refused.
"""

from __future__ import annotations

from functools import cached_property, partial

import torch

from . import dropped
from .configs import FLOW_VAE, TINY_FLOW_VAE, TINY_HIDDEN
from .flow import FlowFamily

_VAE_FACTORS = dict(shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's VAE, which Z-Image uses


class ZImageFamily(FlowFamily):
    name = "zimage"
    pipeline_name = "ZImagePipeline"
    denoiser_class_name = "ZImageTransformer2DModel"
    encoder_folders = ("text_encoder", "tokenizer")
    caption_keys = ("prompt_embeds", "prompt_length")
    guidance = 5.0  # ZImagePipeline's default
    sample_steps = 50
    max_sequence_length = 512  # ZImagePipeline's default
    fixed_shapes = False
    tiny = dict(
        transformer=dict(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=TINY_HIDDEN, axes_dims=(4, 6, 6), axes_lens=(1024, 64, 64),
        ),
        vae=dict(TINY_FLOW_VAE, **_VAE_FACTORS),
        scheduler=dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),  # Z-Image-Turbo's
        text_encoder=dict(  # a Qwen3Model; the pipeline reads hidden_states[-2]: at least 2 layers
            vocab_size=259, hidden_size=TINY_HIDDEN, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
        ),
    )  # fmt: skip
    full = {  # Tongyi-MAI/Z-Image-Turbo: ZImageTransformer2DModel's defaults are its config
        "z-image-turbo": dict(
            transformer=dict(
                all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
                n_heads=30, n_kv_heads=30, cap_feat_dim=2560, axes_dims=(32, 48, 48), axes_lens=(1024, 512, 512),
            ),
            vae=dict(FLOW_VAE, **_VAE_FACTORS),
            scheduler=dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
            params=6_154_908_736,
        )
    }  # fmt: skip

    @cached_property
    def default_resolution(self) -> int:
        """ZImagePipeline's default, 1024, which its VAE's config also says (the tiny VAE says 32)."""
        return self.config("vae").get("sample_size") or 1024

    @torch.no_grad()
    def encode_texts(self, encoders, captions):
        """prompt_embeds (n, max_sequence_length, D): the caption's states through ``ZImagePipeline.encode_prompt``
        (chat template, hidden_states[-2], padding dropped), zero-padded back; prompt_length (n,) its tokens."""
        pipe = encoders
        states, _ = pipe.encode_prompt(
            list(captions),
            device=pipe.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )  # fmt: skip (a copy: encode_prompt rewrites the caller's list in place)
        embeds = states[0].new_zeros(len(states), self.max_sequence_length, states[0].shape[-1])
        for i, s in enumerate(states):
            embeds[i, : len(s)] = s
        lengths = torch.tensor([len(s) for s in states], device=embeds.device)
        return {"prompt_embeds": embeds.float(), "prompt_length": lengths}

    def caption_shapes(self):
        """prompt_embeds (max_sequence_length, cap_feat_dim), prompt_length ()."""
        cfg = self.config(self.denoiser_folder)
        return {"prompt_embeds": (self.max_sequence_length, cfg["cap_feat_dim"]), "prompt_length": ()}

    def random_captions(self, n, generator):
        """Random states, and lengths of 1 to max_sequence_length tokens with the states past them zero."""
        embeds = torch.randn(n, *self.caption_shapes()["prompt_embeds"], generator=generator)
        lengths = torch.randint(1, self.max_sequence_length + 1, (n,), generator=generator)
        embeds[torch.arange(self.max_sequence_length) >= lengths[:, None]] = 0
        return {"prompt_embeds": embeds, "prompt_length": lengths}

    def conditioning(self, batch, drop, empty, *, pairs=True):
        pick = partial(dropped, batch, drop, empty)

        n = 2 if pairs else 1
        return dict(prompt_embeds=pick("prompt_embeds").repeat(n, 1, 1), prompt_length=pick("prompt_length").repeat(n))

    def predict(self, denoiser, noisy, t, cond):
        """Each latent with a frame axis, 1 - s as the time, each caption cut to its length; -output (the velocity)."""
        embeds, lengths = cond["prompt_embeds"], cond["prompt_length"]
        lengths = [embeds.shape[1]] * len(embeds) if lengths.is_meta else lengths.tolist()  # meta: the plans' count
        caps = [e[:n] for e, n in zip(embeds, lengths)]
        time = (1 - t / self.num_train_timesteps).to(noisy.dtype)
        out = denoiser(list(noisy.unsqueeze(2).unbind(0)), time, caps, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def dummy_inputs(self, rows):
        cfg = self.config(self.denoiser_folder)
        _, h, w = self.dummy_latent_shape()
        x = torch.randn(rows, cfg["in_channels"], h, w)
        t = torch.full((rows,), self.num_train_timesteps / 2)
        cond = dict(
            prompt_embeds=torch.randn(rows, self.max_sequence_length, cfg["cap_feat_dim"]),
            prompt_length=torch.full((rows,), self.max_sequence_length),
        )
        return x, t, cond

    @classmethod
    def tiny_pipeline(cls, seed: int = 0):
        """A tiny random ``ZImagePipeline``: the tiny transformer, FLUX-style VAE, a 2-layer ``Qwen3Model`` and the
        byte-level chat tokenizer (``tokenizers.chat_tokenizer``), Z-Image-Turbo's scheduler."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
        from transformers import Qwen3Config, Qwen3Model

        from ..seeding import seed_of
        from .tokenizers import chat_tokenizer

        torch.manual_seed(seed_of(seed, 0))
        transformer = cls.denoiser_class()(**cls.tiny["transformer"])
        torch.manual_seed(seed_of(seed, 1))
        vae = AutoencoderKL(**cls.tiny["vae"])
        torch.manual_seed(seed_of(seed, 2))
        encoder = Qwen3Model(Qwen3Config(**cls.tiny["text_encoder"])).eval()
        return ZImagePipeline(
            transformer=transformer, vae=vae, text_encoder=encoder, tokenizer=chat_tokenizer(),
            scheduler=FlowMatchEulerDiscreteScheduler(**cls.tiny["scheduler"]),
        )  # fmt: skip
