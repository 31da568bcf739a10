"""Tiny random models saved in the layout of a real diffusers repository (every family, the InstructPix2Pix
editor, a CLIP embedder), the full-size configs (for random-weight GPU benchmarks and meta-device plans), and the
offline tokenizers.

Nothing here downloads anything. The tokenizer is a byte-level CLIP BPE with no merges: its vocabulary is
the 256 byte symbols, the same 256 with ``</w>``, and the two specials (514 tokens), so it encodes any
text (lowercased, as CLIP does) exactly the way loaders will meet a real ``tokenizer/`` folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

CLIP_MAX_LENGTH = 77
BOS_ID, EOS_ID = 512, 513  # <|startoftext|>, <|endoftext|> (also the pad token, as in CLIP)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode map (the 256 base symbols of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def byte_level_clip_tokenizer():
    """A ``CLIPTokenizer`` of 514 tokens (256 bytes, 256 bytes + ``</w>``, 2 specials) and no merges.

    ``model_max_length=77`` is required: without it diffusers pipelines pad to an unbounded length.
    """
    from transformers import CLIPTokenizer

    symbols = [c for _, c in sorted(_bytes_to_unicode().items())]
    vocab = {c: i for i, c in enumerate(symbols)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(symbols)})
    vocab["<|startoftext|>"] = BOS_ID
    vocab["<|endoftext|>"] = EOS_ID
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


# --------------------------------------------------------------------------------------------------
# Model configs: tiny (CPU tests) and full size (GPU benchmarks, built with random weights)
# --------------------------------------------------------------------------------------------------

TINY_HIDDEN = 32  # text encoder width; the SDXL-style UNet cross-attends to 2 * TINY_HIDDEN

_TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64),
    norm_num_groups=32,
)
TINY_UNET_CONFIGS = {
    "sd15": dict(
        _TINY_UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_HIDDEN,
        attention_head_dim=8,
    ),
    "sdxl": dict(
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
}
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)  # downsamples by 2: 32px images -> 16x16 latents
TINY_TEXT_CONFIG = dict(
    vocab_size=514,
    hidden_size=TINY_HIDDEN,
    intermediate_size=37,
    num_hidden_layers=2,  # SDXL reads the penultimate hidden state: at least 2 layers
    num_attention_heads=4,
    max_position_embeddings=CLIP_MAX_LENGTH,
    projection_dim=TINY_HIDDEN,
    hidden_act="gelu",
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=EOS_ID,
)

# Full-size configs, values from the public model configs (runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-xl-base-1.0). UNets: 0.860 B (SD1.5) and 2.567 B (SDXL) parameters.
FULL_UNET_CONFIGS = {
    "sd15": dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    "sdxl": dict(
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
}
_FULL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)
FULL_VAE_CONFIGS = {
    "sd15": dict(_FULL_VAE, sample_size=512, scaling_factor=0.18215),
    "sdxl": dict(_FULL_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
}
CLIP_L_TEXT = dict(  # openai/clip-vit-large-patch14 text tower (SD1.5, SDXL's first encoder)
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)
CLIP_BIGG_TEXT = dict(  # laion CLIP ViT-bigG/14 text tower (SDXL's second encoder, with projection)
    CLIP_L_TEXT,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
)
FULL_TEXT_CONFIGS = {"sd15": [CLIP_L_TEXT], "sdxl": [CLIP_L_TEXT, CLIP_BIGG_TEXT]}
FULL_UNET_PARAMS = {"sd15": 859_520_964, "sdxl": 2_567_463_684}


def _check_kind(kind: str, kinds: tuple[str, ...] = ("sd15", "sdxl")) -> None:
    if kind not in kinds:
        raise ValueError(f"kind must be one of {', '.join(map(repr, kinds))}, got {kind!r}")


# --------------------------------------------------------------------------------------------------
# Flow-matching transformers: SD3 / SD3.5 and FLUX.1
# --------------------------------------------------------------------------------------------------

T5_MAX_LENGTH = 512


def t5_tokenizer():
    """A ``T5TokenizerFast`` built without downloads: a Unigram model over the printable ASCII characters (each a
    token, with and without the word-start marker), ``<pad>`` 0, ``</s>`` 1 (appended, as T5 does), ``<unk>`` 2."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [c for c in string.printable if not c.isspace()]
    pieces = ["\u2581"] + chars + ["\u2581" + c for c in chars]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0 - 1e-3 * i) for i, c in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
        model_max_length=T5_MAX_LENGTH,
    )  # fmt: skip


