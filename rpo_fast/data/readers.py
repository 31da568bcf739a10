"""Preference pairs from disk: the readers of every input format (preprocessing is ``preprocess``).

Readers stream (never load whole) and yield ``RawPair``s with the winner first. Formats (``open_source``):
- parquet: a folder of shards (read recursively, in name order) or one file, row group by row group;
- a Hugging Face ``datasets`` folder written by ``save_to_disk`` (its Arrow stream files are read with pyarrow,
  memory-mapped: ``datasets`` itself is not needed); a ``DatasetDict`` folder is refused with its split names;
- JSONL, CSV or JSON (a list of objects): small-run formats, read whole.
What each column holds is a ``Columns`` mapping (``--columns``), in one of three styles:
- labels (Pick-a-Pic v2, the default for parquet and Arrow: ``caption``, ``jpg_0``, ``jpg_1``, ``label_0``,
  ``label_1``): (1, 0) prefers image 0, (0, 1) image 1, (0.5, 0.5) is a tie; ties are dropped unless ``keep_ties``
  (the DiffusionDPO recipe: 959,040 rows become 851,293 pairs);
- pairs (the default for JSONL, CSV and JSON: ``caption``, ``winner``, ``loser``);
- ranked lists (``caption``, ``images`` and ``ranking``, a rank per image with 1 the best, or ``scores``, higher
  the better): a row with N images gives pairs by ``pairs_from_ranking`` (``ranked_pairs``); equal ranks are ties.
An image value is encoded bytes, a ``{"bytes": ..., "path": ...}`` struct (how ``datasets`` stores ``Image``
features), or a path relative to the file that names it.

A row that cannot be used is skipped and counted by cause (``SkipCounts``, which also keeps where each cause
was first seen); ``strict=True`` raises ``DataError`` instead. Rows are owned round-robin by data-parallel ranks
(raw row g belongs to rank g % world), so sharded runs cover each pair exactly once.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

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
    cursor: tuple[int, int, int]  # (file, row, pair of the row) of the next unread pair: where a resumed read starts


# --------------------------------------------------------------------------------------------------
# What the columns hold
# --------------------------------------------------------------------------------------------------

RANKING_RULES = ("all", "adjacent", "best-vs-rest")
STYLES = {
    "labels": ("caption", "image_0", "image_1", "label_0", "label_1"),
    "pairs": ("caption", "winner", "loser"),
    "ranked": ("caption", "images", "ranking|scores"),
}


@dataclass(frozen=True)
class Columns:
    """Which column of the input holds what (``--columns caption=NAME,winner=NAME,...``): the names of one style's
    roles (``STYLES``). ``caption`` defaults to "caption"; a ranked list names ``ranking`` or ``scores``."""

    caption: str = "caption"
    winner: str | None = None
    loser: str | None = None
    image_0: str | None = None
    image_1: str | None = None
    label_0: str | None = None
    label_1: str | None = None
    images: str | None = None
    ranking: str | None = None
    scores: str | None = None

    def __post_init__(self):
        given = {k for k, v in self.roles().items() if k != "caption"}
        styles = [s for s, roles in STYLES.items() if given & set("|".join(roles[1:]).split("|"))]
        if len(styles) != 1:
            raise DataError(
                f"--columns names roles of {' and '.join(styles) or 'no'} style(s); give one of: "
                + "; ".join(f"{s}: {', '.join(r)}" for s, r in STYLES.items())
            )
        want = set(STYLES[styles[0]][1:]) - {"ranking|scores"}
        if styles[0] == "ranked" and (self.ranking is None) == (self.scores is None):
            raise DataError("--columns: a ranked list names exactly one of ranking= (1 is the best) or scores=")
        if want - given:
            raise DataError(f"--columns: the {styles[0]} style also needs {', '.join(sorted(want - given))}")

    @property
    def style(self) -> str:
        return "labels" if self.image_0 else "pairs" if self.winner else "ranked"

    def roles(self) -> dict[str, str]:
        """role -> column name, for the roles this mapping names."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name)}

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.roles().items())

    @classmethod
    def parse(cls, text: str) -> Columns:
        """``caption=prompt,winner=chosen,loser=rejected`` -> Columns."""
        roles = [f.name for f in dataclasses.fields(cls)]
        kw = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, eq, name = part.partition("=")
            if not eq or not name.strip():
                raise DataError(f"--columns: {part!r} is not ROLE=COLUMN")
            if key.strip() not in roles:
                raise DataError(f"--columns: unknown role {key.strip()!r}; roles are {', '.join(roles)}")
            kw[key.strip()] = name.strip()
        return cls(**kw)


