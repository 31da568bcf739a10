"""The offline cache: encode every pair once (VAE latents, text encoder outputs, SDXL time ids, CLIP
embeddings), train from the cache.

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
import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import data as D
from .embed import Embedder, load_embedder

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
)


class CacheError(ValueError):
    """A cache that does not fit the run asking for it, or an unfinished one."""


# --------------------------------------------------------------------------------------------------
# The model side: which model, its fingerprint, and the encoders
# --------------------------------------------------------------------------------------------------


def model_kind(model: str | Path) -> str:
    """'sdxl' or 'sd15', from a diffusers model folder (model_index.json, else the UNet config)."""
    model = Path(model)
    index = model / "model_index.json"
    if index.exists():
        spec = json.loads(index.read_text())
        return "sdxl" if "text_encoder_2" in spec or "XL" in spec.get("_class_name", "") else "sd15"
    unet = model / "unet" / "config.json"
    if unet.exists():
        return "sdxl" if json.loads(unet.read_text()).get("addition_embed_type") == "text_time" else "sd15"
    raise FileNotFoundError(f"{model} is not a diffusers model folder (no model_index.json or unet/config.json)")


def model_fingerprint(model: str | Path) -> str:
    """A hash of what the cache depends on: the VAE, text encoder(s) and tokenizer(s) (configs, and the
    size plus first and last MiB of each weight file: cheap on multi-GB files, and still tells models apart)."""
    model = Path(model)
    h = hashlib.sha256()
    for sub in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
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
    """The VAE and text encoder(s) of a local diffusers model folder, as the cache and the on-the-fly
    dataset use them."""

    def __init__(
        self,
        model: str | Path,
        *,
        device: str | torch.device = "cpu",
        vae_dtype: torch.dtype = torch.float32,
        text_dtype: torch.dtype = torch.float32,
    ):
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.model, self.kind, self.device = Path(model), model_kind(model), torch.device(device)
        self.vae = AutoencoderKL.from_pretrained(self.model, subfolder="vae", dtype=vae_dtype).to(device).eval()
        self.vae_dtype = vae_dtype
        self.tokenizers = [CLIPTokenizer.from_pretrained(self.model, subfolder="tokenizer")]
        self.encoders = [CLIPTextModel.from_pretrained(self.model, subfolder="text_encoder", dtype=text_dtype)]
        if self.kind == "sdxl":
            self.tokenizers.append(CLIPTokenizer.from_pretrained(self.model, subfolder="tokenizer_2"))
            self.encoders.append(
                CLIPTextModelWithProjection.from_pretrained(self.model, subfolder="text_encoder_2", dtype=text_dtype)
            )
        self.encoders = [e.to(device).eval() for e in self.encoders]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 3, H, W) in [-1, 1] -> mean, std (n, 4, H/f, W/f) fp32 on CPU, unscaled."""
        dist = self.vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()

    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SD1.5: last hidden state (n, 77, D). SDXL: penultimate hidden states of both encoders concatenated
        (n, 77, D1 + D2) and the second encoder's pooled embedding (n, D2)."""
        states, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders):
            ids = tok(
                captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(self.device)
            if self.kind == "sd15":
                states.append(enc(ids)[0])
            else:
                out = enc(ids, output_hidden_states=True)
                states.append(out.hidden_states[-2])
                if hasattr(out, "text_embeds"):
                    pooled = out.text_embeds
        return torch.cat(states, dim=-1).float().cpu(), None if pooled is None else pooled.float().cpu()


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
    """Everything the trainer needs of ``pairs``, fp32 on CPU, captions deduplicated."""
    prepared = [D.preprocess_pair(p, resolution, crop=crop, flip=flip, seed=seed, flip_twin=flip_twin) for p in pairs]
    out: dict = {}
    for v, suffix in enumerate(["", "_flip"] if flip_twin else [""]):
        pixels = torch.cat([prep[v][0] for prep in prepared])  # (2n, 3, res, res): w0, l0, w1, l1, ...
        mean, std = encoder.encode_images(pixels)
        out["latent_mean" + suffix] = mean.unflatten(0, (len(pairs), 2))
        out["latent_std" + suffix] = std.unflatten(0, (len(pairs), 2))
        if encoder.kind == "sdxl":
            out["time_ids" + suffix] = torch.tensor([[c.time_ids(resolution) for c in prep[v][1]] for prep in prepared])
    captions = list(dict.fromkeys(p.caption for p in pairs))
    out["captions"] = captions
    out["text_index"] = torch.tensor([captions.index(p.caption) for p in pairs], dtype=torch.int64)
    out["prompt_embeds"], pooled = encoder.encode_texts(captions)
    if pooled is not None:
        out["pooled_prompt_embeds"] = pooled
    if embedder is not None:
        text = torch.nn.functional.normalize(embedder.encode_texts([p.caption for p in pairs]).float(), dim=-1)
        images = embedder.encode_images([im for p in pairs for im in (p.winner, p.loser)]).float()
        out["clip_text"] = text
        out["clip_image"] = torch.nn.functional.normalize(images, dim=-1).unflatten(0, (len(pairs), 2))
    if any(p.tie for p in pairs):
        out["tie"] = torch.tensor([p.tie for p in pairs], dtype=torch.uint8)
    return out


def _concat(batches: list[dict]) -> dict:
    """Join encoded batches into one shard: captions deduplicated again across batches."""
    captions = list(dict.fromkeys(c for b in batches for c in b["captions"]))
    out = {"captions": captions}
    rows = {c: i for i, c in enumerate(captions)}
    first = {}  # first row of each caption among the batches' prompt_embeds
    for bi, b in enumerate(batches):
        for j, c in enumerate(b["captions"]):
            first.setdefault(c, (bi, j))
    for key in ("prompt_embeds", "pooled_prompt_embeds"):
        if key in batches[0]:
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


def _shard_name(rank: int, k: int) -> str:
    return f"shard-r{rank}-{k:05d}.safetensors"


def _write_atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _save_shard(path: Path, shard: dict, storage: torch.dtype, meta: dict) -> None:
    tensors = {}
    for k, v in shard.items():
        if k == "captions":
            continue
        if k.startswith(("latent_", "prompt_embeds", "pooled_", "clip_")):
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


def _dist_env() -> tuple[int, int]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
    return rank, world


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
    embedder: str | Embedder | None = None,
    shard_size: int = 1024,
    batch_size: int = 16,
    storage: str = "fp16",
    vae_dtype: str = "fp32",
    seed: int = 0,
    device: str | None = None,
    limit: int | None = None,
    progress: bool = True,
    rank: int | None = None,
    world: int | None = None,
) -> dict:
    """Build (or finish) the cache of ``data`` for ``model`` in ``out``; returns the summary of this rank."""
    from tqdm.auto import tqdm

    if rank is None or world is None:
        rank, world = _dist_env()
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
    device = device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    emb = load_embedder(embedder, device=device) if isinstance(embedder, str) else embedder
    settings = dict(
        format=FORMAT,
        model_fingerprint=model_fingerprint(model),
        kind=model_kind(model),
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
        data=str(data.resolve()),
    )
    out.mkdir(parents=True, exist_ok=True)
    settings_file = out / "cache.json"
    if settings_file.exists():
        old = json.loads(settings_file.read_text())
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

    encoder = PairEncoder(model, device=device, vae_dtype=STORAGE[vae_dtype])
    if rank == 0 and not (out / "empty_prompt.safetensors").exists():
        embeds, pooled = encoder.encode_texts([""])
        tensors = {"prompt_embeds": embeds.to(STORAGE[storage])}
        if pooled is not None:
            tensors["pooled_prompt_embeds"] = pooled.to(STORAGE[storage])
        save_file(tensors, str(out / "empty_prompt.safetensors.tmp"))
        os.replace(out / "empty_prompt.safetensors.tmp", out / "empty_prompt.safetensors")

    # resume after the last complete shard of this rank
    done = sorted(out.glob(f"shard-r{rank}-*.safetensors"))
    counts, cursor, pairs = Counter(), (0, 0), 0
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
    stream = D.iter_pairs(
        data, keep_ties=keep_ties, strict=strict, counts=counts, rank=rank, world=world, start=cursor, first_index=pairs
    )
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
        shard = _concat(batches)
        shard_counts = {c: counts[c] - before.get(c, 0) for c in counts if counts[c] - before.get(c, 0)}
        _save_shard(
            out / _shard_name(rank, k),
            shard,
            STORAGE[storage],
            dict(n=shard_pairs, pairs_before=pairs, cursor=list(last_cursor), counts=shard_counts),
        )
        pairs += shard_pairs
        written_now += shard_pairs
        k += 1
        finished = shard_pairs < shard_size
    bar.close()
    mine = dict(rank=rank, pairs=pairs, shards=[_shard_name(rank, i) for i in range(k)], skipped=dict(counts))
    _write_atomic_json(out / f"rank-{rank}.json", mine)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0:
        ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]
        shards = []
        for r in ranks:
            for name in r["shards"]:
                shards.append(dict(name=name, pairs=_read_meta(out / name)["n"]))
        skipped = Counter()
        for r in ranks:
            skipped.update(r["skipped"])
        index = _write_index(out, settings, model, sum(r["pairs"] for r in ranks), dict(skipped), shards)
        causes = ", ".join(f"{c} {n}" for c, n in sorted(skipped.items())) or "none"
        print(f"[cache] wrote {index['pairs']} pairs in {len(shards)} shard(s) to {out}; skipped: {causes}")
        return index
    return mine