T5_TINY = 64  # the tiny T5's width: the transformers' joint_attention_dim (>= SD3's two CLIP widths side by side)
TINY_T5_CONFIG = dict(
    vocab_size=3 + 1 + 2 * 94,  # t5_tokenizer(): specials, the word marker, 94 characters with and without it
    d_model=T5_TINY,
    d_kv=8,
    d_ff=37,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    feed_forward_proj="gated-gelu",  # T5 v1.1, as T5-XXL
    is_encoder_decoder=False,
    pad_token_id=0,
    eos_token_id=1,
)
T5_XXL = dict(  # google/t5-v1_1-xxl's encoder (SD3's text_encoder_3, FLUX's text_encoder_2)
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    pad_token_id=0, eos_token_id=1,
)  # fmt: skip
TINY_FLOW_VAE = dict(TINY_VAE_CONFIG, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
FLOW_VAE = dict(_FULL_VAE, latent_channels=16, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False)
VAE_FACTORS = {  # the public VAEs' latent shift and scale
    "sd3": dict(shift_factor=0.0609, scaling_factor=1.5305),
    "flux": dict(shift_factor=0.1159, scaling_factor=0.3611),
}
TINY_TRANSFORMER_CONFIGS = {
    "sd3": dict(  # SD3.5-style: RMS-normed q/k and a dual-attention first layer
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=T5_TINY, caption_projection_dim=32,
        pooled_projection_dim=2 * TINY_HIDDEN, pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,),
    ),
    "flux": dict(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_TINY, pooled_projection_dim=TINY_HIDDEN, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
}  # fmt: skip
# Full size, from the public transformer configs (stabilityai/stable-diffusion-3.5-medium, -large,
# black-forest-labs/FLUX.1-dev); parameter counts on the meta device in FULL_TRANSFORMER_PARAMS.
FULL_TRANSFORMER_CONFIGS = {
    "sd3.5-medium": dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
    ),
    "sd3.5-large": dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
        pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=(),
    ),
    "flux.1-dev": dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
}  # fmt: skip
FLOW_KIND = {"sd3.5-medium": "sd3", "sd3.5-large": "sd3", "flux.1-dev": "flux"}
# every full-size model the fixtures build (save_random_model, save_model_configs), with its family
FULL_SIZE = {"sd15": "sd15", "sdxl": "sdxl", **FLOW_KIND}
# parameters (SD3.5-Medium also holds a 0.23 B positional-embedding buffer of 384^2 x 1536: 2.47 B, its card's 2.5 B)
FULL_TRANSFORMER_PARAMS = {"sd3.5-medium": 2_243_171_520, "sd3.5-large": 8_056_627_520, "flux.1-dev": 11_901_408_320}


def flow_scheduler(kind: str):
    """SD3's FlowMatchEulerDiscreteScheduler (shift 3.0), or FLUX's (resolution-dependent shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if kind == "flux":
        return FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        )  # fmt: skip
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def build_transformer(kind: str, *, full: bool = False, device: str | torch.device = "cpu", seed: int = 0):
    """A random ``SD3Transformer2DModel`` / ``FluxTransformer2DModel``: ``kind`` 'sd3' or 'flux' (tiny), or with
    ``full=True`` one of FULL_TRANSFORMER_CONFIGS ('sd3.5-medium', 'sd3.5-large', 'flux.1-dev')."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    config = FULL_TRANSFORMER_CONFIGS[kind] if full else TINY_TRANSFORMER_CONFIGS[kind]
    cls = FluxTransformer2DModel if (FLOW_KIND[kind] if full else kind) == "flux" else SD3Transformer2DModel
    torch.manual_seed(seed)
    with torch.device(device):
        return cls(**config)


def tiny_flow_pipeline(kind: str, *, seed: int = 0):
    """A tiny random ``StableDiffusion3Pipeline`` (``kind="sd3"``: CLIP-L, CLIP-G and T5 text encoders) or
    ``FluxPipeline`` (CLIP-L and T5)."""
    from diffusers import AutoencoderKL, FluxPipeline, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    _check_kind(kind, ("sd3", "flux"))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_FLOW_VAE, **VAE_FACTORS[kind])
    torch.manual_seed(seed + 2)
    clip = CLIPTextConfig(**TINY_TEXT_CONFIG)
    t5 = T5EncoderModel(T5Config(**TINY_T5_CONFIG)).eval()
    parts = dict(transformer=build_transformer(kind, seed=seed), vae=vae, scheduler=flow_scheduler(kind))
    if kind == "flux":
        return FluxPipeline(
            **parts, text_encoder=CLIPTextModel(clip).eval(), tokenizer=byte_level_clip_tokenizer(),
            text_encoder_2=t5, tokenizer_2=t5_tokenizer(),
        )  # fmt: skip
    return StableDiffusion3Pipeline(
        **parts,
        text_encoder=CLIPTextModelWithProjection(clip).eval(), tokenizer=byte_level_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(clip).eval(), tokenizer_2=byte_level_clip_tokenizer(),
        text_encoder_3=t5, tokenizer_3=t5_tokenizer(),
    )  # fmt: skip


