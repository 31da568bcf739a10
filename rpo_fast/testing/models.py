"""Fixtures for tests, benchmarks and users' own tests: tiny random models saved in the layout of a real
diffusers repository, the full-size SD1.5 / SDXL / SD3 / FLUX configs (for random-weight GPU benchmarks), writers of
Pick-a-Pic v2 parquet shards with the public dataset's schema, and the same preference pairs in every other input
format that ``rpo_fast.data`` reads (``write_every_format``).

Nothing here downloads anything. The tokenizer is a byte-level CLIP BPE with no merges: its vocabulary is
the 256 byte symbols, the same 256 with ``</w>``, and the two specials (514 tokens), so it encodes any
text (lowercased, as CLIP does) exactly the way loaders will meet a real ``tokenizer/`` folder.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import numpy as np
import torch

from . import data as D

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


# --------------------------------------------------------------------------------------------------
# Pick-a-Pic v2 parquet shards
# --------------------------------------------------------------------------------------------------

PICKAPIC_COLUMNS = D.PICKAPIC_V2_SCHEMA  # (name, type) of every column of Pick-a-Pic v2's parquet shards
pickapic_schema, encode_image = D.pickapic_schema, D.encode_image


def random_image(rng: np.random.Generator, size: int | tuple[int, int] = 32):
    """A smooth random RGB image (a colour gradient plus noise), ``size`` = side or (width, height)."""
    from PIL import Image

    w, h = (size, size) if isinstance(size, int) else size
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ramp = np.linspace(0, 1, w)[None, :, None]
    arr = c0 * (1 - ramp) + c1 * ramp + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def pickapic_rows(
    n: int,
    *,
    seed: int = 0,
    size: int | tuple[int, int] = 32,
    tie_every: int = 4,
    corrupt: tuple[int, ...] = (),
    captions: list[str] | None = None,
) -> list[dict]:
    """``n`` synthetic rows with the Pick-a-Pic v2 columns. Every ``tie_every``-th row is a tie (0.5/0.5);
    the others alternate between image 0 and image 1 as the winner. Rows listed in ``corrupt`` get
    undecodable bytes in ``jpg_1``."""
    rng = np.random.default_rng(seed)
    t0 = _dt.datetime(2023, 4, 1)
    rows = []
    for i in range(n):
        uid0, uid1 = f"img-{seed}-{i}-0", f"img-{seed}-{i}-1"
        if tie_every and i % tie_every == tie_every - 1:
            labels, best = (0.5, 0.5), ""
        elif i % 2 == 0:
            labels, best = (1.0, 0.0), uid0
        else:
            labels, best = (0.0, 1.0), uid1
        jpg1 = b"\xff\xd8 not a jpeg" if i in corrupt else encode_image(random_image(rng, size))
        rows.append(
            dict(
                caption=captions[i % len(captions)] if captions else f"a picture number {i} of seed {seed}",
                jpg_0=encode_image(random_image(rng, size)),
                jpg_1=jpg1,
                label_0=labels[0],
                label_1=labels[1],
                has_label=True,
                are_different=True,
                best_image_uid=best,
                model_0="sdxl",
                model_1="sd15",
                ranking_id=seed * 1_000_000 + i,
                user_id=int(rng.integers(1, 10_000)),
                created_at=t0 + _dt.timedelta(minutes=i),
                image_0_uid=uid0,
                image_1_uid=uid1,
                image_0_url=f"https://example.invalid/{uid0}.png",
                image_1_url=f"https://example.invalid/{uid1}.png",
                num_example_per_prompt=1,
            )
        )
    return rows


def write_pickapic_shard(path: str | Path, rows: list[dict], *, drop_columns: tuple[str, ...] = ()) -> Path:
    """Write ``rows`` as one parquet shard with the Pick-a-Pic v2 schema (``drop_columns`` lets a test
    write a shard that lacks a column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pickapic_schema()
    keep = [f for f in schema if f.name not in drop_columns]
    table = pa.table({f.name: pa.array([r[f.name] for r in rows], type=f.type) for f in keep})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def write_pairs_jsonl(folder: str | Path, n: int, *, seed: int = 0, size: int = 32) -> Path:
    """The "own data" format: ``pairs.jsonl`` with ``caption``, ``winner``, ``loser`` image paths
    relative to the file, and the PNG files beside it."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        names = []
        for side in ("w", "l"):
            name = f"images/{i:05d}_{side}.png"
            random_image(rng, size).save(folder / name)
            names.append(name)
        lines.append(json.dumps({"caption": f"own pair {i}", "winner": names[0], "loser": names[1]}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def write_warm_preference_pairs(folder: str | Path, n: int, *, seed: int = 0, size: int = 32) -> Path:
    """A learnable preference for trainer tests: each pair's winner is a warm-coloured picture (red,
    orange, yellow hues) and its loser a cool one (blue, green, cyan), with a soft blob and noise; the
    caption names the object, not the colour. Written as ``pairs.jsonl`` + PNGs (the own-data format)."""
    import colorsys

    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    lines = []
    for i in range(n):
        names = []
        for side, hue_range in (("w", (-0.08, 0.15)), ("l", (0.35, 0.65))):
            hue = rng.uniform(*hue_range) % 1.0
            fg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1), rng.uniform(0.7, 1))) * 255
            bg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.2, 0.5), rng.uniform(0.2, 0.5))) * 255
            cx, cy, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.15, 0.3)]
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
            arr = bg * (1 - blob) + fg * blob + rng.normal(0, 6, (size, size, 3))
            name = f"images/{i:05d}_{side}.png"
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / name)
            names.append(name)
        caption = f"a {['ball', 'flower', 'lamp', 'kite'][i % 4]} number {i}"
        lines.append(json.dumps({"caption": caption, "winner": names[0], "loser": names[1]}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


# --------------------------------------------------------------------------------------------------
# The same preference pairs in every input format of rpo_fast.data
# --------------------------------------------------------------------------------------------------

MIRROR_COLUMNS = "caption=prompt,image_0=first_image,image_1=second_image,label_0=first_label,label_1=second_label"
SAVE_TO_DISK_COLUMNS = "caption=text,winner=chosen,loser=rejected"
RANKED_COLUMNS = "caption=prompt,images=image_paths,ranking=rank"


def preference_pairs(n: int, *, seed: int = 0, size: int | tuple[int, int] = 32) -> list[dict]:
    """``n`` pairs as ``{"caption", "winner", "loser"}`` with PNG bytes (lossless: every format decodes the same
    pixels); every third caption repeats the one before (the cache deduplicates captions)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        caption = f"a preference pair {i - 1 if i % 3 == 2 else i} of seed {seed}"
        winner, loser = (D.encode_image(random_image(rng, size), "PNG") for _ in range(2))
        out.append(dict(caption=caption, winner=winner, loser=loser))
    return out