def _write_index(out: Path, settings: dict, model: Path, pairs: int, skipped: dict, shards: list[dict]) -> dict:
    """index.json, written last (its presence marks a finished cache): the settings, what was written, the
    versions and the model it was made for."""
    index = dict(
        settings,
        pairs=pairs,
        skipped=skipped,
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
# Reading
# --------------------------------------------------------------------------------------------------


class CachedPairs:
    """Random access to a complete cache. ``ds[i]`` (or ``ds.get(i, flip)``) returns fp32 tensors:
    latent_mean, latent_std (2, 4, h, w) [winner, loser]; prompt_embeds (77, D); pooled_prompt_embeds (D2,)
    and time_ids (2, 6) for SDXL; clip_text (E,) and clip_image (2, E) where embedded; caption (str)."""

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
        self.shards = [self.path / s["name"] for s in self.index["shards"]]
        sizes = [s["pairs"] for s in self.index["shards"]]
        self.offsets = torch.tensor([0] + sizes).cumsum(0).tolist()
        self._handles: dict[int, object] = {}
        self._captions: dict[int, list[str]] = {}
        self.kind, self.resolution = self.index["kind"], self.index["resolution"]
        self.has_twins = self.index["flip_twin"]
        self.has_embeddings = self.index["embedder"] is not None
        empty = self.path / "empty_prompt.safetensors"
        with safe_open(str(empty), framework="pt") as f:
            self.empty_prompt = {k: f.get_tensor(k)[0].float() for k in f.keys()}

    def __len__(self) -> int:
        return self.offsets[-1]

    def check(self, *, model: str | Path, resolution: int) -> None:
        """Refuse a cache made with another model or resolution than the run asks for."""
        if self.resolution != resolution:
            raise CacheError(f"{self.path} was cached at resolution {self.resolution}, the run asks for {resolution}")
        fp = model_fingerprint(model)
        if fp != self.index["model_fingerprint"]:
            raise CacheError(
                f"{self.path} was cached with another model ({self.index['model']}, fingerprint "
                f"{self.index['model_fingerprint']}) than {model} (fingerprint {fp})"
            )

    def ties(self) -> int:
        if not self.index["keep_ties"]:
            return 0
        return sum(
            int(self._handle(s).get_tensor("tie").sum())
            for s in range(len(self.shards))
            if "tie" in self._handle(s).keys()
        )

    def _handle(self, s: int):
        if s not in self._handles:
            self._handles[s] = safe_open(str(self.shards[s]), framework="pt")
            self._captions[s] = json.loads(self._handles[s].metadata()["rpo_fast"])["captions"]
        return self._handles[s]

    def __getitem__(self, i: int) -> dict:
        return self.get(i)

    def get(self, i: int, flip: bool = False) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} out of range ({len(self)} pairs)")
        import bisect

        s = bisect.bisect_right(self.offsets, i) - 1
        j = i - self.offsets[s]
        f = self._handle(s)
        suffix = "_flip" if flip and self.has_twins else ""
        row = int(f.get_slice("text_index")[j : j + 1][0])
        item = {
            "latent_mean": f.get_slice("latent_mean" + suffix)[j : j + 1][0].float(),
            "latent_std": f.get_slice("latent_std" + suffix)[j : j + 1][0].float(),
            "prompt_embeds": f.get_slice("prompt_embeds")[row : row + 1][0].float(),
            "caption": self._captions[s][row],
        }
        keys = f.keys()
        if "pooled_prompt_embeds" in keys:
            item["pooled_prompt_embeds"] = f.get_slice("pooled_prompt_embeds")[row : row + 1][0].float()
            item["time_ids"] = f.get_slice("time_ids" + suffix)[j : j + 1][0].float()
        if "clip_text" in keys:
            item["clip_text"] = f.get_slice("clip_text")[j : j + 1][0].float()
            item["clip_image"] = f.get_slice("clip_image")[j : j + 1][0].float()
        return item


