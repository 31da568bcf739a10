"""Model families: everything rpo_fast knows about a kind of diffusion model, behind one small interface.

    family = load_family("path/to/sdxl")        # detected from the folder: an SDXLFamily
    family.name, family.denoiser_folder          # "sdxl", "unet"

A family knows how to load its denoiser, text encoders and VAE from a local diffusers folder, encode captions for
the cache, build the conditioning of a batch (caption dropping, SDXL's pooled embeddings and time ids), noise a
latent and give the training target, sample timesteps, run the denoiser, and load the sampling pipeline. The
trainer, the cache, evaluation and the benchmark go through it.

A family DECLARES what the rest of rpo_fast reads of it: its per-caption conditioning (``caption_keys``, the
tensors ``encode_texts`` returns, one row per unique caption in a cache shard) and per-image conditioning
(``image_keys``), how latents come from its VAE (``latent_distribution``), its noising and prediction (the piece it
picks from ``noising``: ``DDPMNoising`` or ``FlowMatchingNoising``, which set ``flow_matching`` and
``prediction_type``), its DSPO form, default beta, guidance and sampling steps. Nothing outside ``models/`` branches
on a family's name.

Adding a family is one new file in this folder with a ``ModelFamily`` subclass (or a subclass defined anywhere,
imported before use): every module here is imported on first use, and each subclass with a ``name`` registers
itself. ``detect`` decides which family a folder is; the LAST registered family is tried first (a subclass is
registered after its base, so SDXL is tried before SD1.5; an extension after the built-in families).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

FAMILIES: dict[str, type[ModelFamily]] = {}


class ModelFamily:
    """The interface; see ``unet.py`` for SD1.5 and SDXL."""

    name: ClassVar[str]
    denoiser_folder: ClassVar[str] = "unet"  # subfolder of the model folder
    encoder_folders: ClassVar[tuple[str, ...]] = ()  # what the cache depends on (besides vae/): its fingerprint
    caption_keys: ClassVar[tuple[str, ...]] = ()  # per-caption conditioning: what encode_texts returns
    vae_class_name: ClassVar[str] = "AutoencoderKL"  # diffusers' class of vae/
    latent_distribution: ClassVar[bool] = True  # the VAE encodes to a distribution (latent_dist); else .latent
    flow_matching: ClassVar[bool]  # set by the noising piece (noising.DDPMNoising / FlowMatchingNoising)
    dspo_form: ClassVar[str | None] = None  # DSPO's form for this family (None: DSPO does not apply)
    guidance: ClassVar[float] = 7.5  # classifier-free guidance of the papers' evaluation
    image_keys: ClassVar[tuple[str, ...]] = ()  # per-image conditioning stored by the cache (n, 2, ...)
    # online training (rpo_fast.online): None where rollouts work (classifier-free guidance, decode_latents inverts
    # the latents), else why not
    no_rollouts: ClassVar[str | None] = None
    vae_fp16: ClassVar[bool] = True  # the VAE encodes in fp16 without overflowing
    default_beta: ClassVar[float | None] = None  # the objectives' beta where --beta is not given (None: theirs)
    sample_steps: ClassVar[int] = 50  # sampling steps of the family's evaluation recipe
    sample_options: ClassVar[dict] = {}  # further keyword arguments of the family's pipeline call when sampling
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")  # --lora-targets' default
    repeated_blocks: ClassVar[tuple[str, ...]] = ()  # block classes for regional compile where diffusers names none
    resnet_blocks: ClassVar[tuple[str, ...]] = ()  # what --compile-resnets adds to regional compile (UNets)
    max_sequence_length: int | None = None  # text tokens per caption (families whose encoder pads to a fixed length)
    fixed_shapes: ClassVar[bool] = True  # the denoiser's shapes are the batch's (False: each caption's own length)
    # Random models of the family, by component (the denoiser's folder name, "vae", "text_encoders"...): ``tiny``,
    # the CPU tests' (rpo_fast.testing builds and saves it), and ``full``, the full-size variants by name (the
    # public configs' values; the benchmarks build them with random weights, the plans count them on the meta device,
    # "params" is the denoiser's parameter count there)
    tiny: ClassVar[dict] = {}
    full: ClassVar[dict[str, dict]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "name" in cls.__dict__:
            FAMILIES[cls.name] = cls

    @classmethod
    def detect(cls, model_index: dict | None, denoiser_config: dict | None) -> bool:
        """Whether a folder with this ``model_index.json`` (None if absent) and denoiser config is this family."""
        raise NotImplementedError

    def __init__(self, path: str | Path, *, max_sequence_length: int | None = None):
        self.path = Path(path)
        if max_sequence_length is not None:
            if self.max_sequence_length is None:
                with_length = ", ".join(n for n, f in FAMILIES.items() if f.max_sequence_length is not None)
                raise ValueError(
                    f"--max-sequence-length applies to models whose text encoder pads to a fixed length "
                    f"({with_length}), not {self.name}"
                )
            if max_sequence_length < 1:
                raise ValueError(f"--max-sequence-length must be positive, got {max_sequence_length}")
            self.max_sequence_length = max_sequence_length

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def config(self, sub: str) -> dict:
        """The JSON config of a subfolder (scheduler/, vae/, the denoiser's)."""
        name = "scheduler_config.json" if sub == "scheduler" else "config.json"
        return json.loads((self.path / sub / name).read_text())

    # ---------------------------------------------------------------- loading
    def load_denoiser(self, folder: str | Path | None = None, *, dtype=torch.float32) -> torch.nn.Module:
        """The denoiser from ``folder`` (default: MODEL/<denoiser_folder>)."""
        cls = self.denoiser_class()
        if folder:
            return cls.from_pretrained(folder, dtype=dtype)
        return cls.from_pretrained(self.path, subfolder=self.denoiser_folder, dtype=dtype)

    def denoiser_class(self) -> type:
        raise NotImplementedError

    def load_text_encoders(self, *, device="cpu", dtype=torch.float32) -> Any:
        """Whatever ``encode_texts`` needs (tokenizers and encoders), on ``device``."""
        raise NotImplementedError

    def load_vae(self, *, device="cpu", dtype=torch.float32) -> torch.nn.Module:
        import diffusers

        vae = getattr(diffusers, self.vae_class_name).from_pretrained(self.path, subfolder="vae", dtype=dtype)
        return vae.to(device).eval()

    def load_pipeline(self, *, dtype=torch.float32) -> Any:
        """The diffusers sampling pipeline of the folder."""
        raise NotImplementedError

    @classmethod
    def tiny_pipeline(cls, seed: int = 0) -> Any:
        """A tiny random pipeline of the family from its ``tiny`` declaration, built from diffusers' and
        transformers' own classes (``rpo_fast.testing.save_tiny_pipeline`` saves it)."""
        raise NotImplementedError

    @cached_property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel, as the pipelines compute it: 2^(levels - 1) of the VAE's block_out_channels
        (AutoencoderKL; AutoencoderDC's encoder_block_out_channels), or 2^(temporal downsamplings) (Qwen-Image's 3D
        VAE)."""
        vae = self.config("vae")
        if "temperal_downsample" in vae:
            return 2 ** len(vae["temperal_downsample"])
        return 2 ** (len(vae.get("block_out_channels") or vae["encoder_block_out_channels"]) - 1)

    @cached_property
    def latent_channels(self) -> int:
        """Channels of the VAE's latent (its config's latent_channels, or z_dim)."""
        vae = self.config("vae")
        return vae.get("latent_channels") or vae["z_dim"]

    @cached_property
    def default_resolution(self) -> int:
        """Pixels of the model's native resolution: the denoiser's sample size times the VAE's downsampling."""
        return self.config(self.denoiser_folder)["sample_size"] * self.vae_scale_factor

    # ---------------------------------------------------------------- the cache side
    def encode_texts(self, encoders: Any, captions: list[str]) -> dict[str, Tensor]:
        """Per-caption tensors (n, ...) in fp32 on the encoders' device; their names end in ``prompt_embeds``."""
        raise NotImplementedError

    def caption_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of one caption's tensor of each ``caption_keys`` entry, from the folder's configs (what
        ``encode_texts`` gives per caption, without loading an encoder)."""
        raise NotImplementedError

    def random_captions(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Random per-caption tensors of ``caption_shapes`` (n, ...) in the types ``encode_texts`` gives: a synthetic
        cache's captions (benchmarks) and the plans' bytes per caption."""
        return {k: torch.randn(n, *shape, generator=generator) for k, shape in self.caption_shapes().items()}

    def image_conditioning(self, crops: list, resolution: int) -> dict[str, Tensor]:
        """Per-pair conditioning from the two images' crops (``data.Crop``): tensors (2, ...); none by default."""
        return {}

    # ---------------------------------------------------------------- the training side
    @property
    def num_train_timesteps(self) -> int:
        raise NotImplementedError

    @cached_property
    def latent_shift_scale(self) -> tuple[float, float]:
        """The VAE's shift_factor (0 where it has none) and scaling_factor."""
        vae = self.config("vae")
        return vae.get("shift_factor") or 0.0, vae.get("scaling_factor", 0.18215)

    def encode_latents(self, vae, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(n, 3, H, W) in [-1, 1] -> the mean and std (n, C, h, w) of the VAE's latent distribution, unscaled; a
        deterministic encoder (``latent_distribution`` False, as SANA's DC-AE) gives its latent and a zero std."""
        if self.latent_distribution:
            dist = vae.encode(pixels).latent_dist
            return dist.mean, dist.std
        z = vae.encode(pixels).latent
        return z, torch.zeros_like(z)

    def latents(self, sample: Tensor) -> Tensor:
        """A sample of the VAE's latent distribution -> the latent the denoiser sees: (z - shift) * scale."""
        shift, scale = self.latent_shift_scale
        return (sample - shift) * scale

    def decode_latents(self, vae, latents: Tensor) -> Tensor:
        """The denoiser's latents (n, C, h, w) -> pixels (n, 3, H, W) in [-1, 1]: ``vae.decode(z / scale + shift)``
        (online training scores its rollouts' images). A family whose ``latents`` or ``encode_latents`` differ from
        these declares ``no_rollouts`` (or its own ``decode_latents``)."""
        if self.no_rollouts:
            raise ValueError(f"online training: {self.name} models {self.no_rollouts}")
        shift, scale = self.latent_shift_scale
        return vae.decode(latents / scale + shift).sample

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts: "epsilon", "v_prediction" or "flow" (the velocity); from the noising piece."""
        raise NotImplementedError

    def sample_timesteps(
        self, gens: list[torch.Generator], device, probs: Tensor | None = None, latent_shape=None
    ) -> Tensor:
        """One timestep per pair (B,), from each pair's generator, from the family's law or from ``probs`` where
        given (``latent_shape`` (C, h, w): for families whose schedule depends on the image size)."""
        raise NotImplementedError

    def discount_timesteps(self, t: Tensor, latent_shape=None) -> Tensor:
        """The integer timesteps (B,) of 0..T-1 dense DPO's discount counts: those whose step index
        k = ((T - 1 - t) N) // T is the family's sampler step holding ``t``."""
        raise NotImplementedError

    def noisy_and_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """x0 (2B, ...) [winners; losers], noise and t (B, ...) shared by a pair -> the noisy input (2B, ...) and
        the training target: (B, ...) where it does not depend on x0 (shared by winner and loser), else (2B, ...)."""
        raise NotImplementedError

    def conditioning(self, batch: dict, drop: Tensor, empty: dict, *, pairs: bool = True) -> dict:
        """The denoiser's keyword inputs for ``batch``, fp32: rows [winners; losers] (``pairs``) or winners only.
        ``drop`` (B,) bool: the captions replaced by the empty caption's encoding ``empty``."""
        raise NotImplementedError

    def set_attention(self, denoiser, attention: str) -> None:
        """SDPA (the default), or xformers' memory-efficient attention where xformers is installed."""
        if attention == "xformers":
            denoiser.enable_xformers_memory_efficient_attention()
        else:
            from diffusers.models.attention_processor import AttnProcessor2_0

            denoiser.set_attn_processor(AttnProcessor2_0())

    def fuse_qkv(self, denoiser) -> None:
        """Fuse each attention's q/k/v projections into one linear layer (fewer, larger matmuls); the replaced
        layers stay in the module (frozen, unused): ``checkpoint.unfused_state`` splits the fused weights back."""
        raise ValueError(f"--fuse-qkv is not supported for {self.name} models")

    def guidance_kwargs(self, guidance: float, n: int) -> dict:
        """The pipeline's keyword arguments for classifier-free guidance ``guidance`` on ``n`` prompts."""
        return {"guidance_scale": guidance}

    def predict(self, denoiser, noisy: Tensor, t: Tensor, cond: dict) -> Tensor:
        """The denoiser's prediction (the objective's model_pred / ref_pred)."""
        return denoiser(noisy, t, **cond).sample

    def dummy_inputs(self, rows: int) -> tuple[Tensor, Tensor, dict]:
        """Random denoiser inputs (noisy, t, cond) for ``rows`` images at the denoiser config's sample size, on the
        current default device (the meta device counts FLOPs without memory)."""
        raise NotImplementedError

    def save_lora(self, folder: str | Path, layers: dict) -> None:
        """A LoRA state dict (PEFT's naming, ``get_peft_model_state_dict``) in the format the pipeline's
        ``load_lora_weights`` reads."""
        raise NotImplementedError


def dropped(batch: dict, drop: Tensor, empty: dict, key: str) -> Tensor:
    """``batch[key]`` (B, ...), the rows where ``drop`` (B,) is set replaced by the empty caption's ``empty[key]``."""
    v = batch[key]
    return torch.where(drop.view(-1, *[1] * (v.dim() - 1)), empty[key], v)


def random_masked_states(n: int, shape: tuple[int, int], generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random caption states (n, L, D) and attention masks (n, L) int64 of 1 to L leading ones, the states past
    them zero (a synthetic cache's captions of a family whose encoder pads: ``random_captions``)."""
    embeds = torch.randn(n, *shape, generator=generator)
    lengths = torch.randint(1, shape[0] + 1, (n,), generator=generator)
    mask = (torch.arange(shape[0]) < lengths[:, None]).long()
    return embeds * mask[..., None], mask


def cast_conditioning(cond: dict, dtype: torch.dtype) -> dict:
    """A family's conditioning (tensors, and dicts of tensors such as SDXL's added_cond_kwargs) in ``dtype``; integer
    tensors (Z-Image's caption lengths) keep their type."""
    return {
        k: cast_conditioning(v, dtype) if isinstance(v, dict) else v.to(dtype) if v.is_floating_point() else v
        for k, v in cond.items()
    }


def family_class(model: str | Path) -> type[ModelFamily]:
    """The family of a local diffusers folder, from its model_index.json or its denoiser's config."""
    model = Path(model)
    index = model / "model_index.json"
    spec = _read_json(index) if index.exists() else None
    folders = dict.fromkeys(f.denoiser_folder for f in FAMILIES.values())
    configs = {
        sub: _read_json(model / sub / "config.json") for sub in folders if (model / sub / "config.json").exists()
    }
    if spec is None and not configs:
        raise FileNotFoundError(
            f"{model} is not a diffusers model folder (no model_index.json, and no "
            f"{' or '.join(f'{s}/config.json' for s in folders)})"
        )
    for cls in reversed(FAMILIES.values()):  # the last registered first: subclasses before their bases
        if cls.detect(spec, configs.get(cls.denoiser_folder)):
            return cls
    raise ValueError(f"{model}: not a model family rpo_fast knows ({', '.join(FAMILIES)})")


def load_family(model: str | Path, **options) -> ModelFamily:
    """The family of a model folder; ``options``: ``max_sequence_length`` (T5 families)."""
    return family_class(model)(model, **options)


def model_kind(model: str | Path) -> str:
    """The family name of a model folder: 'sd15', 'sdxl', 'sd3', 'flux', 'zimage', ..."""
    return family_class(model).name


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


for _m in pkgutil.iter_modules(__path__):  # every family file registers its class (they import only torch here)
    importlib.import_module(f"{__name__}.{_m.name}")
