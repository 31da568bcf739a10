"""Qwen-Image (``qwenimage``; Qwen/Qwen-Image and Qwen-Image-2512, diffusers' ``QwenImageTransformer2DModel`` and
``QwenImagePipeline``): a 20.4 B MM-DiT over a 3D causal VAE (16 channels at 1/8, one frame), Qwen2.5-VL as its text
encoder, rectified flow with the scheduler config's dynamic shift.

Latents: the VAE encodes an image as one frame (n, 3, 1, H, W) -> (n, 16, 1, h, w); the family drops the frame axis
and normalises with the config's per-channel statistics, x = (z - latents_mean) / latents_std (what the pipeline
undoes before decoding). ``predict`` packs 2 x 2 patches into 64-channel tokens (``QwenImagePipeline._pack_latents``,
FLUX.1's packing), passes ``img_shapes`` [(1, h/2, w/2)] and s = t / 1000, and unpacks the velocity.

Noising, target and timestep law are the flow families' (x_t = (1 - s) x0 + s eps, v = eps - x0, logit-normal u
shifted with mu from the token count: base_shift 0.5 at 256 tokens to max_shift 0.9 at 8192, Qwen-Image's scheduler
config). The sampler also stretches its sigmas so the last is ``shift_terminal`` (0.02): ``sampler_sigmas``.

Text (``QwenImagePipeline.encode_prompt``): the caption in the pipeline's template (a system turn describing the
image, the user turn), Qwen2.5-VL's last hidden state, the template's first 34 tokens dropped, each caption's tokens
kept with an attention mask. The cache stores them padded to ``max_sequence_length`` (512, the pipeline's default
when sampling) with the mask (``prompt_embeds_mask``): the transformer masks the padding in attention and gives text
tokens the same positions padded or not, so the padded caption is the pipeline's (tested).

Guidance: the pipeline's "true" classifier-free guidance needs a negative prompt; sampling passes ``true_cfg_scale``
(4.0, the pipeline's default) with the negative prompt " " of Qwen-Image's card, 50 steps.
"""

from __future__ import annotations

from functools import cached_property, partial

import torch

from . import dropped, random_masked_states
from .flow import FlowFamily, FluxFamily

DROP = 34  # QwenImagePipeline.prompt_template_encode_start_idx
TEMPLATE_WORDS = (  # the template's system turn as Qwen's tokenizer splits it: 34 tokens with the specials
    "system", "Describe", " the", " image", " by", " detailing", " color", " shape", " size", " texture", " quantity",
    " text", " spatial", " relationships", " of", " objects", " and", " background", "user",
)  # fmt: skip
_SCHEDULER = dict(  # Qwen/Qwen-Image/scheduler
    num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
    max_image_seq_len=8192, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
)  # fmt: skip


