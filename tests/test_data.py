"""Readers, preprocessing, embeddings and the sampler."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rpo_fast import data as D
from rpo_fast import testing as T
from rpo_fast.data.loader import PairSampler
from rpo_fast.embed import CLIPEmbedder, combine, load_embedder


def _solid(color, size=(40, 32)):
    return T.encode_image(Image.new("RGB", size, color), "PNG")


def _color(img):
    return tuple(int(v) for v in np.asarray(img)[0, 0])


def _rows_with_colors(labels):
    rows = T.pickapic_rows(len(labels), tie_every=0)
    for i, (row, lab) in enumerate(zip(rows, labels)):
        row["jpg_0"], row["jpg_1"] = _solid((200, 0, 0)), _solid((0, 0, 200))
        row["label_0"], row["label_1"] = lab
        row["caption"] = f"caption {i}"
    return rows


def test_winner_first_and_ties_dropped(tmp_path):
    rows = _rows_with_colors([(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.0, 1.0)])
    T.write_pickapic_shard(tmp_path / "a.parquet", rows)
    counts = {}
    from collections import Counter

    counts = Counter()
    pairs = list(D.iter_pairs(tmp_path, counts=counts))
    assert [p.caption for p in pairs] == ["caption 0", "caption 1", "caption 3"]
    assert [(_color(p.winner), _color(p.loser)) for p in pairs] == [
        ((200, 0, 0), (0, 0, 200)),
        ((0, 0, 200), (200, 0, 0)),
        ((0, 0, 200), (200, 0, 0)),
    ]
    assert counts == {"tie dropped": 1}
    assert [p.index for p in pairs] == [0, 1, 2]
    kept = list(D.iter_pairs(tmp_path, keep_ties=True))
    assert [p.tie for p in kept] == [False, False, True, False]


def test_bad_rows_are_counted_or_refused(tmp_path):
    rows = T.pickapic_rows(8, tie_every=4, corrupt=(1, 5))
    rows[6]["label_0"] = 0.7
    T.write_pickapic_shard(tmp_path / "d" / "a.parquet", rows)
    T.write_pickapic_shard(tmp_path / "d" / "b.parquet", T.pickapic_rows(3, seed=1), drop_columns=("label_1",))
    from collections import Counter

    counts = Counter()
    pairs = list(D.iter_pairs(tmp_path / "d", counts=counts))
    assert len(pairs) == 3  # rows 0, 2, 4
    assert counts == {"undecodable image": 2, "tie dropped": 2, "unknown label": 1, "missing column 'label_1'": 3}
    with pytest.raises(D.DataError, match="undecodable image"):
        list(D.iter_pairs(tmp_path / "d", strict=True))


def test_missing_column_is_refused_in_strict_mode(tmp_path):
    T.write_pickapic_shard(tmp_path / "a.parquet", T.pickapic_rows(3), drop_columns=("caption",))
    with pytest.raises(D.DataError, match="no column 'caption' in a.parquet; its columns are jpg_0, jpg_1, label_0"):
        list(D.iter_pairs(tmp_path, strict=True))


def test_own_jsonl_and_csv(tmp_path):
    path = T.write_pairs_jsonl(tmp_path / "own", 4)
    lines = path.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["loser"] = "images/none.png"
    lines[2] = json.dumps(bad)
    path.write_text("\n".join(lines) + "\n")
    from collections import Counter

    counts = Counter()
    pairs = list(D.iter_pairs(path, counts=counts))
    assert [p.caption for p in pairs] == ["own pair 0", "own pair 1", "own pair 3"]
    assert counts == {"missing file": 1}
    with pytest.raises(D.DataError, match="missing file"):
        list(D.iter_pairs(path, strict=True))
    csv = tmp_path / "own" / "pairs.csv"
    csv.write_text(
        "caption,winner,loser\n" + "\n".join(f"c{i},images/{i:05d}_w.png,images/{i:05d}_l.png" for i in (0, 1))
    )
    assert [p.caption for p in D.iter_pairs(csv)] == ["c0", "c1"]
    assert D.row_offsets(csv) == [0, 2]


def test_ranks_split_rows_round_robin(tmp_path):
    T.write_pickapic_shard(tmp_path / "a.parquet", T.pickapic_rows(7, tie_every=0))
    T.write_pickapic_shard(tmp_path / "b.parquet", T.pickapic_rows(6, seed=1, tie_every=0))
    every = [p.caption for p in D.iter_pairs(tmp_path)]
    parts = [[p.caption for p in D.iter_pairs(tmp_path, rank=r, world=3)] for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(every) and len(every) == 13


def test_resume_from_cursor(tmp_path):
    T.write_pickapic_shard(tmp_path / "a.parquet", T.pickapic_rows(5, tie_every=3))
    T.write_pickapic_shard(tmp_path / "b.parquet", T.pickapic_rows(5, seed=1, tie_every=3))
    every = list(D.iter_pairs(tmp_path))
    k = 3
    rest = list(D.iter_pairs(tmp_path, start=every[k - 1].cursor, first_index=k))
    assert [(p.index, p.caption) for p in rest] == [(p.index, p.caption) for p in every[k:]]


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------


def test_preprocess_resize_center_crop_flip():
    arr = np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8)  # h=32, w=40
    img = Image.fromarray(arr)
    x, crop = D.preprocess(img, 16, crop="center")
    ref = img.resize((20, 16), Image.BILINEAR).crop((2, 0, 18, 16))
    expected = torch.from_numpy(np.asarray(ref, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.equal(x, expected) and x.shape == (3, 16, 16)
    assert crop.original_size == (32, 40) and crop.top_left == (0, 2)
    assert crop.time_ids(16) == [32.0, 40.0, 0.0, 2.0, 16.0, 16.0]
    xf, cf = D.preprocess(img, 16, crop="center", flip=True)
    assert torch.equal(xf, x.flip(-1)) and cf.top_left == (0, 2)
    assert x.min() >= -1 and x.max() <= 1


def test_random_crop_is_seeded_per_pair():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    pair = D.RawPair(7, "c", img, img, False, (0, 0))
    a = D.preprocess_pair(pair, 16, crop="random", flip=True, seed=3, flip_twin=True)
    b = D.preprocess_pair(pair, 16, crop="random", flip=True, seed=3)
    assert torch.equal(a[0][0], b[0][0])  # the twin does not change the chosen variant
    assert torch.equal(a[1][0], a[0][0].flip(-1))  # the twin is the mirror
    offsets = {
        D.preprocess_pair(D.RawPair(i, "c", img, img, False, (0, 0)), 16, crop="random", flip=False, seed=3)[0][1][
            0
        ].top_left
        for i in range(20)
    }
    assert len(offsets) > 3 and all(0 <= left <= round(50 * 16 / 30) - 16 for _, left in offsets)


# --------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------


def test_embedding_modes_have_unit_norm_and_stated_form():
    g = torch.Generator().manual_seed(0)
    text, image = torch.randn(5, 12, generator=g) * 3, torch.randn(5, 12, generator=g)
    for mode in ("text", "image", "multimodal"):
        e = combine(text, image, mode)
        assert e.shape == (5, 12)
        assert torch.allclose(e.norm(dim=-1), torch.ones(5), atol=1e-6)
    mm = combine(text, image, "multimodal")
    manual = text / text.norm(dim=-1, keepdim=True) + image / image.norm(dim=-1, keepdim=True)
    assert torch.allclose(mm, manual / manual.norm(dim=-1, keepdim=True), atol=1e-6)
    with pytest.raises(ValueError, match="embedding mode"):
        combine(text, image, "audio")


def test_clip_embedder_matches_clip_model(tmp_path):
    from transformers import CLIPModel, CLIPTokenizer

    path = T.save_tiny_clip(tmp_path / "clip")
    emb = load_embedder(str(path))
    assert isinstance(emb, CLIPEmbedder)
    images = [T.random_image(np.random.default_rng(i), (40, 30)) for i in range(3)]
    caps = ["a red circle", "a blue square", ""]
    ei, et = emb.encode_images(images), emb.encode_texts(caps)
    assert ei.shape == (3, 16) and et.shape == (3, 16)
    model = CLIPModel.from_pretrained(path).eval()
    tok = CLIPTokenizer.from_pretrained(path)
    ids = tok(caps, padding="max_length", max_length=77, return_tensors="pt")
    px = emb.processor(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=px)
    assert torch.allclose(torch.nn.functional.normalize(ei, dim=-1), out.image_embeds, atol=1e-5)
    assert torch.allclose(torch.nn.functional.normalize(et, dim=-1), out.text_embeds, atol=1e-5)


def test_embedder_spec_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such CLIP folder"):
        load_embedder(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="cannot import"):
        load_embedder("rpo_fast.nothing:factory")


# --------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------


def test_sampler_covers_each_pair_once_per_epoch_and_resumes():
    n = 23
    ranks = [PairSampler(n, seed=5, rank=r, world=2) for r in range(2)]
    epoch = [p.index for s in ranks for p in s.next_batch(11)]
    assert len(set(epoch)) == 22  # 11 each, disjoint, the tail of one dropped
    s = PairSampler(n, seed=5, twins=True)
    straight = s.next_batch(7) + s.next_batch(30)
    a = PairSampler(n, seed=5, twins=True)
    first = a.next_batch(7)
    state = json.loads(json.dumps(a.state_dict()))
    b = PairSampler(n, seed=5, twins=True)
    b.load_state_dict(state)
    assert first + b.next_batch(30) == straight
    assert {p.index for p in straight[:23]} == set(range(23)) and {p.epoch for p in straight} == {0, 1}
    assert [p.epoch for p in straight].index(1) == 23  # each pick names the epoch it falls in
    assert any(p.flip for p in straight) and not all(p.flip for p in straight)
    with pytest.raises(ValueError, match="sampler state"):
        PairSampler(n + 1, seed=5).load_state_dict(state)


def test_decode_threads_change_nothing_but_speed(tmp_path):
    """The same mixed input (undecodable images, ties, an unknown label, a file missing a column) read with 0, 1 and
    4 decode threads: the same pairs (pixels, captions, indices, cursors, ties) in the same order, and after each
    pair the same skip counts and first-seen places (the counts hold only the rows up to the pair yielded); strict
    mode stops at the same row; a read resumed from a cursor continues alike (a read-ahead window that counted the
    rows it had read, not the rows yielded, would show in the snapshots)."""
    rows = T.pickapic_rows(12, tie_every=4, corrupt=(1, 5, 9))
    rows[6]["label_0"] = 0.7
    T.write_pickapic_shard(tmp_path / "d" / "a.parquet", rows)
    T.write_pickapic_shard(tmp_path / "d" / "b.parquet", T.pickapic_rows(3, seed=1), drop_columns=("label_1",))
    T.write_pickapic_shard(tmp_path / "d" / "c.parquet", T.pickapic_rows(5, seed=2, tie_every=2))

    def read(threads, **kw):
        counts, seen = D.SkipCounts(), []
        for p in D.iter_pairs(tmp_path / "d", counts=counts, decode_threads=threads, **kw):
            pixels = (np.asarray(p.winner).tobytes(), np.asarray(p.loser).tobytes())
            seen.append((p.index, p.caption, p.tie, p.cursor, pixels, dict(counts), dict(counts.first)))
        return seen, dict(counts)

    want = read(0)
    assert len(want[0]) >= 5 and want[1]["undecodable image"] == 3 and want[1]["missing column 'label_1'"] == 3
    assert want[0][0][5] != want[1]  # the counts grow along the read: the per-pair snapshots test something
    for threads in (1, 4):
        assert read(threads) == want, threads
    k = 3
    cursor = want[0][k - 1][3]
    resumed = [read(t, start=cursor, first_index=k)[0] for t in (0, 4)]
    assert [r[:5] for r in resumed[0]] == [r[:5] for r in want[0][k:]] and resumed[0] == resumed[1]
    for threads in (0, 4):
        with pytest.raises(D.DataError, match="a.parquet row 1.*undecodable image"):
            list(D.iter_pairs(tmp_path / "d", strict=True, decode_threads=threads))
