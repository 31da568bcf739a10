"""Preference pairs from disk: readers and the reference recipe's preprocessing (the training sampler is in
``rpo_fast.dataset``).

Readers stream (never load whole) and yield ``RawPair``s with the winner first:
- Pick-a-Pic v2: a folder of parquet shards (or one file), read shard by shard, row group by row group.
  Columns used: caption, jpg_0, jpg_1, label_0, label_1. Ties (0.5/0.5) are dropped unless ``keep_ties``
  (the DiffusionDPO recipe: 959,040 rows become 851,293 pairs).
- Own data: a JSONL or CSV file with ``caption``, ``winner``, ``loser`` (image paths relative to the file).
A row that cannot be used (undecodable image, missing column or value, unknown label, missing file) is
skipped and counted by cause; ``strict=True`` raises ``DataError`` instead. Rows are owned round-robin by
data-parallel ranks (raw row g belongs to rank g % world), so sharded runs cover each pair exactly once.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .seeding import seed_of

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


PICKAPIC_V2_SCHEMA = (
    ("caption", "string"),
    ("jpg_0", "binary"),
    ("jpg_1", "binary"),
    ("label_0", "float64"),
    ("label_1", "float64"),
    ("has_label", "bool"),
    ("are_different", "bool"),
    ("best_image_uid", "string"),
    ("model_0", "string"),
    ("model_1", "string"),
    ("ranking_id", "int64"),
    ("user_id", "int64"),
    ("created_at", "timestamp[ns]"),
    ("image_0_uid", "string"),
    ("image_1_uid", "string"),
    ("image_0_url", "string"),
    ("image_1_url", "string"),
    ("num_example_per_prompt", "int64"),
)


def pickapic_schema():
    """The pyarrow schema of a Pick-a-Pic v2 shard (what ``rpo_fast.style_data`` writes, and the fixtures)."""
    import pyarrow as pa

    types = {
        "string": pa.string(),
        "binary": pa.binary(),
        "float64": pa.float64(),
        "bool": pa.bool_(),
        "int64": pa.int64(),
        "timestamp[ns]": pa.timestamp("ns"),
    }
    return pa.schema([(name, types[t]) for name, t in PICKAPIC_V2_SCHEMA])


def encode_image(image, fmt: str = "JPEG") -> bytes:
    """A PIL image as the bytes of an image file (JPEG at quality 95, or ``fmt``), as parquet shards hold them."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=95) if fmt == "JPEG" else image.save(buf, format=fmt)
    return buf.getvalue()


class DataError(ValueError):
    """A row or file of the input data that cannot be used (raised in strict mode, or when nothing is usable)."""


@dataclass
class RawPair:
    index: int  # position among this rank's usable pairs
    caption: str
    winner: Image.Image
    loser: Image.Image
    tie: bool
    cursor: tuple[int, int]  # (file, row) of the next unread row: where a resumed read starts


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def pickapic_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet shards under {path}")
    return files


def is_pair_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".jsonl", ".csv")


def row_offsets(path: str | Path) -> list[int]:
    """Cumulative row counts of the input's files (parquet metadata or lines), read without touching the
    images: ``offsets[f] + row`` numbers a cursor (f, row) globally, for progress bars."""
    if is_pair_file(path):
        return [0, len(_pair_file_rows(Path(path)))]
    import pyarrow.parquet as pq

    out = [0]
    for f in pickapic_files(path):
        out.append(out[-1] + pq.ParquetFile(f).metadata.num_rows)
    return out


def iter_pairs(
    path: str | Path,
    *,
    keep_ties: bool = False,
    strict: bool = False,
    counts: Counter | None = None,
    rank: int = 0,
    world: int = 1,
    start: tuple[int, int] = (0, 0),
    first_index: int = 0,
) -> Iterator[RawPair]:
    """Usable pairs of a Pick-a-Pic folder/file or a JSONL/CSV file, from cursor ``start`` on.

    ``counts`` (a Counter) receives the skipped rows by cause; ``first_index`` numbers the first pair
    yielded (a resumed read continues the numbering)."""
    counts = Counter() if counts is None else counts
    reader = _iter_pair_file if is_pair_file(path) else _iter_pickapic
    index = first_index
    for caption, winner, loser, tie, cursor in reader(Path(path), keep_ties, strict, counts, rank, world, start):
        yield RawPair(index, caption, winner, loser, tie, cursor)
        index += 1