class QwenImageFamily(FlowFamily):
    name = "qwenimage"
    no_rollouts = "decode with a 3D VAE and per-channel statistics, which decode_latents does not invert yet"
    pipeline_name = "QwenImagePipeline"
    denoiser_class_name = "QwenImageTransformer2DModel"
    vae_class_name = "AutoencoderKLQwenImage"
    encoder_folders = ("text_encoder", "tokenizer")
    caption_keys = ("prompt_embeds", "prompt_embeds_mask")
    guidance = 4.0  # QwenImagePipeline's true_cfg_scale
    sample_steps = 50
    max_sequence_length = 512
    negative_prompt = " "  # Qwen-Image's card
    tiny = dict(
        transformer=dict(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
        ),
        vae=dict(
            base_dim=16, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[False],
        ),
        scheduler=_SCHEDULER,
        text_encoder=dict(
            text_config=dict(
                vocab_size=359, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=2048, bos_token_id=257, eos_token_id=258,
                pad_token_id=256, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2], "rope_type": "default"},
            ),
            vision_config=dict(
                depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=16,
                fullatt_block_indexes=[0],
            ),
            vocab_size=359,
        ),
    )  # fmt: skip
    full = {  # Qwen/Qwen-Image: QwenImageTransformer2DModel's and AutoencoderKLQwenImage's defaults are its configs
        "qwen-image": dict(
            transformer=dict(
                patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56),
            ),
            vae=dict(
                base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True],
            ),
            scheduler=_SCHEDULER, params=20_430_401_088,
        )
    }  # fmt: skip

    @cached_property
    def default_resolution(self) -> int:
        """The pipeline's default_sample_size 128 x the VAE's factor: 1024 (the tiny VAE: 256)."""
        return 128 * self.vae_scale_factor

    # ---------------------------------------------------------------- latents
    @cached_property
    def latent_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE config's per-channel latents_mean and latents_std (the VAE class's defaults where absent)."""
        import inspect

        vae = self.config("vae")
        defaults = inspect.signature(self.vae_class().__init__).parameters
        mean = vae.get("latents_mean") or defaults["latents_mean"].default
        std = vae.get("latents_std") or defaults["latents_std"].default
        return torch.tensor(mean), torch.tensor(std)

    def vae_class(self):
        import diffusers

        return getattr(diffusers, self.vae_class_name)

    def encode_latents(self, vae, pixels):
        """(n, 3, H, W) -> the mean and std (n, 16, h, w) of the VAE's distribution, the image as one frame."""
        dist = vae.encode(pixels.unsqueeze(2)).latent_dist
        return dist.mean.squeeze(2), dist.std.squeeze(2)

    def latents(self, sample):
        """(z - latents_mean) / latents_std, per channel."""
        mean, std = (v.to(sample.device, sample.dtype).view(-1, 1, 1) for v in self.latent_statistics)
        return (sample - mean) / std

    def sampler_sigmas(self, steps, tokens):
        """The shifted grid stretched so its last sigma is the config's ``shift_terminal`` (the scheduler's
        ``stretch_shift_to_terminal``)."""
        s = super().sampler_sigmas(steps, tokens)
        terminal = self.scheduler_config.get("shift_terminal")
        if not terminal:
            return s
        return 1 - (1 - s) / ((1 - s[-1]) / (1 - terminal))

    # ---------------------------------------------------------------- text
    @torch.no_grad()
    def encode_texts(self, encoders, captions):
        """prompt_embeds (n, max_sequence_length, D) zero-padded and prompt_embeds_mask (n, max_sequence_length),
        through ``QwenImagePipeline.encode_prompt`` (its template, the last hidden state, 34 tokens dropped)."""
        pipe = encoders
        embeds, mask = pipe.encode_prompt(
            list(captions), device=pipe.device, max_sequence_length=self.max_sequence_length
        )
        n, length = embeds.shape[:2]
        if mask is None:  # every caption as long as the longest: the pipeline returns no mask
            mask = torch.ones(n, length, dtype=torch.long, device=embeds.device)
        pad = self.max_sequence_length - length
        return {
            "prompt_embeds": torch.nn.functional.pad(embeds.float(), (0, 0, 0, pad)),
            "prompt_embeds_mask": torch.nn.functional.pad(mask.long(), (0, pad)),
        }

    def caption_shapes(self):
        cfg = self.config(self.denoiser_folder)
        n = self.max_sequence_length
        return {"prompt_embeds": (n, cfg["joint_attention_dim"]), "prompt_embeds_mask": (n,)}

    def random_captions(self, n, generator):
        embeds, mask = random_masked_states(n, self.caption_shapes()["prompt_embeds"], generator)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def conditioning(self, batch, drop, empty, *, pairs=True):
        pick = partial(dropped, batch, drop, empty)

        n = 2 if pairs else 1
        return dict(
            encoder_hidden_states=pick("prompt_embeds").repeat(n, 1, 1),
            encoder_hidden_states_mask=pick("prompt_embeds_mask").repeat(n, 1),
        )

    def guidance_kwargs(self, guidance, n):
        """True classifier-free guidance: ``true_cfg_scale`` with the card's negative prompt (none at guidance <= 1)."""
        return {"true_cfg_scale": guidance, "negative_prompt": [self.negative_prompt] * n} if guidance > 1 else {}

    # ---------------------------------------------------------------- the denoiser
    def predict(self, denoiser, noisy, t, cond):
        """Packed 2 x 2 tokens in, s = t / 1000, the velocity unpacked to (n, C, h, w)."""
        n, _, h, w = noisy.shape
        out = denoiser(
            hidden_states=FluxFamily.pack(noisy), timestep=(t / self.num_train_timesteps).to(noisy.dtype),
            img_shapes=[[(1, h // 2, w // 2)]] * n, return_dict=False, **cond,
        )[0]  # fmt: skip
        return FluxFamily.unpack(out, h, w)

    def dummy_inputs(self, rows):
        c, h, w = self.dummy_latent_shape()
        x = torch.randn(rows, c, h, w)
        t = torch.full((rows,), self.num_train_timesteps / 2)
        shapes = self.caption_shapes()
        cond = dict(
            encoder_hidden_states=torch.randn(rows, *shapes["prompt_embeds"]),
            encoder_hidden_states_mask=torch.ones(rows, *shapes["prompt_embeds_mask"], dtype=torch.long),
        )
        return x, t, cond

    @classmethod
    def tiny_pipeline(cls, seed: int = 0):
        """A tiny random ``QwenImagePipeline``: the tiny transformer, a 2-level ``AutoencoderKLQwenImage``, a 2-layer
        ``Qwen2_5_VLForConditionalGeneration`` and the byte-level chat tokenizer with the template's words as tokens
        (its first 34 tokens are the template's, as with Qwen's tokenizer)."""
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        from ..seeding import seed_of
        from .tokenizers import chat_tokenizer

        torch.manual_seed(seed_of(seed, 0))
        transformer = cls.denoiser_class()(**cls.tiny["transformer"])
        torch.manual_seed(seed_of(seed, 1))
        vae = AutoencoderKLQwenImage(**cls.tiny["vae"])
        torch.manual_seed(seed_of(seed, 2))
        encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cls.tiny["text_encoder"])).eval()
        return QwenImagePipeline(
            transformer=transformer, vae=vae, text_encoder=encoder, tokenizer=chat_tokenizer(TEMPLATE_WORDS),
            scheduler=FlowMatchEulerDiscreteScheduler(**cls.tiny["scheduler"]),
        )  # fmt: skip
