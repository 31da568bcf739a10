"""The style-alignment preference sets: Pick-a-Pic winners edited into a style by a local InstructPix2Pix pipeline,
written as Pick-a-Pic v2 shards with the styled image as the winner (``build_style_set``; the command, its choices
and its output are described in ``rpo_fast/style_data.py``, ``python -m rpo_fast.style_data``)."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import torch

from ..seeding import seed_of
from . import readers as D
from .preprocess import preprocess

STYLES = {
    "vangogh": dict(instruction="make it a Van Gogh painting", description="a painting in the style of Van Gogh"),
    "sketch": dict(instruction="turn it into a pencil sketch", description="a black and white pencil sketch"),
    "winter": dict(instruction="make it winter, covered in snow", description="a snowy winter scene"),
}
EDIT_SETTINGS = dict(num_inference_steps=20, guidance_scale=7.5, image_guidance_scale=1.5, scheduler="ddim")


def _shard(i: int) -> str:
    return f"train-{i:05d}.parquet"


def build_style_set(
    src,
    style: str,
    editor,
    out,
    *,
    limit: int | None = None,
    resolution: int = 512,
    shard_size: int = 256,
    batch_size: int = 4,
    device: str | None = None,
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """Edit the winners of ``src`` into ``style``; returns the summary (also written to ``OUT/_style.json``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline
    from tqdm.auto import tqdm

    if style not in STYLES:
        raise ValueError(f"--style must be one of {sorted(STYLES)}, got {style!r}")
    for name, p in (("--src", src), ("--editor", editor)):
        if not Path(p).exists():
            raise FileNotFoundError(f"{name} {p} does not exist")
    if shard_size % batch_size:
        raise ValueError(f"--shard-size {shard_size} must be a multiple of --batch-size {batch_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(
        style=style,
        **STYLES[style],
        **EDIT_SETTINGS,
        resolution=resolution,
        seed=seed,
        src=str(src),
        editor=str(editor),
        shard_size=shard_size,
    )
    meta_file = out / "_style.json"
    if meta_file.exists():
        old = json.loads(meta_file.read_text())["settings"]
        if old != settings:
            raise ValueError(f"{out} was built with other settings ({old}); use another --out")
    done = sorted(out.glob("train-*.parquet"))
    cursor, rows_done, counts = (0, 0), 0, {}
    if done:
        meta = json.loads(pq.read_schema(done[-1]).metadata[b"rpo_fast"])
        cursor, rows_done, counts = tuple(meta["cursor"]), meta["rows_before"] + meta["rows"], meta["counts"]
        if meta["rows"] < shard_size:  # the last shard was the end of the data
            return _finish(out, settings, done, counts)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        editor, dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    from collections import Counter

    skip = Counter(counts)
    stream = D.iter_pairs(src, counts=skip, start=cursor, first_index=rows_done)
    schema = D.pickapic_schema()
    k = len(done)
    bar = tqdm(total=limit, initial=rows_done, unit="img", desc=f"styling ({style})", disable=not progress)
    while limit is None or rows_done < limit:
        rows, last = [], cursor
        while len(rows) < shard_size and (limit is None or rows_done + len(rows) < limit):
            want = min(batch_size, shard_size - len(rows), (limit - rows_done - len(rows)) if limit else batch_size)
            batch = [p for _, p in zip(range(want), stream)]
            if not batch:
                break
            originals = [preprocess(p.winner, resolution)[0] for p in batch]
            images = [_to_pil(x) for x in originals]
            gens = [torch.Generator(device).manual_seed(seed_of(seed, p.index)) for p in batch]
            edited = pipe(
                [STYLES[style]["instruction"]] * len(batch),
                image=images,
                generator=gens,
                num_inference_steps=EDIT_SETTINGS["num_inference_steps"],
                guidance_scale=EDIT_SETTINGS["guidance_scale"],
                image_guidance_scale=EDIT_SETTINGS["image_guidance_scale"],
            ).images
            for p, orig, new in zip(batch, images, edited):
                rows.append(_row(p, orig, new, style))
            last = batch[-1].cursor
            bar.update(len(batch))
            if len(batch) < want:
                break
        if not rows:
            break
        meta = dict(settings=settings, cursor=list(last), rows_before=rows_done, rows=len(rows), counts=dict(skip))
        table = pa.table({f.name: pa.array([r[f.name] for r in rows], type=f.type) for f in schema})
        table = table.replace_schema_metadata({"rpo_fast": json.dumps(meta)})
        tmp = out / f".{_shard(k)}.tmp"  # dot- and underscore-prefixed files: invisible to pyarrow datasets
        pq.write_table(table, tmp)
        os.replace(tmp, out / _shard(k))
        rows_done += len(rows)
        cursor = last
        k += 1
        if len(rows) < shard_size:
            break
    bar.close()
    return _finish(out, settings, sorted(out.glob("train-*.parquet")), dict(skip))


def _to_pil(x: torch.Tensor):
    from PIL import Image

    arr = ((x.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def _row(pair: D.RawPair, original, styled, style: str) -> dict:
    uid0, uid1 = f"{style}-{pair.index}", f"orig-{pair.index}"
    return dict(
        caption=pair.caption,
        jpg_0=D.encode_image(styled),
        jpg_1=D.encode_image(original),
        label_0=1.0,
        label_1=0.0,
        has_label=True,
        are_different=True,
        best_image_uid=uid0,
        model_0=f"instruct-pix2pix:{style}",
        model_1="pickapic-winner",
        ranking_id=pair.index,
        user_id=0,
        created_at=dt.datetime(2024, 1, 1),
        image_0_uid=uid0,
        image_1_uid=uid1,
        image_0_url="",
        image_1_url="",
        num_example_per_prompt=1,
    )


def _finish(out: Path, settings: dict, shards: list[Path], counts: dict) -> dict:
    import pyarrow.parquet as pq

    rows = sum(pq.ParquetFile(s).metadata.num_rows for s in shards)
    summary = dict(
        settings=settings,
        rows=rows,
        shards=[s.name for s in shards],
        skipped=counts,
        orientation="jpg_0 = styled (winner, label_0 = 1), jpg_1 = original (loser, label_1 = 0)",
    )
    (out / "_style.json").write_text(json.dumps(summary, indent=1))
    causes = ", ".join(f"{c} {n}" for c, n in sorted(counts.items())) or "none"
    print(f"[style_data] {rows} styled pairs in {len(shards)} shard(s) in {out}; skipped: {causes}")
    return summary