def build_unet(kind: str, *, full: bool = False, device: str | torch.device = "cpu", seed: int = 0):
    """A random-weight ``UNet2DConditionModel``: tiny (tests) or full size (``full=True``, benchmarks).

    ``device="meta"`` builds it without allocating (parameter counting, shape checks).
    """
    from diffusers import UNet2DConditionModel

    _check_kind(kind)
    config = (FULL_UNET_CONFIGS if full else TINY_UNET_CONFIGS)[kind]
    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(**config)


def build_vae(kind: str = "sd15", *, full: bool = False, device: str | torch.device = "cpu", seed: int = 0):
    from diffusers import AutoencoderKL

    _check_kind(kind)
    config = FULL_VAE_CONFIGS[kind] if full else TINY_VAE_CONFIG
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoencoderKL(**config)


def build_text_encoders(kind: str, *, full: bool = False, device: str | torch.device = "cpu", seed: int = 0):
    """``[CLIPTextModel]`` for SD1.5; ``[CLIPTextModel, CLIPTextModelWithProjection]`` for SDXL."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _check_kind(kind)
    configs = FULL_TEXT_CONFIGS[kind] if full else [TINY_TEXT_CONFIG] * (1 if kind == "sd15" else 2)
    classes = [CLIPTextModel, CLIPTextModelWithProjection][: len(configs)]
    torch.manual_seed(seed)
    with torch.device(device):
        return [cls(CLIPTextConfig(**cfg)).eval() for cls, cfg in zip(classes, configs)]


def build_scheduler(prediction_type: str = "epsilon"):
    """The SD training scheduler: DDPM, scaled-linear betas 0.00085..0.012 over 1000 steps."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def tiny_pipeline(kind: str = "sd15", *, seed: int = 0, prediction_type: str = "epsilon"):
    """A tiny random ``StableDiffusionPipeline`` (``kind="sd15"``) or ``StableDiffusionXLPipeline``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    _check_kind(kind)
    parts = dict(
        unet=build_unet(kind, seed=seed),
        vae=build_vae(kind, seed=seed + 1),
        scheduler=build_scheduler(prediction_type),
    )
    encoders = build_text_encoders(kind, seed=seed + 2)
    if kind == "sd15":
        return StableDiffusionPipeline(
            **parts,
            text_encoder=encoders[0],
            tokenizer=byte_level_clip_tokenizer(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        **parts,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=byte_level_clip_tokenizer(),
        tokenizer_2=byte_level_clip_tokenizer(),
    )


def save_tiny_pipeline(
    path: str | Path, kind: str = "sd15", *, seed: int = 0, prediction_type: str = "epsilon"
) -> Path:
    """Write a tiny random pipeline with ``save_pretrained``, as a real repository has it: ``model_index.json``,
    ``unet/``, ``vae/``, ``text_encoder/`` (+ ``_2``), ``tokenizer/`` (+ ``_2``), ``scheduler/`` for ``kind`` 'sd15' /
    'sdxl'; ``transformer/`` and CLIP-L, CLIP-G, T5 (``_3``) for 'sd3'; ``transformer/``, CLIP-L and T5 (``_2``) for
    'flux' (``prediction_type`` is the UNets' only)."""
    path = Path(path)
    if kind in ("sd3", "flux"):
        tiny_flow_pipeline(kind, seed=seed).save_pretrained(path)
        return path
    tiny_pipeline(kind, seed=seed, prediction_type=prediction_type).save_pretrained(path)
    return path


TINY_CLIP_VISION = dict(
    image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
)


def save_tiny_clip(path: str | Path, *, seed: int = 0, projection_dim: int = 16) -> Path:
    """A tiny random ``CLIPModel`` folder in the layout of openai/clip-vit-large-patch14: ``config.json``,
    weights, ``preprocessor_config.json`` (32px, center crop) and the byte-level tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = Path(path)
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=TINY_TEXT_CONFIG, vision_config=TINY_CLIP_VISION, projection_dim=projection_dim)
    CLIPModel(config).eval().save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    byte_level_clip_tokenizer().save_pretrained(path)
    return path


def save_tiny_instruct_pix2pix(path: str | Path, *, seed: int = 0) -> Path:
    """A tiny random ``StableDiffusionInstructPix2PixPipeline`` folder: the SD1.5-style parts with a UNet of 8
    input channels (noisy latent + latent of the image being edited), as timbrooks/instruct-pix2pix has."""
    from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**TINY_UNET_CONFIGS["sd15"], "in_channels": 8})
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=build_vae("sd15", seed=seed + 1),
        text_encoder=build_text_encoders("sd15", seed=seed + 2)[0],
        tokenizer=byte_level_clip_tokenizer(),
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = Path(path)
    pipe.save_pretrained(path)
    return path


def save_random_model(
    path: str | Path,
    kind: str,
    *,
    full: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> Path:
    """A diffusers model folder with random weights: the tiny fixtures, or (``full=True``) the full-size SD1.5 /
    SDXL configs (speed and memory are those of real weights), built on ``device`` and saved in ``dtype``.

    The flow models (``kind`` 'sd3.5-medium', 'sd3.5-large', 'flux.1-dev'): the tiny sd3/flux pipeline, or at full
    size the configs of ``save_model_configs`` with the transformer's random weights only (no text encoders or VAE
    weights: a training step reads a cache, and the 4.7 B-parameter T5-XXL would only cost time)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind in FULL_TRANSFORMER_CONFIGS:
        path = Path(path)
        if not full:
            return save_tiny_pipeline(path, FLOW_KIND[kind], seed=seed)
        save_model_configs(path, kind)
        build_transformer(kind, full=True, device=device, seed=seed).to(dtype).save_pretrained(path / "transformer")
        return path
    _check_kind(kind)
    unet = build_unet(kind, full=full, device=device, seed=seed).to(dtype)
    vae = build_vae(kind, full=full, device=device, seed=seed + 1).to(dtype)
    encoders = [e.to(dtype) for e in build_text_encoders(kind, full=full, device=device, seed=seed + 2)]
    parts = dict(
        unet=unet, vae=vae, scheduler=build_scheduler(), text_encoder=encoders[0], tokenizer=byte_level_clip_tokenizer()
    )
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=encoders[1], tokenizer_2=byte_level_clip_tokenizer())
    else:
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    path = Path(path)
    pipe.save_pretrained(path)
    return path


