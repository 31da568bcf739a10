"""The cache-cost table of docs/guides/cache.md is what benchmarks/plans/cache_cost.py computes, and its bytes-per-pair
formula gives the bytes of real shards (tiny SD1.5 and SDXL caches with RPO's embeddings and flipped twins)."""

from pathlib import Path

import pytest
from safetensors import safe_open

from rpo_fast import testing as T
from rpo_fast.data.writer import build_cache

ROOT = Path(__file__).resolve().parents[1]
import cache_cost as C  # noqa: E402


def test_the_readme_table_is_the_scripts():
    assert C.table() in (ROOT / "docs" / "guides" / "cache.md").read_text()


def test_the_full_size_figures():
    # SD1.5 at 512: latents 2 x 2 x 4 x 64 x 64 fp16, the caption 77 x 768 fp16, CLIP 3 x 768 fp16, text_index
    assert C.full_bytes_per_pair("sd15") == 131_072 + 118_272 + 4_608 + 8
    # SDXL at 1024: latents 2 x 2 x 4 x 128 x 128, captions 77 x 2048 + 1280, time ids 2 x 6 fp32
    assert C.full_bytes_per_pair("sdxl") == 524_288 + (77 * 2048 + 1280) * 2 + 48 + 4_608 + 8
    assert C.full_bytes_per_pair("sdxl", captions_per_pair=0) == 524_288 + 48 + 4_608 + 8


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_bytes_per_pair_is_what_a_shard_holds(kind, tmp_path, tiny_sd15, tiny_sdxl, request):
    model = {"sd15": tiny_sd15, "sdxl": tiny_sdxl}[kind]
    clip = T.save_tiny_clip(tmp_path / "clip")
    pairs = T.preference_pairs(6)  # 4 unique captions
    data = T.write_pair_file(tmp_path / "data", pairs)
    out = tmp_path / "cache"
    build_cache(
        model, data, out, resolution=32, embedder=str(clip), flip_twin=True, shard_size=6, batch_size=3, progress=False
    )
    with safe_open(str(out / "shard-r0-00000.safetensors"), framework="pt") as f:
        held = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    side = 32 // 2 ** (len(T.TINY_VAE_CONFIG["block_out_channels"]) - 1)
    width = T.TINY_TEXT_CONFIG["hidden_size"] * (2 if kind == "sdxl" else 1)
    pooled = T.TINY_TEXT_CONFIG["projection_dim"] if kind == "sdxl" else None
    per_pair = C.bytes_per_pair(
        latent_channels=T.TINY_VAE_CONFIG["latent_channels"],
        latent_side=side,
        text_width=width,
        pooled_width=pooled,
        clip_dim=16,
        captions_per_pair=4 / 6,
        flip_twin=True,
    )
    assert held == pytest.approx(6 * per_pair, abs=1e-6)
