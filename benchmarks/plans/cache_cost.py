"""What caching Pick-a-Pic v2 costs: bytes per pair on disk and encoder FLOPs per pair for the full-size SD1.5 and
SDXL models (counted from their configs on the meta device, not measured), the time a full cache takes per GPU at
a stated fraction of an H100's peak, and, measured on this machine, the CPU work of decoding and preprocessing a
Pick-a-Pic-sized JPEG and the throughput of the whole cache build on the tiny models.

    python benchmarks/plans/cache_cost.py            # the tables of docs/guides/cache.md (tests/test_cache_cost.py)
    python benchmarks/plans/cache_cost.py --measure  # also the CPU figures of this machine (not in the test)

Bytes per pair (``bytes_per_pair``), with ``--storage fp16``: the latent mean and std of both images
(2 x 2 x C x h x w x 2 B; ``--flip-twin`` doubles them and the time ids), SDXL's time ids (2 x 6 fp32), the
text_index (8 B), RPO's CLIP embeddings (3 x E x 2 B), and the text encodings once per unique caption
(SD1.5 77 x 768, SDXL 77 x 2048 + 1280, fp16). The test holds the formula to the bytes of a tiny cache's shard.

FLOPs per pair (``encode_flops``): the VAE encoder on both images, the text encoder(s) on one caption (77 tokens),
and the CLIP ViT-L/14 embedder (both images at 224 px and the caption), from torch.utils.flop_counter.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

PICKAPIC_PAIRS = 851_293  # Pick-a-Pic v2's train split after the tie filter (the DiffusionDPO recipe)
RESOLUTION = {"sd15": 512, "sdxl": 1024}
CLIP_DIM = 768  # CLIP ViT-L/14's projection
H100_TF32, H100_BF16 = 495e12, 989e12  # H100 SXM dense peaks, FLOP/s
FRACTION = 0.4  # the assumed fraction of peak an encoder reaches (not measured: a GPU run measures it)
CLIP_L14 = dict(  # openai/clip-vit-large-patch14
    text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
    vision_config=dict(
        hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, patch_size=14
    ),
    projection_dim=768,
)


def text_widths(kind: str) -> tuple[int, int | None]:
    """(width of prompt_embeds, width of pooled_prompt_embeds or None) of the full-size family."""
    from rpo_fast.testing import FULL_TEXT_CONFIGS

    cfgs = FULL_TEXT_CONFIGS[kind]
    width = sum(c["hidden_size"] for c in cfgs)
    return width, (cfgs[-1].get("projection_dim", cfgs[-1]["hidden_size"]) if kind == "sdxl" else None)


def bytes_per_pair(
    *,
    latent_channels: int,
    latent_side: int,
    text_width: int,
    pooled_width: int | None,
    clip_dim: int | None = CLIP_DIM,
    captions_per_pair: float = 1.0,
    flip_twin: bool = False,
    tokens: int = 77,
    storage_bytes: int = 2,
) -> float:
    """Tensor bytes one pair adds to a shard (its share of its caption's encodings included)."""
    twins = 2 if flip_twin else 1
    latents = 2 * 2 * latent_channels * latent_side**2 * storage_bytes * twins
    time_ids = 2 * 6 * 4 * twins if pooled_width else 0
    text = (tokens * text_width + (pooled_width or 0)) * storage_bytes * captions_per_pair
    clip = 3 * clip_dim * storage_bytes if clip_dim else 0
    return latents + time_ids + text + clip + 8


def full_bytes_per_pair(kind: str, **kw) -> float:
    from rpo_fast.testing import FULL_VAE_CONFIGS

    vae = FULL_VAE_CONFIGS[kind]
    side = RESOLUTION[kind] // 2 ** (len(vae["block_out_channels"]) - 1)
    width, pooled = text_widths(kind)
    return bytes_per_pair(
        latent_channels=vae["latent_channels"], latent_side=side, text_width=width, pooled_width=pooled, **kw
    )


def encode_flops(kind: str) -> dict[str, float]:
    """FLOPs per pair of the full-size encoders, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPConfig, CLIPModel

    from rpo_fast import testing as T

    res = RESOLUTION[kind]
    out = {}
    with torch.device("meta"):
        vae = T.build_vae(kind, full=True, device="meta")
        encoders = T.build_text_encoders(kind, full=True, device="meta")
        clip = CLIPModel(CLIPConfig(**CLIP_L14)).eval()
        images, ids = torch.empty(2, 3, res, res), torch.zeros(1, 77, dtype=torch.long)
        clip_images = torch.empty(2, 3, 224, 224)
    with torch.no_grad():
        for name, run in (
            ("vae", lambda: vae.encode(images)),
            ("text", lambda: [enc(ids, output_hidden_states=True) for enc in encoders]),
            ("clip", lambda: (clip.get_image_features(pixel_values=clip_images), clip.get_text_features(ids))),
        ):
            counter = FlopCounterMode(display=False)
            with counter:
                run()
            out[name] = float(counter.get_total_flops())
    return out


def cost_rows() -> list[dict]:
    rows = []
    for kind in ("sd15", "sdxl"):
        f = encode_flops(kind)
        # the VAE encodes in fp32 (--vae-dtype fp32, the default: convolutions run as TF32 on an H100), the text
        # encoders and CLIP in the cache's fp32 too; both at FRACTION of the TF32 peak
        seconds = sum(f.values()) / (FRACTION * H100_TF32)
        rows.append(
            dict(
                kind=kind,
                resolution=RESOLUTION[kind],
                bytes_own_caption=full_bytes_per_pair(kind),
                bytes_shared_caption=full_bytes_per_pair(kind, captions_per_pair=0.0),
                bytes_twin=full_bytes_per_pair(kind, flip_twin=True),
                vae_gflop=f["vae"] / 1e9,
                text_gflop=f["text"] / 1e9,
                clip_gflop=f["clip"] / 1e9,
                gpu_pairs_per_s=1 / seconds,
                pickapic_gpu_hours=PICKAPIC_PAIRS * seconds / 3600,
                pickapic_disk_gb=PICKAPIC_PAIRS * full_bytes_per_pair(kind) / 1e9,
            )
        )
    return rows


def table() -> str:
    lines = [
        "| model (resolution) | bytes per pair (own caption / caption shared / `--flip-twin`) "
        "| GFLOP per pair: VAE, text, CLIP | pairs/s per H100 at 40% of TF32 | full Pick-a-Pic: GPU hours, disk |",
        "|---|---|---|---|---|",
    ]
    for r in cost_rows():
        name = {"sd15": "SD1.5", "sdxl": "SDXL"}[r["kind"]]
        lines.append(
            f"| {name} ({r['resolution']} px) | {r['bytes_own_caption'] / 1e3:.0f} KB / "
            f"{r['bytes_shared_caption'] / 1e3:.0f} KB / {r['bytes_twin'] / 1e3:.0f} KB | "
            f"{r['vae_gflop']:,.0f}, {r['text_gflop']:,.1f}, {r['clip_gflop']:,.0f} | {r['gpu_pairs_per_s']:,.0f} | "
            f"{r['pickapic_gpu_hours']:.2f} h, {r['pickapic_disk_gb']:,.0f} GB |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Measured on this machine
# --------------------------------------------------------------------------------------------------


def measure_decode(side: int = 768, target: int = 512, repeats: int = 20) -> float:
    """Seconds of one CPU core to decode a ``side`` x ``side`` JPEG (quality 95, a Pick-a-Pic-sized image) and
    preprocess it to ``target`` px (the median of ``repeats``)."""
    import time

    import numpy as np

    from rpo_fast import data as D
    from rpo_fast.testing import random_image

    jpeg = D.encode_image(random_image(np.random.default_rng(0), side))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        D.preprocess(D.load_image(jpeg, Path()), target)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def measure_read(threads: int, pairs: int = 48, side: int = 768, target: int = 512, rounds: int = 3) -> dict:
    """Pairs per second of reading (decode) and preprocessing a parquet of ``side`` px JPEG pairs to ``target`` px,
    on one thread and on ``threads`` (iter_pairs' decode threads and the cache's preprocessing threads), side by
    side: the two alternate for ``rounds`` rounds and each keeps its fastest. Returns {threads: pairs/s}."""
    import tempfile
    import time

    import numpy as np

    from rpo_fast import data as D
    from rpo_fast.testing import MIRROR_COLUMNS, random_image

    rng = np.random.default_rng(0)
    rows = [
        dict(prompt=f"c{i}", first_image={"bytes": D.encode_image(random_image(rng, side)), "path": None},
             second_image={"bytes": D.encode_image(random_image(rng, side)), "path": None},
             first_label=1, second_label=0)
        for i in range(pairs)
    ]  # fmt: skip
    best = {}
    with tempfile.TemporaryDirectory() as tmp:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(tmp) / "jpeg.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        cols = D.Columns.parse(MIRROR_COLUMNS)
        for _ in range(rounds):
            for n in (1, threads):
                t = time.perf_counter()
                got = list(D.iter_pairs(path, columns=cols, decode_threads=n if n > 1 else 0))
                for k in range(0, len(got), 16):  # the cache's batches, preprocessed as encode_pairs does
                    D.preprocess_pairs(got[k : k + 16], target, threads=n, crop="center", flip=False, seed=0)
                best[n] = max(best.get(n, 0.0), len(got) / (time.perf_counter() - t))
    return best


def measure_tiny_build(pairs: int = 64, resolution: int = 64) -> dict:
    """The whole cache build (read, decode, preprocess, VAE, text encoder, write) on the tiny SD1.5 and SDXL
    fixtures, one rank: pairs/s, and bytes per pair of the shards against ``bytes_per_pair``."""
    import tempfile
    import time

    from rpo_fast import testing as T
    from rpo_fast.data.writer import build_cache

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = T.write_mirror_parquet(tmp / "data.parquet", T.preference_pairs(pairs, size=96))
        for kind in ("sd15", "sdxl"):
            model = T.save_tiny_pipeline(tmp / kind, kind)
            t = time.perf_counter()
            build_cache(
                model,
                data,
                tmp / f"cache-{kind}",
                resolution=resolution,
                columns=T.MIRROR_COLUMNS,
                shard_size=pairs,
                batch_size=16,
                progress=False,
            )
            seconds = time.perf_counter() - t
            shard = tmp / f"cache-{kind}" / "shard-r0-00000.safetensors"
            out[kind] = dict(pairs_per_s=pairs / seconds, shard_bytes=shard.stat().st_size)
    return out


def main() -> None:
    from rpo_fast.logs import quiet_known_noise

    quiet_known_noise()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="also measure this machine's CPU figures")
    a = parser.parse_args()
    print(table())
    if a.measure:
        for side, target in ((768, 512), (1024, 1024)):
            decode = measure_decode(side, target)
            print(
                f"CPU: decode + preprocess of a {side} px JPEG to {target} px: {decode * 1e3:.1f} ms per image on one "
                f"core = {1 / (2 * decode):.0f} pairs/s"
            )
        threads = os.cpu_count() or 1
        rates = measure_read(threads)
        print(
            f"CPU: read + decode + preprocess of 768 px JPEG pairs to 512 px: {rates[1]:.1f} pairs/s on 1 thread, "
            f"{rates[threads]:.1f} on {threads} ({rates[threads] / rates[1]:.2f}x)"
        )
        print(json.dumps(measure_tiny_build(), indent=1))


if __name__ == "__main__":
    main()
