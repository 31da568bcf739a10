"""The optimizer step of each shipped DeepSpeed config, counted on a CPU (one rank, bf16, a small MLP): host reads and
device synchronizes per optimizer step at two parameter counts, and the relative error of the accumulated gradient
against the float64 sum of the same micro-steps' gradients at 4, 64 and 256 micro-steps. "before" runs each config as
it shipped before fp32 accumulation (single_gpu.json at ZeRO stage 0, 16-bit accumulation, the throughput timer on).

    python benchmarks/bench_one_gpu_step.py            # markdown tables on stdout

What a CPU cannot show: the time a synchronize or a read costs on a GPU (each stalls the host until the stream
drains). Counted with rpo_fast.debug.HostSyncs (tests/test_one_gpu_step.py holds the same counts).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("single_gpu", "zero1_8bit", "zero2_8bit", "zero3_8bit")
BEFORE = {  # what each config was before: 16-bit accumulation, the throughput timer synchronizing
    "data_types": {"grad_accum_dtype": "bf16"},
    "timers": {"throughput": {"enabled": True}},
}


def engine(config: str, model, grad_accum: int, *, before=False, optimizer="adamw8bit", clip=True, **sections):
    """The trainer's engine (``engine.read_ds_config`` + ``build_engine``) for ``configs/<config>.json`` in bf16 on one
    rank; ``sections`` are merged into a copy of the config file before the trainer reads it. ``before``: the config
    as it shipped before (``BEFORE``; single_gpu at stage 0, which read_ds_config now refuses with accumulation, so
    that row's fields are filled here)."""
    from rpo_fast import distributed
    from rpo_fast import engine as E
    from rpo_fast.config import TrainConfig

    distributed.init_distributed()
    ds = json.loads((ROOT / "configs" / f"{config}.json").read_text())
    if before:
        ds |= BEFORE
    if not clip:
        ds["gradient_clipping"] = 0.0  # clipping rescales the sum: the comparison is of the sum itself
    for key, value in sections.items():
        ds[key] = {**ds.get(key, {}), **value}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ds, f)
    cfg = TrainConfig(
        ds_config=f.name, model="-", data="-", grad_accum=grad_accum, mixed_precision="bf16", optimizer=optimizer
    )
    if before and config == "single_gpu":
        ds = {k: v for k, v in ds.items() if not k.startswith("_")} | dict(
            train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=grad_accum, train_batch_size=grad_accum,
            bf16={"enabled": True}, fp16={"enabled": False}, zero_optimization={"stage": 0},
            zero_allow_untested_optimizer=True,
        )  # fmt: skip
    else:
        ds = E.read_ds_config(cfg, 1)
    return E.build_engine(model, cfg, ds, 1e-3)[0]


def mlp(layers: int, width: int = 48) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[m for _ in range(layers) for m in (torch.nn.Linear(width, width), torch.nn.GELU())])


def batches(n: int, width: int = 48):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, width, generator=g).to(torch.bfloat16) for _ in range(n)]


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out.float().pow(2).mean()


def counts(config: str, layers: int, *, before: bool = False) -> tuple[int, int]:
    """(host reads, device synchronizes) of one whole optimizer step of 2 micro-steps (forward, backward, engine.step
    with its overflow check, clipping and the 8-bit update) after three warm-up steps."""
    from rpo_fast.debug import HostSyncs

    eng = engine(config, mlp(layers), 2, before=before)

    def step():
        for x in batches(2):
            eng.backward(loss_of(eng(x)))
            eng.step()

    for _ in range(3):
        step()
    with HostSyncs() as c:
        step()
    return len(c.reads), len(c.synchronizes)


def accumulation_error(config: str, steps: int, *, before: bool = False, **sections) -> float:
    """The relative L2 error of what the optimizer receives after ``steps`` micro-steps against the float64 sum of the
    same micro-steps' bf16 gradients computed alone. The client optimizer's step is intercepted; its parameters (flat
    fp32 partitions in the model's order, padded at the end) are read as one vector."""
    model, twin = mlp(2), mlp(2).to(torch.bfloat16)  # the same weights, rounded as DeepSpeed rounds them
    eng = engine(config, model, steps, before=before, optimizer="adamw", clip=False, **sections)
    client, seen, step = eng.optimizer.optimizer, [], eng.optimizer.optimizer.step

    def intercept(*a, **k):
        seen.append(torch.cat([p.grad.double().flatten() for g in client.param_groups for p in g["params"]]))
        return step(*a, **k)

    client.step = intercept
    want = [torch.zeros_like(p, dtype=torch.float64) for p in twin.parameters()]
    for x in batches(steps):
        eng.backward(loss_of(eng(x)))
        eng.step()
        twin.zero_grad()
        (loss_of(twin(x)) / steps).backward()  # DeepSpeed divides the loss by the accumulation steps
        for w, p in zip(want, twin.parameters()):
            w += p.grad.double()
    want = torch.cat([w.flatten() for w in want])
    assert len(seen) == 1
    have = seen[0][: want.numel()]
    return ((have - want).norm() / want.norm()).item()


def main() -> None:
    import warnings

    warnings.simplefilter("ignore")  # the 'before' rows' 16-bit accumulation warning
    print("| config | before: reads, synchronizes (4 / 16 tensors) | now: reads, synchronizes (4 / 16 tensors) |")
    print("|---|---|---|")
    for config in CONFIGS:
        cells = []
        for before in (True, False):
            a, b = counts(config, 2, before=before), counts(config, 8, before=before)
            cells.append(f"{a[0]}, {a[1]} / {b[0]}, {b[1]}")
        print(f"| `{config}.json` | {cells[0]} | {cells[1]} |")
    print()
    print("| config | before: error at 4 / 64 / 256 micro-steps | now: error at 4 / 64 / 256 micro-steps |")
    print("|---|---|---|")
    for config in CONFIGS:
        cells = [
            " / ".join(f"{accumulation_error(config, n, before=b):.2g}" for n in (4, 64, 256)) for b in (True, False)
        ]
        print(f"| `{config}.json` | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    from rpo_fast.logs import quiet_known_noise

    quiet_known_noise()  # the dependencies' known log noise (RPO_FAST_VERBOSE=1 shows it)
    main()
