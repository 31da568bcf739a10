"""SANA (``sana``; Efficient-Large-Model/Sana_1600M_1024px and Sana_600M, diffusers' ``SanaTransformer2DModel`` and
``SanaPipeline``): a linear-attention DiT over the deterministic DC-AE (32 channels at 1/32), one Gemma-2 text
encoder, rectified flow sampled with DPM-Solver++ in its flow form.

Noising and target are the flow families' (x_t = (1 - s) x0 + s eps, v = eps - x0: DPM-Solver's ``flow_prediction``
recovers x0 = x_t - s v); the transformer takes t = 1000 s (times the config's ``timestep_scale``, 1 for SANA 1.0).
The shift is the scheduler config's static ``flow_shift`` (3.0), s = S u / (1 + (S - 1) u). The DC-AE is deterministic
(``latent_distribution`` False): the cache stores its latent and a zero std; the latent the transformer sees is
z x 0.41407 (the VAE config's scaling factor).

Text (``SanaPipeline.encode_prompt`` as its ``__call__`` drives it): the caption lowercased, after the pipeline's
default complex human instruction (the prompt-enhancing preamble of SANA's app config), Gemma-2's last hidden state,
the first token and the last ``max_sequence_length`` - 1 (300) kept, the attention mask kept as per-caption
conditioning (``prompt_attention_mask``: the transformer masks the padding). The empty caption, the one caption
dropping uses, is encoded as the pipeline's negative prompt: without the instruction.

Sampling: the pipeline's defaults (20 steps at guidance 4.5) with resolution binning switched off (``sample_options``:
binning would turn a 512 px request into its 1024 px bin).
"""

from __future__ import annotations

import inspect
from functools import cached_property, partial

import torch

from . import dropped, random_masked_states
from .flow import FlowFamily

_SCHEDULER = dict(  # Sana_1600M_1024px_diffusers/scheduler
    _class_name="DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", flow_shift=3.0, use_flow_sigmas=True,
    prediction_type="flow_prediction", num_train_timesteps=1000, solver_order=2, final_sigmas_type="zero",
)  # fmt: skip
_DC_AE = dict(  # mit-han-lab/dc-ae-f32c32-sana-1.0: AutoencoderDC with SANA's blocks and scaling factor
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407,
)  # fmt: skip