def _skip(counts: Counter, strict: bool, cause: str, where: str) -> None:
    if strict:
        raise DataError(f"{where}: {cause} (strict mode; without --strict such rows are skipped and counted)")
    counts[cause] += 1


def _iter_pickapic(path, keep_ties, strict, counts, rank, world, start):
    import pyarrow.parquet as pq

    files = pickapic_files(path)
    g = sum(pq.ParquetFile(f).metadata.num_rows for f in files[: start[0]])  # global raw row index
    for fi in range(start[0], len(files)):
        pf = pq.ParquetFile(files[fi])
        first = start[1] if fi == start[0] else 0
        missing = [c for c in PICKAPIC_COLUMNS if c not in pf.schema_arrow.names]
        if missing:
            rows = pf.metadata.num_rows
            owned = sum(1 for r in range(first, rows) if (g + r) % world == rank)
            if strict and owned:
                raise DataError(f"{files[fi]}: missing column(s) {missing} (strict mode)")
            counts["missing column"] += owned
            g += rows
            continue
        row = 0
        for rg in range(pf.metadata.num_row_groups):
            n_rg = pf.metadata.row_group(rg).num_rows
            if row + n_rg <= first:
                row += n_rg
                continue
            for batch in pf.iter_batches(batch_size=256, row_groups=[rg], columns=list(PICKAPIC_COLUMNS)):
                cols = {c: batch.column(c).to_pylist() for c in PICKAPIC_COLUMNS}
                for k in range(batch.num_rows):
                    r = row
                    row += 1
                    if r < first or (g + r) % world != rank:
                        continue
                    where = f"{files[fi].name} row {r}"
                    values = {c: cols[c][k] for c in PICKAPIC_COLUMNS}
                    if any(v is None for v in values.values()):
                        _skip(counts, strict, "missing value", where)
                        continue
                    labels = (values["label_0"], values["label_1"])
                    if labels == (0.5, 0.5):
                        if not keep_ties:
                            counts["tie dropped"] += 1
                            continue
                        order, tie = (0, 1), True
                    elif labels == (1.0, 0.0):
                        order, tie = (0, 1), False
                    elif labels == (0.0, 1.0):
                        order, tie = (1, 0), False
                    else:
                        _skip(counts, strict, "unknown label", where + f" (labels {labels})")
                        continue
                    try:
                        images = [_decode(values[f"jpg_{j}"]) for j in order]
                    except Exception as e:  # noqa: BLE001 - PIL raises many kinds
                        _skip(counts, strict, "undecodable image", where + f" ({type(e).__name__})")
                        continue
                    yield str(values["caption"]), images[0], images[1], tie, (fi, r + 1)
        g += pf.metadata.num_rows


def _pair_file_rows(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"pair file not found: {path}")
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {i + 1} is not JSON ({e})") from e
    return rows


def _iter_pair_file(path, keep_ties, strict, counts, rank, world, start):
    rows = _pair_file_rows(path)
    for r in range(start[1], len(rows)):
        if r % world != rank:
            continue
        row, where = rows[r], f"{path.name} row {r + 1}"
        if any(not row.get(k) for k in ("caption", "winner", "loser")):
            _skip(counts, strict, "missing value", where)
            continue
        try:
            images = [_decode((path.parent / row[k]).read_bytes()) for k in ("winner", "loser")]
        except FileNotFoundError:
            _skip(counts, strict, "missing file", where)
            continue
        except Exception as e:  # noqa: BLE001
            _skip(counts, strict, "undecodable image", where + f" ({type(e).__name__})")
            continue
        yield str(row["caption"]), images[0], images[1], False, (0, r + 1)


# --------------------------------------------------------------------------------------------------
# Preprocessing (the reference recipe)
# --------------------------------------------------------------------------------------------------


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
