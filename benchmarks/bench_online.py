"""Online training's rollouts (``rpo_fast.online``): their throughput and their share of an online step, measured on
the trainer itself (``OnlineTrainer.train_step``: a rollout, then the updates), one rank, fp32, torch AdamW.

    python benchmarks/bench_online.py [--steps 3]                     this CPU, the demo's base model (32 px)
    python benchmarks/bench_online.py --kind sd15 --resolution 512    a GPU: the random full-size SD1.5 (gpu_session)

Per configuration (objective dense-reward, the warmth scorer as the reward, K samples of P prompts per rollout, N
sampler steps, S sampled steps per update): trajectories sampled and scored per second, milliseconds per trajectory,
the update's milliseconds per step, the rollout's share of the step, and the denoiser rows of each (a rollout: P K N
rows, guided: x 2; an update: S P K rows through policy and reference, guided: x 4). The median of ``--steps`` timed
steps after one warm-up step. Writes ``benchmarks/results/online_rollout-<device>.{json,md}`` (``-cpu`` on a CPU:
the host's figure, honest as a ratio of the same step's parts).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_utils import QUICK, ResultTable, cpu_name

ROOT = Path(__file__).resolve().parents[1]
DEMO_BASE = ROOT / "rpo_fast" / "demo" / "assets" / "base"
# (N sampler steps, S sampled steps per update); K = 4 samples of P = 2 prompts
CONFIGS = [(10, 1), (50, 1), (50, 3)]
QUICK_CONFIGS = [(4, 1)]


def measure(model: Path, rollout_steps: int, steps_per_sample: int, *, steps: int, resolution: int, out: Path):
    from rpo_fast.config import TrainConfig
    from rpo_fast.online import make_trainer_class
    from rpo_fast.train import Trainer

    prompts = out / "prompts.txt"
    prompts.write_text("a red square on the left\na blue circle in the middle\na green triangle\na large star\n")
    cfg = TrainConfig(
        ds_config=str(ROOT / "configs" / "single_gpu.json"),
        model=str(model),
        data=str(prompts),
        output=str(out / f"run-{rollout_steps}-{steps_per_sample}"),
        objective="dense-reward",
        reward="rpo_fast.demo.shapes:WarmthScorer",
        samples_per_prompt=4,
        rollout_prompts=2,
        micro_batch_size=2,
        rollout_steps=rollout_steps,
        steps_per_sample=steps_per_sample,
        resolution=resolution,
        max_steps=steps + 1,
        optimizer="adamw",
        mixed_precision="no" if not torch.cuda.is_available() else "bf16",
        export=False,
        progress=False,
        tensorboard=False,
    )
    trainer = make_trainer_class(Trainer)(cfg)
    rollout_ms, update_ms = [], []
    try:
        for i in range(steps + 1):
            before = dict(trainer.seconds)
            t0 = time.perf_counter()
            trainer.train_step()
            total = time.perf_counter() - t0
            if i:  # the first step warms up
                r = trainer.seconds["rollout"] - before["rollout"]
                rollout_ms.append(1e3 * r)
                update_ms.append(1e3 * (total - r))
    finally:
        trainer.close()
    images = 2 * 4
    r, u = statistics.median(rollout_ms), statistics.median(update_ms)
    return dict(
        rollout_ms=r,
        images_per_s=images / (r / 1e3),
        ms_per_trajectory=r / images,
        update_ms=u,
        rollout_share=r / (r + u),
        rollout_rows=images * rollout_steps * 2,
        update_rows=steps_per_sample * images * 4,
    )


def measure_in_process_of_its_own(model: Path, rollout_steps: int, steps_per_sample: int, **kw) -> dict:
    """``measure`` in a fresh Python process (as the host-overhead benchmark): the trainer's process group and its
    environment (RANK, MASTER_PORT) stay there, not in the caller's (pytest's later launches would inherit them)."""
    import json
    import os
    import subprocess

    job = dict(model=str(model), rollout_steps=rollout_steps, steps_per_sample=steps_per_sample, **kw)
    job["out"] = str(job["out"])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    res = subprocess.run(
        [sys.executable, __file__, "--measure", json.dumps(job)], capture_output=True, text=True, env=env
    )
    if res.returncode != 0:
        raise RuntimeError(f"bench_online --measure failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(configs, *, steps: int, kind: str | None, resolution: int, command: str, quick: bool) -> ResultTable:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    table = ResultTable(
        "online_rollout",
        "Online training: rollout throughput and the rollout's share of a step",
        [
            "model",
            "resolution",
            "rollout_steps",
            "steps_per_sample",
            "images_per_s",
            "ms_per_trajectory",
            "rollout_ms",
            "update_ms",
            "rollout_share",
            "rollout_rows",
            "update_rows",
            "device",
            "command",
        ],
        notes=f"Command: {command}. dense-reward, K = 4 samples of 2 prompts per rollout, a rollout every step, 2 "
        "groups per update, one rank, the warmth scorer as the reward (decoding included), median of the timed steps "
        f"after a warm-up step; {cpu_name() if device == 'cpu' else device}.",
        key=("model", "resolution", "rollout_steps", "steps_per_sample"),
        device="cpu" if device == "cpu" and not quick else "",  # a CPU's full run is committed: its ratios hold
    )
    with tempfile.TemporaryDirectory() as tmp:
        if kind is None:
            model, name = DEMO_BASE, "demo base (1.4M UNet)"
        else:
            from gpu_check import random_model

            model, name = random_model(kind, quick or QUICK), kind
        for n, s in configs:
            row = measure_in_process_of_its_own(model, n, s, steps=steps, resolution=resolution, out=Path(tmp))
            table.add(model=name, resolution=resolution, rollout_steps=n, steps_per_sample=s, device=device,
                      command=command, **row)  # fmt: skip
            print(table.rows[-1], flush=True)
    table.write()
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up step)")
    ap.add_argument("--kind", default=None, help="a random full-size model of gpu_check's (default: the demo's base)")
    ap.add_argument("--resolution", type=int, default=32, help="pixels (the demo's base: 32)")
    ap.add_argument("--quick", action="store_true", help="one tiny configuration (CI)")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # one configuration, JSON in and out
    a = ap.parse_args()
    if a.measure:
        import json

        job = json.loads(a.measure)
        row = measure(Path(job.pop("model")), job.pop("rollout_steps"), job.pop("steps_per_sample"),
                      out=Path(job.pop("out")), **job)  # fmt: skip
        print(json.dumps(row))
        return
    run(
        QUICK_CONFIGS if a.quick else CONFIGS,
        steps=1 if a.quick else a.steps,
        kind=a.kind,
        resolution=a.resolution,
        command="python benchmarks/bench_online.py " + " ".join(sys.argv[1:]),
        quick=a.quick,
    )


if __name__ == "__main__":
    main()