def _image_files(folder: Path, pairs: list[dict]) -> list[tuple[str, str]]:
    """The pairs' images as PNG files under ``folder/images``: their paths relative to ``folder``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i, p in enumerate(pairs):
        w, l = f"images/{i:05d}_w.png", f"images/{i:05d}_l.png"
        (folder / w).write_bytes(p["winner"])
        (folder / l).write_bytes(p["loser"])
        names.append((w, l))
    return names


def write_pickapic_pairs(path: str | Path, pairs: list[dict]) -> Path:
    """Pick-a-Pic v2's schema (labels): the winner is image 0 on even rows and image 1 on odd ones."""
    rows = pickapic_rows(len(pairs), tie_every=0)
    for i, (row, p) in enumerate(zip(rows, pairs)):
        row["caption"] = p["caption"]
        row["jpg_0"], row["jpg_1"] = (p["winner"], p["loser"]) if i % 2 == 0 else (p["loser"], p["winner"])
    return write_pickapic_shard(path, rows)


def write_mirror_parquet(path: str | Path, pairs: list[dict], *, rows_per_file: int | None = None) -> Path:
    """A mirror-style parquet (read with ``MIRROR_COLUMNS``): other column names, images as ``{"bytes", "path"}``
    structs (how ``datasets`` stores an ``Image`` feature), integer labels, the winner alternating between
    image 0 and 1; ``rows_per_file`` splits it into a folder of shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cols = dict(prompt=[], first_image=[], second_image=[], first_label=[], second_label=[], extra=[])
    for i, p in enumerate(pairs):
        a, b = (p["winner"], p["loser"]) if i % 2 == 0 else (p["loser"], p["winner"])
        cols["prompt"].append(p["caption"])
        cols["first_image"].append({"bytes": a, "path": f"{i}_a.png"})
        cols["second_image"].append({"bytes": b, "path": f"{i}_b.png"})
        cols["first_label"].append(1 - i % 2)
        cols["second_label"].append(i % 2)
        cols["extra"].append(i)
    types = dict(first_image=image, second_image=image, first_label=pa.int64(), second_label=pa.int64())
    table = pa.table({k: pa.array(v, type=types.get(k)) for k, v in cols.items()})
    path = Path(path)
    if rows_per_file is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return path
    path.mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, len(pairs), rows_per_file)):
        pq.write_table(table.slice(start, rows_per_file), path / f"train-{k:05d}.parquet")
    return path


def write_save_to_disk(folder: str | Path, pairs: list[dict]) -> Path:
    """A Hugging Face ``datasets`` folder written by the real ``Dataset.save_to_disk`` (read with
    ``SAVE_TO_DISK_COLUMNS``): ``text``, and ``chosen``/``rejected`` as ``Image`` features. Needs ``datasets``."""
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "chosen": datasets.Image(), "rejected": datasets.Image()}
    )
    rows = dict(
        text=[p["caption"] for p in pairs],
        chosen=[{"bytes": p["winner"], "path": None} for p in pairs],
        rejected=[{"bytes": p["loser"], "path": None} for p in pairs],
    )
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return Path(folder)


def write_ranked_json(folder: str | Path, pairs: list[dict]) -> Path:
    """A ranked-list JSON (read with ``RANKED_COLUMNS``): a list of ``{"prompt", "image_paths", "rank"}`` with
    two images each (rank 1 the best, the winner first on even rows, second on odd ones) and the PNG files
    beside it; any ranking rule gives the pair itself."""
    folder = Path(folder)
    rows = []
    for i, (p, (w, l)) in enumerate(zip(pairs, _image_files(folder, pairs))):
        paths, rank = ([w, l], [1, 2]) if i % 2 == 0 else ([l, w], [2, 1])
        rows.append(dict(prompt=p["caption"], image_paths=paths, rank=rank))
    (folder / "ranked.json").write_text(json.dumps(rows, indent=1))
    return folder / "ranked.json"


def write_pair_file(folder: str | Path, pairs: list[dict], fmt: str = "jsonl") -> Path:
    """The own-data format: ``pairs.jsonl`` or ``pairs.csv`` of caption, winner, loser (paths) and the PNGs."""
    folder = Path(folder)
    names = _image_files(folder, pairs)
    rows = [dict(caption=p["caption"], winner=w, loser=l) for p, (w, l) in zip(pairs, names)]
    if fmt == "csv":
        import csv

        with (folder / "pairs.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["caption", "winner", "loser"])
            writer.writeheader()
            writer.writerows(rows)
        return folder / "pairs.csv"
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "pairs.jsonl"


def write_every_format(folder: str | Path, pairs: list[dict]) -> dict[str, tuple[Path, str | None]]:
    """``pairs`` written in each input format: name -> (the ``--data`` path, the ``--columns`` it is read with)."""
    folder = Path(folder)
    return {
        "pickapic": (write_pickapic_pairs(folder / "pickapic" / "train-00000.parquet", pairs).parent, None),
        "mirror": (write_mirror_parquet(folder / "mirror" / "data.parquet", pairs), MIRROR_COLUMNS),
        "save_to_disk": (write_save_to_disk(folder / "save_to_disk", pairs), SAVE_TO_DISK_COLUMNS),
        "ranked": (write_ranked_json(folder / "ranked", pairs), RANKED_COLUMNS),
        "jsonl": (write_pair_file(folder / "jsonl", pairs), None),
        "csv": (write_pair_file(folder / "csv", pairs, "csv"), None),
    }


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
    import json

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


def write_synthetic_cache(
    model: str | Path, out: str | Path, n: int, *, resolution: int, embed_dim: int = 768, seed: int = 0
) -> Path:
    """A complete cache (the format of ``rpo_fast.cache``) of ``n`` random pairs for ``model``: shapes taken from the
    model's configs, nothing encoded. For benchmarks of the training step, where only shapes matter."""
    from safetensors.torch import save_file

    from .data import schema as S
    from .data import writer as W
    from .data.encode import model_fingerprint
    from .models import load_family

    model, out = Path(model), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    family = load_family(model)
    vae = family.config("vae")
    h = resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    g = torch.Generator().manual_seed(seed)
    shard = {
        "captions": [f"synthetic caption {i}" for i in range(n)],
        "latent_mean": torch.randn(n, 2, vae["latent_channels"], h, h, generator=g),
        "latent_std": torch.rand(n, 2, vae["latent_channels"], h, h, generator=g) * 0.1,
        "text_index": torch.arange(n),
        "clip_text": torch.nn.functional.normalize(torch.randn(n, embed_dim, generator=g), dim=-1),
        "clip_image": torch.nn.functional.normalize(torch.randn(n, 2, embed_dim, generator=g), dim=-1),
    }
    widths = family.caption_shapes()
    shard.update({k: torch.randn(n, *shape, generator=g) for k, shape in widths.items()})
    square = D.Crop((resolution, resolution), (0, 0))  # a square image, centre-cropped
    for key, v in family.image_conditioning([square, square], resolution).items():
        shard[key] = v.expand(n, *v.shape).contiguous()
    empty = {k: torch.randn(1, *shape, generator=g).half() for k, shape in widths.items()}
    meta = dict(n=n, pairs_before=0, cursor=[0, n], counts={})
    W.write_shard(out / S.shard_name(0, 0), shard, torch.float16, meta, family.caption_keys)
    save_file(empty, str(out / "empty_prompt.safetensors"))
    settings = dict(
        format=S.FORMAT, model_fingerprint=model_fingerprint(family), kind=family.name, resolution=resolution,
        crop="center", flip=False, flip_twin=False, keep_ties=False, seed=seed, shard_size=n, batch_size=n,
        storage="fp16", world=1, embedder="synthetic", data="synthetic", max_sequence_length=family.max_sequence_length,
    )  # fmt: skip
    (out / "cache.json").write_text(json.dumps(settings))
    shards = [dict(name=S.shard_name(0, 0), pairs=n)]
    W.write_index(out, settings, model, n, {}, shards, caption_keys=family.caption_keys)
    return out
