"""Evaluation: prompt readers, statistics, scorers against their formulas on tiny models, deterministic and
resumable sampling, the report."""

import csv
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from browser import CHROMIUM, layout, screenshot
from PIL import Image

from rpo_fast import evaluate as E
from rpo_fast import testing as T
from rpo_fast.models import load_family
from rpo_fast.scorers import ScorerUnavailable, load_scorer


def _images(n, seed=0, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return [T.random_image(rng, size) for _ in range(n)]


# --------------------------------------------------------------------------------------------------
# Prompt sets
# --------------------------------------------------------------------------------------------------


def test_prompt_readers(tmp_path):
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\na red cube\tObjects\na dog\tAnimals\n")
    assert E.read_prompts(tmp_path / "parti.tsv") == ["a red cube", "a dog"]
    (tmp_path / "parti.csv").write_text('Prompt,Challenge\n"a cat, sitting",Basic\n')
    assert E.read_prompts(tmp_path / "parti.csv") == ["a cat, sitting"]
    hps = tmp_path / "hps"
    hps.mkdir()
    (hps / "anime.json").write_text(json.dumps(["an anime girl", "a robot"]))
    (hps / "photo.json").write_text(json.dumps(["a photo of a lake"]))
    assert E.read_prompts(hps) == ["an anime girl", "a robot", "a photo of a lake"]
    assert E.read_prompts(hps / "photo.json") == ["a photo of a lake"]
    T.write_pickapic_shard(tmp_path / "test.parquet", T.pickapic_rows(4, captions=["x", "y"]))
    assert E.read_prompts(tmp_path / "test.parquet") == ["x", "y"]
    pairs = T.preference_pairs(4)
    mirror = T.write_mirror_parquet(tmp_path / "mirror.parquet", pairs)  # its captions are in 'prompt'
    assert E.read_prompts(mirror) == list(dict.fromkeys(p["caption"] for p in pairs))
    T.write_pickapic_shard(tmp_path / "nocap.parquet", T.pickapic_rows(2), drop_columns=("caption",))
    with pytest.raises(
        ValueError, match="nocap.parquet: no prompt column .caption, prompt, text.; its columns are jpg_0"
    ):
        E.read_prompts(tmp_path / "nocap.parquet")
    (tmp_path / "p.txt").write_text("one\n\n two \nthree\n")
    assert E.read_prompts(tmp_path / "p.txt", limit=2) == ["one", "two"]
    with pytest.raises(ValueError, match="'Prompt' column"):
        (tmp_path / "bad.tsv").write_text("Text\nx\n")
        E.read_prompts(tmp_path / "bad.tsv")
    with pytest.raises(FileNotFoundError):
        E.read_prompts(tmp_path / "none.txt")


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def test_wilson_and_t_intervals_match_direct_computation():
    from scipy import stats

    z = stats.norm.ppf(0.975)
    for wins, n in ((0, 10), (7.5, 20), (150, 200), (200, 200)):
        p = wins / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        lo, hi = E.wilson_interval(wins, n)
        assert abs(lo - (centre - half)) < 1e-12 and abs(hi - (centre + half)) < 1e-12
    x = np.random.default_rng(0).normal(3, 2, 37)
    m, lo, hi = E.mean_interval(x)
    ref = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert abs(m - x.mean()) < 1e-12 and abs(lo - ref[0]) < 1e-10 and abs(hi - ref[1]) < 1e-10


def test_paired_win_rate_counts_ties_half():
    base = np.array([1.0, 2.0, 3.0, 4.0])
    tuned = np.array([2.0, 2.0, 1.0, 5.0])  # win, tie, loss, win
    c = E.compare("m", base, tuned)
    assert c.win_rate == 2.5 / 4 and (c.win_low, c.win_high) == E.wilson_interval(2.5, 4)
    assert c.base_mean == 2.5 and c.tuned_mean == 2.5


# --------------------------------------------------------------------------------------------------
# Scorers, each against a hand-written computation on a tiny model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return T.save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _clip_features(path, images, prompts):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(path).eval()
    px = CLIPImageProcessor.from_pretrained(path)(images=images, return_tensors="pt").pixel_values
    ids = CLIPTokenizer.from_pretrained(path)(prompts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=px)
    return model, out.image_embeds, out.text_embeds  # both L2-normalised by CLIPModel


def test_pickscore_and_clipscore_formulas(clip_dir):
    images, prompts = _images(3), ["a red circle", "a blue square", "green"]
    model, img, txt = _clip_features(clip_dir, images, prompts)
    cos = (img * txt).sum(-1)
    pick = load_scorer(f"pickscore={clip_dir}").score(images, prompts)
    assert torch.allclose(pick, model.logit_scale.exp().detach() * cos, atol=1e-4)
    clip = load_scorer(f"clipscore={clip_dir}").score(images, prompts)
    assert torch.allclose(clip, 100 * cos.clamp_min(0), atol=1e-3)


def test_aesthetic_formula(clip_dir, tmp_path):
    from rpo_fast.scorers.aesthetic import aesthetic_mlp

    torch.manual_seed(1)
    mlp = aesthetic_mlp(16)
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, tmp_path / "mlp.pth")
    images = _images(4)
    _, img, _ = _clip_features(clip_dir, images, ["x"] * 4)
    x = img.double()
    for i in (0, 2, 4, 6, 7):  # Linear layers; dropout is identity at inference, no activations
        layer = mlp[i]
        x = x @ layer.weight.double().T + layer.bias.double()
    got = load_scorer(f"aesthetic={tmp_path / 'mlp.pth'}:{clip_dir}").score(images, None)
    assert torch.allclose(got.double(), x.squeeze(-1), atol=1e-4)


