"""The reference recipe's preprocessing of a pair's images: resize the shorter side, crop a square, flip, scale to
[-1, 1], each pair from its own seeded stream (``pair_rng``), in threads (``DECODE_THREADS``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..seeding import seed_of
from .readers import DECODE_THREADS, RawPair


@dataclass
class Crop:
    """What preprocessing did to one image: SDXL's micro-conditioning needs it (time ids)."""

    original_size: tuple[int, int]  # (height, width) before resizing
    top_left: tuple[int, int]  # crop offset (top, left) in the resized image

    def time_ids(self, resolution: int) -> list[float]:
        """SDXL add_time_ids: original size, crop top-left, target size."""
        return [*map(float, self.original_size), *map(float, self.top_left), float(resolution), float(resolution)]


def preprocess(
    image: Image.Image,
    resolution: int,
    *,
    crop: str = "center",
    flip: bool = False,
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, Crop]:
    """Resize the shorter side to ``resolution`` (bilinear), crop a square (center, or random with ``rng``),
    flip horizontally if ``flip``, scale to [-1, 1]. Returns (3, res, res) fp32 and the crop record."""
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), Image.BILINEAR)
    if crop == "center":
        top, left = int(round((nh - resolution) / 2.0)), int(round((nw - resolution) / 2.0))
    elif crop == "random":
        top, left = int(rng.integers(0, nh - resolution + 1)), int(rng.integers(0, nw - resolution + 1))
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        left = nw - resolution - left  # the mirrored offset in the resized image
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return arr / 127.5 - 1.0, Crop((h, w), (top, left))


def pair_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of one pair: its crop and flip do not depend on batching or resumption."""
    return np.random.default_rng(seed_of(seed, index))


def preprocess_pairs(pairs: list[RawPair], resolution: int, *, threads: int | None = None, **kw) -> list:
    """``preprocess_pair`` of each pair (``kw``: its options), in order, by ``threads`` threads (default
    ``DECODE_THREADS``; each pair has its own seeded stream, so the threads change no bit)."""
    threads = DECODE_THREADS if threads is None else threads
    if threads <= 1 or len(pairs) <= 1:
        return [preprocess_pair(p, resolution, **kw) for p in pairs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(pairs)), thread_name_prefix="rpo_fast-preprocess") as pool:
        return list(pool.map(lambda p: preprocess_pair(p, resolution, **kw), pairs))


def preprocess_pair(pair: RawPair, resolution: int, *, crop: str, flip: bool, seed: int, flip_twin: bool = False):
    """Both images of a pair, one random stream, one flip decision for the pair. Returns a list of
    (pixels (2, 3, res, res), crops [winner, loser]): the chosen variant, plus the mirrored twin if
    ``flip_twin``."""
    rng = pair_rng(seed, pair.index)
    do_flip = bool(rng.random() < 0.5) if flip else False
    variants = [do_flip] + ([not do_flip] if flip_twin else [])
    out = []
    for f in variants:
        r = pair_rng(seed, pair.index)  # the same crops for the twin
        r.random()
        res = [preprocess(im, resolution, crop=crop, flip=f, rng=r) for im in (pair.winner, pair.loser)]
        out.append((torch.stack([x for x, _ in res]), [c for _, c in res]))
    return out
