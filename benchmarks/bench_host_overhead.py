"""Host overhead of the training step, measured on a CPU: a UNet with SDXL's full module structure (every block,
resnet, transformer layer and attention of the real config: 3 levels, 1/2/10 transformer layers per block, 1,930
modules) at tiny channel widths (20/40/80, 4 channels per head) and 16x16 latents, so the arithmetic is small and
what is left is Python, module hooks, DeepSpeed's bookkeeping and op dispatch. Each configuration runs the real
``Trainer.train_step`` (RPO, 1 pair, one rank, fp32, the replicated reference, torch's AdamW: bitsandbytes' 8-bit
step on a CPU is its CPU kernels' compute, about 1 s of a 2 s step at 40/80/160 widths, not host overhead) in its own
process, each configuration twice (interleaved), keeping the faster median.

    python benchmarks/bench_host_overhead.py [--steps 5] [--quick]

Per configuration: host milliseconds per step (median of the timed steps), module calls per step, and calls of
functions named ``*hook*`` per step (DeepSpeed's ZeRO-3 fetch/release hooks, torch's hook dispatch; from cProfile,
one profiled step after the timed ones). For ZeRO-3 also the reference forward's host time under DeepSpeed's
process-wide ``F.linear`` replacement and with torch's own ``F.linear`` put back. The table is written to
``benchmarks/results/host_overhead-cpu.{json,md}`` (committed: this is a figure a CPU gives honestly).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_utils import ResultTable, cpu_name, stage0_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [  # (DeepSpeed config, recompute, option); stage0: single_gpu.json at stage 0, as it shipped before
    ("stage0", "none", "-"),
    ("single_gpu", "none", "-"),
    ("single_gpu", "selective", "-"),
    ("single_gpu", "full", "-"),
    ("zero2_8bit", "none", "-"),
    ("zero3_8bit", "none", "-"),
    ("zero3_8bit", "full", "-"),
    ("single_gpu", "none", "fuse-qkv"),
    ("single_gpu", "none", "regional"),
    ("single_gpu", "none", "regional+resnets"),
]
# the step options as TrainConfig fields (regional compile with inductor: on a CPU it generates C++ loops, so the
# row shows how many per-op dispatches a compiled region saves; its compilation happens in the warm-up steps)
OPTIONS = {
    "-": {},
    "fuse-qkv": dict(fuse_qkv=True),
    "regional": dict(compile_mode="regional", compile_backend="inductor"),
    "regional+resnets": dict(compile_mode="regional", compile_resnets=True, compile_backend="inductor"),
}


def skeleton_config() -> dict:
    """SDXL's UNet config with tiny widths: the same modules, ~1/64 of the channels."""
    from rpo_fast import testing as T

    return dict(
        T.FULL_UNET_CONFIGS["sdxl"],
        block_out_channels=(20, 40, 80),  # 5/10/20 heads of 4 channels (SDXL: 64)
        norm_num_groups=4,
        sample_size=16,
        cross_attention_dim=2 * T.TINY_HIDDEN,  # the tiny text encoders'
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + T.TINY_HIDDEN,
    )


def build(root: Path) -> tuple[Path, Path]:
    """The skeleton model folder (the tiny SDXL pipeline with the skeleton UNet) and a cache of 8 pairs."""
    from diffusers import UNet2DConditionModel

    from rpo_fast import testing as T

    model = T.save_tiny_pipeline(root / "model", "sdxl")
    UNet2DConditionModel(**skeleton_config()).save_pretrained(model / "unet")
    cache = T.write_synthetic_cache(model, root / "cache", 8, resolution=32, embed_dim=16)
    return model, cache


def measure_here(a) -> dict:
    """The child: one configuration's Trainer, timed and counted."""
    import cProfile
    import pstats

    import torch

    from rpo_fast.config import TrainConfig
    from rpo_fast.train import Trainer

    with tempfile.TemporaryDirectory() as out:
        ds_config = stage0_config(out) if a.ds_config == "stage0" else ROOT / "configs" / f"{a.ds_config}.json"
        cfg = TrainConfig(
            ds_config=str(ds_config),
            model=a.model,
            data=a.cache,
            output=out,
            objective="rpo",
            micro_batch_size=1,
            max_steps=10**6,
            mixed_precision="no",
            optimizer="adamw",
            recompute=a.recompute,
            **OPTIONS[a.option],
            export=False,
            progress=False,
            tensorboard=False,
        )
        trainer = Trainer(cfg)
        for _ in range(2):
            trainer.train_step()
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t0)
        calls = [0]

        def count(module, args):
            calls[0] += 1

        handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
        prof = cProfile.Profile()
        prof.enable()
        trainer.train_step()
        prof.disable()
        handle.remove()
        stats = pstats.Stats(prof).stats  # {(file, line, name): (primitive calls, calls, ...)}
        hooks = sum(v[1] for (_, _, name), v in stats.items() if "hook" in name and name != "<lambda>")
        row = dict(
            host_ms_per_step=1e3 * statistics.median(times),
            module_calls_per_step=calls[0],
            hook_function_calls_per_step=hooks,
            modules=sum(1 for _ in trainer.engine.module.modules()),
        )
        if a.ds_config.startswith("zero3"):
            row |= reference_forward_ms(trainer)
        trainer.close()
    return row