class OnTheFlyPairs:
    """The same items as ``CachedPairs``, encoded when asked (for small runs from raw data): pair i gets the
    crop, flip and seeds the cache would give it."""

    def __init__(
        self,
        model: str | Path,
        data: str | Path,
        *,
        resolution: int,
        crop: str = "center",
        flip: bool = False,
        seed: int = 0,
        keep_ties: bool = False,
        embedder: Embedder | None = None,
        device: str = "cpu",
        limit: int | None = None,
        encoder: PairEncoder | None = None,
    ):
        self.counts: Counter = Counter()
        self.pairs = []
        for p in D.iter_pairs(data, keep_ties=keep_ties, counts=self.counts):
            self.pairs.append(p)
            if limit is not None and len(self.pairs) >= limit:
                break
        if not self.pairs:
            raise D.DataError(f"no usable pairs in {data} (skipped: {dict(self.counts)})")
        self.encoder = encoder or PairEncoder(model, device=device)
        self.kind, self.resolution, self.crop, self.flip, self.seed = self.encoder.kind, resolution, crop, flip, seed
        self.embedder, self.has_twins, self.has_embeddings = embedder, False, embedder is not None
        embeds, pooled = self.encoder.encode_texts([""])
        self.empty_prompt = {"prompt_embeds": embeds[0]} | (
            {"pooled_prompt_embeds": pooled[0]} if pooled is not None else {}
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def ties(self) -> int:
        if not self.index["keep_ties"]:
            return 0
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
        item = {
            "latent_mean": enc["latent_mean"][0],
            "latent_std": enc["latent_std"][0],
            "prompt_embeds": enc["prompt_embeds"][0],
            "caption": self.pairs[i].caption,
        }
        if "pooled_prompt_embeds" in enc:
            item["pooled_prompt_embeds"] = enc["pooled_prompt_embeds"][0]
            item["time_ids"] = enc["time_ids"][0]
        if "clip_text" in enc:
            item["clip_text"], item["clip_image"] = enc["clip_text"][0], enc["clip_image"][0]
        return item


def collate(items: list[dict]) -> dict:
    """Stack items into a batch (captions as a list)."""
    out = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "caption"}
    out["caption"] = [it["caption"] for it in items]
    return out


