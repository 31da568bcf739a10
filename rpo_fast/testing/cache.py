"""A complete cache of random pairs for a model, without encoding anything (benchmarks of full-size models)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import data as D


def write_synthetic_cache(
    model: str | Path, out: str | Path, n: int, *, resolution: int, embed_dim: int = 768, seed: int = 0
) -> Path:
    """A complete cache (the format of ``rpo_fast.cache``) of ``n`` random pairs for ``model``: shapes taken from the
    model's configs, nothing encoded. For benchmarks of the training step, where only shapes matter."""
    from safetensors.torch import save_file

    from ..data import schema as S
    from ..data import writer as W
    from ..data.encode import model_fingerprint
    from ..models import load_family

    model, out = Path(model), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    family = load_family(model)
    h = resolution // family.vae_scale_factor
    g = torch.Generator().manual_seed(seed)
    shard = {
        "captions": [f"synthetic caption {i}" for i in range(n)],
        "latent_mean": torch.randn(n, 2, family.latent_channels, h, h, generator=g),
        "latent_std": torch.rand(n, 2, family.latent_channels, h, h, generator=g) * 0.1,
        "text_index": torch.arange(n),
        "clip_text": torch.nn.functional.normalize(torch.randn(n, embed_dim, generator=g), dim=-1),
        "clip_image": torch.nn.functional.normalize(torch.randn(n, 2, embed_dim, generator=g), dim=-1),
    }
    shard.update(family.random_captions(n, g))
    square = D.Crop((resolution, resolution), (0, 0))  # a square image, centre-cropped
    for key, v in family.image_conditioning([square, square], resolution).items():
        shard[key] = v.expand(n, *v.shape).contiguous()
    empty = {k: v.half() if v.is_floating_point() else v for k, v in family.random_captions(1, g).items()}
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
