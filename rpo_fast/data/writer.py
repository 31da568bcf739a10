"""The cache writer: encode every pair once (``encode``) into shards of the format ``schema`` declares, resumable
after a kill and data-parallel over ranks (``python -m rpo_fast.cache`` is its command)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import distributed
from ..embed import Embedder, load_embedder
from ..models import load_family
from . import readers as D
from .encode import PairEncoder, encode_pairs, model_fingerprint
from .schema import FORMAT, STORAGE, CacheError, read_meta, shard_name

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
        tensors = {
            k: v.to(STORAGE[storage]) if v.is_floating_point() else v for k, v in encoder.encode_texts([""]).items()
        }
        save_file(tensors, str(out / "empty_prompt.safetensors.tmp"))
        os.replace(out / "empty_prompt.safetensors.tmp", out / "empty_prompt.safetensors")

    # resume after the last complete shard of this rank
    done = sorted(out.glob(f"shard-r{rank}-*.safetensors"))
    counts, cursor, pairs = D.SkipCounts(), (0, 0, 0), 0
    for f in done:
        meta = read_meta(f)
        counts.update(meta["counts"])
        cursor, pairs = tuple(meta["cursor"]), meta["pairs_before"] + meta["n"]
    finished = bool(done) and read_meta(done[-1])["n"] < shard_size
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
                shards.append(dict(name=name, pairs=read_meta(out / name)["n"]))
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

    from .. import __version__

    return dict(
        rpo_fast=__version__,
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
    )
