"""Preference data for tests: Pick-a-Pic v2 parquet shards with the public dataset's schema, a learnable warm-beats-
cool preference, and the same pairs in every other input format that ``rpo_fast.data`` reads (``write_every_format``).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import numpy as np

from .. import data as D

# --------------------------------------------------------------------------------------------------
# Pick-a-Pic v2 parquet shards
# --------------------------------------------------------------------------------------------------

PICKAPIC_COLUMNS = D.PICKAPIC_V2_SCHEMA  # (name, type) of every column of Pick-a-Pic v2's parquet shards
pickapic_schema, encode_image = D.pickapic_schema, D.encode_image


def random_image(rng: np.random.Generator, size: int | tuple[int, int] = 32):
    """A smooth random RGB image (a colour gradient plus noise), ``size`` = side or (width, height)."""
    from PIL import Image

    w, h = (size, size) if isinstance(size, int) else size
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ramp = np.linspace(0, 1, w)[None, :, None]
    arr = c0 * (1 - ramp) + c1 * ramp + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def pickapic_rows(
    n: int,
    *,
    seed: int = 0,
    size: int | tuple[int, int] = 32,
    tie_every: int = 4,
    corrupt: tuple[int, ...] = (),
    captions: list[str] | None = None,
) -> list[dict]:
    """``n`` synthetic rows with the Pick-a-Pic v2 columns. Every ``tie_every``-th row is a tie (0.5/0.5);
    the others alternate between image 0 and image 1 as the winner. Rows listed in ``corrupt`` get
    undecodable bytes in ``jpg_1``."""
    rng = np.random.default_rng(seed)
    t0 = _dt.datetime(2023, 4, 1)
    rows = []
    for i in range(n):
        uid0, uid1 = f"img-{seed}-{i}-0", f"img-{seed}-{i}-1"
        if tie_every and i % tie_every == tie_every - 1:
            labels, best = (0.5, 0.5), ""
        elif i % 2 == 0:
            labels, best = (1.0, 0.0), uid0
        else:
            labels, best = (0.0, 1.0), uid1
        jpg1 = b"\xff\xd8 not a jpeg" if i in corrupt else encode_image(random_image(rng, size))
        rows.append(
            dict(
                caption=captions[i % len(captions)] if captions else f"a picture number {i} of seed {seed}",
                jpg_0=encode_image(random_image(rng, size)),
                jpg_1=jpg1,
                label_0=labels[0],
                label_1=labels[1],
                has_label=True,
                are_different=True,
                best_image_uid=best,
                model_0="sdxl",
                model_1="sd15",
                ranking_id=seed * 1_000_000 + i,
                user_id=int(rng.integers(1, 10_000)),
                created_at=t0 + _dt.timedelta(minutes=i),
                image_0_uid=uid0,
                image_1_uid=uid1,
                image_0_url=f"https://example.invalid/{uid0}.png",
                image_1_url=f"https://example.invalid/{uid1}.png",
                num_example_per_prompt=1,
            )
        )
    return rows


def write_pickapic_shard(path: str | Path, rows: list[dict], *, drop_columns: tuple[str, ...] = ()) -> Path:
    """Write ``rows`` as one parquet shard with the Pick-a-Pic v2 schema (``drop_columns`` lets a test
    write a shard that lacks a column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pickapic_schema()
    keep = [f for f in schema if f.name not in drop_columns]
    table = pa.table({f.name: pa.array([r[f.name] for r in rows], type=f.type) for f in keep})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def write_pairs_jsonl(folder: str | Path, n: int, *, seed: int = 0, size: int = 32) -> Path:
    """The "own data" format: ``pairs.jsonl`` with ``caption``, ``winner``, ``loser`` image paths
    relative to the file, and the PNG files beside it."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        names = []
        for side in ("w", "l"):
            name = f"images/{i:05d}_{side}.png"
            random_image(rng, size).save(folder / name)
            names.append(name)
        lines.append(json.dumps({"caption": f"own pair {i}", "winner": names[0], "loser": names[1]}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def write_warm_preference_pairs(folder: str | Path, n: int, *, seed: int = 0, size: int = 32) -> Path:
    """A learnable preference for trainer tests: each pair's winner is a warm-coloured picture (red,
    orange, yellow hues) and its loser a cool one (blue, green, cyan), with a soft blob and noise; the
    caption names the object, not the colour. Written as ``pairs.jsonl`` + PNGs (the own-data format)."""
    import colorsys

    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    lines = []
    for i in range(n):
        names = []
        for side, hue_range in (("w", (-0.08, 0.15)), ("l", (0.35, 0.65))):
            hue = rng.uniform(*hue_range) % 1.0
            fg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1), rng.uniform(0.7, 1))) * 255
            bg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.2, 0.5), rng.uniform(0.2, 0.5))) * 255
            cx, cy, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.15, 0.3)]
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
            arr = bg * (1 - blob) + fg * blob + rng.normal(0, 6, (size, size, 3))
            name = f"images/{i:05d}_{side}.png"
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / name)
            names.append(name)
        caption = f"a {['ball', 'flower', 'lamp', 'kite'][i % 4]} number {i}"
        lines.append(json.dumps({"caption": caption, "winner": names[0], "loser": names[1]}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


# --------------------------------------------------------------------------------------------------
# The same preference pairs in every input format of rpo_fast.data
# --------------------------------------------------------------------------------------------------

MIRROR_COLUMNS = "caption=prompt,image_0=first_image,image_1=second_image,label_0=first_label,label_1=second_label"
SAVE_TO_DISK_COLUMNS = "caption=text,winner=chosen,loser=rejected"
RANKED_COLUMNS = "caption=prompt,images=image_paths,ranking=rank"


def preference_pairs(n: int, *, seed: int = 0, size: int | tuple[int, int] = 32) -> list[dict]:
    """``n`` pairs as ``{"caption", "winner", "loser"}`` with PNG bytes (lossless: every format decodes the same
    pixels); every third caption repeats the one before (the cache deduplicates captions)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        caption = f"a preference pair {i - 1 if i % 3 == 2 else i} of seed {seed}"
        winner, loser = (D.encode_image(random_image(rng, size), "PNG") for _ in range(2))
        out.append(dict(caption=caption, winner=winner, loser=loser))
    return out


