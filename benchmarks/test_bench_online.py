"""The online rollout benchmark under pytest (``pytest benchmarks/ --benchmark``): on a CPU one tiny configuration
(the demo's base model, 4 sampler steps), on a GPU the random full-size SD1.5 at 512 px."""

import math

import pytest
from bench_utils import QUICK


@pytest.mark.bench
def test_online_rollout():
    import bench_online as B

    kind, resolution = (None, 32) if QUICK else ("sd15", 512)
    table = B.run(
        B.QUICK_CONFIGS if QUICK else B.CONFIGS[:2],
        steps=1 if QUICK else 2,
        kind=kind,
        resolution=resolution,
        command="pytest benchmarks/ --benchmark",
        quick=QUICK,
    )
    for row in table.rows:
        assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0
        assert 0 < row["rollout_share"] < 1
        assert row["rollout_rows"] == 8 * row["rollout_steps"] * 2
