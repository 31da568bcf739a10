"""The end-to-end step benchmark under pytest (``pytest benchmarks/ --benchmark``): on a GPU the first priorities
of the GPU slot (SDXL with 1 pair and gradient checkpointing; SD1.5 with 1 pair), on a CPU the quick mode. The
full list (more pairs, no checkpointing, compile, the sharded reference, LoRA) runs from the script."""

import math

import pytest
from bench_utils import QUICK


@pytest.mark.bench
def test_train_step(results):
    import bench_train_step as B

    kinds, pairs = (["sd15"], [2]) if QUICK else (["sdxl", "sd15"], [1])
    table = B.run(
        kinds,
        pairs,
        steps=1 if QUICK else 5,
        warmup=1 if QUICK else 2,
        table=results.get("train_step"),
        command="pytest benchmarks/ --benchmark",
    )
    results["train_step"] = table
    for row in table.rows:
        assert row["errors"] is None, row["errors"]
        assert math.isfinite(row["rpo_fast_pairs_s"]) and row["rpo_fast_pairs_s"] > 0
        assert math.isfinite(row["baseline_pairs_s"]) and row["baseline_pairs_s"] > 0
        assert row["model_tflop_per_pair"] > 0
