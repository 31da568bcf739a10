"""The training data: the cache's reader (``CachedPairs``), raw pairs encoded on the fly (``OnTheFlyPairs``) and
the batch collation. The sampler and the prefetching loader are ``loader``; the cache writer is ``writer`` (this
module does not import it: both follow ``schema``).

An item is a dict of fp32 tensors: latent_mean, latent_std (2, C, h, w) [winner, loser]; every per-caption tensor
of the family (its ``caption_keys``, recorded in the cache's index: SD1.5's prompt_embeds (77, D), SDXL's also
pooled_prompt_embeds (D2,)); the family's per-image conditioning (SDXL: time_ids (2, 6)); clip_text (E,) and
clip_image (2, E) where embedded; caption (str).
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..embed import Embedder
from . import readers as D
from .encode import PairEncoder, encode_pairs, model_fingerprint
from .schema import NOT_ITEMS, CacheError, caption_keys_of


class CachedPairs:
    """Random access to a complete cache: ``ds[i]`` (or ``ds.get(i, flip)``) is pair i's item."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "index.json"
        if not index.exists():
            if (self.path / "cache.json").exists():
                raise CacheError(
                    f"{self.path}: unfinished cache (index.json missing); rerun python -m rpo_fast.cache "
                    "with the same arguments to finish it"
                )
            raise CacheError(f"{self.path} is not an rpo_fast cache (no index.json)")
        self.index = json.loads(index.read_text())
        self.skipped = D.SkipCounts(self.index.get("skipped", {}))  # the rows the cache's build skipped
        self.skipped.first.update(self.index.get("skipped_first", {}))
        self.shards = [self.path / s["name"] for s in self.index["shards"]]
        sizes = [s["pairs"] for s in self.index["shards"]]
        self.offsets = torch.tensor([0] + sizes).cumsum(0).tolist()
        self._handles: dict[int, object] = {}
        self._captions: dict[int, list[str]] = {}
        self._keys: dict[int, set[str]] = {}
        self.kind, self.resolution = self.index["kind"], self.index["resolution"]
        self.caption_keys = caption_keys_of(self.index)
        self.has_twins = self.index["flip_twin"]
        self.has_embeddings = self.index["embedder"] is not None
        with safe_open(str(self.path / "empty_prompt.safetensors"), framework="pt") as f:
            self.empty_prompt = {k: _fp32(f.get_tensor(k)[0]) for k in f.keys()}

    def __len__(self) -> int:
        return self.offsets[-1]

    def check(self, *, family, resolution: int) -> None:
        """Refuse a cache made with another model (``family``'s folder) or resolution than the run asks for."""
        if self.resolution != resolution:
            raise CacheError(f"{self.path} was cached at resolution {self.resolution}, the run asks for {resolution}")
        fp = model_fingerprint(family)
        if fp != self.index["model_fingerprint"]:
            raise CacheError(
                f"{self.path} was cached with another model ({self.index['model']}, fingerprint "
                f"{self.index['model_fingerprint']}) than {family.path} (fingerprint {fp})"
            )

    def ties(self) -> int:
        if not self.index["keep_ties"]:
            return 0
        handles = [self._handle(s) for s in range(len(self.shards))]
        return sum(int(f.get_tensor("tie").sum()) for f in handles if "tie" in f.keys())

    def _handle(self, s: int):
        if s not in self._handles:
            self._handles[s] = safe_open(str(self.shards[s]), framework="pt")
            self._captions[s] = json.loads(self._handles[s].metadata()["rpo_fast"])["captions"]
            self._keys[s] = set(self._handles[s].keys())
        return self._handles[s]

    def __getitem__(self, i: int) -> dict:
        return self.get(i)

    def get(self, i: int, flip: bool = False) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} out of range ({len(self)} pairs)")
        s = bisect.bisect_right(self.offsets, i) - 1
        j = i - self.offsets[s]
        f = self._handle(s)
        keys = self._keys[s]
        row = int(f.get_slice("text_index")[j : j + 1][0])
        item = {"caption": self._captions[s][row]}
        for k in sorted(keys):
            if k in NOT_ITEMS or k.endswith("_flip"):
                continue
            if k in self.caption_keys:
                item[k] = _fp32(f.get_slice(k)[row : row + 1][0])
            else:
                src = k + "_flip" if flip and self.has_twins and k + "_flip" in keys else k
                item[k] = f.get_slice(src)[j : j + 1][0].float()
        return item


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """A stored caption tensor as the trainer reads it: floats in fp32, integers (caption lengths, masks) as stored.
    (Per-pair tensors, SDXL's integer time ids among them, are read as fp32.)"""
    return t.float() if t.is_floating_point() else t


