"""End-to-end preference-training step: rpo_fast against a step in the style of the reference DPO scripts.

    python benchmarks/bench_train_step.py --kind sdxl --pairs 1 2 4 [--recompute none|selective|full]
        [--ds-config single_gpu|zero2_8bit|zero3_8bit] [--compile] [--compile-mode regional [--compile-resnets]]
        [--fp8] [--reference-graphs] [--ref-placement zero3] [--lora-rank 8]
                                                           (GPU: full-size UNets with random weights)
    python benchmarks/bench_train_step.py --quick          (CPU: tiny models; checks that it runs)
    python benchmarks/bench_train_step.py --kind sd3.5-medium flux.1-dev --recompute full --lora-rank 16
                                                           (the flow models: rpo_fast's side only, see below)

rpo_fast: ``rpo_fast.train.Trainer`` itself (the DeepSpeed config for one GPU, ``configs/single_gpu.json``, unless
``--ds-config`` names another; bitsandbytes AdamW8bit, bf16, the replicated bf16 reference, one concatenated forward per
model, latents and text encodings read from a cache, the loss backend "auto"). Baseline, what train_diffusion_dpo.py /
DiffusionDPO's train.py do every step on one GPU: both images through the VAE and the caption through the text
encoder(s) on the fly, the policy in fp32 under fp16 autocast with bitsandbytes AdamW8bit, the reference in fp16, the
eager loss, no compile, no cache. Same model, batch and GPU, measured side by side. The flow models (sd3.5-medium,
sd3.5-large, flux.1-dev) have no baseline row: no public script takes a full-parameter preference step on them.

Reported per configuration: pairs/s, seconds per step, peak memory, and FLOP utilisation over the bf16 matmul rate
measured in the same run: MFU counts the model FLOPs of a pair (policy forward + backward on winner and loser as 3
forwards, the reference forward on both), HFU the hardware FLOPs (recompute and flash attention's backward as they run).
Both are counted with torch.utils.flop_counter on the meta device (``rpo_fast.recompute.step_cost``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_utils  # noqa: E402
import torch
from bench_utils import QUICK, ResultTable, sync  # noqa: E402

from rpo_fast.models import FAMILIES, load_family
from rpo_fast.testing import FULL_SIZE

ROOT = Path(__file__).resolve().parents[1]
KINDS = tuple(FULL_SIZE)  # the full-size models the fixtures build (the tiny one of the same family in quick mode)


def matmul_rate() -> float:
    """The device's matmul FLOP/s, the MFU's denominator: 8192^3 in bf16 on a GPU, 512^3 in fp32 on a CPU."""
    n = 8192 if torch.cuda.is_available() else 512
    return bench_utils.matmul_rate(n, n, n, reps=20 if torch.cuda.is_available() else 5)


def flops_per_pair(model: Path, recompute: str) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one pair's step: policy forward + backward on [winner; loser] and the
    reference forward on both, counted on the meta device."""
    from rpo_fast.models import load_family
    from rpo_fast.recompute import step_cost

    cost = step_cost(load_family(model), recompute)
    reference = cost["forward_flops"]
    return 3 * cost["forward_flops"] + reference, cost["hardware_flops"] + reference


