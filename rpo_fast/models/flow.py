"""The flow-matching transformer families: Stable Diffusion 3 / 3.5 (``sd3``, diffusers' ``SD3Transformer2DModel``)
and FLUX.1 (``flux``, ``FluxTransformer2DModel``), rectified-flow noising with a velocity target
(``noising.FlowMatchingNoising``: x_t = (1 - s) x0 + s eps, v = eps - x0, the sign diffusers' samplers integrate).

The trainer's timestep t is s * 1000 (float; high t = noisy, as for the UNets): SD3's transformer takes t, FLUX's
takes s (it multiplies by 1000 itself). One s per pair, shared by winner and loser, drawn as the families' own
training recipes do (diffusers' train_dreambooth_sd3/flux, the SD3 paper): logit-normal, then the scheduler's
shift: SD3's static shift S = 3.0; FLUX's dynamic shift, mu from base_shift 0.5 at 256 tokens to max_shift 1.15 at
4096 (1024px: mu = 1.15).

Dense DPO's discount counts the steps of the family's sampler (its shifted schedule, at the image's token count), and
``--timestep-sampling discounted`` draws a point of a sampler step k with P(k) proportional to gamma^k in place of the
logit-normal law (``noising``'s module doc). The objectives take per-sample MEAN squared velocity errors exactly as they
take epsilon errors, so beta means the same per element at every resolution and latent size (SD3/FLUX latents at 1024 px
hold 4x the elements of SDXL's and change nothing); the default beta of these families is 100 (``default_beta``,
Flow-GRPO's SD3.5 DPO recipe, which also takes a mean error), 5000 for the UNets (Diffusion-DPO). DSPO's score form is
derived for DDPM's epsilon parametrisation (its score is -eps / sqrt(1 - abar_t)); a velocity model has no such score
without a change of variables, so DSPO is refused here with a message naming the family.

RPO's weight matrix compares winner i's errors at t_i with loser j's at t_j, as on the UNets: the paper's form is
used unchanged (the tiny SD3/FLUX runs train with it); a per-timestep normalisation is not offered.

Text: SD3 concatenates the penultimate hidden states of CLIP-L and CLIP-G (77 x 2048, zero-padded to T5's width)
with T5-XXL's last hidden state (``max_sequence_length`` tokens, 256 by default) along the sequence, and pools
both CLIPs' projections (2048). FLUX takes T5-XXL's states (512 tokens) and CLIP-L's pooled output (768). The cache
stores the CLIP and T5 parts apart (no padding on disk) through the pipelines' own ``encode_prompt``.
"""

from __future__ import annotations

from functools import cached_property, partial
from pathlib import Path

import torch
from torch import Tensor

from . import ModelFamily, dropped
from .configs import FLOW_VAE, T5_TINY, TINY_FLOW_VAE, TINY_HIDDEN
from .noising import FlowMatchingNoising


class FlowFamily(FlowMatchingNoising, ModelFamily):
    """What SD3 and FLUX share: the transformer folder, rectified flow (``noising.FlowMatchingNoising``), the
    pipeline's own text encoding."""

    denoiser_folder = "transformer"
    dspo_form = None
    default_beta = 100.0
    vae_fp16 = False
    pipeline_name: str = ""
    denoiser_class_name: str = ""
    max_sequence_length = 256

    @classmethod
    def detect(cls, model_index, denoiser_config):
        if model_index is not None:
            return model_index.get("_class_name") == cls.pipeline_name
        return denoiser_config is not None and denoiser_config.get("_class_name") == cls.denoiser_class_name

    # ---------------------------------------------------------------- loading
    @classmethod
    def denoiser_class(cls):
        import diffusers

        return getattr(diffusers, cls.denoiser_class_name)

    @classmethod
    def pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_name)

    def load_pipeline(self, *, dtype=torch.float32):
        return self.pipeline_class().from_pretrained(self.path, dtype=dtype)

    def load_text_encoders(self, *, device="cpu", dtype=torch.float32):
        """The family's pipeline with its text encoders and tokenizers only (no transformer, no VAE)."""
        pipe = self.pipeline_class().from_pretrained(self.path, transformer=None, vae=None, dtype=dtype)
        return pipe.to(device)

    def save_lora(self, folder, layers):
        """In PEFT's naming (lora_A / lora_B), as diffusers' transformer training scripts save (FLUX.2's loader reads
        lora.down / lora.up as another trainer's format and misplaces the double blocks' adapters)."""
        self.pipeline_class().save_lora_weights(Path(folder), transformer_lora_layers=layers, safe_serialization=True)

    def set_attention(self, denoiser, attention: str) -> None:
        """Their own SDPA processors (joint text-image attention) stay; xformers is not wired for them."""
        if attention != "sdpa":
            raise ValueError(f"--attention {attention} is not supported for {self.name} models (their SDPA only)")