# --------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m rpo_fast.cache",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", required=True, help="local diffusers model folder (SD1.5 or SDXL)")
    ap.add_argument("--data", required=True, help="Pick-a-Pic v2 parquet folder/file, or a pairs .jsonl/.csv")
    ap.add_argument("--out", required=True, help="cache folder (resumed if it holds a partial cache)")
    ap.add_argument("--resolution", type=int, required=True, help="training resolution in pixels (512, 1024)")
    ap.add_argument("--crop", choices=["center", "random"], default="center")
    ap.add_argument("--flip", action="store_true", help="random horizontal flip (fixed per pair by the seed)")
    ap.add_argument("--flip-twin", action="store_true", help="also cache the mirrored twin of every pair")
    ap.add_argument("--keep-ties", action="store_true", help="keep 0.5/0.5 rows (dropped by default)")
    ap.add_argument("--strict", action="store_true", help="a bad row is an error instead of skipped and counted")
    ap.add_argument(
        "--clip",
        "--embedder",
        dest="embedder",
        default=None,
        help="embeddings for RPO: a CLIPModel folder, openclip:MODEL:CKPT, or module:factory[:ARG]",
    )
    ap.add_argument("--shard-size", type=int, default=1024, help="pairs per shard (a multiple of --batch-size)")
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per encoding batch")
    ap.add_argument("--storage", choices=list(STORAGE), default="fp16", help="dtype of stored tensors")
    ap.add_argument("--vae-dtype", choices=list(STORAGE), default="fp32", help="dtype the VAE encodes in")
    ap.add_argument("--seed", type=int, default=0, help="seed of crops and flips")
    ap.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many pairs per rank")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    build_cache(
        a.model,
        a.data,
        a.out,
        resolution=a.resolution,
        crop=a.crop,
        flip=a.flip,
        flip_twin=a.flip_twin,
        keep_ties=a.keep_ties,
        strict=a.strict,
        embedder=a.embedder,
        shard_size=a.shard_size,
        batch_size=a.batch_size,
        storage=a.storage,
        vae_dtype=a.vae_dtype,
        seed=a.seed,
        device=a.device,
        limit=a.limit,
        progress=not a.no_progress,
    )


if __name__ == "__main__":
    main()