def _timed(step, steps: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        step()
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return (time.perf_counter() - t0) / steps, peak


def bench_config(
    model: Path, cache: Path, pairs: int, out: str, *, ds_config: str, objective="rpo", max_steps=10**6, **flags
):
    """The TrainConfig of a benchmarked step: ``objective`` (RPO) on the cache, ``pairs`` per micro-step,
    ``configs/DS_CONFIG.json``, no export, progress bar or TensorBoard; ``flags`` are further TrainConfig fields."""
    from rpo_fast.config import TrainConfig

    return TrainConfig(
        ds_config=str(ROOT / "configs" / f"{ds_config}.json"),
        model=str(model),
        data=str(cache),
        output=out,
        objective=objective,
        micro_batch_size=pairs,
        max_steps=max_steps,
        export=False,
        progress=False,
        tensorboard=False,
        **flags,
    )


def bench_rpo_fast(model: Path, cache: Path, pairs: int, *, steps: int, warmup: int, **flags) -> dict:
    from rpo_fast.train import Trainer

    with tempfile.TemporaryDirectory(prefix="rpo_fast_bench_") as out:  # logs only: no checkpoint in these steps
        trainer = Trainer(bench_config(model, cache, pairs, out, **flags))
        sec, peak = _timed(trainer.train_step, steps, warmup)
        trainer.close()
    return dict(step_s=sec, pairs_per_s=pairs / sec, peak_gb=peak)


def bench_baseline(model: Path, pairs: int, *, steps: int, warmup: int, gradient_checkpointing: bool) -> dict:
    """The reference scripts' step: VAE + text encoders every step, fp16 reference, fp16 autocast, eager loss, and
    diffusers' gradient checkpointing where the rpo_fast side recomputes (the scripts know no other)."""
    import bitsandbytes as bnb

    from rpo_fast import PreferenceLoss
    from rpo_fast.data import Crop
    from rpo_fast.models import cast_conditioning, load_family

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    half = torch.float16 if dev == "cuda" else torch.bfloat16
    family = load_family(model)
    res = family.default_resolution  # the recipe's: 512 / 1024 px (the tiny folder's 32)
    policy = family.load_denoiser(dtype=torch.float32).to(dev).train()
    if gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    reference = family.load_denoiser(dtype=half).to(dev).eval()
    vae = family.load_vae(device=dev, dtype=half if family.vae_fp16 else torch.float32)
    encoders = family.load_text_encoders(device=dev, dtype=half)
    opt = bnb.optim.AdamW8bit(policy.parameters(), lr=1e-8)
    loss_fn = PreferenceLoss("dpo", backend="eager")
    images = torch.rand(2 * pairs, 3, res, res, device=dev) * 2 - 1
    captions = [f"a photo number {i}" for i in range(pairs)]
    whole = family.image_conditioning([Crop((res, res), (0, 0))] * 2, res)  # the uncropped image's time ids
    keep = torch.zeros(pairs, dtype=torch.bool, device=dev)  # no caption dropped
    scaler = torch.amp.GradScaler(enabled=dev == "cuda")

    def step():
        with torch.no_grad():
            mean, std = family.encode_latents(vae, images.to(vae.dtype))
            x0 = family.latents((mean + std * torch.randn_like(std)).float())
            batch = family.encode_texts(encoders, captions)  # the text encoders every step
            batch |= {k: v.to(dev).expand(pairs, *v.shape) for k, v in whole.items()}
            cond = family.conditioning(batch, keep, {k: v[0] for k, v in batch.items()})
        t = torch.randint(0, family.num_train_timesteps, (pairs,), device=dev)
        noise = torch.randn_like(x0[:pairs])
        noisy, target = family.noisy_and_target(x0, noise, t)
        t2 = t.repeat(2)
        with torch.autocast(dev, dtype=half):
            pred = family.predict(policy, noisy, t2, cond)
        with torch.no_grad():
            ref = family.predict(reference, noisy.to(half), t2, cast_conditioning(cond, half))
        loss = loss_fn(pred.float(), target, ref.float()).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    sec, peak = _timed(step, steps, warmup)
    return dict(step_s=sec, pairs_per_s=pairs / sec, peak_gb=peak)


def measure(side: str, model: Path, cache: Path, pairs: int, *, steps: int, warmup: int, **flags) -> dict:
    """One measurement (``side``: "rpo_fast" or "baseline") in its own process, so that its peak memory is its
    own and an out-of-memory ends only it: {step_s, pairs_per_s, peak_gb} or {error}."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--measure", side, "--model", str(model), "--cache", str(cache)]
        cmd += ["--pairs", str(pairs), "--steps", str(steps), "--warmup", str(warmup), "--result", str(result)]
        cmd += ["--flags", json.dumps(flags)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if result.exists():
            return json.loads(result.read_text())
        lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]
        return dict(error=f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}", log=lines[-40:])


def _measure_here(a) -> None:
    """The child of ``measure``: runs one side and writes its result (an out-of-memory is a result too)."""
    flags = json.loads(a.flags)
    kw = dict(steps=a.steps, warmup=a.warmup)
    (pairs,) = a.pairs
    try:
        if a.measure == "rpo_fast":
            out = bench_rpo_fast(Path(a.model), Path(a.cache), pairs, **kw, **flags)
        else:
            out = bench_baseline(Path(a.model), pairs, **kw, gradient_checkpointing=flags["recompute"] != "none")
    except torch.OutOfMemoryError as e:
        peak = torch.cuda.max_memory_allocated() / 2**30
        out = dict(error=f"out of memory (peak {peak:.1f} GiB allocated): {str(e).splitlines()[0]}")
    Path(a.result).write_text(json.dumps(out))


def random_model(root: Path, kind: str, tiny: bool) -> Path:
    """The random model folder of ``kind`` under ``root`` (full size in bf16 on the GPU; tiny: the small config in
    fp32 on the CPU), built once: the same seed gives the same weights, and a folder left half-built is redone."""
    from rpo_fast import testing as T

    model = root / (f"tiny-{kind}" if tiny else kind)
    if not (model / ".complete").exists():
        t0 = time.perf_counter()
        shutil.rmtree(model, ignore_errors=True)
        dtype, device = (torch.float32, "cpu") if tiny else (torch.bfloat16, "cuda")
        T.save_random_model(model, kind, full=not tiny, dtype=dtype, device=device)
        (model / ".complete").touch()
        print(f"[bench] built {model} in {time.perf_counter() - t0:.0f} s", flush=True)
    return model


def run(kinds, pairs_list, *, recompute="selective", steps=5, warmup=2, table=None, command="", **flags) -> ResultTable:
    from rpo_fast import testing as T

    # one spelling per configuration
    flags = dict(ds_config="single_gpu", ref_placement="replicated", lora_rank=0, compile=False) | flags
    table = table or ResultTable(
        "train_step",
        "End-to-end training step: rpo_fast vs a reference-script step",
        [
            "kind",
            "pairs",
            "recompute",
            "flags",
            "rpo_fast_pairs_s",
            "baseline_pairs_s",
            "speedup",
            "rpo_fast_peak_gb",
            "baseline_peak_gb",
            "model_tflop_per_pair",
            "hardware_tflop_per_pair",
            "matmul_tflops",
            "rpo_fast_mfu",
            "rpo_fast_hfu",
            "baseline_mfu",
            "errors",
            "command",
        ],
        notes="Command: python benchmarks/bench_train_step.py (or pytest benchmarks/ --benchmark). MFU: model FLOPs "
        "(policy fwd+bwd on 2 images as 3 forwards + reference fwd on 2) x pairs/s over the bf16 matmul rate "
        "measured in the same run; HFU: hardware FLOPs (recompute and flash attention's backward included) x pairs/s "
        "over the same rate. The baseline recomputes (diffusers' gradient checkpointing) wherever rpo_fast does. Each "
        "measurement runs in its own process (peak memory is its own; an out-of-memory is reported in errors).",
        key=("kind", "pairs", "recompute", "flags"),
    )
    rate = matmul_rate()
    keep = os.environ.get("RPO_FAST_BENCH_MODELS")  # a folder to keep the random models in, for the next run
    # without it, a temporary folder removed at the end (an SDXL model folder is 7 GB)
    with contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(prefix="rpo_fast_models_") as root:
        for kind in kinds:
            key = dict(kind=kind, recompute=recompute, flags=json.dumps(flags))
            todo = [p for p in pairs_list if not table.measured(pairs=p, **key)]
            if not todo:
                print(f"[bench] {kind}: measured earlier at this commit (RPO_FAST_BENCH_RESUME=1)", flush=True)
                continue
            model = random_model(Path(root), kind, tiny=QUICK)
            flops, hw_flops = flops_per_pair(model, recompute)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the measurements run in child processes: leave them the whole GPU
            family = load_family(model)
            for pairs in todo:
                res = family.default_resolution
                cache = T.write_synthetic_cache(
                    model, Path(root) / f"cache-{kind}-{pairs}", max(8, 2 * pairs), resolution=res
                )
                kw = dict(steps=steps, warmup=warmup, recompute=recompute)
                ours = measure("rpo_fast", model, cache, pairs, **kw, **flags)
                if family.flow_matching:  # rpo_fast's side only
                    base = dict(note="no baseline: no public full-parameter preference step for this family")
                else:
                    base = measure("baseline", model, cache, pairs, **kw)
                ok = "error" not in ours and "pairs_per_s" in base
                table.add(
                    **key,
                    pairs=pairs,
                    rpo_fast_pairs_s=ours.get("pairs_per_s"),
                    baseline_pairs_s=base.get("pairs_per_s"),
                    speedup=ours["pairs_per_s"] / base["pairs_per_s"] if ok else None,
                    rpo_fast_peak_gb=ours.get("peak_gb"),
                    baseline_peak_gb=base.get("peak_gb"),
                    model_tflop_per_pair=flops / 1e12,
                    hardware_tflop_per_pair=hw_flops / 1e12,
                    matmul_tflops=rate / 1e12,
                    rpo_fast_mfu=ours["pairs_per_s"] * flops / rate if "error" not in ours else None,
                    rpo_fast_hfu=ours["pairs_per_s"] * hw_flops / rate if "error" not in ours else None,
                    baseline_mfu=base["pairs_per_s"] * flops / rate if "pairs_per_s" in base else None,
                    errors="; ".join(
                        f"{k}: {v['error']}" for k, v in (("rpo_fast", ours), ("baseline", base)) if "error" in v
                    )
                    or None,
                    command=command,
                )
                for side, r in (("rpo_fast", ours), ("baseline", base)):
                    if "error" in r:
                        print(
                            f"[bench] {kind} x{pairs} {side}: {r['error']}",
                            *r.get("log", [])[-20:],
                            sep="\n",
                            flush=True,
                        )
                print(f"[bench] {table.rows[-1]}", flush=True)
    return table


def add_step_options(ap: argparse.ArgumentParser) -> None:
    """The step's speed options, as this benchmark and benchmarks/gpu_check.py's step stage take them."""
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compile-mode", choices=["whole", "regional"], help="implies --compile")
    ap.add_argument("--compile-resnets", action="store_true", help="with --compile-mode regional: the resnets too")
    ap.add_argument("--fp8", action="store_true", help="FP8 linear layers (torchao; sm_89+)")
    ap.add_argument("--reference-graphs", action="store_true", help="the reference forward from a CUDA graph")


def step_options(a: argparse.Namespace) -> dict:
    """``add_step_options``' flags beyond --compile, as TrainConfig fields."""
    keys = ("compile_mode", "compile_resnets", "fp8", "reference_graphs")
    return {k: getattr(a, k) for k in keys}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", nargs="+", default=["sdxl"], choices=KINDS)
    ap.add_argument("--pairs", nargs="+", type=int, default=[1])
    ap.add_argument("--recompute", default="selective", choices=["none", "selective", "full"])
    ap.add_argument("--ds-config", default="single_gpu", choices=["single_gpu", "zero2_8bit", "zero3_8bit"])
    add_step_options(ap)
    ap.add_argument("--ref-placement", default="replicated", choices=["replicated", "zero3"])
    ap.add_argument("--lora-rank", type=int, default=0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny models (the CPU mode)")
    for name in ("--measure", "--model", "--cache", "--result", "--flags"):  # the child of measure()
        ap.add_argument(name, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.measure:
        return _measure_here(a)
    flags = dict(ds_config=a.ds_config, ref_placement=a.ref_placement, lora_rank=a.lora_rank, compile=a.compile)
    flags |= {k: v for k, v in step_options(a).items() if v}  # only those given: an older row's key keeps its spelling
    if QUICK and not a.quick:
        print("[bench] no GPU: running the quick mode (tiny models)")
    table = run(
        a.kind if not QUICK else ["sd15", *(k for k in a.kind if FAMILIES[FULL_SIZE[k]].flow_matching)],
        a.pairs,
        recompute=a.recompute,
        steps=a.steps if not QUICK else 1,
        warmup=a.warmup if not QUICK else 1,
        command="python benchmarks/bench_train_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        **flags,
    )
    for p in table.write():
        print(f"[bench] wrote {p}")


if __name__ == "__main__":
    main()
