"""Running the trainer in tests: the launcher command, and reading a run's metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

from bench_utils import stage0_config  # noqa: F401 (the tests import it from here)

from rpo_fast.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "rpo_fast" / "train.py"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
ZERO3 = ROOT / "configs" / "zero3_8bit.json"


def launch(args: list[str], *, ranks: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """deepspeed --num_gpus N rpo_fast/train.py ... (ranks > 1), or python rpo_fast/train.py ... (one).

    Every launcher run also checks that it left none of DeepSpeed's CPU all-reduce buffers in /dev/shm (the trainer
    unlinks them; each leaked one holds ~70 MB of memory until reboot, and a test suite's worth once ran CI out of
    memory). A one-process run makes none: DeepSpeed sets them up only when the launcher sets LOCAL_SIZE."""
    return _run(TRAIN, args, ranks, timeout)


def launch_many(runs: list[list[str]], *, ranks: int = 1, timeout: int = 900) -> subprocess.CompletedProcess:
    """Runs one after another in ONE Python process a rank (tests/train_many.py): the imports and DeepSpeed's
    set-up, most of a tiny run's time, paid once; on ``ranks`` > 1 under the deepspeed launcher, as ``launch``."""
    args = []
    for i, run in enumerate(runs):
        args += (["--"] if i else []) + run
    return _run(ROOT / "tests" / "train_many.py", args, ranks, timeout)


def _run(script: Path, args: list[str], ranks: int, timeout: int) -> subprocess.CompletedProcess:
    port = str(free_port())
    if ranks > 1:
        cmd = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", port, str(script), *args]
    else:
        cmd = [sys.executable, str(script), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    leaked = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")) if ranks > 1 else []
    for f in leaked:
        f.unlink()
    assert not leaked, f"the run left DeepSpeed's shared-memory buffers behind: {leaked}"
    return res


def train_config(runs, out, kind: str = "sd15", **kw):
    """The TrainConfig of a run on the tiny ``kind`` model's warm-preference cache (the ``runs`` fixture), writing to
    ``out``: configs/single_gpu.json and TrainConfig's defaults; ``kw`` overrides."""
    from rpo_fast.config import TrainConfig

    paths = dict(ds_config=str(ROOT / "configs" / "single_gpu.json"), model=str(runs[kind]))
    return TrainConfig(**(paths | dict(data=str(runs["root"] / f"cache_{kind}"), output=str(out)) | kw))


def in_process_trainer(runs, out, kind: str = "sd15", **kw):
    """A Trainer in this process (``train_config``): DPO, 2 pairs a step, fp32, torch's AdamW, no export, progress
    bar or TensorBoard; ``kw`` overrides."""
    from rpo_fast.train import Trainer

    cfg = dict(
        objective="dpo",
        micro_batch_size=2,
        max_steps=100,
        optimizer="adamw",
        mixed_precision="no",
        export=False,
        progress=False,
        tensorboard=False,
    )
    return Trainer(train_config(runs, out, kind, **(cfg | kw)))


def step_losses(trainer, steps: int = 3) -> list[float]:
    """``steps`` optimizer steps of an in-process Trainer, the mean loss after each; the trainer is closed."""
    out = []
    for _ in range(steps):
        trainer.train_step()
        out.append(trainer.metrics.mean(trainer.device)["loss"])
    trainer.close()
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_rows(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metrics(out) if "loss/loss" in r}


def common(runs, kind, out, *extra):
    return [
        "--ds_config",
        str(ZERO3),
        "--model",
        str(runs[kind]),
        "--data",
        str(runs["root"] / f"cache_{kind}"),
        "--output",
        str(out),
        "--micro-batch-size",
        "2",
        "--log-every",
        "1",
        "--no-progress",
        *extra,
    ]
