"""Encoding pairs for a model family: the VAE latents, the family's text conditioning and per-image conditioning,
and RPO's CLIP embeddings of a batch of pairs (``encode_pairs``, shared by the cache writer and the on-the-fly
dataset), and the fingerprint of what a cache depends on (``model_fingerprint``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..embed import Embedder
from ..models import ModelFamily
from .preprocess import preprocess_pairs
from .readers import RawPair


def model_fingerprint(family: ModelFamily) -> str:
    """A hash of what the cache depends on: the VAE, text encoder(s) and tokenizer(s) of the family's model folder."""
    return folder_fingerprint(family.path, ("vae", *family.encoder_folders))


def folder_fingerprint(root: Path, subfolders) -> str:
    """A hash of the files in ``root``'s ``subfolders``: their names, sizes and first and last MiB (cheap on multi-GB
    weight files, and still tells models apart)."""
    h = hashlib.sha256()
    for sub in subfolders:
        folder = Path(root) / sub
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if not f.is_file():
                continue
            h.update(f"{sub}/{f.name}:{f.stat().st_size}".encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
                if f.stat().st_size > 2 << 20:
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read())
    return h.hexdigest()[:16]


class PairEncoder:
    """The VAE and text encoder(s) of a model family's folder, as the cache and the on-the-fly dataset use them."""

    def __init__(
        self,
        family: ModelFamily,
        *,
        device: str | torch.device = "cpu",
        vae_dtype: torch.dtype = torch.float32,
        text_dtype: torch.dtype = torch.float32,
    ):
        self.family = family
        self.model, self.kind, self.device = family.path, family.name, torch.device(device)
        self.vae = self.family.load_vae(device=device, dtype=vae_dtype)
        self.vae_dtype = vae_dtype
        self.encoders = self.family.load_text_encoders(device=device, dtype=text_dtype)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 3, H, W) in [-1, 1] -> mean, std (n, C, H/f, W/f) fp32 on CPU, unscaled."""
        mean, std = self.family.encode_latents(self.vae, pixels.to(self.device, self.vae_dtype))
        return mean.float().cpu(), std.float().cpu()

    def encode_texts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The family's per-caption tensors (``ModelFamily.encode_texts``), fp32 on CPU."""
        return {k: v.cpu() for k, v in self.family.encode_texts(self.encoders, captions).items()}


def encode_pairs(
    pairs: list[RawPair],
    encoder: PairEncoder,
    *,
    resolution: int,
    crop: str,
    flip: bool,
    seed: int,
    flip_twin: bool = False,
    embedder: Embedder | None = None,
) -> dict:
    """Everything the trainer needs of ``pairs``, fp32 on CPU, captions deduplicated (the pairs preprocessed by
    ``data.DECODE_THREADS`` threads)."""
    prepared = preprocess_pairs(pairs, resolution, crop=crop, flip=flip, seed=seed, flip_twin=flip_twin)
    out: dict = {}
    for v, suffix in enumerate(["", "_flip"] if flip_twin else [""]):
        pixels = torch.cat([prep[v][0] for prep in prepared])  # (2n, 3, res, res): w0, l0, w1, l1, ...
        mean, std = encoder.encode_images(pixels)
        out["latent_mean" + suffix] = mean.unflatten(0, (len(pairs), 2))
        out["latent_std" + suffix] = std.unflatten(0, (len(pairs), 2))
        per_pair = [encoder.family.image_conditioning(prep[v][1], resolution) for prep in prepared]
        for key in encoder.family.image_keys:
            out[key + suffix] = torch.stack([c[key] for c in per_pair])
    captions = list(dict.fromkeys(p.caption for p in pairs))
    out["captions"] = captions
    out["text_index"] = torch.tensor([captions.index(p.caption) for p in pairs], dtype=torch.int64)
    out.update(encoder.encode_texts(captions))
    if embedder is not None:
        text = torch.nn.functional.normalize(embedder.encode_texts([p.caption for p in pairs]).float(), dim=-1)
        images = embedder.encode_images([im for p in pairs for im in (p.winner, p.loser)]).float()
        out["clip_text"] = text
        out["clip_image"] = torch.nn.functional.normalize(images, dim=-1).unflatten(0, (len(pairs), 2))
    if any(p.tie for p in pairs):
        out["tie"] = torch.tensor([p.tie for p in pairs], dtype=torch.uint8)
    return out
