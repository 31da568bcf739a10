"""Preference data as it exists: the same pairs in every input format (Pick-a-Pic's parquet, a mirror with other
columns and struct images, a real ``datasets.save_to_disk`` folder, a ranked-list JSON, JSONL, CSV) read alike,
cache to the same bytes and train to the same losses; ranked lists become pairs by a stated rule; every
malformed variant names its file, row or column, or is a counted skip."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from trainrun import ZERO3, launch, train_rows

from rpo_fast import data as D
from rpo_fast import testing as T
from rpo_fast.data.writer import build_cache


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """The same 7 pairs in every format; the save_to_disk folder is written by the real ``datasets`` (the dev
    extra), so this fails, not skips, where it is missing."""
    folder = tmp_path_factory.mktemp("formats")
    pairs = T.preference_pairs(7, size=(40, 36))
    return pairs, T.write_every_format(folder, pairs)


def _read(path, columns, **kw):
    return list(D.iter_pairs(path, columns=D.Columns.parse(columns) if columns else None, **kw))


def _pixels(image):
    return np.asarray(image).tobytes()


def test_every_format_gives_the_same_pairs(formats):
    pairs, written = formats
    assert set(written) == {"pickapic", "mirror", "save_to_disk", "ranked", "jsonl", "csv"}
    want = [
        (p["caption"], _pixels(D.load_image(p["winner"], Path())), _pixels(D.load_image(p["loser"], Path())))
        for p in pairs
    ]
    for name, (path, columns) in written.items():
        got = _read(path, columns)
        assert [(p.caption, _pixels(p.winner), _pixels(p.loser)) for p in got] == want, name
        assert [p.index for p in got] == list(range(len(pairs))) and not any(p.tie for p in got), name
    assert D.open_source(written["save_to_disk"][0]).format == "arrow"  # read with pyarrow, not datasets


@pytest.mark.slow
def test_every_format_caches_to_the_same_bytes(formats, tiny_sd15, tmp_path):
    _, written = formats
    built = {}
    for name, (path, columns) in written.items():
        out = tmp_path / name
        build_cache(tiny_sd15, path, out, resolution=32, shard_size=4, batch_size=2, columns=columns, progress=False)
        built[name] = out
    ref = built["pickapic"]
    names = sorted(p.name for p in ref.glob("*.safetensors"))
    assert names == ["empty_prompt.safetensors", "shard-r0-00000.safetensors", "shard-r0-00001.safetensors"]
    index = {k: json.loads((out / "index.json").read_text()) for k, out in built.items()}
    for name, out in built.items():
        assert sorted(p.name for p in out.glob("*.safetensors")) == names, name
        for f in names:
            assert (out / f).read_bytes() == (ref / f).read_bytes(), (name, f)
        same = {k: v for k, v in index[name].items() if k not in ("data", "created")}
        assert same == {k: v for k, v in index["pickapic"].items() if k not in ("data", "created")}, name
    assert index["mirror"]["data"]["columns"] == D.Columns.parse(T.MIRROR_COLUMNS).roles()
    assert index["ranked"]["data"] | {"path": None} == dict(
        path=None, format="json", columns=D.Columns.parse(T.RANKED_COLUMNS).roles(), pairs_from_ranking="all"
    )


@pytest.mark.slow
def test_every_format_trains_to_the_same_first_losses(formats, runs, tmp_path):
    """Raw --data, encoded on the fly: the first two steps' losses of every format are equal (one process each)."""
    _, written = formats
    losses = {}
    for name in written:
        path, columns = written[name]
        out = tmp_path / name
        args = ["--ds_config", str(ZERO3), "--model", str(runs["sd15"]), "--data", str(path), "--output", str(out)]
        args += ["--resolution", "32", "--objective", "dpo", "--micro-batch-size", "2", "--max-steps", "2"]
        args += ["--log-every", "1", "--no-progress", "--no-export"] + (["--columns", columns] if columns else [])
        res = launch(args, ranks=1)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "| 7 pairs" in res.stdout, res.stdout[-2000:]
        losses[name] = [r["loss/loss"] for _, r in sorted(train_rows(out).items())]
    assert len(losses["pickapic"]) == 2
    assert all(v == losses["pickapic"] for v in losses.values()), losses


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_ranks_train_straight_from_raw_pairs(formats, runs, tmp_path):
    path, columns = formats[1]["mirror"]
    out = tmp_path / "run"
    args = ["--ds_config", str(ZERO3), "--model", str(runs["sd15"]), "--data", str(path), "--output", str(out)]
    args += ["--columns", columns, "--resolution", "32", "--clip", str(runs["clip"]), "--objective", "rpo"]
    args += ["--micro-batch-size", "1", "--max-steps", "2", "--log-every", "1", "--no-progress", "--no-export"]
    res = launch(args, ranks=2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 rank(s) x 1 pairs x 1 accumulation = 2 pairs/step" in res.stdout
    rows = train_rows(out)
    assert sorted(rows) == [1, 2] and all(np.isfinite(r["loss/loss"]) for r in rows.values())


# --------------------------------------------------------------------------------------------------
# Ranked lists
# --------------------------------------------------------------------------------------------------


def test_ranked_pairs_rules():
    ranks = [3, 1, 2, 2]  # image 1 best, then 2 and 3 (tied), then 0
    assert D.ranked_pairs(ranks, "all") == [
        (1, 2, False),
        (1, 3, False),
        (1, 0, False),
        (2, 3, True),
        (2, 0, False),
        (3, 0, False),
    ]
    assert D.ranked_pairs(ranks, "adjacent") == [(1, 2, False), (2, 3, True), (3, 0, False)]
    assert D.ranked_pairs(ranks, "best-vs-rest") == [(1, 2, False), (1, 3, False), (1, 0, False)]
    with pytest.raises(ValueError, match="pairs_from_ranking must be one of"):
        D.ranked_pairs(ranks, "best")


def _ranked_file(tmp_path, rows, name="ranked.jsonl"):
    """JSONL ranked lists whose images are solid colours: image j of row i has red = 10 i + j."""
    from PIL import Image

    (tmp_path / "img").mkdir(exist_ok=True)
    lines = []
    for i, (n, key, values) in enumerate(rows):
        paths = []
        for j in range(n):
            paths.append(f"img/{i}_{j}.png")
            Image.new("RGB", (16, 16), (10 * i + j, 0, 0)).save(tmp_path / paths[-1])
        lines.append(json.dumps({"caption": f"c{i}", "images": paths, key: values}))
    (tmp_path / name).write_text("\n".join(lines) + "\n")
    return tmp_path / name


def _ids(pairs):
    return [(int(np.asarray(p.winner)[0, 0, 0]), int(np.asarray(p.loser)[0, 0, 0])) for p in pairs]


def test_ranked_lists_become_pairs_by_the_rule_and_ties_are_counted(tmp_path):
    path = _ranked_file(tmp_path, [(3, "ranking", [2, 1, 3]), (4, "scores", [0.1, 0.9, 0.5, 0.5]), (1, "ranking", [1])])
    ranking = D.Columns.parse("images=images,ranking=ranking")
    scores = D.Columns.parse("images=images,scores=scores")
    counts = D.SkipCounts()
    got = _ids(D.iter_pairs(path, columns=ranking, counts=counts))
    assert got == [(1, 0), (1, 2), (0, 2)]  # row 0 only: the others lack ranking / have one image
    assert counts == {"missing value in 'ranking'": 1, "fewer than 2 images": 1}
    assert counts.first["fewer than 2 images"] == "ranked.jsonl line 3"
    counts = D.SkipCounts()
    got = _ids(D.iter_pairs(path, columns=scores, pairs_from_ranking="best-vs-rest", counts=counts))
    assert got == [(11, 12), (11, 13), (11, 10)]  # scores: higher is better
    counts = D.SkipCounts()
    adjacent = list(D.iter_pairs(path, columns=scores, pairs_from_ranking="adjacent", counts=counts))
    assert _ids(adjacent) == [(11, 12), (13, 10)] and counts["tie dropped"] == 1  # 12 and 13 are tied
    kept = list(D.iter_pairs(path, columns=scores, pairs_from_ranking="adjacent", keep_ties=True))
    assert _ids(kept) == [(11, 12), (12, 13), (13, 10)] and [p.tie for p in kept] == [False, True, False]


def test_a_ranked_read_resumes_inside_a_row(tmp_path):
    path = _ranked_file(tmp_path, [(4, "ranking", [4, 3, 2, 1]), (3, "ranking", [1, 2, 3])])
    cols = D.Columns.parse("images=images,ranking=ranking")
    every = list(D.iter_pairs(path, columns=cols))
    assert len(every) == 6 + 3
    for k in range(1, len(every)):
        rest = list(D.iter_pairs(path, columns=cols, start=every[k - 1].cursor, first_index=k))
        assert [(p.index, *_ids([p])) for p in rest] == [(p.index, *_ids([p])) for p in every[k:]], k
    assert every[2].cursor == (0, 0, 3) and every[5].cursor == (0, 1, 0)


# --------------------------------------------------------------------------------------------------
# Malformed inputs: a message naming the file, row or column, or a counted skip
# --------------------------------------------------------------------------------------------------


def test_column_mapping_errors():
    with pytest.raises(D.DataError, match="unknown role 'prompt'; roles are caption, winner"):
        D.Columns.parse("prompt=caption")
    with pytest.raises(D.DataError, match="not ROLE=COLUMN"):
        D.Columns.parse("caption")
    with pytest.raises(D.DataError, match="roles of labels and pairs style"):
        D.Columns.parse("winner=a,loser=b,image_0=c")
    with pytest.raises(D.DataError, match="the pairs style also needs loser"):
        D.Columns.parse("winner=a")
    with pytest.raises(D.DataError, match="exactly one of ranking= .* or scores="):
        D.Columns.parse("images=a,ranking=b,scores=c")


def test_a_missing_column_names_the_file_and_its_columns(formats, tmp_path):
    _, written = formats
    path = written["mirror"][0]
    counts = D.SkipCounts()
    assert _read(path, None, counts=counts) == []  # Pick-a-Pic's default names: none of them is there
    assert dict(counts) == {"missing column 'caption'": 7}
    assert counts.summary() == (
        "missing column 'caption' 7 (first: data.parquet; its columns are prompt, first_image, second_image, "
        "first_label, second_label, extra (map others with --columns))"
    )
    with pytest.raises(D.DataError, match=r"no column 'caption' in data.parquet; its columns are prompt, first_im"):
        _read(path, None, strict=True)
    with pytest.raises(D.DataError, match="no column 'label_1' in data.parquet"):
        _read(path, T.MIRROR_COLUMNS.replace("second_label", "label_1"), strict=True)


def test_bad_images_name_the_row(tmp_path):
    import pyarrow.parquet as pq

    pairs = T.preference_pairs(5)
    T.write_mirror_parquet(tmp_path / "m.parquet", pairs)
    table = pq.read_table(tmp_path / "m.parquet").to_pylist()
    table[1]["first_image"] = {"bytes": b"not a png", "path": None}
    table[3]["second_image"] = {"bytes": None, "path": "nowhere.png"}  # a struct with a path only: relative
    table[4]["first_label"] = 2
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(tmp_path / "m.parquet")), tmp_path / "m.parquet")
    counts = D.SkipCounts()
    got = _read(tmp_path / "m.parquet", T.MIRROR_COLUMNS, counts=counts)
    assert [p.caption for p in got] == [pairs[0]["caption"], pairs[2]["caption"]]
    assert dict(counts) == {"undecodable image": 1, "missing file": 1, "unknown label": 1}
    assert counts.first == {
        "undecodable image": "m.parquet row 1 (UnidentifiedImageError)",
        "missing file": "m.parquet row 3 (nowhere.png)",
        "unknown label": "m.parquet row 4 (labels (2.0, 0.0))",
    }
    with pytest.raises(D.DataError, match=r"m.parquet row 1 \(UnidentifiedImageError\): undecodable image"):
        _read(tmp_path / "m.parquet", T.MIRROR_COLUMNS, strict=True)


