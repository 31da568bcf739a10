"""Style alignment: the set builder (schema, orientation, resume), the Fréchet distance, the style score."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rpo_fast import evaluate as E
from rpo_fast import testing as T
from rpo_fast.data.style import STYLES, build_style_set


@pytest.fixture(scope="module")
def editor(tmp_path_factory):
    return T.save_tiny_instruct_pix2pix(tmp_path_factory.mktemp("ip2p") / "ip2p")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src")
    T.write_pickapic_shard(folder / "a.parquet", T.pickapic_rows(8, tie_every=4, size=(40, 36)))
    return folder


def test_builder_writes_pickapic_rows_styled_first_and_resumes(src, editor, tmp_path):
    out = tmp_path / "vangogh"
    kw = dict(limit=5, resolution=32, shard_size=2, batch_size=1, progress=False)
    summary = build_style_set(src, "vangogh", editor, out, **kw)
    shards = sorted(out.glob("train-*.parquet"))
    assert [s.name for s in shards] == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    assert summary["rows"] == 5
    table = pq.read_table(out)
    assert table.schema.remove_metadata().equals(T.pickapic_schema())
    assert table["label_0"].to_pylist() == [1.0] * 5 and table["label_1"].to_pylist() == [0.0] * 5
    assert set(table["model_0"].to_pylist()) == {"instruct-pix2pix:vangogh"}
    assert table["best_image_uid"].to_pylist() == table["image_0_uid"].to_pylist()
    # jpg_1 is the original winner (preprocessed to 32px); jpg_0 the edit of it
    from rpo_fast import data as D

    winners = list(D.iter_pairs(src))[:5]
    for k, pair in enumerate(winners):
        original = np.asarray(Image.open(io.BytesIO(table["jpg_1"][k].as_py())), dtype=float)
        expected = (D.preprocess(pair.winner, 32)[0].permute(1, 2, 0).numpy() + 1) * 127.5
        assert np.abs(original - expected).mean() < 3  # JPEG round trip
        assert table["caption"][k].as_py() == pair.caption
        assert Image.open(io.BytesIO(table["jpg_0"][k].as_py())).size == (32, 32)
    meta = json.loads(pq.read_schema(shards[0]).metadata[b"rpo_fast"])
    assert meta["settings"]["instruction"] == STYLES["vangogh"]["instruction"]
    recorded = json.loads((out / "_style.json").read_text())
    assert recorded["settings"]["image_guidance_scale"] == 1.5 and "styled (winner" in recorded["orientation"]

    # resume: nothing redone; a lost last shard is rebuilt byte for byte
    stamps = {s: s.stat().st_mtime_ns for s in shards}
    build_style_set(src, "vangogh", editor, out, **kw)
    assert {s: s.stat().st_mtime_ns for s in shards} == stamps
    last = shards[-1].read_bytes()
    shards[-1].unlink()
    build_style_set(src, "vangogh", editor, out, **kw)
    assert shards[-1].read_bytes() == last
    with pytest.raises(ValueError, match="other settings"):
        build_style_set(src, "vangogh", editor, out, **{**kw, "resolution": 64})
    with pytest.raises(ValueError, match="--style must be one of"):
        build_style_set(src, "cubism", editor, tmp_path / "x", **kw)


def test_frechet_distance_equals_direct_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (300, 6)) @ rng.normal(0, 1, (6, 6))
    b = rng.normal(0.5, 1, (250, 6)) @ rng.normal(0, 1, (6, 6))
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a.T), np.cov(b.T)
    # Tr((S_a S_b)^1/2) = sum of the square roots of the eigenvalues of S_a S_b (real and non-negative)
    eig = np.linalg.eigvals(s_a @ s_b)
    direct = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.sqrt(eig.real.clip(min=0)).sum()
    assert abs(E.frechet_distance(a, b) - direct) < 1e-8 * abs(direct)
    assert abs(E.frechet_distance(a, a)) < 1e-8
    lo, hi = E.bootstrap_interval(E.frechet_distance, a, b, n=50)
    assert lo < E.frechet_distance(a, b) < hi


def test_style_score_and_clip_fid_follow_their_formulas(tmp_path):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from rpo_fast.embed import CLIPEmbedder

    clip_dir = T.save_tiny_clip(tmp_path / "clip")
    rng = np.random.default_rng(0)
    base = [T.random_image(rng, 32) for _ in range(12)]
    tuned = [T.random_image(rng, 32) for _ in range(12)]
    refs = [T.random_image(rng, 32) for _ in range(15)]
    got = E.style_metrics(base, tuned, refs, style="winter", clip=CLIPEmbedder(clip_dir), n_boot=30)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    proc, tok = CLIPImageProcessor.from_pretrained(clip_dir), CLIPTokenizer.from_pretrained(clip_dir)

    def img(ims):
        px = proc(images=ims, return_tensors="pt").pixel_values
        with torch.no_grad():
            return F.normalize(model.get_image_features(pixel_values=px).pooler_output, dim=-1).numpy()

    ids = tok([STYLES["winter"]["description"]], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        txt = F.normalize(model.get_text_features(**ids).pooler_output, dim=-1).numpy()[0]
    for name, ims in (("base", base), ("tuned", tuned)):
        assert abs(got[name]["style_score"] - float((100 * img(ims) @ txt).mean())) < 1e-3
        assert abs(got[name]["clip_fid"] - E.frechet_distance(img(ims), img(refs))) < 1e-4
        assert got[name]["clip_fid_low"] <= got[name]["clip_fid_high"]
    assert got["references"] == 15 and got["description"] == STYLES["winter"]["description"]


def test_evaluate_reports_style_alignment(tiny_sd15, src, editor, tmp_path):
    from diffusers import UNet2DConditionModel

    refs = tmp_path / "refs"
    build_style_set(src, "sketch", editor, refs, limit=4, resolution=32, shard_size=4, batch_size=2, progress=False)
    clip_dir = T.save_tiny_clip(tmp_path / "clip")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    unet.save_pretrained(tmp_path / "tuned")
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    s = E.evaluate(
        tiny_sd15,
        tmp_path / "p.txt",
        tmp_path / "eval",
        unet=tmp_path / "tuned",
        steps=2,
        progress=False,
        style="sketch",
        style_refs=refs,
        style_clip=clip_dir,
        inception="/none.pth",
    )
    assert s["style"]["references"] == 4 and set(s["style"]["base"]) >= {"clip_fid", "style_score"}
    assert s["style"]["inception_fid"].startswith("not computed")  # no pytorch-fid / torchvision here
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "Style alignment: sketch" in html and "CLIP-FID" in html
    with pytest.raises(ValueError, match="--style needs --style-refs"):
        E.evaluate(tiny_sd15, tmp_path / "p.txt", tmp_path / "e2", unet=tmp_path / "tuned", style="sketch")
