"""FLUX.2: Klein (``flux2-klein``; black-forest-labs/FLUX.2-klein-4B and -9B, their -base releases,
``Flux2KleinPipeline``) and dev (``flux2``; black-forest-labs/FLUX.2-dev, ``Flux2Pipeline``), diffusers'
``Flux2Transformer2DModel``: an MM-DiT over FLUX.2's 32-channel VAE, rectified flow with FLUX.2's empirical shift.
Klein reads a Qwen3 text encoder; dev a Mistral-3 (Small 3.1) one and a guidance embedding.

Latents (``Flux2KleinPipeline._encode_vae_image`` and the end of its ``__call__``): the VAE's 32 channels at 1/8 are
cut into 2 x 2 patches (128 channels at 1/16) and normalised by the VAE's batch-norm statistics,
x = (patchify(z) - running_mean) / sqrt(running_var + eps). The family keeps x in the unpatchified layout
(32, h, w): patchifying is a permutation of the elements, so noise, the velocity and every mean squared error are
those of the 128-channel latent, and the cache and the draws keep the shapes every family has. ``predict`` patchifies
and packs the tokens as the pipeline does (positions (0, row, column, 0), text positions (0, 0, 0, l)) and unpacks the
velocity back.

Noising and target are the flow families' (x_t = (1 - s) x0 + s eps, v = eps - x0: the pipeline steps with the
transformer's output, which takes s = t / 1000). The shift is FLUX.2's empirical one (``compute_empirical_mu``: mu
from the image's token count and the sampler's step count, the family's ``sample_steps``), s = e^mu u / (1 + (e^mu -
1) u), for training draws, dense DPO's discount and sampling alike.

Text (``Flux2KleinPipeline.encode_prompt``): the caption in Qwen3's chat template (``enable_thinking=False``), padded
to ``max_sequence_length`` (512), the hidden states of layers (9, 18, 27) side by side: (512, 3 D), padding included
(the pipeline keeps it). FLUX.2-dev (``Flux2Pipeline.encode_prompt``): the pipeline's system message and the caption
in Mistral's chat template, layers (10, 20, 30) of Mistral-3, (512, 3 x 5120); its guidance embedding takes the
same value for policy and reference while training (1.0, as FLUX.1's family), the sampling guidance (4.0) at
evaluation. Sampling: the pipeline's defaults, 50 steps at guidance 4.0; a distilled release
(``is_distilled`` in its model_index.json) skips classifier-free guidance in the pipeline itself and samples in 4 steps
(its card's).
"""

from __future__ import annotations

import json
import math
from functools import cached_property

import torch

from .flow import FlowFamily

TEXT_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers
_FLUX2_VAE = dict(  # AutoencoderKLFlux2's defaults, black-forest-labs/FLUX.2's VAE
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=32, norm_num_groups=32, sample_size=1024,
)  # fmt: skip
_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)  # mu from the pipeline