def _image_files(folder: Path, pairs: list[dict]) -> list[tuple[str, str]]:
    """The pairs' images as PNG files under ``folder/images``: their paths relative to ``folder``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i, p in enumerate(pairs):
        w, l = f"images/{i:05d}_w.png", f"images/{i:05d}_l.png"
        (folder / w).write_bytes(p["winner"])
        (folder / l).write_bytes(p["loser"])
        names.append((w, l))
    return names


def write_pickapic_pairs(path: str | Path, pairs: list[dict]) -> Path:
    """Pick-a-Pic v2's schema (labels): the winner is image 0 on even rows and image 1 on odd ones."""
    rows = pickapic_rows(len(pairs), tie_every=0)
    for i, (row, p) in enumerate(zip(rows, pairs)):
        row["caption"] = p["caption"]
        row["jpg_0"], row["jpg_1"] = (p["winner"], p["loser"]) if i % 2 == 0 else (p["loser"], p["winner"])
    return write_pickapic_shard(path, rows)


def write_mirror_parquet(path: str | Path, pairs: list[dict], *, rows_per_file: int | None = None) -> Path:
    """A mirror-style parquet (read with ``MIRROR_COLUMNS``): other column names, images as ``{"bytes", "path"}``
    structs (how ``datasets`` stores an ``Image`` feature), integer labels, the winner alternating between
    image 0 and 1; ``rows_per_file`` splits it into a folder of shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cols = dict(prompt=[], first_image=[], second_image=[], first_label=[], second_label=[], extra=[])
    for i, p in enumerate(pairs):
        a, b = (p["winner"], p["loser"]) if i % 2 == 0 else (p["loser"], p["winner"])
        cols["prompt"].append(p["caption"])
        cols["first_image"].append({"bytes": a, "path": f"{i}_a.png"})
        cols["second_image"].append({"bytes": b, "path": f"{i}_b.png"})
        cols["first_label"].append(1 - i % 2)
        cols["second_label"].append(i % 2)
        cols["extra"].append(i)
    types = dict(first_image=image, second_image=image, first_label=pa.int64(), second_label=pa.int64())
    table = pa.table({k: pa.array(v, type=types.get(k)) for k, v in cols.items()})
    path = Path(path)
    if rows_per_file is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return path
    path.mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, len(pairs), rows_per_file)):
        pq.write_table(table.slice(start, rows_per_file), path / f"train-{k:05d}.parquet")
    return path


def write_save_to_disk(folder: str | Path, pairs: list[dict]) -> Path:
    """A Hugging Face ``datasets`` folder written by the real ``Dataset.save_to_disk`` (read with
    ``SAVE_TO_DISK_COLUMNS``): ``text``, and ``chosen``/``rejected`` as ``Image`` features. Needs ``datasets``."""
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "chosen": datasets.Image(), "rejected": datasets.Image()}
    )
    rows = dict(
        text=[p["caption"] for p in pairs],
        chosen=[{"bytes": p["winner"], "path": None} for p in pairs],
        rejected=[{"bytes": p["loser"], "path": None} for p in pairs],
    )
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return Path(folder)


def write_ranked_json(folder: str | Path, pairs: list[dict]) -> Path:
    """A ranked-list JSON (read with ``RANKED_COLUMNS``): a list of ``{"prompt", "image_paths", "rank"}`` with
    two images each (rank 1 the best, the winner first on even rows, second on odd ones) and the PNG files
    beside it; any ranking rule gives the pair itself."""
    folder = Path(folder)
    rows = []
    for i, (p, (w, l)) in enumerate(zip(pairs, _image_files(folder, pairs))):
        paths, rank = ([w, l], [1, 2]) if i % 2 == 0 else ([l, w], [2, 1])
        rows.append(dict(prompt=p["caption"], image_paths=paths, rank=rank))
    (folder / "ranked.json").write_text(json.dumps(rows, indent=1))
    return folder / "ranked.json"


def write_pair_file(folder: str | Path, pairs: list[dict], fmt: str = "jsonl") -> Path:
    """The own-data format: ``pairs.jsonl`` or ``pairs.csv`` of caption, winner, loser (paths) and the PNGs."""
    folder = Path(folder)
    names = _image_files(folder, pairs)
    rows = [dict(caption=p["caption"], winner=w, loser=l) for p, (w, l) in zip(pairs, names)]
    if fmt == "csv":
        import csv

        with (folder / "pairs.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["caption", "winner", "loser"])
            writer.writeheader()
            writer.writerows(rows)
        return folder / "pairs.csv"
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "pairs.jsonl"


def write_every_format(folder: str | Path, pairs: list[dict]) -> dict[str, tuple[Path, str | None]]:
    """``pairs`` written in each input format: name -> (the ``--data`` path, the ``--columns`` it is read with)."""
    folder = Path(folder)
    return {
        "pickapic": (write_pickapic_pairs(folder / "pickapic" / "train-00000.parquet", pairs).parent, None),
        "mirror": (write_mirror_parquet(folder / "mirror" / "data.parquet", pairs), MIRROR_COLUMNS),
        "save_to_disk": (write_save_to_disk(folder / "save_to_disk", pairs), SAVE_TO_DISK_COLUMNS),
        "ranked": (write_ranked_json(folder / "ranked", pairs), RANKED_COLUMNS),
        "jsonl": (write_pair_file(folder / "jsonl", pairs), None),
        "csv": (write_pair_file(folder / "csv", pairs, "csv"), None),
    }