def test_inputs_refused_with_a_clear_message(formats, tmp_path, tiny_sd15, monkeypatch):
    import datasets

    pairs = T.preference_pairs(2)
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"a": [1]}), "test": datasets.Dataset.from_dict({"a": [2]})}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(
        D.DataError, match=r"DatasetDict with splits train, test: pass one split's folder, e.g. --data .*dd/train"
    ):
        D.open_source(tmp_path / "dd")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(D.DataError, match=r"unknown data format '.txt'"):
        D.open_source(tmp_path / "x.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no parquet shards under .*empty .nor a save_to_disk folder"):
        D.open_source(tmp_path / "empty")
    csv = T.write_pair_file(tmp_path / "csv", pairs, "csv")
    with pytest.raises(D.DataError, match="ranked lists need JSON, JSONL, parquet or Arrow"):
        _read(csv, "images=winner,ranking=loser")

    # nothing usable: one error, before any model loads
    import rpo_fast.data.writer as C

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(C, "PairEncoder", no_model)
    mirror = formats[1]["mirror"][0]
    with pytest.raises(
        D.DataError, match=r"no usable pairs in .*data.parquet: skipped missing column 'caption' 7 \(first"
    ):
        build_cache(tiny_sd15, mirror, tmp_path / "cache", resolution=32, progress=False)
    from rpo_fast.data.dataset import open_dataset
    from rpo_fast.models import load_family

    with pytest.raises(D.DataError, match="no usable pairs in .*data.parquet: skipped missing column 'caption' 7"):
        open_dataset(mirror, family=load_family(tiny_sd15), resolution=32)


