"""The CPU loss benchmark under pytest (``pytest benchmarks/ --benchmark``): its quick mode, so CI checks that it
runs. The table of CPU figures comes from ``python benchmarks/bench_loss_cpu.py``."""

import math

import pytest


@pytest.mark.bench
def test_loss_cpu():
    import bench_loss_cpu as B

    table = B.run(quick=True, iters=2, rounds=1, command="pytest benchmarks/ --benchmark")
    assert [r["family"] for r in table.rows] == list(B.FAMILIES)
    for row in table.rows:
        for provider in B.PROVIDERS:
            assert math.isfinite(row[f"{provider}_ms"]) and row[f"{provider}_ms"] > 0, row
