"""What each ``--recompute`` choice costs for the full-size SD1.5 and SDXL UNets, counted on the meta device (no
weights, no GPU): activation memory kept for backward after the policy's forward, and the hardware FLOPs of its
forward + backward (recompute included), per pair (winner and loser: 2 images), bf16, flash attention.

    python benchmarks/plans/recompute_cost.py            # the table of docs/guides/performance.md

The table of docs/guides/performance.md is this script's output (tests/test_recompute.py holds them equal).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

RESOLUTION = {"sd15": 512, "sdxl": 1024}


def table() -> str:
    from rpo_fast import testing as T
    from rpo_fast.models import load_family
    from rpo_fast.recompute import RECOMPUTE, step_cost

    rows = [
        "| model | recompute | activation memory per pair | vs none "
        "| policy FLOPs per pair (fwd + bwd + recompute) | vs none |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for kind, res in RESOLUTION.items():
            family = load_family(T.save_model_configs(Path(tmp) / kind, kind))
            costs = {mode: step_cost(family, mode) for mode in RECOMPUTE}
            base = costs["none"]
            for mode, c in costs.items():
                mem, flops = c["activation_bytes"], c["hardware_flops"]
                rows.append(
                    f"| {kind} {res}px | `{mode}` | {mem / 2**30:.2f} GiB | {mem / base['activation_bytes']:.0%} | "
                    f"{flops / 1e12:.1f} TFLOP | {flops / base['hardware_flops']:.0%} |"
                )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