def _hf_to_openclip(model) -> dict:
    """The inverse of rpo_fast.scorers.hps.openclip_to_hf, written out for the test."""
    s = model.state_dict()
    out = {
        "logit_scale": s["logit_scale"],
        "text_projection": s["text_projection.weight"].T,
        "visual.proj": s["visual_projection.weight"].T,
        "token_embedding.weight": s["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": s["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": s["text_model.final_layer_norm.weight"],
        "ln_final.bias": s["text_model.final_layer_norm.bias"],
        "visual.conv1.weight": s["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": s["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": s["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": s["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": s["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": s["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": s["vision_model.post_layernorm.bias"],
    }
    for src, dst in (("text_model", "transformer"), ("vision_model", "visual.transformer")):
        i = 0
        while f"{src}.encoder.layers.{i}.layer_norm1.weight" in s:
            a, b = f"{src}.encoder.layers.{i}.", f"{dst}.resblocks.{i}."
            for x, y in (
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("self_attn.out_proj", "attn.out_proj"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ):
                out[b + y + ".weight"], out[b + y + ".bias"] = s[a + x + ".weight"], s[a + x + ".bias"]
            out[b + "attn.in_proj_weight"] = torch.cat([s[a + f"self_attn.{n}_proj.weight"] for n in "qkv"])
            out[b + "attn.in_proj_bias"] = torch.cat([s[a + f"self_attn.{n}_proj.bias"] for n in "qkv"])
            i += 1
    return out


def test_hps_maps_open_clip_weights_and_scores_100_cos(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from rpo_fast.scorers.hps import hps_preprocess

    torch.manual_seed(2)
    text = dict(T.TINY_TEXT_CONFIG, hidden_act="gelu", hidden_size=64, num_attention_heads=1)  # heads = width // 64
    vision = dict(T.TINY_CLIP_VISION, hidden_act="gelu", hidden_size=64, num_attention_heads=1)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    torch.save({"state_dict": _hf_to_openclip(model)}, tmp_path / "hps.pt")
    T.byte_level_clip_tokenizer().save_pretrained(tmp_path / "tok")
    scorer = load_scorer(f"hps={tmp_path / 'hps.pt'}:{tmp_path / 'tok'}")
    images, prompts = _images(3, size=(50, 20)), ["a", "b c", "d"]
    # preprocessing: longest side to 32 (bicubic), black letterbox, OpenAI normalisation, by hand
    im = images[0].resize((32, 13), Image.BICUBIC)
    canvas = np.zeros((32, 32, 3))
    canvas[9:22] = np.asarray(im) / 255.0
    manual = (canvas - [0.48145466, 0.4578275, 0.40821073]) / [0.26862954, 0.26130258, 0.27577711]
    assert torch.allclose(hps_preprocess(images[0], 32), torch.from_numpy(manual).permute(2, 0, 1).float(), atol=1e-6)
    px = torch.stack([hps_preprocess(x, 32) for x in images])
    ids = T.byte_level_clip_tokenizer()(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        img = F.normalize(model.get_image_features(pixel_values=px).pooler_output, dim=-1)
        txt = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
    assert torch.allclose(scorer.score(images, prompts), 100 * (img * txt).sum(-1), atol=1e-3)


@pytest.mark.gpu
def test_hps_mapping_equals_open_clip_forward(tmp_path):
    """On the GPU machine (open_clip installed with the openclip extra): our mapping equals open_clip's forward
    on a random ViT-H-14."""
    open_clip = pytest.importorskip("open_clip")
    from rpo_fast.scorers.hps import openclip_to_hf

    model = open_clip.create_model("ViT-H-14", pretrained=None).eval()
    hf = openclip_to_hf(model.state_dict()).eval()
    px = torch.randn(2, 3, 224, 224)
    ids = open_clip.get_tokenizer("ViT-H-14")(["a photo of a cat", "a dog"])
    with torch.no_grad():
        a = F.normalize(model.encode_image(px), dim=-1) @ F.normalize(model.encode_text(ids), dim=-1).T
        img = F.normalize(hf.visual_projection(hf.vision_model(pixel_values=px).pooler_output), dim=-1)
        txt = F.normalize(hf.text_projection(hf.text_model(input_ids=ids).pooler_output), dim=-1)
    assert torch.allclose(a, img @ txt.T, atol=1e-4)


def test_warmth_and_missing_imagereward():
    from rpo_fast.demo import shapes as S

    rng = np.random.default_rng(0)
    warm = S.render(S.CAPTIONS[0], 0.05, rng)
    cold = S.render(S.CAPTIONS[0], 0.55, rng)
    s = load_scorer("rpo_fast.demo.shapes:WarmthScorer").score([warm, cold], None)
    assert s[0] > 0.5 and s[1] < -0.5
    with pytest.raises(ScorerUnavailable, match="ImageReward"):
        load_scorer("imagereward=/nonexistent.pt")
    with pytest.raises(ValueError, match="unknown scorer"):
        load_scorer("fid=x")


# --------------------------------------------------------------------------------------------------
# Sampling and the whole command
# --------------------------------------------------------------------------------------------------


def test_sampling_is_deterministic_by_seed_and_batching(tiny_sd15, tmp_path):
    pipe = E.load_pipeline(load_family(tiny_sd15))
    prompts = ["a red circle", "a blue square", "a star"]
    a = E.sample(pipe, prompts, tmp_path / "a", per_prompt=2, steps=3, batch_size=4, progress=False)
    b = E.sample(pipe, prompts, tmp_path / "b", per_prompt=2, steps=3, batch_size=1, progress=False)
    c = E.sample(pipe, prompts, tmp_path / "c", per_prompt=2, steps=3, batch_size=4, progress=False)
    assert len(a) == 6
    load = lambda p: np.asarray(Image.open(p)).astype(int)  # noqa: E731
    for x, y, z in zip(a, b, c):
        assert np.array_equal(load(x), load(z)), x.name  # same seeds, same batching: the same bits
        assert np.abs(load(x) - load(y)).max() <= 1, x.name  # other batching: at most one 8-bit level (rounding)
    assert not np.array_equal(np.asarray(Image.open(a[0])), np.asarray(Image.open(a[1])))  # other seed, other image


def test_sdxl_pipeline_samples(tiny_sdxl, tmp_path):
    pipe = E.load_pipeline(load_family(tiny_sdxl))
    paths = E.sample(pipe, ["a red circle"], tmp_path, steps=2, progress=False)
    assert Image.open(paths[0]).size == (32, 32) and pipe.family.name == "sdxl"


def test_evaluate_end_to_end_resumes_and_reports(tiny_sd15, clip_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    tuned = tmp_path / "tuned_unet"
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    unet.save_pretrained(tuned)
    (tmp_path / "prompts.txt").write_text("\n".join(["a red circle", "a blue square", "a star", "a cat"]))
    out = tmp_path / "eval"
    kw = dict(
        unet=tuned,
        scorers=[f"clipscore={clip_dir}", "rpo_fast.demo.shapes:WarmthScorer", "imagereward=/none.pt"],
        per_prompt=2,
        steps=3,
        batch_size=3,
        progress=False,
    )
    s = E.evaluate(tiny_sd15, tmp_path / "prompts.txt", out, **kw)
    files = sorted((out / "images").rglob("*.png"))
    assert len(files) == 16
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    E.evaluate(tiny_sd15, tmp_path / "prompts.txt", out, **kw)  # resume: nothing redone
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    assert s["not_computed"] == {
        "imagereward": "ImageReward: the ImageReward package is not installed (pip install image-reward)"
    }
    with (out / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    for m in s["metrics"]:
        base = np.array([float(r[f"{m['metric']}_base"]) for r in rows])
        tuned_s = np.array([float(r[f"{m['metric']}_tuned"]) for r in rows])
        assert abs(m["base_mean"] - base.mean()) < 1e-9 and abs(m["tuned_mean"] - tuned_s.mean()) < 1e-9
        wins = (tuned_s > base).sum() + 0.5 * (tuned_s == base).sum()
        assert abs(m["win_rate"] - wins / 8) < 1e-12
        assert (m["win_low"], m["win_high"]) == pytest.approx(E.wilson_interval(wins, 8))
    report = (out / "report.html").read_text()
    assert "not computed" in report and "clipscore" in report
    srcs = re.findall(r'src="([^"]+)"', report)
    assert "metrics.png" in srcs and all((out / src).exists() for src in srcs)
    # every prompt a card: its 2 base and 2 tuned images, each with the first metric's score
    assert report.count('class="card"') == 4 and "every prompt (4)" in report
    assert sorted(src for src in srcs if src.startswith("images/")) == sorted(
        p.relative_to(out).as_posix() for p in files
    )
    assert report.count("<figcaption>") == 16
    first = s["metrics"][0]["metric"]
    assert f"with their {first}" in report
    assert "The training run" not in report  # a bare UNet folder: no run settings to show
    E.evaluate(tiny_sd15, tmp_path / "prompts.txt", out, **kw, report_prompts=2)
    report = (out / "report.html").read_text()
    assert report.count('class="card"') == 2 and "the first 2 of the 4 prompts" in report


def test_evaluate_refuses_missing_inputs(tiny_sd15, tmp_path):
    with pytest.raises(ValueError, match="give the tuned model"):
        E.evaluate(tiny_sd15, tmp_path / "p.txt", tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="--unet"):
        E.evaluate(tiny_sd15, tmp_path / "p.txt", tmp_path / "o", unet=tmp_path / "none")


def _openclip_state(width_v=64, width_t=48, layers=2, patch=8, image=32, vocab=514, ctx=77, proj=16, seed=3):
    """A random state dict in open_clip's layout (not derived from transformers)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    s = {
        "visual.conv1.weight": r(width_v, 3, patch, patch),
        "visual.class_embedding": r(width_v),
        "visual.positional_embedding": r((image // patch) ** 2 + 1, width_v),
        "visual.proj": r(width_v, proj),
        "token_embedding.weight": r(vocab, width_t),
        "positional_embedding": r(ctx, width_t),
        "text_projection": r(width_t, proj),
        "logit_scale": torch.tensor(2.0),
    }
    for prefix, w in (("visual.", width_v), ("", width_t)):
        for n in ("ln_pre", "ln_post") if prefix else ("ln_final",):
            s[f"{prefix}{n}.weight"], s[f"{prefix}{n}.bias"] = 1 + r(w), r(w)
        for i in range(layers):
            b = f"{prefix}transformer.resblocks.{i}."
            for n in ("ln_1", "ln_2"):
                s[b + n + ".weight"], s[b + n + ".bias"] = 1 + r(w), r(w)
            s[b + "attn.in_proj_weight"], s[b + "attn.in_proj_bias"] = r(3 * w, w), r(3 * w)
            s[b + "attn.out_proj.weight"], s[b + "attn.out_proj.bias"] = r(w, w), r(w)
            s[b + "mlp.c_fc.weight"], s[b + "mlp.c_fc.bias"] = r(4 * w, w), r(4 * w)
            s[b + "mlp.c_proj.weight"], s[b + "mlp.c_proj.bias"] = r(w, 4 * w), r(w)
    return s


def _openclip_blocks(s, prefix, x, heads, mask=None):
    """open_clip's Transformer: x + attn(ln_1(x)), x + mlp(ln_2(x)); nn.MultiheadAttention semantics, GELU MLP."""
    i = 0
    while f"{prefix}resblocks.{i}.ln_1.weight" in s:
        b = f"{prefix}resblocks.{i}."
        h = F.layer_norm(x, x.shape[-1:], s[b + "ln_1.weight"], s[b + "ln_1.bias"])
        q, k, v = F.linear(h, s[b + "attn.in_proj_weight"], s[b + "attn.in_proj_bias"]).chunk(3, dim=-1)
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
        att = split(q) @ split(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // heads)
        if mask is not None:
            att = att + mask
        o = (att.softmax(-1) @ split(v)).transpose(1, 2).flatten(2)
        x = x + F.linear(o, s[b + "attn.out_proj.weight"], s[b + "attn.out_proj.bias"])
        h = F.layer_norm(x, x.shape[-1:], s[b + "ln_2.weight"], s[b + "ln_2.bias"])
        x = x + F.linear(
            F.gelu(F.linear(h, s[b + "mlp.c_fc.weight"], s[b + "mlp.c_fc.bias"])),
            s[b + "mlp.c_proj.weight"],
            s[b + "mlp.c_proj.bias"],
        )
        i += 1
    return x


def test_hps_mapping_equals_an_open_clip_forward_written_out(tmp_path):
    """open_clip's forward, written from its VisionTransformer / encode_text (conv patchify, class token,
    ln_pre, blocks, ln_post of the class token, @ proj; token + position embedding, causal blocks, ln_final,
    the argmax (EOT) token, @ text_projection) against ``openclip_to_hf`` on a random open_clip state dict."""
    from rpo_fast.scorers.hps import openclip_to_hf

    s = _openclip_state()
    hf = openclip_to_hf(s, vision_heads=2, text_heads=3)
    px = torch.randn(2, 3, 32, 32)
    ids = T.byte_level_clip_tokenizer()(
        ["a red circle", "b"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        x = F.conv2d(px, s["visual.conv1.weight"], stride=8).flatten(2).transpose(1, 2)
        x = torch.cat([s["visual.class_embedding"].expand(2, 1, -1), x], dim=1) + s["visual.positional_embedding"]
        x = F.layer_norm(x, x.shape[-1:], s["visual.ln_pre.weight"], s["visual.ln_pre.bias"])
        x = _openclip_blocks(s, "visual.transformer.", x, heads=2)
        img = (
            F.layer_norm(x[:, 0], x.shape[-1:], s["visual.ln_post.weight"], s["visual.ln_post.bias"]) @ s["visual.proj"]
        )
        causal = torch.full((77, 77), float("-inf")).triu(1)
        t = _openclip_blocks(
            s, "transformer.", s["token_embedding.weight"][ids] + s["positional_embedding"], heads=3, mask=causal
        )
        t = F.layer_norm(t, t.shape[-1:], s["ln_final.weight"], s["ln_final.bias"])
        txt = t[torch.arange(2), ids.argmax(-1)] @ s["text_projection"]
        hf_img = hf.visual_projection(hf.vision_model(pixel_values=px).pooler_output)
        hf_txt = hf.text_projection(hf.text_model(input_ids=ids).pooler_output)
    assert torch.allclose(hf_img, img, atol=1e-4), (hf_img - img).abs().max()
    assert torch.allclose(hf_txt, txt, atol=1e-4), (hf_txt - txt).abs().max()
    assert torch.allclose(hf.logit_scale, s["logit_scale"])


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_report_of_a_run_in_headless_chromium(tiny_sd15, tmp_path):
    """The report of an rpo_fast run (its settings and training curves beside the tuned UNet), at 1200 px and at a
    phone's 390 px: a page that shows something, its pictures are the samples (the same page with the image files
    moved away looks different), nothing overflows the width (a long path in the settings wraps) and the training
    curves are at least 340 px wide on the phone (their stacked picture there)."""
    from diffusers import UNet2DConditionModel

    run = tmp_path / "run"
    UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").save_pretrained(run / "unet")
    train = dict(objective="dpo", model=str(tiny_sd15), max_steps=4, lr=1e-5, seed=3, micro_batch_size=2)
    train["data"] = "/data/" + "/".join(["averylongfoldernameofaclusterfilesystem"] * 4) + "/cache"
    (run / "config.json").write_text(json.dumps(dict(train=train, loss=dict(beta=500.0))))
    rows = [{"step": k, "loss/loss": 0.7 - 0.05 * k, "reward/implicit_acc": 0.5 + 0.1 * k} for k in range(1, 5)]
    rows += [{"step": 4, "eval/implicit_acc": 0.8}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "star")]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    out = tmp_path / "eval"
    kw = dict(unet=run / "unet", scorers=["rpo_fast.demo.shapes:WarmthScorer"], steps=2, progress=False)
    E.evaluate(tiny_sd15, tmp_path / "prompts.txt", out, **kw)
    report = (out / "report.html").read_text()
    assert "The training run" in report and "<td>objective</td><td>dpo</td>" in report and "<td>beta</td>" in report
    assert 'src="training.png"' in report and (out / "training.png").exists()
    assert 'srcset="training-narrow.png"' in report and (out / "training-narrow.png").exists()
    assert report.count('class="card"') == len(prompts)
    for width in (1200, 390):
        shot = screenshot(out / "report.html", tmp_path / f"report-{width}.png", width, tmp_path / "profile")
        assert shot.shape[1] == width
        ink = (shot < 235).any(axis=2).mean()  # not blank: text, tables, charts and pictures
        assert ink > 0.05, f"{width} px: {ink:.1%} of the page is not white"
        (out / "images").rename(tmp_path / "images-away")
        broken = screenshot(out / "report.html", tmp_path / f"broken-{width}.png", width, tmp_path / "profile")
        (tmp_path / "images-away").rename(out / "images")
        assert np.abs(shot - broken).mean() > 1.0, f"{width} px: the samples do not show"
        (got,) = layout([out / "report.html"], width, tmp_path)
        assert got["client"] == width and got["scroll"] <= width, (width, got)
        curves = [w for alt, w in got["images"] if alt == "training curves"]
        assert curves and curves[0] >= 340, (width, got["images"])


def test_evaluate_without_a_scorer_says_what_it_reports(tiny_sd15, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    unet = tmp_path / "unet"
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").save_pretrained(unet)
    summary = E.evaluate(tiny_sd15, tmp_path / "prompts.txt", tmp_path / "eval", unet=unet, steps=2, progress=False)
    said = capsys.readouterr().out
    assert "no --scorer given" in said and "no scores, means or win rates" in said
    assert summary["metrics"] == [] and (tmp_path / "eval" / "report.html").exists()
    assert len(list((tmp_path / "eval" / "images" / "tuned").glob("*.png"))) == 2
