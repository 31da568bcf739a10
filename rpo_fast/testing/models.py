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

from ..models import FAMILIES, ModelFamily
from ..models.configs import (
    CLIP_TOKENS,
    TINY_BOS,
    TINY_CLIP_TEXT,
    TINY_EOS,
    TINY_T5,
    TINY_VAE,
)
from ..models.tokenizers import _bytes_to_unicode, chat_tokenizer  # noqa: F401 (chat_tokenizer: Qwen-encoded families)

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

CLIP_MAX_LENGTH = CLIP_TOKENS
BOS_ID, EOS_ID = TINY_BOS, TINY_EOS  # <|startoftext|>, <|endoftext|> (also the pad token, as in CLIP)


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

# The configs are the families' declarations (ModelFamily.tiny and .full, in each family's file; the shared parts in
# rpo_fast/models/configs.py); the names below are views of them, by kind.
_UNETS, _FLOWS = ("sd15", "sdxl"), ("sd3", "flux")
TINY_UNET_CONFIGS = {k: FAMILIES[k].tiny["unet"] for k in _UNETS}
TINY_VAE_CONFIG, TINY_TEXT_CONFIG = TINY_VAE, TINY_CLIP_TEXT
FULL_UNET_CONFIGS = {k: FAMILIES[k].full[k]["unet"] for k in _UNETS}
FULL_VAE_CONFIGS = {k: FAMILIES[k].full[k]["vae"] for k in _UNETS}
FULL_TEXT_CONFIGS = {k: list(FAMILIES[k].full[k]["text_encoders"]) for k in _UNETS}
FULL_UNET_PARAMS = {k: FAMILIES[k].full[k]["params"] for k in _UNETS}


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


TINY_T5_CONFIG = TINY_T5
TINY_TRANSFORMER_CONFIGS = {k: FAMILIES[k].tiny["transformer"] for k in _FLOWS}
FULL_TRANSFORMER_CONFIGS = {v: c["transformer"] for k in _FLOWS for v, c in FAMILIES[k].full.items()}
FLOW_KIND = {v: k for k in _FLOWS for v in FAMILIES[k].full}
# every full-size model the fixtures build (save_random_model, save_model_configs), with its family
FULL_SIZE = {v: k for k, f in FAMILIES.items() for v in f.full}
FULL_TRANSFORMER_PARAMS = {v: c["params"] for k in _FLOWS for v, c in FAMILIES[k].full.items()}


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
    vae = AutoencoderKL(**FAMILIES[kind].tiny["vae"])
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


def _declared() -> tuple[str, ...]:
    """The families that build their own tiny pipeline (``ModelFamily.tiny_pipeline``)."""
    base = ModelFamily.tiny_pipeline.__func__
    return tuple(k for k, f in FAMILIES.items() if f.tiny_pipeline.__func__ is not base)


def _declared_full() -> dict[str, str]:
    """Full-size model name -> family, for the families that build their own tiny pipeline."""
    return {v: k for k in _declared() for v in FAMILIES[k].full}


def save_tiny_pipeline(
    path: str | Path, kind: str = "sd15", *, seed: int = 0, prediction_type: str = "epsilon"
) -> Path:
    """Write a tiny random pipeline with ``save_pretrained``, as a real repository has it: ``model_index.json``,
    ``unet/``, ``vae/``, ``text_encoder/`` (+ ``_2``), ``tokenizer/`` (+ ``_2``), ``scheduler/`` for ``kind`` 'sd15' /
    'sdxl'; ``transformer/`` and CLIP-L, CLIP-G, T5 (``_3``) for 'sd3'; ``transformer/``, CLIP-L and T5 (``_2``) for
    'flux' (``prediction_type`` is the UNets' only)."""
    path = Path(path)
    if kind in _declared():
        FAMILIES[kind].tiny_pipeline(seed=seed).save_pretrained(path)
        return path
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

    if kind in _declared_full():  # a declared family's full-size model: configs and the denoiser's random weights
        path, family = Path(path), FAMILIES[_declared_full()[kind]]
        if not full:
            return save_tiny_pipeline(path, family.name, seed=seed)
        save_model_configs(path, kind)
        torch.manual_seed(seed)
        with torch.device(device):
            denoiser = family.denoiser_class()(**family.full[kind][family.denoiser_folder])
        denoiser.to(dtype).save_pretrained(path / family.denoiser_folder)
        return path
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
    if kind in _declared_full():  # a declared family: model_index.json, the denoiser's, vae/ and scheduler/ configs
        family = FAMILIES[_declared_full()[kind]]
        spec = family.full[kind]
        vae_class = family.vae_class_name
        index = {"_class_name": family.pipeline_name, "vae": ["diffusers", vae_class]}
        index[family.denoiser_folder] = ["diffusers", family.denoiser_class_name]
        configs = {
            family.denoiser_folder: dict(spec[family.denoiser_folder], _class_name=family.denoiser_class_name),
            "vae": dict(spec["vae"], _class_name=vae_class),
            "scheduler": dict({"_class_name": "FlowMatchEulerDiscreteScheduler"}, **spec["scheduler"]),
        }
        for sub, config in configs.items():
            name = "scheduler_config.json" if sub == "scheduler" else "config.json"
            (path / sub).mkdir(parents=True, exist_ok=True)
            (path / sub / name).write_text(json.dumps(config, indent=1))
        (path / "model_index.json").write_text(json.dumps(index, indent=1))
        return path
    if kind in FULL_TRANSFORMER_CONFIGS:  # sd3.5-medium, sd3.5-large, flux.1-dev: transformer/, vae/, scheduler/
        flux = FLOW_KIND[kind] == "flux"
        cls = "FluxTransformer2DModel" if flux else "SD3Transformer2DModel"
        index = {"_class_name": "FluxPipeline" if flux else "StableDiffusion3Pipeline"}
        index.update(transformer=["diffusers", cls], vae=["diffusers", "AutoencoderKL"])
        vae = dict(FAMILIES[FLOW_KIND[kind]].full[kind]["vae"], _class_name="AutoencoderKL")
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
