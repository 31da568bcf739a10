"""The cache's format, declared once and shared by its writer (``writer``, ``python -m rpo_fast.cache``) and its
reader (``dataset``). What depends on the model family is the family's declaration: its ``caption_keys`` (the
per-caption tensors, recorded in index.json) and ``image_keys`` (per-image conditioning).

Layout of CACHE_DIR:
    cache.json                      the build settings (checked on resume: same settings or a clear error)
    empty_prompt.safetensors        the text encoding of "" (for dropping captions while training)
    shard-r{rank}-{k:05d}.safetensors   ``shard_size`` pairs each (the last may hold fewer):
        latent_mean, latent_std     (n, 2, 4, h, w)  the VAE latent distribution of [winner, loser],
                                    unscaled (training samples mean + std * eps, times scaling_factor)
        *_flip                      the horizontally flipped twin (``--flip-twin``)
        text_index                  (n,) row of the pair's caption in the per-caption tensors
        the family's caption_keys   (u, ...) one row per unique caption of the shard. SD1.5: prompt_embeds
                                    (u, 77, D), CLIP-L's last hidden state; SDXL: both encoders' penultimate
                                    hidden states concatenated, and pooled_prompt_embeds (u, D2)
        the family's image_keys     (n, 2, ...) [winner, loser][_flip]. SDXL: time_ids (n, 2, 6), original
                                    (h, w), crop (top, left), target (h, w)
        clip_text, clip_image       (n, E), (n, 2, E) L2-normalised embeddings for RPO (``--clip``)
        tie                         (n,) 1 where the pair is a tie (``--keep-ties``)
      metadata: captions, the source cursor after the shard, skip counts; written under a temporary name and
      renamed when complete, so a killed build resumes after its last complete shard and yields the same bytes.
    index.json                      written last: shards, pair counts, skips by cause, model fingerprint,
                                    resolution, the caption keys, versions. Training refuses a folder without it.

Caching fixes the crop and flip of each image (drawn from the pair's seed): every epoch sees the same
crop. ``--flip-twin`` also stores the mirrored twin of each pair, and training then picks one per epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

FORMAT = 1
STORAGE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def caption_keys_of(index: dict) -> tuple[str, ...]:
    """The per-caption tensors of a cache's shards (one row per unique caption, indexed by text_index; every other
    tensor has one row per pair): the family's ``caption_keys``, recorded in the index. A cache built before the
    index recorded them holds the four built-in families' encodings, each named ``...prompt_embeds``."""
    if "caption_keys" in index:
        return tuple(index["caption_keys"])
    return ("prompt_embeds", "pooled_prompt_embeds", "clip_prompt_embeds", "t5_prompt_embeds")


class CacheError(ValueError):
    """A cache that does not fit the run asking for it, or an unfinished one."""


NOT_ITEMS = ("text_index", "tie", "captions")  # shard entries that are not item tensors


def shard_name(rank: int, k: int) -> str:
    return f"shard-r{rank}-{k:05d}.safetensors"


def read_meta(path: Path) -> dict:
    """A shard's metadata: its captions, the source cursor after it, its skip counts."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["rpo_fast"])
