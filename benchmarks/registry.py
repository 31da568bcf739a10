"""Shapes every benchmark draws from (one registry, no hard-coded shapes in the benchmark files)."""

import torch
from bench_utils import QUICK

LATENTS = {"sd15": (4, 64, 64), "sdxl": (4, 128, 128)}  # 512px and 1024px images
PAIRS = (1, 4, 16, 64)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FAMILIES = ("dpo", "rpo", "dspo")  # dpo stands for the four-scalar objectives (dpo, sft, dense-dpo, cal-dpo)
EMBED_DIM = 768  # CLIP ViT-L/14

if QUICK:  # CPU: the Triton interpreter is no speed reference; check that the suite runs
    LATENTS = {"tiny": (4, 8, 8)}
    PAIRS = (2,)
    DTYPES = {"fp32": torch.float32}
    EMBED_DIM = 16


def loss_configs():
    for family in FAMILIES:
        for shape in LATENTS:
            for b in PAIRS:
                for dtype in DTYPES:
                    yield family, shape, b, dtype