def empirical_mu(tokens: int, steps: int) -> float:
    """``diffusers.pipelines.flux2.pipeline_flux2_klein.compute_empirical_mu``: linear in the token count, and
    between 10 and 200 sampler steps linear in the step count (tokens > 4300: the 200-step line)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if tokens > 4300:
        return a2 * tokens + b2
    m_200, m_10 = a2 * tokens + b2, a1 * tokens + b1
    a = (m_200 - m_10) / 190.0
    return a * steps + m_200 - 200.0 * a


class Flux2KleinFamily(FlowFamily):
    name = "flux2-klein"
    no_rollouts = "keep batch-normalised patchified latents, which decode_latents does not invert yet"
    pipeline_name = "Flux2KleinPipeline"
    denoiser_class_name = "Flux2Transformer2DModel"
    vae_class_name = "AutoencoderKLFlux2"
    encoder_folders = ("text_encoder", "tokenizer")
    caption_keys = ("prompt_embeds",)
    # every attention projection: the double blocks' image and text streams, the single blocks' fused QKV + MLP input
    lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_qkv_mlp_proj",
    )  # fmt: skip
    guidance = 4.0  # Flux2KleinPipeline's default
    sample_steps = 50
    max_sequence_length = 512
    text_layers = TEXT_LAYERS
    tiny = dict(
        transformer=dict(
            patch_size=1, in_channels=32, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=32, mlp_ratio=2.0,
            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
        ),
        vae=dict(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
            latent_channels=8, norm_num_groups=8, sample_size=32,
        ),
        scheduler=_SCHEDULER,
        text_encoder=dict(  # a Qwen3ForCausalLM deep enough for the pipeline's layers (9, 18, 27)
            vocab_size=259, hidden_size=16, intermediate_size=24, num_hidden_layers=max(TEXT_LAYERS) + 1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
            tie_word_embeddings=True,
        ),
    )  # fmt: skip
    full = {  # black-forest-labs/FLUX.2-klein-4B (Qwen3-4B: 3 x 2560) and -9B (Qwen3-8B: 3 x 4096)
        "flux.2-klein-4b": dict(
            transformer=dict(
                patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=7680, axes_dims_rope=(32, 32, 32, 32),
                guidance_embeds=False,
            ),
            vae=_FLUX2_VAE, scheduler=_SCHEDULER, params=3_875_544_576,
        ),
        "flux.2-klein-9b": dict(
            transformer=dict(
                patch_size=1, in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128,
                num_attention_heads=32, joint_attention_dim=12288, axes_dims_rope=(32, 32, 32, 32),
                guidance_embeds=False,
            ),
            vae=_FLUX2_VAE, scheduler=_SCHEDULER, params=9_078_581_248,
        ),
    }  # fmt: skip

    def __init__(self, path, **options):
        super().__init__(path, **options)
        index = self.path / "model_index.json"
        if index.exists() and json.loads(index.read_text()).get("is_distilled"):
            self.sample_steps = 4  # the distilled releases' card (the pipeline skips guidance), and their shift

    @cached_property
    def default_resolution(self) -> int:
        """The pipeline's default_sample_size 128 x the VAE's factor: 1024 (the tiny VAE's says 32)."""
        vae = self.config("vae")
        return vae.get("sample_size") or 128 * self.vae_scale_factor

    # ---------------------------------------------------------------- latents
    @cached_property
    def batch_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's batch-norm mean and std (128,) over the patchified channels, read from its weights file."""
        from safetensors import safe_open

        files = sorted((self.path / "vae").glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path}/vae has no .safetensors weights (FLUX.2 reads its batch-norm there)")
        eps = self.config("vae").get("batch_norm_eps", 1e-4)
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                if "bn.running_mean" in st.keys():
                    mean, var = st.get_tensor("bn.running_mean"), st.get_tensor("bn.running_var")
                    return mean.float(), torch.sqrt(var.float() + eps)
        raise KeyError(f"{self.path}/vae: no bn.running_mean in its weights")

    @staticmethod
    def patchify(z: torch.Tensor) -> torch.Tensor:
        """(..., C, h, w) -> (..., 4C, h/2, w/2): ``Flux2KleinPipeline._patchify_latents``."""
        *lead, c, h, w = z.shape
        z = z.reshape(-1, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(*lead, c * 4, h // 2, w // 2)

    @staticmethod
    def unpatchify(x: torch.Tensor) -> torch.Tensor:
        """The inverse of ``patchify`` (``_unpatchify_latents``)."""
        *lead, c4, h, w = x.shape
        x = x.reshape(-1, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(*lead, c4 // 4, h * 2, w * 2)

    def latents(self, sample):
        """A VAE sample (..., 32, h, w) -> the batch-normalised patchified latent, kept unpatchified (module doc)."""
        mean, std = (v.to(sample.device, sample.dtype).view(-1, 1, 1) for v in self.batch_norm)
        return self.unpatchify((self.patchify(sample) - mean) / std)

    def shift_factor(self, tokens: int) -> float:
        """e^mu of FLUX.2's empirical mu at ``tokens`` and the family's sampler steps."""
        return math.exp(empirical_mu(tokens, self.sample_steps))

    # ---------------------------------------------------------------- text
    @torch.no_grad()
    def encode_texts(self, encoders, captions):
        """prompt_embeds (n, max_sequence_length, 3 D): ``Flux2KleinPipeline.encode_prompt``."""
        pipe = encoders
        embeds, _ = pipe.encode_prompt(
            list(captions), device=pipe.device, max_sequence_length=self.max_sequence_length,
            text_encoder_out_layers=self.text_layers,
        )  # fmt: skip
        return {"prompt_embeds": embeds.float()}

    def caption_shapes(self):
        cfg = self.config(self.denoiser_folder)
        return {"prompt_embeds": (self.max_sequence_length, cfg["joint_attention_dim"])}

    def conditioning(self, batch, drop, empty, *, pairs=True):
        v = batch["prompt_embeds"]
        v = torch.where(drop.view(-1, 1, 1), empty["prompt_embeds"], v)
        return dict(encoder_hidden_states=v.repeat(2 if pairs else 1, 1, 1))

    # ---------------------------------------------------------------- the denoiser
    @staticmethod
    def token_ids(h: int, w: int, text: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Image positions (h w, 4): (0, row, column, 0); text positions (text, 4): (0, 0, 0, l), as the pipeline's
        ``_prepare_latent_ids`` and ``_prepare_text_ids``."""
        one = torch.arange(1, device=device)
        img = torch.cartesian_prod(one, torch.arange(h, device=device), torch.arange(w, device=device), one)
        txt = torch.cartesian_prod(one, one, one, torch.arange(text, device=device))
        return img, txt

    def predict(self, denoiser, noisy, t, cond):
        """Patchified, packed tokens in (n, h/2 w/2, 4C), s = t / 1000; the velocity unpacked to (n, C, h, w)."""
        return self._predict(denoiser, noisy, t, cond, None)

    def _predict(self, denoiser, noisy, t, cond, guidance):
        x = self.patchify(noisy)
        n, c4, h, w = x.shape
        text = cond["encoder_hidden_states"]
        img_ids, txt_ids = self.token_ids(h, w, text.shape[1], noisy.device)
        out = denoiser(
            hidden_states=x.reshape(n, c4, h * w).permute(0, 2, 1), timestep=(t / self.num_train_timesteps).to(x.dtype),
            guidance=guidance, encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]  # fmt: skip
        return self.unpatchify(out.permute(0, 2, 1).reshape(n, c4, h, w))

    def dummy_inputs(self, rows):
        c, h, w = self.dummy_latent_shape()
        x = torch.randn(rows, c, h, w)
        t = torch.full((rows,), self.num_train_timesteps / 2)
        return x, t, dict(encoder_hidden_states=torch.randn(rows, *self.caption_shapes()["prompt_embeds"]))

    @classmethod
    def tiny_pipeline(cls, seed: int = 0):
        """A tiny random pipeline of the family: the tiny transformer, a 2-level ``AutoencoderKLFlux2`` with random
        batch-norm statistics, and ``tiny_text_encoder``'s encoder and tokenizer."""
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

        from ..seeding import seed_of

        torch.manual_seed(seed_of(seed, 0))
        transformer = cls.denoiser_class()(**cls.tiny["transformer"])
        torch.manual_seed(seed_of(seed, 1))
        vae = AutoencoderKLFlux2(**cls.tiny["vae"])
        vae.bn.running_mean.normal_(0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
        torch.manual_seed(seed_of(seed, 2))
        encoder, tokenizer = cls.tiny_text_encoder()
        return cls.pipeline_class()(
            transformer=transformer, vae=vae, text_encoder=encoder.eval(), tokenizer=tokenizer,
            scheduler=FlowMatchEulerDiscreteScheduler(**cls.tiny["scheduler"]),
        )  # fmt: skip

    @classmethod
    def tiny_text_encoder(cls):
        """Klein's: a 28-layer ``Qwen3ForCausalLM`` of width 16 and the byte-level chat tokenizer."""
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from .tokenizers import chat_tokenizer

        return Qwen3ForCausalLM(Qwen3Config(**cls.tiny["text_encoder"])), chat_tokenizer()


class Flux2Family(Flux2KleinFamily):
    """FLUX.2-dev: Klein's latents, shift, packing and prediction, Mistral-3's text layers and a guidance embedding."""

    name = "flux2"
    pipeline_name = "Flux2Pipeline"
    guidance = 4.0  # Flux2Pipeline's default (embedded guidance, no second forward)
    text_layers = (10, 20, 30)  # Flux2Pipeline's text_encoder_out_layers
    train_guidance = 1.0  # the guidance embedding's input while training, the same for policy and reference
    tiny = dict(
        Flux2KleinFamily.tiny,
        transformer=dict(Flux2KleinFamily.tiny["transformer"], guidance_embeds=True),
        text_encoder=dict(  # a Mistral3ForConditionalGeneration deep enough for the pipeline's layers (10, 20, 30)
            text_config=dict(
                model_type="mistral", vocab_size=263, hidden_size=16, intermediate_size=24,
                num_hidden_layers=max(text_layers) + 1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            ),
            vision_config=dict(
                model_type="pixtral", hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                head_dim=8, image_size=28, patch_size=14,
            ),
            image_token_index=262, spatial_merge_size=2,
        ),
    )  # fmt: skip
    full = {  # black-forest-labs/FLUX.2-dev: Flux2Transformer2DModel's defaults (Mistral-3 Small: 3 x 5120)
        "flux.2-dev": dict(
            transformer=dict(
                patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                num_attention_heads=48, joint_attention_dim=15360, axes_dims_rope=(32, 32, 32, 32),
                guidance_embeds=True,
            ),
            vae=_FLUX2_VAE, scheduler=_SCHEDULER, params=32_223_281_152,
        )
    }  # fmt: skip

    @torch.no_grad()
    def encode_texts(self, encoders, captions):
        """prompt_embeds (n, max_sequence_length, 3 D): ``Flux2Pipeline.encode_prompt`` (its system message)."""
        pipe = encoders
        embeds, _ = pipe.encode_prompt(
            list(captions), device=pipe.device, max_sequence_length=self.max_sequence_length,
            text_encoder_out_layers=self.text_layers,
        )  # fmt: skip
        return {"prompt_embeds": embeds.float()}

    def conditioning(self, batch, drop, empty, *, pairs=True):
        """Klein's, and the guidance embedding's input ``train_guidance`` per row."""
        cond = super().conditioning(batch, drop, empty, pairs=pairs)
        text = cond["encoder_hidden_states"]
        return dict(cond, guidance=torch.full((text.shape[0],), self.train_guidance, device=text.device))

    def predict(self, denoiser, noisy, t, cond):
        """Klein's, with the conditioning's guidance (the value the pipeline passes as ``guidance_scale``)."""
        cond = dict(cond)
        guidance = cond.pop("guidance")
        return self._predict(denoiser, noisy, t, cond, guidance.to(noisy.dtype))

    def dummy_inputs(self, rows):
        x, t, cond = super().dummy_inputs(rows)
        return x, t, dict(cond, guidance=torch.full((rows,), self.train_guidance))

    @classmethod
    def tiny_text_encoder(cls):
        """A 31-layer ``Mistral3ForConditionalGeneration`` of width 16 and an offline tokenizer with Mistral's chat
        template in place of the pipeline's ``PixtralProcessor`` (``tokenizers.mistral_tokenizer``)."""
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        from .tokenizers import mistral_tokenizer

        return Mistral3ForConditionalGeneration(Mistral3Config(**cls.tiny["text_encoder"])), mistral_tokenizer()