class SD3Family(FlowFamily):
    name = "sd3"
    pipeline_name = "StableDiffusion3Pipeline"
    denoiser_class_name = "SD3Transformer2DModel"
    encoder_folders = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    caption_keys = ("clip_prompt_embeds", "t5_prompt_embeds", "pooled_prompt_embeds")
    guidance = 7.0  # StableDiffusion3Pipeline's default (SD3.5-Large's card: 3.5 at 28 steps)
    sample_steps = 28
    max_sequence_length = 256
    repeated_blocks = ("JointTransformerBlock",)  # diffusers 0.42.1 leaves SD3's _repeated_blocks empty
    _vae_factors = dict(shift_factor=0.0609, scaling_factor=1.5305)  # the public VAE's latent shift and scale
    tiny = dict(
        transformer=dict(  # SD3.5-style: RMS-normed q/k and a dual-attention first layer
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=T5_TINY, caption_projection_dim=32,
            pooled_projection_dim=2 * TINY_HIDDEN, pos_embed_max_size=32, qk_norm="rms_norm",
            dual_attention_layers=(0,),
        ),
        vae=dict(TINY_FLOW_VAE, **_vae_factors),
    )  # fmt: skip
    full = {  # stabilityai/stable-diffusion-3.5-medium and -large (Medium also holds a 0.23 B positional-embedding
        # buffer of 384^2 x 1536: 2.47 B, its card's 2.5 B)
        "sd3.5-medium": dict(
            transformer=dict(
                sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
                dual_attention_layers=tuple(range(13)),
            ),
            vae=dict(FLOW_VAE, **_vae_factors),
            params=2_243_171_520,
        ),
        "sd3.5-large": dict(
            transformer=dict(
                sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
                num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=(),
            ),
            vae=dict(FLOW_VAE, **_vae_factors),
            params=8_056_627_520,
        ),
    }  # fmt: skip

    @torch.no_grad()
    def encode_texts(self, encoders, captions):
        """clip_prompt_embeds (n, 77, D_L + D_G): CLIP-L's and CLIP-G's penultimate states side by side;
        t5_prompt_embeds (n, max_sequence_length, D_T5); pooled_prompt_embeds (n, P_L + P_G), through
        ``StableDiffusion3Pipeline.encode_prompt`` (its zero T5 states where the folder has no text_encoder_3)."""
        pipe = encoders
        embeds, _, pooled, _ = pipe.encode_prompt(
            captions, None, None, device=pipe.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )  # fmt: skip
        n_clip = pipe.tokenizer_max_length
        width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        return {
            "clip_prompt_embeds": embeds[:, :n_clip, :width].float(),
            "t5_prompt_embeds": embeds[:, n_clip:].float(),
            "pooled_prompt_embeds": pooled.float(),
        }

    def caption_shapes(self):
        """t5_prompt_embeds (max_sequence_length, joint_attention_dim), pooled_prompt_embeds (pooled_projection_dim)
        and clip_prompt_embeds (77, pooled_projection_dim: CLIP-L and CLIP-G side by side)."""
        cfg = self.config(self.denoiser_folder)
        return {
            "clip_prompt_embeds": (77, cfg["pooled_projection_dim"]),
            "t5_prompt_embeds": (self.max_sequence_length, cfg["joint_attention_dim"]),
            "pooled_prompt_embeds": (cfg["pooled_projection_dim"],),
        }

    def conditioning(self, batch, drop, empty, *, pairs=True):
        pick = partial(dropped, batch, drop, empty)

        clip, t5 = pick("clip_prompt_embeds"), pick("t5_prompt_embeds")
        ehs = torch.cat([torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], dim=1)
        pooled = pick("pooled_prompt_embeds")
        n = 2 if pairs else 1
        return dict(encoder_hidden_states=ehs.repeat(n, 1, 1), pooled_projections=pooled.repeat(n, 1))

    def predict(self, denoiser, noisy, t, cond):
        return denoiser(hidden_states=noisy, timestep=t, **cond, return_dict=False)[0]

    def dummy_inputs(self, rows):
        cfg = self.config(self.denoiser_folder)
        c, size = cfg["in_channels"], cfg["sample_size"]
        x = torch.randn(rows, c, size, size)
        t = torch.full((rows,), self.num_train_timesteps / 2)
        ehs = torch.randn(rows, 77 + self.max_sequence_length, cfg["joint_attention_dim"])
        return x, t, dict(encoder_hidden_states=ehs, pooled_projections=torch.randn(rows, cfg["pooled_projection_dim"]))