def test_cli_names_the_column(formats, tiny_sd15, tmp_path):
    mirror = formats[1]["mirror"][0]
    cmd = [sys.executable, "-m", "rpo_fast.cache", "--model", str(tiny_sd15), "--data", str(mirror)]
    res = subprocess.run(
        cmd + ["--out", str(tmp_path / "c"), "--resolution", "32", "--strict"], capture_output=True, text=True
    )
    assert res.returncode == 2, res.stderr
    assert "python -m rpo_fast.cache: error: no column 'caption' in data.parquet; its columns are prompt" in res.stderr
    assert "Traceback" not in res.stderr


# --------------------------------------------------------------------------------------------------
# Streaming: memory stays flat over many shards
# --------------------------------------------------------------------------------------------------

STREAM = """
import resource, sys
from rpo_fast import data as D
n = 0
for p in D.iter_pairs(sys.argv[1], columns=D.Columns.parse(sys.argv[2])):
    n += 1
print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_memory_stays_flat_while_streaming_shards(tmp_path):
    """200 parquet shards of 16 pairs (images 96x96, ~55 KB of pixels each side) read through: the peak memory of
    the whole stream is within 40 MB of reading 10 of them (holding the pairs read takes ~195 MB more, measured)."""
    pairs = T.preference_pairs(16, size=96)
    one = tmp_path / "one"
    T.write_mirror_parquet(one, pairs, rows_per_file=16)
    many, few = tmp_path / "many", tmp_path / "few"
    for folder, k in ((many, 200), (few, 10)):
        folder.mkdir()
        for i in range(k):
            (folder / f"train-{i:05d}.parquet").symlink_to(one / "train-00000.parquet")
    peak = {}
    for folder, k in ((many, 200), (few, 10)):
        out = subprocess.run(
            [sys.executable, "-c", STREAM, str(folder), T.MIRROR_COLUMNS], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        n, rss_kb = map(int, out.stdout.split())
        assert n == 16 * k
        peak[k] = rss_kb / 1024
    assert peak[200] - peak[10] < 40, peak
