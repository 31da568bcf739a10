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


def engine(config: str, model, grad_accum: int, *, before: bool, optimizer: str = "adamw8bit", clip: bool = True):
    from rpo_fast import engine as E
    from rpo_fast.config import TrainConfig

    ds = json.loads((ROOT / "configs" / f"{config}.json").read_text())
    if before:
        ds |= BEFORE
        if config == "single_gpu":
            ds["zero_optimization"] = {"stage": 0}
    if not clip:
        ds["gradient_clipping"] = 0.0
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ds, f)
    cfg = TrainConfig(
        ds_config=f.name, model="-", data="-", grad_accum=grad_accum, mixed_precision="bf16", optimizer=optimizer
    )
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        ds = E.read_ds_config(cfg, 1) if not (before and config == "single_gpu") else _stage0(cfg)
    return E.build_engine(model, cfg, ds, 1e-3)[0]


def _stage0(cfg) -> dict:
    """read_ds_config refuses stage 0 with accumulation now: fill the same fields by hand for the 'before' row."""
    ds = json.loads(Path(cfg.ds_config).read_text())
    ds |= dict(
        train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=cfg.grad_accum, train_batch_size=cfg.grad_accum
    )
    ds["bf16"], ds["fp16"] = {"enabled": True}, {"enabled": False}
    ds["zero_allow_untested_optimizer"] = True
    return {k: v for k, v in ds.items() if not k.startswith("_")}


def mlp(layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[m for _ in range(layers) for m in (torch.nn.Linear(48, 48), torch.nn.GELU())])


def batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 48, generator=g).to(torch.bfloat16) for _ in range(n)]


def counts(config: str, layers: int, before: bool) -> tuple[int, int]:
    from rpo_fast.debug import HostSyncs

    eng = engine(config, mlp(layers), 2, before=before)

    def step():
        for x in batches(2):
            eng.backward(eng(x).float().pow(2).mean())
            eng.step()

    for _ in range(3):
        step()
    with HostSyncs() as c:
        step()
    return len(c.reads), len(c.synchronizes)


def accumulation_error(config: str, steps: int, before: bool) -> float:
    model, twin = mlp(2), mlp(2).to(torch.bfloat16)
    eng = engine(config, model, steps, before=before, optimizer="adamw", clip=False)
    client, seen, step = eng.optimizer.optimizer, [], eng.optimizer.optimizer.step

    def intercept(*a, **k):
        seen.append(torch.cat([p.grad.double().flatten() for g in client.param_groups for p in g["params"]]))
        return step(*a, **k)

    client.step = intercept
    want = [torch.zeros_like(p, dtype=torch.float64) for p in twin.parameters()]
    for x in batches(steps):
        eng.backward(eng(x).float().pow(2).mean())
        eng.step()
        twin.zero_grad()
        (twin(x).float().pow(2).mean() / steps).backward()
        for w, p in zip(want, twin.parameters()):
            w += p.grad.double()
    want = torch.cat([w.flatten() for w in want])
    have = seen[0][: want.numel()]
    return ((have - want).norm() / want.norm()).item()


def main() -> None:
    from rpo_fast import distributed

    distributed.init_distributed()
    print("| config | before: reads, synchronizes (4 / 16 tensors) | now: reads, synchronizes (4 / 16 tensors) |")
    print("|---|---|---|")
    for config in CONFIGS:
        cells = []
        for before in (True, False):
            a, b = counts(config, 2, before), counts(config, 8, before)
            cells.append(f"{a[0]}, {a[1]} / {b[0]}, {b[1]}")
        print(f"| `{config}.json` | {cells[0]} | {cells[1]} |")
    print()
    print("| config | before: error at 4 / 64 / 256 micro-steps | now: error at 4 / 64 / 256 micro-steps |")
    print("|---|---|---|")
    for config in CONFIGS:
        cells = [" / ".join(f"{accumulation_error(config, n, b):.2g}" for n in (4, 64, 256)) for b in (True, False)]
        print(f"| `{config}.json` | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