def reference_forward_ms(trainer) -> dict:
    """The reference forward alone, under ZeRO-3's F.linear replacement and with torch's F.linear put back."""
    import torch
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Init

    picks = trainer.sampler.next_batch(1)
    batch = trainer.batch(picks)
    fam = trainer.family
    noisy = torch.randn(2, *batch["latent_mean"].shape[2:])
    t = torch.full((2,), 500)
    from rpo_fast.models import cast_conditioning

    cond = cast_conditioning(fam.conditioning(batch, torch.zeros(1, dtype=torch.bool), trainer.empty), trainer.dtype)

    def timed() -> float:
        trainer.reference_forward(noisy, t, cond)
        t0 = time.perf_counter()
        for _ in range(5):
            trainer.reference_forward(noisy, t, cond)
        return 1e3 * (time.perf_counter() - t0) / 5

    patched = timed()
    linear = torch.nn.functional.linear
    torch.nn.functional.linear = getattr(Init, "linear_bk", linear)
    try:
        plain = timed()
    finally:
        torch.nn.functional.linear = linear
    return dict(reference_fwd_ms_zero3_linear=patched, reference_fwd_ms_torch_linear=plain)


def run(steps: int, configs=CONFIGS, command: str = "", rounds: int = 2) -> ResultTable:
    table = ResultTable(
        "host_overhead",
        "Host overhead of the training step (SDXL's module structure, tiny widths, CPU)",
        [
            "ds_config",
            "recompute",
            "option",
            "host_ms_per_step",
            "vs_stage0",
            "module_calls_per_step",
            "hook_function_calls_per_step",
            "modules",
            "reference_fwd_ms_zero3_linear",
            "reference_fwd_ms_torch_linear",
            "errors",
            "command",
        ],
        notes="Command: python benchmarks/bench_host_overhead.py. RPO, 1 pair (2 images through the policy and the "
        "replicated reference), one rank, fp32, torch AdamW, OMP_NUM_THREADS=1; each configuration in its own "
        f"process, median of {steps} timed steps after 2 warm-up steps; every configuration run {rounds} times, "
        "interleaved, the fastest median kept (a 2-core machine drifts). Hook calls: "
        "calls of functions whose name contains 'hook' in one cProfile'd step. ZeRO-3 with selective recompute is "
        "refused by the trainer (see README), so it has no row.",
        key=("ds_config", "recompute", "option"),
        device="cpu",
    )
    table.env["device"] = cpu_name()
    table.env["mode"] = "host overhead on a CPU: the arithmetic is small, this is no GPU speed"
    with tempfile.TemporaryDirectory(prefix="rpo_fast_host_") as tmp:
        model, cache = build(Path(tmp))
        best: dict[tuple, dict] = {}
        for _ in range(rounds):
            for config in configs:
                row = _child(Path(tmp), model, cache, *config, steps)
                old = best.get(config)
                if old is None or row.get("host_ms_per_step", float("inf")) < old.get("host_ms_per_step", float("inf")):
                    best[config] = row
        base = best.get(("stage0", "none", "-"), {}).get("host_ms_per_step")
        for (ds_config, recompute, option), row in best.items():
            ms = row.get("host_ms_per_step")
            table.add(
                ds_config=ds_config,
                recompute=recompute,
                option=option,
                vs_stage0=ms / base if ms and base else None,
                command=command,
                **row,
            )
            print(f"[bench] {table.rows[-1]}", flush=True)
    return table


def _child(tmp: Path, model: Path, cache: Path, ds_config: str, recompute: str, option: str, steps: int) -> dict:
    """One measurement in its own process: its row, or {"errors": ...}."""
    result = tmp / f"{ds_config}-{recompute}-{option}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", "--ds-config", ds_config, "--recompute", recompute, "--option", option]
    cmd += ["--model", str(model), "--cache", str(cache), "--steps", str(steps), "--result", str(result)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.exists():
        return json.loads(result.read_text()) | {"errors": None}
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]
    return {"errors": f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    ap.add_argument("--quick", action="store_true", help="2 timed steps, stage 0 and single_gpu only (CI)")
    for name in ("--ds-config", "--recompute", "--option", "--model", "--cache", "--result"):  # the child
        ap.add_argument(name, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        Path(a.result).write_text(json.dumps(measure_here(a)))
        return
    command = "python benchmarks/bench_host_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.quick:
        table = run(2, [("stage0", "none", "-"), ("single_gpu", "none", "-")], command=command, rounds=1)
    else:
        table = run(a.steps, command=command)
    for p in table.write():
        print(f"[bench] wrote {p}")


if __name__ == "__main__":
    main()