def save_model_configs(path: str | Path, kind: str, *, full: bool = True) -> Path:
    """A model folder of configs only (model_index.json, unet/ or transformer/, vae/, scheduler/; no weights): enough
    for a ``ModelFamily`` to build its denoiser on the meta device and count FLOPs and memory (``rpo_fast.recompute``).
    ``kind``: 'sd15', 'sdxl', or a full-size flow model ('sd3.5-medium', 'sd3.5-large', 'flux.1-dev')."""

    path = Path(path)
    if kind in FULL_TRANSFORMER_CONFIGS:  # sd3.5-medium, sd3.5-large, flux.1-dev: transformer/, vae/, scheduler/
        flux = FLOW_KIND[kind] == "flux"
        cls = "FluxTransformer2DModel" if flux else "SD3Transformer2DModel"
        index = {"_class_name": "FluxPipeline" if flux else "StableDiffusion3Pipeline"}
        index.update(transformer=["diffusers", cls], vae=["diffusers", "AutoencoderKL"])
        vae = dict(FLOW_VAE, **VAE_FACTORS[FLOW_KIND[kind]], _class_name="AutoencoderKL")
        configs = {"transformer": dict(FULL_TRANSFORMER_CONFIGS[kind], _class_name=cls), "vae": vae}
        for sub, config in configs.items():
            (path / sub).mkdir(parents=True, exist_ok=True)
            (path / sub / "config.json").write_text(json.dumps(config, indent=1))
        (path / "model_index.json").write_text(json.dumps(index, indent=1))
        flow_scheduler(FLOW_KIND[kind]).save_config(path / "scheduler")
        return path
    _check_kind(kind)
    pipeline = "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"
    index = {"_class_name": pipeline, "unet": ["diffusers", "UNet2DConditionModel"]}
    index["vae"] = ["diffusers", "AutoencoderKL"]
    if kind == "sdxl":
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    unet = (FULL_UNET_CONFIGS if full else TINY_UNET_CONFIGS)[kind]
    vae = FULL_VAE_CONFIGS[kind] if full else TINY_VAE_CONFIG
    configs = {"unet": dict(unet, _class_name="UNet2DConditionModel"), "vae": dict(vae, _class_name="AutoencoderKL")}
    for sub, config in configs.items():
        (path / sub).mkdir(parents=True, exist_ok=True)
        (path / sub / "config.json").write_text(json.dumps(config, indent=1))
    (path / "model_index.json").write_text(json.dumps(index, indent=1))
    build_scheduler().save_config(path / "scheduler")
    return path
