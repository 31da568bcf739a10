"""The UNet families: Stable Diffusion 1.5 (``sd15``) and SDXL (``sdxl``), DDPM noising (``noising.DDPMNoising``)
with an epsilon or v-prediction target (the scheduler's ``prediction_type``).

SD1.5 conditions on the CLIP-L text encoder's last hidden state (77, 768). SDXL concatenates the penultimate
hidden states of both encoders (77, 2048) and adds the second encoder's pooled projection and six time ids per
image (original size, crop top-left, target size).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import ModelFamily
from .configs import CLIP_BIGG_TEXT, CLIP_L_TEXT, CLIP_TOKENS, FULL_VAE, TINY_CLIP_TEXT, TINY_HIDDEN, TINY_VAE
from .noising import DDPMNoising

_TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64),
    norm_num_groups=32,
)


class SD15Family(DDPMNoising, ModelFamily):
    name = "sd15"
    encoder_folders = ("text_encoder", "tokenizer")
    caption_keys = ("prompt_embeds",)
    dspo_form = "sd15"
    guidance = 7.5
    resnet_blocks = ("ResnetBlock2D",)
    tiny = dict(
        unet=dict(
            _TINY_UNET,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_HIDDEN,
            attention_head_dim=8,
        ),
        vae=TINY_VAE,
        text_encoders=(TINY_CLIP_TEXT,),
    )
    full = {  # runwayml/stable-diffusion-v1-5: a 0.860 B UNet
        "sd15": dict(
            unet=dict(
                sample_size=64,
                in_channels=4,
                out_channels=4,
                layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768,
                attention_head_dim=8,
                norm_num_groups=32,
            ),
            vae=dict(FULL_VAE, sample_size=512, scaling_factor=0.18215),
            text_encoders=(CLIP_L_TEXT,),
            params=859_520_964,
        )
    }

    @classmethod
    def detect(cls, model_index, denoiser_config):
        if model_index is not None:
            return "unet" in model_index
        return denoiser_config is not None

    # ---------------------------------------------------------------- loading
    def denoiser_class(self):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    def _text_models(self):
        from transformers import CLIPTextModel, CLIPTokenizer

        return [("tokenizer", "text_encoder", CLIPTokenizer, CLIPTextModel)]

    def load_text_encoders(self, *, device="cpu", dtype=torch.float32):
        out = []
        for tok_dir, enc_dir, tok_cls, enc_cls in self._text_models():
            tok = tok_cls.from_pretrained(self.path, subfolder=tok_dir)
            enc = enc_cls.from_pretrained(self.path, subfolder=enc_dir, dtype=dtype).to(device).eval()
            out.append((tok, enc))
        return out

    @classmethod
    def pipeline_class(cls):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def load_pipeline(self, *, dtype=torch.float32):
        return self.pipeline_class().from_pretrained(
            self.path, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )

    def save_lora(self, folder, layers):
        """In diffusers' own naming (lora.down / lora.up), as its SD and SDXL training scripts save."""
        from diffusers.utils import convert_state_dict_to_diffusers

        layers = convert_state_dict_to_diffusers(layers)
        self.pipeline_class().save_lora_weights(Path(folder), unet_lora_layers=layers, safe_serialization=True)

    # ---------------------------------------------------------------- the cache side
    @staticmethod
    def _ids(tok, captions, device):
        return tok(
            captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)

    @torch.no_grad()
    def encode_texts(self, encoders, captions):
        """prompt_embeds (n, 77, D): the last hidden state of CLIP-L."""
        ((tok, enc),) = encoders
        return {"prompt_embeds": enc(self._ids(tok, captions, enc.device))[0].float().cpu()}

    def caption_shapes(self):
        """prompt_embeds (77, the encoders' widths added); SDXL's pooled_prompt_embeds (the second's projection)."""
        subs = [s for s in self.encoder_folders if s.startswith("text_encoder") and (self.path / s).is_dir()]
        te = [self.config(sub) for sub in subs]
        shapes = {"prompt_embeds": (CLIP_TOKENS, sum(c["hidden_size"] for c in te))}
        if "pooled_prompt_embeds" in self.caption_keys:
            shapes["pooled_prompt_embeds"] = (te[-1].get("projection_dim", te[-1]["hidden_size"]),)
        return shapes

    # ---------------------------------------------------------------- the training side
    def fuse_qkv(self, denoiser):
        """diffusers' ``fuse_qkv_projections``: self-attention's to_q/to_k/to_v become one ``to_qkv``, cross-attention's
        to_k/to_v one ``to_kv`` (its to_q stays), with diffusers' fused SDPA processor. The replaced layers are frozen
        (no gradient, kept out of the optimizer)."""
        from diffusers.models.attention_processor import Attention

        denoiser.fuse_qkv_projections()
        for m in denoiser.modules():
            if isinstance(m, Attention):
                stale = (m.to_k, m.to_v) if m.is_cross_attention else (m.to_q, m.to_k, m.to_v)
                for layer in stale:
                    layer.requires_grad_(False)

    def dummy_inputs(self, rows):
        cfg = self.config(self.denoiser_folder)
        size = cfg["sample_size"]
        x = torch.randn(rows, cfg["in_channels"], size, size)
        t = torch.full((rows,), self.num_train_timesteps // 2)
        return x, t, dict(encoder_hidden_states=torch.randn(rows, 77, cfg["cross_attention_dim"]))

    def conditioning(self, batch, drop, empty, *, pairs=True):
        ehs = torch.where(drop[:, None, None], empty["prompt_embeds"], batch["prompt_embeds"])
        return dict(encoder_hidden_states=ehs.repeat(2, 1, 1) if pairs else ehs)


class SDXLFamily(SD15Family):
    name = "sdxl"
    encoder_folders = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    caption_keys = ("prompt_embeds", "pooled_prompt_embeds")
    dspo_form = "sdxl"
    tiny = dict(
        unet=dict(
            _TINY_UNET,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=2 * TINY_HIDDEN,
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            # 6 time ids (original size, crop offset, target size) * 8 + pooled text embedding (32)
            projection_class_embeddings_input_dim=6 * 8 + TINY_HIDDEN,
        ),
        vae=TINY_VAE,
        text_encoders=(TINY_CLIP_TEXT, TINY_CLIP_TEXT),
    )
    full = {  # stabilityai/stable-diffusion-xl-base-1.0: a 2.567 B UNet
        "sdxl": dict(
            unet=dict(
                sample_size=128,
                in_channels=4,
                out_channels=4,
                layers_per_block=2,
                block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=2048,
                attention_head_dim=(5, 10, 20),
                transformer_layers_per_block=(1, 2, 10),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_embed_type_num_heads=64,
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
                norm_num_groups=32,
            ),
            vae=dict(FULL_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
            text_encoders=(CLIP_L_TEXT, CLIP_BIGG_TEXT),
            params=2_567_463_684,
        )
    }
    guidance = 5.0
    image_keys = ("time_ids",)
    vae_fp16 = False  # SDXL's VAE overflows in fp16: the reference scripts keep it in fp32

    @classmethod
    def detect(cls, model_index, denoiser_config):
        if model_index is not None:  # a UNet pipeline with a second text encoder
            return "unet" in model_index and (
                "text_encoder_2" in model_index or "XL" in model_index.get("_class_name", "")
            )
        return denoiser_config is not None and denoiser_config.get("addition_embed_type") == "text_time"

    def _text_models(self):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        return [
            ("tokenizer", "text_encoder", CLIPTokenizer, CLIPTextModel),
            ("tokenizer_2", "text_encoder_2", CLIPTokenizer, CLIPTextModelWithProjection),
        ]

    @classmethod
    def pipeline_class(cls):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def load_pipeline(self, *, dtype=torch.float32):
        return self.pipeline_class().from_pretrained(self.path, dtype=dtype)

    @torch.no_grad()
    def encode_texts(self, encoders, captions):
        """prompt_embeds (n, 77, D1 + D2): both encoders' penultimate hidden states, concatenated;
        pooled_prompt_embeds (n, D2): the second encoder's pooled (projected) embedding."""
        states, pooled = [], None
        for tok, enc in encoders:
            out = enc(self._ids(tok, captions, enc.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        return {"prompt_embeds": torch.cat(states, dim=-1).float(), "pooled_prompt_embeds": pooled.float()}

    def dummy_inputs(self, rows):
        x, t, cond = super().dummy_inputs(rows)
        cfg = self.config(self.denoiser_folder)
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        cond["added_cond_kwargs"] = dict(text_embeds=torch.randn(rows, pooled), time_ids=torch.randn(rows, 6))
        return x, t, cond

    def image_conditioning(self, crops, resolution):
        """time_ids (2, 6) of [winner, loser]: original (h, w), crop (top, left), target (h, w)."""
        return {"time_ids": torch.tensor([c.time_ids(resolution) for c in crops])}

    def conditioning(self, batch, drop, empty, *, pairs=True):
        cond = super().conditioning(batch, drop, empty, pairs=pairs)
        pooled = torch.where(drop[:, None], empty["pooled_prompt_embeds"], batch["pooled_prompt_embeds"])
        time_ids = batch["time_ids"].float().transpose(0, 1).flatten(0, 1)  # (2B, 6) [winners; losers], as floats
        b = pooled.shape[0]
        cond["added_cond_kwargs"] = dict(
            text_embeds=pooled.repeat(2, 1) if pairs else pooled, time_ids=time_ids if pairs else time_ids[:b]
        )
        return cond
