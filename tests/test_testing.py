"""The fixtures every other test stands on: tiny models load back from their folders and run, the full-size
configs have the published parameter counts, the Pick-a-Pic writer produces the public schema."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from rpo_fast import testing as T


def test_tokenizer_has_514_tokens_and_round_trips(tmp_path):
    from transformers import CLIPTokenizer

    tok = T.byte_level_clip_tokenizer()
    assert len(tok) == 514
    tok.save_pretrained(tmp_path)
    back = CLIPTokenizer.from_pretrained(tmp_path)
    ids = back("A Red Circle, é!").input_ids
    assert ids[0] == T.BOS_ID and ids[-1] == T.EOS_ID
    assert ids == back("a red circle, é!").input_ids  # lowercased, as CLIP does
    assert max(ids) < 514 and len(ids) > 10  # every byte is a token: no unknowns
    padded = back(["x"], padding="max_length", max_length=77).input_ids[0]
    assert len(padded) == 77 and padded[-1] == T.EOS_ID


def test_sd15_folder_loads_and_runs(tiny_sd15):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    index = json.loads((tiny_sd15 / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_sd15 / sub).is_dir(), sub
    assert list((tiny_sd15 / "unet").glob("*.safetensors"))

    tok = CLIPTokenizer.from_pretrained(tiny_sd15, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(tiny_sd15, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(tiny_sd15, subfolder="vae")
    sched = DDPMScheduler.from_pretrained(tiny_sd15, subfolder="scheduler")
    assert sched.config.prediction_type == "epsilon" and sched.config.num_train_timesteps == 1000

    ids = tok(["a red circle", "a blue square"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        hidden = te(ids.input_ids)[0]
        latents = vae.encode(torch.rand(2, 3, 32, 32) * 2 - 1).latent_dist.mean
        out = unet(latents, torch.tensor([10, 500]), encoder_hidden_states=hidden).sample
    assert hidden.shape == (2, 77, T.TINY_HIDDEN)
    assert latents.shape == (2, 4, 16, 16)
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_sdxl_folder_loads_and_runs(tiny_sdxl):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index = json.loads((tiny_sdxl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    tok = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer_2")
    te1 = CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    assert unet.config.addition_embed_type == "text_time"

    ids = tok(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        o1 = te1(ids, output_hidden_states=True)
        o2 = te2(ids, output_hidden_states=True)
        context = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
        latents = vae.encode(torch.rand(1, 3, 32, 32) * 2 - 1).latent_dist.mean
        time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
        out = unet(
            latents,
            torch.tensor([10]),
            encoder_hidden_states=context,
            added_cond_kwargs={"text_embeds": o2.text_embeds, "time_ids": time_ids},
        ).sample
    assert context.shape == (1, 77, 2 * T.TINY_HIDDEN)
    assert out.shape == latents.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_full_size_configs_have_published_parameter_counts(kind):
    unet = T.build_unet(kind, full=True, device="meta")
    n = sum(p.numel() for p in unet.parameters())
    assert n == T.FULL_UNET_PARAMS[kind]
    assert round(n / 1e9, 3) == {"sd15": 0.860, "sdxl": 2.567}[kind]
    vae = T.build_vae(kind, full=True, device="meta")
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    encoders = T.build_text_encoders(kind, full=True, device="meta")
    sizes = [sum(p.numel() for p in e.parameters()) for e in encoders]
    assert sizes == {"sd15": [123_060_480], "sdxl": [123_060_480, 694_659_840]}[kind]


def test_pickapic_shard_reads_back_with_the_public_schema(tmp_path):
    import io

    from PIL import Image

    rows = T.pickapic_rows(9, seed=3, tie_every=3, corrupt=(4,))
    path = T.write_pickapic_shard(tmp_path / "train-00000-of-00001.parquet", rows)
    table = pq.read_table(path)
    assert table.schema.equals(T.pickapic_schema())
    assert [f.name for f in table.schema] == [name for name, _ in T.PICKAPIC_COLUMNS]
    assert table.num_rows == 9
    labels = list(zip(table["label_0"].to_pylist(), table["label_1"].to_pylist()))
    assert labels.count((0.5, 0.5)) == 3  # ties included
    best = table["best_image_uid"].to_pylist()
    for (l0, _), uid0, uid1, b in zip(labels, table["image_0_uid"].to_pylist(), table["image_1_uid"].to_pylist(), best):
        assert b == (uid0 if l0 == 1.0 else uid1 if l0 == 0.0 else "")
    img = Image.open(io.BytesIO(table["jpg_0"][0].as_py()))
    assert img.format == "JPEG" and img.size == (32, 32)
    with pytest.raises(OSError):
        Image.open(io.BytesIO(table["jpg_1"][4].as_py())).load()


def test_own_pairs_jsonl(tmp_path):
    path = T.write_pairs_jsonl(tmp_path / "own", 3)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 3 and set(lines[0]) == {"caption", "winner", "loser"}
    assert all((path.parent / line["winner"]).exists() for line in lines)