COLUMNS_HELP = (
    "which column holds what, ROLE=NAME,...: caption, image_0, image_1, label_0, label_1 (labels; the default for "
    "parquet and save_to_disk: Pick-a-Pic v2's caption, jpg_0, jpg_1, label_0, label_1), or caption, winner, loser "
    "(pairs; the default for .jsonl/.csv/.json), or caption, images, and ranking (1 = best) or scores (ranked lists)"
)
RANKING_HELP = "ranked lists: the pairs of a caption's N images: all, adjacent (in rank order), or best-vs-rest"

PICKAPIC = Columns(image_0="jpg_0", image_1="jpg_1", label_0="label_0", label_1="label_1")
PAIRS = Columns(winner="winner", loser="loser")
PICKAPIC_COLUMNS = tuple(PICKAPIC.roles().values())


def ranked_pairs(keys: list[float], rule: str = "all") -> list[tuple[int, int, bool]]:
    """The pairs of a ranked list as (better, worse, tie) positions into ``keys`` (lower is better: a rank; a
    score is negated). The images are ordered best first (a stable sort: equal keys keep their order), then
    - ``all``: every (a, b) with a before b: N(N-1)/2 pairs, a's first;
    - ``adjacent``: each image with the next: N-1 pairs;
    - ``best-vs-rest``: the first with each other: N-1 pairs.
    A pair of equal keys is a tie."""
    if rule not in RANKING_RULES:
        raise ValueError(f"pairs_from_ranking must be one of {RANKING_RULES}, got {rule!r}")
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    n = len(order)
    if rule == "all":
        spans = [(a, b) for a in range(n) for b in range(a + 1, n)]
    elif rule == "adjacent":
        spans = [(a, a + 1) for a in range(n - 1)]
    else:
        spans = [(0, b) for b in range(1, n)]
    return [(order[a], order[b], keys[order[a]] == keys[order[b]]) for a, b in spans]


# --------------------------------------------------------------------------------------------------
# Sources: the files of an input and their rows
# --------------------------------------------------------------------------------------------------

LINE_FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".json": "json"}


@dataclass
class Source:
    """An input's format and files (``open_source``); ``rows(f, start, names)`` streams file f's rows as dicts of
    the named columns it has."""

    path: Path
    format: str  # parquet | arrow | jsonl | csv | json
    files: list[Path]
    _lines: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def default_columns(self) -> Columns:
        return PICKAPIC if self.format in ("parquet", "arrow") else PAIRS

    def columns_of(self, f: int) -> list[str]:
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.files[f]).schema_arrow.names
        if self.format == "arrow":
            return _arrow_reader(self.files[f]).schema.names
        return list(dict.fromkeys(k for row in self._line_rows(f) for k in row))

    def num_rows(self, f: int) -> int:
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.files[f]).metadata.num_rows
        if self.format == "arrow":
            return sum(b.num_rows for b in _arrow_reader(self.files[f]))
        return len(self._line_rows(f))

    def rows(self, f: int, start: int, names: list[str]) -> Iterator[tuple[int, dict]]:
        """(row number, {name: value}) of file f from row ``start`` on, one record batch in memory at a time."""
        if self.format in ("jsonl", "csv", "json"):
            rows = self._line_rows(f)
            for r in range(start, len(rows)):
                yield r, {k: rows[r].get(k) for k in names}
            return
        if self.format == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(self.files[f])
            row, groups = 0, []
            for g in range(pf.metadata.num_row_groups):  # skip the row groups before ``start`` unread
                n = pf.metadata.row_group(g).num_rows
                if row + n > start:
                    groups.append(g)
                else:
                    row += n
            batches = pf.iter_batches(batch_size=256, row_groups=groups, columns=names) if groups else []
        else:
            row, batches = 0, _arrow_reader(self.files[f])
        for batch in batches:
            if row + batch.num_rows <= start:
                row += batch.num_rows
                continue
            cols = {c: batch.column(c).to_pylist() for c in names}
            for k in range(batch.num_rows):
                if row + k >= start:
                    yield row + k, {c: cols[c][k] for c in names}
            row += batch.num_rows

    def _line_rows(self, f: int) -> list[dict]:
        if f not in self._lines:
            self._lines = {f: _read_line_file(self.files[f], self.format)}  # one file held at a time
        return self._lines[f]


def _arrow_reader(path: Path):
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(str(path)))