class FluxFamily(FlowFamily):
    name = "flux"
    no_rollouts = "embed their guidance (a distilled guidance), which rollouts do not set yet"
    pipeline_name = "FluxPipeline"
    denoiser_class_name = "FluxTransformer2DModel"
    encoder_folders = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    caption_keys = ("t5_prompt_embeds", "pooled_prompt_embeds")
    guidance = 3.5  # FluxPipeline's default (FLUX.1-dev)
    sample_steps = 28
    max_sequence_length = 512
    train_guidance = 1.0  # the guidance embedding's input while training, the same for policy and reference
    _vae_factors = dict(shift_factor=0.1159, scaling_factor=0.3611)  # the public VAE's latent shift and scale
    tiny = dict(
        transformer=dict(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=T5_TINY, pooled_projection_dim=TINY_HIDDEN,
            guidance_embeds=True, axes_dims_rope=(4, 6, 6),
        ),
        vae=dict(TINY_FLOW_VAE, **_vae_factors),
    )  # fmt: skip
    full = {  # black-forest-labs/FLUX.1-dev
        "flux.1-dev": dict(
            transformer=dict(
                patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56),
            ),
            vae=dict(FLOW_VAE, **_vae_factors),
            params=11_901_408_320,
        )
    }  # fmt: skip

    @cached_property
    def default_resolution(self) -> int:
        vae = self.config("vae")  # FLUX.1's VAE says 1024; else FluxPipeline's default_sample_size 128 x its factor
        return vae.get("sample_size") or 128 * self.vae_scale_factor

    @cached_property
    def guidance_embeds(self) -> bool:
        return bool(self.config(self.denoiser_folder).get("guidance_embeds"))

    @torch.no_grad()
    def encode_texts(self, encoders, captions):
        """t5_prompt_embeds (n, max_sequence_length, D_T5) and pooled_prompt_embeds (n, 768): CLIP-L's pooled output,
        through ``FluxPipeline.encode_prompt``."""
        pipe = encoders
        embeds, pooled, _ = pipe.encode_prompt(
            captions, None, device=pipe.device, max_sequence_length=self.max_sequence_length
        )
        return {"t5_prompt_embeds": embeds.float(), "pooled_prompt_embeds": pooled.float()}

    def caption_shapes(self):
        """t5_prompt_embeds (max_sequence_length, joint_attention_dim), pooled_prompt_embeds (pooled_projection_dim)."""
        cfg = self.config(self.denoiser_folder)
        return {
            "t5_prompt_embeds": (self.max_sequence_length, cfg["joint_attention_dim"]),
            "pooled_prompt_embeds": (cfg["pooled_projection_dim"],),
        }

    def conditioning(self, batch, drop, empty, *, pairs=True):
        pick = partial(dropped, batch, drop, empty)

        n = 2 if pairs else 1
        t5, pooled = pick("t5_prompt_embeds").repeat(n, 1, 1), pick("pooled_prompt_embeds").repeat(n, 1)
        cond = dict(encoder_hidden_states=t5, pooled_projections=pooled)
        if self.guidance_embeds:
            cond["guidance"] = torch.full((t5.shape[0],), self.train_guidance, device=t5.device)
        return cond

    @staticmethod
    def pack(x: Tensor) -> Tensor:
        """(n, C, h, w) -> (n, h/2 * w/2, 4C): 2 x 2 patches as tokens (FluxPipeline._pack_latents)."""
        n, c, h, w = x.shape
        return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(x: Tensor, h: int, w: int) -> Tensor:
        """The inverse of ``pack`` (FluxPipeline._unpack_latents)."""
        n, _, c4 = x.shape
        return x.view(n, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c4 // 4, h, w)

    @staticmethod
    def image_ids(h: int, w: int, device, dtype) -> Tensor:
        """(h/2 * w/2, 3): (0, row, column) of each packed token (FluxPipeline._prepare_latent_image_ids)."""
        ids = torch.zeros(h // 2, w // 2, 3, device=device)
        ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
        ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
        return ids.reshape(-1, 3).to(dtype)

    def predict(self, denoiser, noisy, t, cond):
        """Packed tokens in, the velocity (n, C, h, w) out; text ids are zeros, as in FluxPipeline."""
        h, w = noisy.shape[-2:]
        txt = cond["encoder_hidden_states"]
        out = denoiser(
            hidden_states=self.pack(noisy),
            timestep=t / self.num_train_timesteps,
            img_ids=self.image_ids(h, w, noisy.device, noisy.dtype),
            txt_ids=torch.zeros(txt.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            **cond,
            return_dict=False,
        )[0]
        return self.unpack(out, h, w)

    def dummy_inputs(self, rows):
        cfg = self.config(self.denoiser_folder)
        c, size = (
            cfg["in_channels"] // 4,
            self.default_resolution // self.vae_scale_factor,
        )
        x = torch.randn(rows, c, size, size)
        t = torch.full((rows,), self.num_train_timesteps / 2)
        cond = dict(
            encoder_hidden_states=torch.randn(rows, self.max_sequence_length, cfg["joint_attention_dim"]),
            pooled_projections=torch.randn(rows, cfg["pooled_projection_dim"]),
        )
        if self.guidance_embeds:
            cond["guidance"] = torch.full((rows,), self.train_guidance)
        return x, t, cond
