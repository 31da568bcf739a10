"""The offline cache: encode every pair once (VAE latents, text encoder outputs, SDXL time ids, CLIP
embeddings), read by ``rpo_fast.dataset``.

    python -m rpo_fast.cache --model MODEL_DIR --data PICKAPIC_DIR|pairs.jsonl --out CACHE_DIR --resolution 512
    deepspeed --num_gpus 8 -m rpo_fast.cache ...         (or torchrun: ranks split the rows round-robin)

Layout of CACHE_DIR:
    cache.json                      the build settings (checked on resume: same settings or a clear error)
    empty_prompt.safetensors        the text encoding of "" (for dropping captions while training)
    shard-r{rank}-{k:05d}.safetensors   ``shard_size`` pairs each (the last may hold fewer):
        latent_mean, latent_std     (n, 2, 4, h, w)  the VAE latent distribution of [winner, loser],
                                    unscaled (training samples mean + std * eps, times scaling_factor)
        *_flip                      the horizontally flipped twin (``--flip-twin``)
        text_index                  (n,) row of the pair's caption in prompt_embeds
        prompt_embeds               (u, 77, D) one row per unique caption of the shard. SD1.5: CLIP-L last
                                    hidden state; SDXL: both encoders' penultimate hidden states concatenated
        pooled_prompt_embeds        (u, D2) SDXL: the second encoder's pooled (projected) embedding
        time_ids[_flip]             (n, 2, 6) SDXL: original (h, w), crop (top, left), target (h, w)
        clip_text, clip_image       (n, E), (n, 2, E) L2-normalised embeddings for RPO (``--clip``)
        tie                         (n,) 1 where the pair is a tie (``--keep-ties``)
      metadata: captions, the source cursor after the shard, skip counts; written under a temporary name and
      renamed when complete, so a killed build resumes after its last complete shard and yields the same bytes.
    index.json                      written last: shards, pair counts, skips by cause, model fingerprint,
                                    resolution, versions. Training refuses a directory without it.

Caching fixes the crop and flip of each image (drawn from the pair's seed): every epoch sees the same
crop. ``--flip-twin`` also stores the mirrored twin of each pair, and training then picks one per epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import data as D
from . import distributed
from .embed import Embedder, load_embedder
from .models import ModelFamily, load_family

FORMAT = 1
STORAGE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SETTINGS = (
    "format",
    "model_fingerprint",
    "kind",
    "resolution",
    "crop",
    "flip",
    "flip_twin",
    "keep_ties",
    "seed",
    "shard_size",
    "batch_size",
    "storage",
    "world",
    "embedder",
    "data",
    "max_sequence_length",
)


def caption_keys_of(index: dict) -> tuple[str, ...]:
    """The per-caption tensors of a cache's shards (one row per unique caption, indexed by text_index; every other
    tensor has one row per pair): the family's ``caption_keys``, recorded in the index. A cache built before the
    index recorded them holds the four built-in families' encodings, each named ``...prompt_embeds``."""
    if "caption_keys" in index:
        return tuple(index["caption_keys"])
    return ("prompt_embeds", "pooled_prompt_embeds", "clip_prompt_embeds", "t5_prompt_embeds")


class CacheError(ValueError):
    """A cache that does not fit the run asking for it, or an unfinished one."""


# --------------------------------------------------------------------------------------------------
# The model side: which model, its fingerprint, and the encoders
# --------------------------------------------------------------------------------------------------


def model_fingerprint(family: ModelFamily) -> str:
    """A hash of what the cache depends on: the VAE, text encoder(s) and tokenizer(s) of the family's model folder
    (configs, and the size plus first and last MiB of each weight file: cheap on multi-GB files, and still tells
    models apart)."""
    model = family.path
    h = hashlib.sha256()
    for sub in ("vae", *family.encoder_folders):
        folder = model / sub
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


# --------------------------------------------------------------------------------------------------
# Encoding a batch of pairs (shared by the cache writer and the on-the-fly dataset)
# --------------------------------------------------------------------------------------------------