def _read_line_file(path: Path, fmt: str) -> list[dict]:
    if fmt == "csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    if fmt == "json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not JSON ({e})") from e
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: a JSON input is a list of objects, one per row")
        return rows
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {i + 1} is not JSON ({e})") from e
    return rows


def open_source(path: str | Path) -> Source:
    """The format and files of ``path``: a parquet file or folder, a ``save_to_disk`` folder, an ``.arrow`` file,
    or a JSONL/CSV/JSON file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path}")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in LINE_FORMATS:
            return Source(path, LINE_FORMATS[suffix], [path])
        if suffix in (".parquet", ".arrow"):
            return Source(path, suffix[1:], [path])
        raise DataError(
            f"{path}: unknown data format {suffix!r} (parquet, a save_to_disk folder, .arrow, .jsonl, .csv, .json)"
        )
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(
            f"{path} is a datasets DatasetDict with splits {', '.join(splits)}: pass one split's folder, "
            f"e.g. --data {path / (splits[0] if splits else 'train')}"
        )
    if (path / "state.json").exists():
        state = json.loads((path / "state.json").read_text())
        files = [path / d["filename"] for d in state.get("_data_files", [])]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise DataError(f"{path}: the save_to_disk folder lacks its file(s) {missing} (listed in state.json)")
        return Source(path, "arrow", files)
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"no parquet shards under {path} (nor a save_to_disk folder: no state.json); a pair file is "
            "passed as the file itself (.jsonl, .csv, .json)"
        )
    return Source(path, "parquet", files)


def pickapic_files(path: str | Path) -> list[Path]:
    return open_source(path).files


def row_offsets(path: str | Path) -> list[int]:
    """Cumulative row counts of the input's files (parquet metadata, Arrow batch headers or lines), read without
    touching the images: ``offsets[f] + row`` numbers a cursor (f, row, ...) globally, for progress bars."""
    src = open_source(path)
    out = [0]
    for f in range(len(src.files)):
        out.append(out[-1] + src.num_rows(f))
    return out


def describe_source(path: str | Path, columns: Columns | None = None, pairs_from_ranking: str = "all") -> dict:
    """What the cache records of its input: the path, format, column mapping and (ranked lists) the pair rule."""
    src = open_source(path)
    cols = columns or src.default_columns
    out = dict(path=str(Path(path).resolve()), format=src.format, columns=cols.roles())
    if cols.style == "ranked":
        out["pairs_from_ranking"] = pairs_from_ranking
    return out


# --------------------------------------------------------------------------------------------------
# Rows to pairs
# --------------------------------------------------------------------------------------------------


class SkipCounts(Counter):
    """Skipped rows by cause, and where each cause was first seen (``first``)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.first: dict[str, str] = {}

    def add(self, cause: str, where: str, n: int = 1) -> None:
        self[cause] += n
        self.first.setdefault(cause, where)

    def summary(self) -> str:
        """``tie dropped 2; undecodable image 1 (first: a.parquet row 5)``, or ``none``."""
        parts = []
        for cause, n in sorted(self.items()):
            where = self.first.get(cause)
            parts.append(f"{cause} {n}" + (f" (first: {where})" if where and cause != TIE_DROPPED else ""))
        return "; ".join(parts) or "none"


class _Skip(Exception):
    def __init__(self, cause: str, detail: str = ""):
        super().__init__(cause)
        self.cause, self.detail = cause, detail


@dataclass
class SkippedRows:
    """``n`` rows (a row, or a file's rows) that failed before decoding, under ``cause``; ``strict_message``: what
    strict mode says instead of the generic line."""

    cause: str
    where: str
    n: int = 1
    strict_message: str | None = None


@dataclass
class RowToDecode:
    """A row whose images are to be decoded: its candidate pairs (winner value, loser value, tie) from ``first`` on,
    the folder relative paths start from, and the read cursor after each candidate. ``job``: its decode (a future
    of ``decode_row``, or None until started)."""

    where: str
    caption: str
    candidates: list
    first: int
    keep_ties: bool
    base: Path
    cursors: list
    job: object = None


@dataclass
class DecodedPair:
    images: tuple  # (winner, loser) PIL images
    tie: bool
    cursor: tuple[int, int, int]


TIE_DROPPED = "tie dropped"  # a decode outcome (and the skip cause): a tie left out without keep_ties


