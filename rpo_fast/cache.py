"""The offline cache: encode every pair once (VAE latents, text encoder outputs, per-image conditioning, CLIP
embeddings), read by the trainer (``rpo_fast.data``: the writer ``data.writer``, the format ``data.schema``).

    python -m rpo_fast.cache --model MODEL_DIR --data PICKAPIC_DIR|pairs.jsonl --out CACHE_DIR --resolution 512
    deepspeed --num_gpus 8 -m rpo_fast.cache ...         (or torchrun: ranks split the rows round-robin)

Caching fixes the crop and flip of each image (drawn from the pair's seed): every epoch sees the same
crop. ``--flip-twin`` also stores the mirrored twin of each pair, and training then picks one per epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from . import distributed
from .data import readers as D
from .data.schema import STORAGE
from .data.writer import build_cache


@dataclass
class CacheConfig:
    """The flags of ``python -m rpo_fast.cache`` (the arguments of ``build_cache``)."""

    model: str = field(
        metadata=dict(help="local diffusers model folder (its family is detected: SD1.5, SDXL, SD3/SD3.5 or FLUX.1)")
    )
    data: str = field(
        metadata=dict(
            help="parquet folder/file (Pick-a-Pic v2's columns by default), a datasets save_to_disk folder, or a "
            ".jsonl/.csv/.json of pairs or ranked lists"
        )
    )
    out: str = field(metadata=dict(help="cache folder (resumed if it holds a partial cache)"))
    resolution: int = field(metadata=dict(help="training resolution in pixels (512, 1024)"))
    crop: Literal["center", "random"] = field(default="center", metadata=dict(help="crop of the resized image"))
    flip: bool = field(default=False, metadata=dict(help="random horizontal flip (fixed per pair by the seed)"))
    flip_twin: bool = field(default=False, metadata=dict(help="also cache the mirrored twin of every pair"))
    keep_ties: bool = field(default=False, metadata=dict(help="keep 0.5/0.5 rows (dropped by default)"))
    strict: bool = field(default=False, metadata=dict(help="a bad row is an error instead of skipped and counted"))
    columns: str | None = field(default=None, metadata=dict(help=D.COLUMNS_HELP))
    pairs_from_ranking: Literal[D.RANKING_RULES] = field(default="all", metadata=dict(help=D.RANKING_HELP))
    embedder: str | None = field(
        default=None,
        metadata=dict(
            help="embeddings for RPO: a CLIPModel folder, openclip:MODEL:CKPT, or module:factory[:ARG]",
            flags=("--clip", "--embedder"),
        ),
    )
    shard_size: int = field(default=1024, metadata=dict(help="pairs per shard (a multiple of --batch-size)"))
    batch_size: int = field(default=16, metadata=dict(help="pairs per encoding batch"))
    storage: Literal[tuple(STORAGE)] = field(default="fp16", metadata=dict(help="dtype of stored tensors"))
    vae_dtype: Literal[tuple(STORAGE)] = field(default="fp32", metadata=dict(help="dtype the VAE encodes in"))
    seed: int = field(default=0, metadata=dict(help="seed of crops and flips"))
    device: str | None = field(default=None, metadata=dict(help="default: cuda:LOCAL_RANK if available, else cpu"))
    limit: int | None = field(default=None, metadata=dict(help="stop after this many pairs per rank"))
    max_sequence_length: int | None = field(
        default=None,
        metadata=dict(help="T5 tokens per caption (sd3: 256, flux: 512 by default; recorded in the index)"),
    )
    progress: bool = field(default=True, metadata=dict(help="progress bar on rank 0"))
    local_rank: int | None = field(
        default=None, metadata=dict(help=argparse.SUPPRESS, flags=("--local_rank", "--local-rank"))
    )


EXAMPLE = """example (SDXL at 1024 px, RPO's CLIP embeddings, 8 GPUs splitting the rows):
  deepspeed --num_gpus 8 -m rpo_fast.cache --model MODELS/stable-diffusion-xl-base-1.0 \\
      --data pickapic_v2/data --out CACHE --resolution 1024 --clip MODELS/clip-vit-large-patch14"""


def main(argv: list[str] | None = None) -> None:
    from .cli import run

    def body(cfg: CacheConfig):
        kw = dataclasses.asdict(cfg)
        kw.pop("local_rank")
        return build_cache(kw.pop("model"), kw.pop("data"), kw.pop("out"), **kw)

    run(CacheConfig, argv, body, prog="python -m rpo_fast.cache", description=__doc__, epilog=EXAMPLE)


if __name__ == "__main__":
    main()
    distributed.finish()