def encode_pairs(
    pairs: list[D.RawPair],
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
    prepared = D.preprocess_pairs(pairs, resolution, crop=crop, flip=flip, seed=seed, flip_twin=flip_twin)
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


def _concat(batches: list[dict], caption_keys: tuple[str, ...]) -> dict:
    """Join encoded batches into one shard: captions deduplicated again across batches."""
    captions = list(dict.fromkeys(c for b in batches for c in b["captions"]))
    out = {"captions": captions}
    rows = {c: i for i, c in enumerate(captions)}
    first = {}  # first row of each caption among the batches' prompt_embeds
    for bi, b in enumerate(batches):
        for j, c in enumerate(b["captions"]):
            first.setdefault(c, (bi, j))
    for key in batches[0]:
        if key in caption_keys:
            out[key] = torch.stack([batches[bi][key][j] for bi, j in (first[c] for c in captions)])
    out["text_index"] = torch.cat(
        [torch.tensor([rows[b["captions"][i]] for i in b["text_index"].tolist()]) for b in batches]
    )
    for key in batches[0]:
        if key not in out and key != "tie":
            out[key] = torch.cat([b[key] for b in batches])
    if any("tie" in b for b in batches):
        out["tie"] = torch.cat([b.get("tie", torch.zeros(len(b["text_index"]), dtype=torch.uint8)) for b in batches])
    return out


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def shard_name(rank: int, k: int) -> str:
    return f"shard-r{rank}-{k:05d}.safetensors"


def _write_atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def write_shard(path: Path, shard: dict, storage: torch.dtype, meta: dict, caption_keys: tuple[str, ...]) -> None:
    """One shard file: ``shard``'s tensors (latents, embeddings and the floating per-caption tensors stored as
    ``storage``), its captions and ``meta`` in the metadata; written under a temporary name and renamed when
    complete."""
    tensors = {}
    for k, v in shard.items():
        if k == "captions":
            continue
        if k.startswith(("latent_", "clip_")) or (k in caption_keys and v.is_floating_point()):
            v = v.to(storage)
        tensors[k] = v.contiguous()
    # one metadata key: safetensors keeps metadata in a hash map whose order changes from run to run
    meta = json.dumps({**meta, "captions": shard["captions"]}, sort_keys=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"rpo_fast": meta})
    os.replace(tmp, path)  # a shard exists under its final name only once complete


def _read_meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["rpo_fast"])