def _skip(counts: Counter, strict: bool, cause: str, where: str, n: int = 1) -> None:
    if strict:
        raise DataError(f"{where}: {cause} (strict mode; without --strict such rows are skipped and counted)")
    if isinstance(counts, SkipCounts):
        counts.add(cause, where, n)
    else:
        counts[cause] += n


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def load_image(value, base: Path) -> Image.Image:
    """An image value: encoded bytes, a ``{"bytes", "path"}`` struct (bytes first), or a path relative to
    ``base``. Raises ``_Skip`` with the cause."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        file = base / value
        if not file.is_file():
            raise _Skip("missing file", f" ({value})")
        value = file.read_bytes()
    if not isinstance(value, (bytes, bytearray)):
        raise _Skip("undecodable image", f" (a {type(value).__name__}, not bytes, a struct or a path)")
    try:
        return _decode(value)
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds
        raise _Skip("undecodable image", f" ({type(e).__name__})") from e


def _load_once(decoded: dict, value, base: Path) -> Image.Image:
    """``load_image`` of a value seen before in this row: the image (or its ``_Skip``) it gave then."""
    if id(value) not in decoded:
        try:
            decoded[id(value)] = load_image(value, base)
        except _Skip as s:
            decoded[id(value)] = s
    if isinstance(decoded[id(value)], _Skip):
        raise decoded[id(value)]
    return decoded[id(value)]


def _label_order(v: dict, cols: Columns) -> tuple[tuple[str, str], bool]:
    try:
        labels = (float(v[cols.label_0]), float(v[cols.label_1]))
    except (TypeError, ValueError) as e:
        raise _Skip("unknown label", f" (labels {v[cols.label_0]!r}, {v[cols.label_1]!r})") from e
    if labels == (0.5, 0.5):
        return (cols.image_0, cols.image_1), True
    if labels == (1.0, 0.0):
        return (cols.image_0, cols.image_1), False
    if labels == (0.0, 1.0):
        return (cols.image_1, cols.image_0), False
    raise _Skip("unknown label", f" (labels {labels})")


def _candidates(v: dict, cols: Columns, rule: str) -> list[tuple[object, object, bool]]:
    """One row's candidate pairs as (winner value, loser value, tie), before tie filtering and decoding."""
    if cols.style == "pairs":
        return [(v[cols.winner], v[cols.loser], False)]
    if cols.style == "labels":
        (w, l), tie = _label_order(v, cols)
        return [(v[w], v[l], tie)]
    images, keys = v[cols.images], v[cols.ranking or cols.scores]
    if isinstance(images, str) or isinstance(keys, str):
        images, keys = (json.loads(x) if isinstance(x, str) else x for x in (images, keys))
    if not isinstance(images, list) or not isinstance(keys, list) or len(images) != len(keys):
        raise _Skip(
            "bad ranking", f" ({cols.images!r} and {cols.ranking or cols.scores!r} are not lists of one length)"
        )
    try:
        keys = [float(k) if cols.ranking else -float(k) for k in keys]
    except (TypeError, ValueError) as e:
        raise _Skip("bad ranking", f" (not numbers: {keys!r})") from e
    if len(images) < 2:
        raise _Skip("fewer than 2 images", "")
    return [(images[a], images[b], tie) for a, b, tie in ranked_pairs(keys, rule)]


# threads that decode (iter_pairs) and preprocess (the cache's encode_pairs) images; RPO_FAST_DECODE_THREADS sets it
DECODE_THREADS = int(os.environ.get("RPO_FAST_DECODE_THREADS") or min(8, os.cpu_count() or 1))