class SanaFamily(FlowFamily):
    name = "sana"
    pipeline_name = "SanaPipeline"
    denoiser_class_name = "SanaTransformer2DModel"
    vae_class_name = "AutoencoderDC"
    latent_distribution = False
    encoder_folders = ("text_encoder", "tokenizer")
    caption_keys = ("prompt_embeds", "prompt_attention_mask")
    guidance = 4.5  # SanaPipeline's defaults
    sample_steps = 20
    sample_options = {"use_resolution_binning": False}
    max_sequence_length = 300
    patch = 1
    repeated_blocks = ("SanaTransformerBlock",)  # diffusers 0.42.1 names none for SANA (--compile-mode regional)
    tiny = dict(
        transformer=dict(
            in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
            sample_size=16, patch_size=1,
        ),
        vae=dict(
            in_channels=3, latent_channels=8, attention_head_dim=8,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(16, 32), decoder_block_out_channels=(16, 32),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)), upsample_block_type="interpolate",
            downsample_block_type="Conv", decoder_norm_types="rms_norm", decoder_act_fns="silu",
            scaling_factor=0.41407,
        ),
        scheduler=_SCHEDULER,
        text_encoder=dict(  # a Gemma2Model (SANA reads its last hidden state)
            vocab_size=356, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=4096,
        ),
    )  # fmt: skip
    full = {  # Efficient-Large-Model/Sana_1600M_1024px_diffusers and Sana_600M_1024px_diffusers
        "sana-1.6b": dict(
            transformer=dict(
                in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1,
            ),
            vae=_DC_AE, scheduler=_SCHEDULER, params=1_604_462_752,
        ),
        "sana-0.6b": dict(
            transformer=dict(
                in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32, num_layers=28,
                num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152,
                caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1,
            ),
            vae=_DC_AE, scheduler=_SCHEDULER, params=591_747_872,
        ),
    }  # fmt: skip

    def shift_factor(self, tokens: int) -> float:
        """DPM-Solver's static ``flow_shift``."""
        return self.scheduler_config.get("flow_shift", 1.0)

    def sampler_u(self, steps: int) -> torch.Tensor:
        """DPM-Solver's flow sigmas before the shift: (1 - 1/T)(1 - i/N), i = 0..N-1 (1 - linspace(1, 1/T, N + 1),
        flipped, the last dropped)."""
        return super().sampler_u(steps) * (1 - 1 / self.num_train_timesteps)

    @cached_property
    def latent_shift_scale(self) -> tuple[float, float]:
        return 0.0, self.config("vae").get("scaling_factor", 0.41407)

    @cached_property
    def instruction(self) -> list[str]:
        """The complex human instruction ``SanaPipeline.__call__`` encodes captions with by default."""
        return inspect.signature(self.pipeline_class().__call__).parameters["complex_human_instruction"].default

    # ---------------------------------------------------------------- text
    @torch.no_grad()
    def encode_texts(self, encoders, captions):
        """prompt_embeds (n, max_sequence_length, D) and prompt_attention_mask (n, max_sequence_length) int64, as the
        pipeline encodes a prompt (with its instruction) and its negative prompt "" (without)."""
        pipe, out = encoders, {}
        groups = {True: [i for i, c in enumerate(captions) if c == ""], False: [i for i, c in enumerate(captions) if c]}
        for empty, rows in groups.items():
            if rows:
                embeds, mask, _, _ = pipe.encode_prompt(
                    [captions[i] for i in rows], do_classifier_free_guidance=False, device=pipe.device,
                    max_sequence_length=self.max_sequence_length,
                    complex_human_instruction=None if empty else self.instruction,
                )  # fmt: skip
                for r, e, m in zip(rows, embeds, mask):
                    out[r] = (e.float(), m.long())
        return {
            "prompt_embeds": torch.stack([out[i][0] for i in range(len(captions))]),
            "prompt_attention_mask": torch.stack([out[i][1] for i in range(len(captions))]),
        }

    def caption_shapes(self):
        cfg = self.config(self.denoiser_folder)
        n = self.max_sequence_length
        return {"prompt_embeds": (n, cfg["caption_channels"]), "prompt_attention_mask": (n,)}

    def random_captions(self, n, generator):
        embeds, mask = random_masked_states(n, self.caption_shapes()["prompt_embeds"], generator)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def conditioning(self, batch, drop, empty, *, pairs=True):
        pick = partial(dropped, batch, drop, empty)

        n = 2 if pairs else 1
        return dict(
            encoder_hidden_states=pick("prompt_embeds").repeat(n, 1, 1),
            encoder_attention_mask=pick("prompt_attention_mask").repeat(n, 1),
        )

    # ---------------------------------------------------------------- the denoiser
    def predict(self, denoiser, noisy, t, cond):
        """t = 1000 s times the config's timestep_scale, as SanaPipeline; the output is the velocity."""
        scale = self.config(self.denoiser_folder).get("timestep_scale", 1.0)
        return denoiser(noisy, timestep=t * scale, **cond, return_dict=False)[0]

    def dummy_inputs(self, rows):
        c, h, w = self.dummy_latent_shape()
        x = torch.randn(rows, c, h, w)
        t = torch.full((rows,), self.num_train_timesteps / 2)
        shapes = self.caption_shapes()
        cond = dict(
            encoder_hidden_states=torch.randn(rows, *shapes["prompt_embeds"]),
            encoder_attention_mask=torch.ones(rows, *shapes["prompt_attention_mask"], dtype=torch.long),
        )
        return x, t, cond

    @classmethod
    def tiny_pipeline(cls, seed: int = 0):
        """A tiny random ``SanaPipeline``: the tiny transformer, a 2-level ``AutoencoderDC``, a 2-layer ``Gemma2Model``
        and the offline Gemma tokenizer (``tokenizers.gemma_tokenizer``), SANA's DPM-Solver++ config."""
        from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline
        from transformers import Gemma2Config, Gemma2Model

        from ..seeding import seed_of
        from .tokenizers import gemma_tokenizer

        torch.manual_seed(seed_of(seed, 0))
        transformer = cls.denoiser_class()(**cls.tiny["transformer"])
        torch.manual_seed(seed_of(seed, 1))
        vae = AutoencoderDC(**cls.tiny["vae"])
        torch.manual_seed(seed_of(seed, 2))
        encoder = Gemma2Model(Gemma2Config(**cls.tiny["text_encoder"])).eval()
        scheduler = {k: v for k, v in cls.tiny["scheduler"].items() if k != "_class_name"}
        return SanaPipeline(
            transformer=transformer, vae=vae, text_encoder=encoder, tokenizer=gemma_tokenizer(),
            scheduler=DPMSolverMultistepScheduler(**scheduler),
        )  # fmt: skip
