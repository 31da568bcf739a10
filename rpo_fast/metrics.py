"""What a run reports: a running mean of the loss's metrics (on the device, no sync until read), the run
logger (``metrics.jsonl`` and TensorBoard on rank 0), and the peak memory.

Keys of a training row: ``loss/<name>`` for the loss and the errors (loss, mse_w, mse_l, ref_mse_w, ref_mse_l),
``reward/<name>`` for the rest of the objective's metrics (implicit_acc, reward_margin, ...), ``train/lr``,
``train/grad_norm``, ``train/skipped_steps``, ``time/pairs_per_s``, ``memory/peak_gb`` (and ``train/loss_scale``
with fp16); evaluation rows: ``eval/<name>``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from . import distributed


def metric_group(name: str) -> str:
    """The row prefix of a loss metric: 'loss' for the loss and the errors, 'reward' for the rest."""
    return "loss" if name == "loss" or name.startswith(("mse", "ref_mse")) else "reward"


# The keys of every training row beside the loss's metrics, with what they mean (docs/cli/train.md).
STEP_KEYS = {
    "train/lr": "the learning rate of the step",
    "train/grad_norm": "DeepSpeed's global gradient norm of the step (all ranks; NaN where it reports none)",
    "train/skipped_steps": "optimizer steps skipped so far (a non-finite loss or gradient, an fp16 overflow)",
    "time/pairs_per_s": "pairs trained per second since the last row (all ranks)",
    "memory/peak_gb": "rank 0's peak CUDA memory allocated, GiB (on a CPU its peak resident set)",
}
FP16_KEYS = {"train/loss_scale": "DeepSpeed's dynamic loss scale (--mixed-precision fp16 only)"}
ONLINE_KEYS = {
    "rollout/reward_mean": "online: the mean reward of the rollouts since the last row (all ranks)",
    "rollout/reward_std": "online: the spread of the rewards within a prompt's K samples (mean standard deviation)",
    "rollout/reward_max": "online: the mean over prompts of the best of K rewards",
    "time/rollout_s": "online: seconds spent sampling, decoding and scoring since the last row (mean over ranks)",
    "time/train_s": "online: seconds spent in the updates since the last row (mean over ranks)",
    "time/rollout_share": "online: rollout seconds / (rollout + update seconds)",
    "time/images_per_s": "online: rollout throughput, trajectories sampled and scored per second (all ranks)",
}


def row_keys(objective: str, *, fp16: bool = False) -> list[str]:
    """The keys of a training row of ``metrics.jsonl`` (beside ``step``) for ``objective``: its metrics under
    ``loss/`` or ``reward/`` (``metric_group``), then ``STEP_KEYS`` (and ``FP16_KEYS``)."""
    from .objectives import objective as spec

    keys = [f"{metric_group(name)}/{name}" for name in spec(objective).metrics]
    online = list(ONLINE_KEYS) if spec(objective).online else []
    return keys + online + list(STEP_KEYS) + (list(FP16_KEYS) if fp16 else [])


def eval_keys(objective: str) -> list[str]:
    """The keys of an evaluation row (``--eval-every``): ``eval/<metric>`` for each of the objective's metrics."""
    from .objectives import objective as spec

    return [f"eval/{name}" for name in sorted(spec(objective).metrics)]


def key_table() -> str:
    """The table of ``metrics.jsonl`` keys (docs/cli/train.md): which objectives log each and what it is."""
    from .objectives import METRIC_HELP, OBJECTIVE_TABLE

    rows = ["| key | objectives | meaning |", "|---|---|---|"]
    names = list(dict.fromkeys(n for o in OBJECTIVE_TABLE.values() for n in o.metrics))
    for name in names:
        which = [o for o, spec in OBJECTIVE_TABLE.items() if name in spec.metrics]
        shown = "all" if len(which) == len(OBJECTIVE_TABLE) else ", ".join(which)
        rows.append(f"| `{metric_group(name)}/{name}` (`eval/{name}`) | {shown} | {METRIC_HELP[name]} |")
    online = ", ".join(k for k, o in OBJECTIVE_TABLE.items() if o.online)
    for key, text in (STEP_KEYS | FP16_KEYS).items():
        rows.append(f"| `{key}` | all | {text} |")
    for key, text in ONLINE_KEYS.items():
        rows.append(f"| `{key}` | {online} | {text.removeprefix('online: ')} |")
    return "\n".join(rows)


class MetricMean:
    """Sums of scalar tensors over micro-steps, kept on their device; ``mean()`` averages over the micro-steps and
    the ranks (one all-reduce) and is the only point where values leave the device."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def mean(self, device) -> dict[str, float]:
        """{name: mean over micro-steps and ranks}; resets the sums."""
        names = sorted(self.sums)
        vec = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32, device=device) for k in names])
        vec = distributed.all_reduce_sum(vec / self.count) / distributed.world_size()
        self.sums, self.count = {}, 0
        return dict(zip(names, vec.tolist()))


def peak_memory_gb() -> float:
    """Peak CUDA memory allocated, or on a CPU the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _logged_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line of a killed process: dropped


class RunLogger:
    """metrics.jsonl (one JSON object per log), TensorBoard when installed, on rank 0.

    The run continues from ``start_step`` (0, or the step of the checkpoint it resumed from): rows logged after
    that step by an earlier, killed process are dropped (they are about to be redone), so the file holds each step
    once. TensorBoard's events after it are purged the same way."""

    def __init__(self, out: Path, rank: int, tensorboard: bool, start_step: int = 0):
        self.rank, self.tb = rank, None
        if rank != 0:
            return
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        if path.exists():
            lines = path.read_text().splitlines() if start_step else []
            kept = [line for line in lines if _logged_step(line) <= start_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self.file = path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)
            except ImportError:
                print("[rpo_fast] tensorboard is not installed: logging to metrics.jsonl only", flush=True)

    def write(self, step: int, row: dict) -> None:
        if self.rank != 0:
            return
        self.file.write(json.dumps({"step": step, **row}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.rank == 0:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def progress_bar(total: int, start: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", desc=desc, dynamic_ncols=True)


def run_environment(world: int) -> dict:
    """The versions and device of a run (OUTPUT/env.json), and whether ``import kernels`` works (it must not:
    ``rpo_fast/`` on sys.path would make rpo_fast's subpackages importable as top-level names)."""
    import importlib.util

    import deepspeed
    import diffusers
    import transformers

    try:
        import kernels  # noqa: F401

        kernels_import = f"works ({importlib.util.find_spec('kernels').origin})"
    except ImportError as e:
        kernels_import = f"fails ({type(e).__name__})"
    return dict(
        world=world,
        torch=torch.__version__,
        deepspeed=deepspeed.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        cuda=torch.cuda.is_available(),
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        import_kernels=kernels_import,
        sys_path=sys.path,
    )