def iter_pairs(
    path: str | Path,
    *,
    columns: Columns | None = None,
    pairs_from_ranking: str = "all",
    keep_ties: bool = False,
    strict: bool = False,
    counts: Counter | None = None,
    rank: int = 0,
    world: int = 1,
    start: tuple[int, ...] = (0, 0, 0),
    first_index: int = 0,
    decode_threads: int | None = None,
) -> Iterator[RawPair]:
    """Usable pairs of an input (``open_source``) read with ``columns`` (default: the format's), from cursor
    ``start`` on.

    ``counts`` (a Counter; a ``SkipCounts`` also keeps where each cause was first seen) receives the skipped rows
    by cause. A file that lacks a column skips its rows under the cause "missing column 'NAME'". ``first_index``
    numbers the first pair yielded (a resumed read continues the numbering).

    Images are decoded by ``decode_threads`` threads (default ``DECODE_THREADS``; 0: on the caller's thread), a
    window of rows ahead of the one being yielded (PIL releases the GIL while it decodes). Everything else stays in
    row order on the caller's thread: the pairs, their numbering, and the skip counts, which hold only the rows up to
    the last pair yielded, as with 0 threads (the cache records them with each shard)."""
    from concurrent.futures import ThreadPoolExecutor

    counts = Counter() if counts is None else counts
    threads = DECODE_THREADS if decode_threads is None else decode_threads
    pool = ThreadPoolExecutor(threads, thread_name_prefix="rpo_fast-decode") if threads > 0 else None
    window = collections.deque()  # rows read ahead, in row order: SkippedRows and RowToDecode
    items = _row_items(path, columns, pairs_from_ranking, keep_ties, rank, world, tuple(start))
    index = first_index
    try:
        while True:
            while len(window) < max(1, 4 * threads):  # read ahead
                item = next(items, None)
                if item is None:
                    break
                if isinstance(item, RowToDecode) and pool:  # its decode starts now (no pool: when it is reached)
                    item.job = pool.submit(decode_row, item)
                window.append(item)
            if not window:
                return
            item = window.popleft()
            if isinstance(item, SkippedRows):
                if strict and item.strict_message:
                    raise DataError(item.strict_message)
                _skip(counts, strict, item.cause, item.where, item.n)
                continue
            for outcome in item.job.result() if pool else decode_row(item):
                if outcome == TIE_DROPPED:
                    counts[TIE_DROPPED] += 1
                elif isinstance(outcome, _Skip):
                    _skip(counts, strict, outcome.cause, item.where + outcome.detail)
                else:
                    (w, l) = outcome.images
                    yield RawPair(index, item.caption, w, l, outcome.tie, outcome.cursor)
                    index += 1
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _row_items(path, columns, pairs_from_ranking, keep_ties, rank, world, start):
    """This rank's rows of ``iter_pairs`` in order, undecoded: ``SkippedRows`` for a row (or a file's rows) that
    fails before decoding, ``RowToDecode`` for a row whose images are to be decoded."""
    src = open_source(path)
    cols = columns or src.default_columns
    if cols.style == "ranked" and src.format == "csv":
        raise DataError(f"{src.path}: ranked lists need JSON, JSONL, parquet or Arrow (a CSV cell holds no list)")
    names = list(dict.fromkeys(cols.roles().values()))
    start = start + (0,) * (3 - len(start))  # caches of before 0.3 kept (file, row)
    g = sum(src.num_rows(f) for f in range(start[0]))  # global raw row index
    line = src.format in LINE_FORMATS.values()
    for fi in range(start[0], len(src.files)):
        file, first, n_rows = src.files[fi], start[1] if fi == start[0] else 0, src.num_rows(fi)
        have = src.columns_of(fi)
        missing = [c for c in names if c not in have]
        if missing:
            owned = sum(1 for r in range(first, n_rows) if (g + r) % world == rank)
            if owned:
                where = f"{file.name}; its columns are {', '.join(have)} (map others with --columns)"
                strict_error = f"no column {missing[0]!r} in {where} (strict mode)"
                yield SkippedRows(f"missing column {missing[0]!r}", where, owned, strict_error)
            g += n_rows
            continue
        for r, v in src.rows(fi, first, names):
            if (g + r) % world != rank:
                continue
            where = f"{file.name} {'line' if src.format == 'jsonl' else 'row'} {r + 1 if line else r}"
            absent = [c for c in names if v[c] is None or v[c] == ""]
            if absent:
                yield SkippedRows(f"missing value in {absent[0]!r}", where)
                continue
            try:
                cands = _candidates(v, cols, pairs_from_ranking)
            except _Skip as s:
                yield SkippedRows(s.cause, where + s.detail)
                continue
            first_k = start[2] if (fi, r) == start[:2] else 0
            cursors = [(fi, r, k + 1) if k + 1 < len(cands) else (fi, r + 1, 0) for k in range(len(cands))]
            yield RowToDecode(where, str(v[cols.caption]), cands, first_k, keep_ties, file.parent, cursors)
        g += n_rows


def decode_row(row: RowToDecode) -> list:
    """One row's candidates from ``row.first`` on, decoded (each image once), in order: ``TIE_DROPPED``, a ``_Skip``
    (its cause), or a ``DecodedPair``."""
    decoded: dict = {}  # a ranked list's images, decoded once per row
    out = []
    for k in range(row.first, len(row.candidates)):
        w, l, tie = row.candidates[k]
        if tie and not row.keep_ties:
            out.append(TIE_DROPPED)
            continue
        try:
            images = tuple(_load_once(decoded, x, row.base) for x in (w, l))
        except _Skip as s:
            out.append(s)
            continue
        out.append(DecodedPair(images, tie, row.cursors[k]))
    return out