def build_cache(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    resolution: int,
    crop: str = "center",
    flip: bool = False,
    flip_twin: bool = False,
    keep_ties: bool = False,
    strict: bool = False,
    columns: str | D.Columns | None = None,
    pairs_from_ranking: str = "all",
    embedder: str | Embedder | None = None,
    shard_size: int = 1024,
    batch_size: int = 16,
    storage: str = "fp16",
    vae_dtype: str = "fp32",
    seed: int = 0,
    device: str | None = None,
    limit: int | None = None,
    max_sequence_length: int | None = None,
    progress: bool = True,
    rank: int | None = None,
    world: int | None = None,
) -> dict:
    """Build (or finish) the cache of ``data`` for ``model`` in ``out``; returns the summary of this rank."""
    from tqdm.auto import tqdm

    if rank is None or world is None:
        rank, world = distributed.init_from_env()
    model, data, out = Path(model), Path(data), Path(out)
    for name, p in (("model", model), ("data", data)):
        if not p.exists():
            raise FileNotFoundError(f"--{name} {p} does not exist")
    if shard_size % batch_size:
        raise ValueError(f"--shard-size {shard_size} must be a multiple of --batch-size {batch_size}")
    if resolution % 8:
        raise ValueError(f"--resolution {resolution} must be a multiple of 8")
    if storage not in STORAGE:
        raise ValueError(f"--storage must be one of {list(STORAGE)}")
    if isinstance(columns, str):
        columns = D.Columns.parse(columns)
    read = dict(columns=columns, pairs_from_ranking=pairs_from_ranking, keep_ties=keep_ties, strict=strict)
    source = D.describe_source(data, columns, pairs_from_ranking)  # the format, and a clear error for a bad input
    device = device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    emb = load_embedder(embedder, device=device) if isinstance(embedder, str) else embedder
    family = load_family(model, max_sequence_length=max_sequence_length)
    settings = dict(
        format=FORMAT,
        model_fingerprint=model_fingerprint(family),
        kind=family.name,
        resolution=resolution,
        crop=crop,
        flip=flip,
        flip_twin=flip_twin,
        keep_ties=keep_ties,
        seed=seed,
        shard_size=shard_size,
        batch_size=batch_size,
        storage=storage,
        world=world,
        embedder=getattr(emb, "name", None) if emb else None,
        data=source,
        max_sequence_length=family.max_sequence_length,
    )
    out.mkdir(parents=True, exist_ok=True)
    distributed.check_shared_folder(out, "--out", reads="Rank 0 joins every rank's shards into index.json there")
    settings_file = out / "cache.json"
    if settings_file.exists():
        old = json.loads(settings_file.read_text())
        if isinstance(old.get("data"), str) and old["data"] == source["path"]:  # the record of before 0.3
            old["data"] = source
        diff = {k: (old.get(k), settings[k]) for k in SETTINGS if old.get(k) != settings[k]}
        if diff:
            raise CacheError(
                f"{out} holds a cache built with other settings {diff} (was, now): "
                "use another --out, or the same arguments to resume it"
            )
    elif rank == 0:
        _write_atomic_json(settings_file, settings)
    if (out / "index.json").exists():
        summary = json.loads((out / "index.json").read_text())
        print(f"[cache] {out} is complete: {summary['pairs']} pairs; nothing to do")
        return summary

    first_pair_or_error(data, **read)  # bad data fails here, before any model loads
    encoder = PairEncoder(family, device=device, vae_dtype=STORAGE[vae_dtype])
    if rank == 0 and not (out / "empty_prompt.safetensors").exists():
        tensors = {k: v.to(STORAGE[storage]) for k, v in encoder.encode_texts([""]).items()}
        save_file(tensors, str(out / "empty_prompt.safetensors.tmp"))
        os.replace(out / "empty_prompt.safetensors.tmp", out / "empty_prompt.safetensors")

    # resume after the last complete shard of this rank
    done = sorted(out.glob(f"shard-r{rank}-*.safetensors"))
    counts, cursor, pairs = D.SkipCounts(), (0, 0, 0), 0
    for f in done:
        meta = _read_meta(f)
        counts.update(meta["counts"])
        cursor, pairs = tuple(meta["cursor"]), meta["pairs_before"] + meta["n"]
    finished = bool(done) and _read_meta(done[-1])["n"] < shard_size
    if done:
        print(f"[cache] rank {rank}: resuming after {len(done)} complete shard(s), {pairs} pairs")
    offsets = D.row_offsets(data)
    bar = tqdm(
        total=offsets[-1],
        initial=offsets[cursor[0]] + cursor[1],
        unit="row",
        desc="caching",
        disable=not progress or rank != 0,
    )
    t0, written_now = time.perf_counter(), 0
    stream = D.iter_pairs(data, **read, counts=counts, rank=rank, world=world, start=cursor, first_index=pairs)
    k = len(done)
    while not finished and (limit is None or pairs < limit):
        before = Counter(counts)
        batches, shard_pairs, last_cursor = [], 0, cursor
        while shard_pairs < shard_size and (limit is None or pairs + shard_pairs < limit):
            want = min(batch_size, shard_size - shard_pairs, (limit - pairs - shard_pairs) if limit else batch_size)
            batch = [p for _, p in zip(range(want), stream)]
            if not batch:
                break
            batches.append(
                encode_pairs(
                    batch,
                    encoder,
                    resolution=resolution,
                    crop=crop,
                    flip=flip,
                    seed=seed,
                    flip_twin=flip_twin,
                    embedder=emb,
                )
            )
            shard_pairs += len(batch)
            last_cursor = batch[-1].cursor
            bar.update(offsets[last_cursor[0]] + last_cursor[1] - bar.n)  # rows read (by all ranks, roughly)
            rate = (written_now + shard_pairs) / (time.perf_counter() - t0)
            bar.set_postfix(pairs=pairs + shard_pairs, pairs_per_s=f"{rate * world:.1f}", skipped=sum(counts.values()))
            if len(batch) < want:
                break
        if shard_pairs == 0:
            break
        shard = _concat(batches, family.caption_keys)
        shard_counts = {c: counts[c] - before.get(c, 0) for c in counts if counts[c] - before.get(c, 0)}
        write_shard(
            out / shard_name(rank, k),
            shard,
            STORAGE[storage],
            dict(n=shard_pairs, pairs_before=pairs, cursor=list(last_cursor), counts=shard_counts),
            family.caption_keys,
        )
        pairs += shard_pairs
        written_now += shard_pairs
        k += 1
        finished = shard_pairs < shard_size
    bar.close()
    shards = [shard_name(rank, i) for i in range(k)]
    mine = dict(rank=rank, pairs=pairs, shards=shards, skipped=dict(counts), skipped_first=counts.first)
    _write_atomic_json(out / f"rank-{rank}.json", mine)
    distributed.barrier()
    if rank == 0:
        ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]
        shards = []
        for r in ranks:
            for name in r["shards"]:
                shards.append(dict(name=name, pairs=_read_meta(out / name)["n"]))
        skipped = D.SkipCounts()
        for r in ranks:
            skipped.update(r["skipped"])
            for cause, where in r.get("skipped_first", {}).items():
                skipped.first.setdefault(cause, where)
        pairs = sum(r["pairs"] for r in ranks)
        index = write_index(out, settings, model, pairs, skipped, shards, caption_keys=family.caption_keys)
        print(f"[cache] wrote {index['pairs']} pairs in {len(shards)} shard(s) to {out}; skipped: {skipped.summary()}")
        return index
    return mine


def first_pair_or_error(data: str | Path, **read) -> D.RawPair:
    """The input's first usable pair (of any rank), or a ``DataError`` that says why none is: the check before
    any model loads. A good input is read only up to its first usable pair."""
    counts = D.SkipCounts()
    pair = next(D.iter_pairs(data, **read, counts=counts), None)
    if pair is None:
        raise D.DataError(f"no usable pairs in {data}: skipped {counts.summary()}")
    return pair


def write_index(
    out: Path, settings: dict, model: Path, pairs: int, skipped: dict, shards: list[dict], *, caption_keys
) -> dict:
    """index.json, written last (its presence marks a finished cache): the settings, what was written (skips by
    cause, and where each cause was first seen), the family's per-caption tensors, the versions and the model it
    was made for."""
    index = dict(
        settings,
        caption_keys=list(caption_keys),
        pairs=pairs,
        skipped=dict(skipped),
        skipped_first=dict(sorted(getattr(skipped, "first", {}).items())),
        shards=shards,
        versions=_versions(),
        model=str(model.resolve()),
        created=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    _write_atomic_json(out / "index.json", index)
    return index


def _versions() -> dict:
    import diffusers
    import transformers

    from . import __version__

    return dict(
        rpo_fast=__version__,
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
    )


# --------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------


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
