"""The offline cache on the fixtures' tiny models: equality with on-the-fly encoding, kill-and-resume, two
ranks, refusals.

Tolerance: the cache stores fp16; cached tensors equal on-the-fly fp32 encoding to fp16 rounding
(rtol 2e-3 of each value, atol 1e-3 of the tensor's largest value)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import assert_close
from trainrun import free_port

from rpo_fast import testing as T
from rpo_fast.data.dataset import CachedPairs, OnTheFlyPairs, collate
from rpo_fast.data.encode import PairEncoder
from rpo_fast.data.schema import CacheError
from rpo_fast.data.writer import build_cache
from rpo_fast.models import load_family, model_kind


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pickapic")
    caps = ["a red circle", "a blue square", "a green star"]  # repeated captions: text encoded once each
    T.write_pickapic_shard(
        folder / "train-0.parquet", T.pickapic_rows(13, seed=0, size=(40, 36), captions=caps, corrupt=(2,))
    )
    T.write_pickapic_shard(folder / "train-1.parquet", T.pickapic_rows(11, seed=1, size=(36, 40)))
    return folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return T.save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_cache_equals_on_the_fly_encoding(tmp_path, pickapic, clip, kind, request):
    model = request.getfixturevalue(f"tiny_{kind}")
    out = tmp_path / "cache"
    index = build_cache(
        model,
        pickapic,
        out,
        resolution=32,
        crop="random",
        flip=True,
        embedder=str(clip),
        shard_size=4,
        batch_size=2,
        progress=False,
        rank=0,
        world=1,
    )
    # 24 rows: 3 + 2 ties (every 4th row of each file), 1 corrupt -> 18 pairs in 5 shards
    assert index["pairs"] == 18 and len(index["shards"]) == 5
    assert index["skipped"] == {"tie dropped": 5, "undecodable image": 1}
    cached = CachedPairs(out)
    assert len(cached) == 18 and cached.kind == kind
    fly = OnTheFlyPairs(
        load_family(model), pickapic, resolution=32, crop="random", flip=True, embedder=cached_embedder(clip)
    )
    assert len(fly) == 18
    for i in (0, 5, 17):
        a, b = cached[i], fly[i]
        assert set(a) == set(b)
        assert a["caption"] == b["caption"]
        for k in a:
            if k != "caption":
                assert_close(f"{kind} pair {i} {k}", a[k], b[k], atol=1e-3, rtol=2e-3)
    item = cached[3]
    assert item["latent_mean"].shape == (2, 4, 16, 16)
    assert item["prompt_embeds"].shape == (77, T.TINY_HIDDEN * (2 if kind == "sdxl" else 1))
    if kind == "sdxl":
        assert item["time_ids"].shape == (2, 6) and item["pooled_prompt_embeds"].shape == (T.TINY_HIDDEN,)
        assert item["time_ids"][0, 4:].tolist() == [32.0, 32.0]
    assert torch.allclose(item["clip_text"].norm(), torch.tensor(1.0), atol=1e-3)
    assert torch.allclose(item["clip_image"].norm(dim=-1), torch.ones(2), atol=1e-3)
    batch = collate([cached[i] for i in range(3)])
    assert batch["latent_mean"].shape == (3, 2, 4, 16, 16) and len(batch["caption"]) == 3
    assert cached.empty_prompt["prompt_embeds"].shape == item["prompt_embeds"].shape


def cached_embedder(path):
    from rpo_fast.embed import CLIPEmbedder

    return CLIPEmbedder(path)


def test_text_is_encoded_once_per_unique_caption(tmp_path, pickapic, tiny_sd15):
    out = tmp_path / "c"
    build_cache(
        tiny_sd15,
        pickapic / "train-0.parquet",
        out,
        resolution=32,
        shard_size=8,
        batch_size=4,
        progress=False,
        rank=0,
        world=1,
    )
    from safetensors import safe_open

    with safe_open(str(out / "shard-r0-00000.safetensors"), framework="pt") as f:
        assert f.get_tensor("prompt_embeds").shape[0] == 3  # 8 pairs, 3 captions
        assert f.get_tensor("text_index").shape == (8,)


def _cache_cmd(model, data, out, *extra):
    return [
        sys.executable,
        "-m",
        "rpo_fast.cache",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--resolution",
        "32",
        "--shard-size",
        "2",
        "--no-progress",
        *extra,
    ]


# the resumed build: one pair a batch, both twins, random crops (every seeded choice must be redone alike)
RESUME_ARGS = ("--batch-size", "1", "--flip-twin", "--flip", "--crop", "random")


@pytest.mark.slow
def test_kill_and_resume_gives_byte_identical_shards(tmp_path, tiny_sd15):
    data = tmp_path / "data"
    T.write_pickapic_shard(data / "a.parquet", T.pickapic_rows(40, tie_every=0, corrupt=(7,)))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    build = {out: _cache_cmd(tiny_sd15, data, out, *RESUME_ARGS) for out in (straight, killed)}
    subprocess.run(build[straight], check=True, env=env, capture_output=True, timeout=600)

    proc = subprocess.Popen(build[killed], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "shard-r0-00003.safetensors").exists():
        assert time.time() < deadline and proc.poll() is None, "the build ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "index.json").exists(), "killed too late to test a resume"
    with pytest.raises(CacheError, match="unfinished cache"):
        CachedPairs(killed)
    done = subprocess.run(build[killed], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming after" in done.stdout
    names = sorted(p.name for p in straight.glob("shard-*.safetensors"))
    assert names == sorted(p.name for p in killed.glob("shard-*.safetensors")) and len(names) == 20
    for name in names:
        assert (straight / name).read_bytes() == (killed / name).read_bytes(), name
    a, b = (json.loads((d / "index.json").read_text()) for d in (straight, killed))
    assert a["pairs"] == b["pairs"] == 39 and a["skipped"] == b["skipped"] == {"undecodable image": 1}
    again = subprocess.run(build[killed], env=env, capture_output=True, text=True, timeout=600)
    assert "nothing to do" in again.stdout


@pytest.mark.multiprocess
def test_two_ranks_cover_every_pair_once(tmp_path, pickapic, tiny_sd15):
    out = tmp_path / "cache"
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        cmd = _cache_cmd(tiny_sd15, pickapic, out, "--batch-size", "2")
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    cached = CachedPairs(out)
    assert {s["name"][:8] for s in cached.index["shards"]} == {"shard-r0", "shard-r1"}
    single = tmp_path / "single"
    build_cache(tiny_sd15, pickapic, single, resolution=32, shard_size=2, batch_size=2, progress=False, rank=0, world=1)
    one = CachedPairs(single)
    assert len(cached) == len(one) == 18
    key = lambda ds: sorted((ds[i]["caption"], round(float(ds[i]["latent_mean"].sum()), 2)) for i in range(len(ds)))  # noqa: E731
    assert key(cached) == key(one)  # the same pairs, each exactly once


def test_refusals(tmp_path, pickapic, tiny_sd15, tiny_sdxl):
    out = tmp_path / "cache"
    build_cache(
        tiny_sd15,
        pickapic / "train-1.parquet",
        out,
        resolution=32,
        shard_size=4,
        batch_size=2,
        progress=False,
        rank=0,
        world=1,
    )
    with pytest.raises(CacheError, match="other settings"):
        build_cache(
            tiny_sd15,
            pickapic / "train-1.parquet",
            out,
            resolution=64,
            shard_size=4,
            batch_size=2,
            progress=False,
            rank=0,
            world=1,
        )
    cached = CachedPairs(out)
    cached.check(family=load_family(tiny_sd15), resolution=32)
    with pytest.raises(CacheError, match="resolution 32, the run asks for 64"):
        cached.check(family=load_family(tiny_sd15), resolution=64)
    with pytest.raises(CacheError, match="another model"):
        cached.check(family=load_family(tiny_sdxl), resolution=32)
    with pytest.raises(CacheError, match="not an rpo_fast cache"):
        CachedPairs(tmp_path)
    with pytest.raises(ValueError, match="multiple of --batch-size"):
        build_cache(tiny_sd15, pickapic, tmp_path / "x", resolution=32, shard_size=5, batch_size=2, rank=0, world=1)
    with pytest.raises(FileNotFoundError, match="--data"):
        build_cache(tiny_sd15, tmp_path / "none", tmp_path / "x", resolution=32, rank=0, world=1)


def test_model_kind_and_encoder(tiny_sd15, tiny_sdxl):
    assert model_kind(tiny_sd15) == "sd15" and model_kind(tiny_sdxl) == "sdxl"
    enc = PairEncoder(load_family(tiny_sdxl))
    texts = enc.encode_texts(["a", "b"])
    embeds, pooled = texts["prompt_embeds"], texts["pooled_prompt_embeds"]
    assert embeds.shape == (2, 77, 2 * T.TINY_HIDDEN) and pooled.shape == (2, T.TINY_HIDDEN)
    mean, std = enc.encode_images(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert mean.shape == std.shape == (2, 4, 16, 16) and (std > 0).all()


def test_cache_cli_help():
    out = subprocess.run(
        [sys.executable, "-m", "rpo_fast.cache", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--flip-twin" in out.stdout and "--strict" in out.stdout
    # defaults and choices come from CacheConfig's fields
    assert "{center,random}" in out.stdout and "{fp16,bf16,fp32}" in out.stdout
    assert "pairs per shard (a multiple of --batch-size) (default: 1024)" in " ".join(out.stdout.split())