class OnTheFlyPairs:
    """The same items as ``CachedPairs``, encoded when asked (for small runs from raw data): pair i gets the
    crop, flip and seeds the cache would give it."""

    has_twins = False

    def __init__(
        self,
        family,
        data: str | Path,
        *,
        resolution: int,
        crop: str = "center",
        flip: bool = False,
        seed: int = 0,
        keep_ties: bool = False,
        columns: D.Columns | None = None,
        pairs_from_ranking: str = "all",
        strict: bool = False,
        embedder: Embedder | None = None,
        device: str = "cpu",
        limit: int | None = None,
        encoder: PairEncoder | None = None,
    ):
        self.counts = self.skipped = D.SkipCounts()
        self.pairs = []
        read = dict(columns=columns, pairs_from_ranking=pairs_from_ranking, keep_ties=keep_ties, strict=strict)
        for p in D.iter_pairs(data, **read, counts=self.counts):
            self.pairs.append(p)
            if limit is not None and len(self.pairs) >= limit:
                break
        if not self.pairs:
            raise D.DataError(f"no usable pairs in {data}: skipped {self.counts.summary()}")
        self.encoder = encoder or PairEncoder(family, device=device)
        self.kind, self.resolution, self.crop, self.flip, self.seed = self.encoder.kind, resolution, crop, flip, seed
        self.embedder, self.has_embeddings = embedder, embedder is not None
        self.empty_prompt = {k: v[0] for k, v in self.encoder.encode_texts([""]).items()}

    def __len__(self) -> int:
        return len(self.pairs)

    def ties(self) -> int:
        return sum(p.tie for p in self.pairs)

    def __getitem__(self, i: int) -> dict:
        return self.get(i)

    def get(self, i: int, flip: bool = False) -> dict:
        enc = encode_pairs(
            [self.pairs[i]],
            self.encoder,
            resolution=self.resolution,
            crop=self.crop,
            flip=self.flip,
            seed=self.seed,
            embedder=self.embedder,
        )
        return {"caption": self.pairs[i].caption} | {k: v[0] for k, v in sorted(enc.items()) if k not in NOT_ITEMS}


def collate(items: list[dict]) -> dict:
    """Stack items into a batch (captions as a list)."""
    out = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "caption"}
    out["caption"] = [it["caption"] for it in items]
    return out


def is_cache(data: str | Path) -> bool:
    """Whether ``data`` is a cache folder (``python -m rpo_fast.cache``) rather than raw pairs."""
    return (Path(data) / "index.json").exists() or (Path(data) / "cache.json").exists()


def open_dataset(
    data: str | Path,
    *,
    family,
    resolution: int | None = None,
    embedder: str | None = None,
    seed: int = 0,
    flag: str = "--data",
    columns: str | None = None,
    pairs_from_ranking: str = "all",
    strict: bool = False,
):
    """The cache at ``data`` (refused if made for another model than ``family``'s folder or at another resolution),
    or raw pairs encoded on the fly by ``family`` (any input of ``rpo_fast.data.open_source``, read with
    ``columns``; those need ``resolution``)."""
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist")
    if is_cache(path):
        if columns:
            raise ValueError(f"--columns reads raw data; {flag} {path} is a cache (its columns were mapped when built)")
        ds = CachedPairs(path)
        ds.check(family=family, resolution=resolution or ds.resolution)
        return ds
    if not resolution:
        raise ValueError(f"raw {flag} needs --resolution (a cache records its own)")
    from ..embed import load_embedder

    read = dict(columns=D.Columns.parse(columns) if columns else None, pairs_from_ranking=pairs_from_ranking)
    return OnTheFlyPairs(
        family,
        path,
        resolution=resolution,
        embedder=load_embedder(embedder) if embedder else None,
        seed=seed,
        strict=strict,
        **read,
    )


def check_dataset(dataset, *, pairs_per_rank: int, world: int, needs_embeddings: bool, objective: str) -> None:
    """Refuse data that cannot train: fewer pairs than one micro-batch per rank, ties, missing embeddings."""
    n = len(dataset)
    if n < pairs_per_rank * world:
        raise ValueError(f"--data holds {n} pairs, fewer than one micro-batch per rank ({pairs_per_rank} x {world})")
    ties = dataset.ties()
    if ties:
        raise ValueError(
            f"--data holds {ties} tie(s) (0.5/0.5): preference objectives need a winner; rebuild the cache "
            "without --keep-ties"
        )
    if needs_embeddings and not dataset.has_embeddings:
        raise ValueError(
            f"--objective {objective} needs CLIP embeddings: build the cache with --clip (raw data: pass --clip)"
        )
