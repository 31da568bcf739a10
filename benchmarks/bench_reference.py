"""The precomputed reference (``python -m rpo_fast.reference``, ``--ref-placement precomputed``) in the figures a CPU
gives honestly: counts, errors, and times side by side in one process.

    python benchmarks/bench_reference.py [--parts numerics,flops,step] [--steps 6]

- numerics: the pair logit u = -(beta / 2)(delta_w - delta_l) at beta 5000, the live path's delta (one fp32
  expression, ``per_sample_errors``) against the table's (m and r accumulated in float64), both against float64 on
  the same inputs: random tensors at SDXL's latent size (4 pairs of 4 x 128 x 128; p = t + 0.5 noise, q = p + 0.01
  noise), in fp32 and in bf16 (both paths from the same bf16 values); and a tiny SD1.5 trainer (fp32, bf16), the
  run reading a table against the run with the live reference on the same picks and draws.
- flops: a training step's FLOPs per pair with the live reference (policy forward + backward without recompute, the
  reference's forward on both images) and without it, counted on the meta device (``rpo_fast.recompute.step_cost``)
  for SD1.5 at 512 px, SDXL, SD3.5-Medium/Large and FLUX.1-dev at 1024 px; and the reference's bf16 weights per GPU
  that the table frees.
- step: on this CPU, the host-overhead benchmark's SDXL-structure UNet (benchmarks/bench_host_overhead.py), RPO,
  1 pair, fp32: a training step with the live replicated reference and with the table, alternated in one process
  (medians), and the reference pass's images per second.

Writes ``benchmarks/results/reference-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench_train_step as B
import torch
from bench_utils import ResultTable, cpu_name

ROOT = Path(__file__).resolve().parents[1]
BETA = 5000.0
FLOP_MODELS = ("sd15", "sdxl", "sd3.5-medium", "sd3.5-large", "flux.1-dev")


def _logit(delta: torch.Tensor) -> torch.Tensor:
    b = delta.shape[0] // 2
    return -(BETA / 2) * (delta[:b] - delta[b:])


def numerics_random(dtype: torch.dtype) -> dict:
    """Max |u_live - u_table| and each against float64, at SDXL's latent size."""
    from rpo_fast.objectives import per_sample_errors

    g = torch.Generator().manual_seed(0)
    shape = (8, 4, 128, 128)
    t = torch.randn(shape, generator=g)
    p = (t + 0.5 * torch.randn(shape, generator=g)).to(dtype)
    q = (p.float() + 0.01 * torch.randn(shape, generator=g)).to(dtype)
    live = per_sample_errors(p, t, q).delta  # fp32 accumulation of one expression
    m = per_sample_errors(p.double(), t.double()).m
    r = per_sample_errors(q.double(), t.double()).m
    exact = per_sample_errors(p.double(), t.double(), q.double()).delta
    u_live, u_table, u_exact = _logit(live.double()), _logit(m - r), _logit(exact)
    return dict(
        inputs=f"random 8x4x128x128 {str(dtype).removeprefix('torch.')}",
        max_logit_err_live_vs_table=float((u_live - u_table).abs().max()),
        max_logit_err_live_vs_float64=float((u_live - u_exact).abs().max()),
        max_logit_err_table_vs_float64=float((u_table - u_exact).abs().max()),
        mean_abs_logit=float(u_exact.abs().mean()),
    )


def numerics_trainer(precision: str, root: Path) -> dict:
    """A tiny SD1.5 run reading a table against the run with the live reference, 3 micro-batches of 2 pairs: the
    largest |h_live - h_table| of the mean implicit rewards (each micro-batch's reward_w, reward_l) and the loss's."""
    from rpo_fast import testing as T
    from rpo_fast.reference import ReferenceConfig, run_pass

    model = root / "sd15"
    if not model.exists():
        T.save_tiny_pipeline(model, "sd15")
        T.write_synthetic_cache(model, root / "cache", 12, resolution=32, embed_dim=16)
    table = run_pass(
        ReferenceConfig(
            model=str(model),
            data=str(root / "cache"),
            reference_table=str(root / f"table-{precision}"),
            mixed_precision=precision,
            progress=False,
            batch_size=5,
        )
    )
    live, pre = live_and_table(
        model, root / "cache", table, root / precision, 2, objective="dpo", beta=BETA, mixed_precision=precision,
        max_steps=6,
    )  # fmt: skip
    g = torch.Generator().manual_seed(3)
    noise = [0.02 * p.abs().mean() * torch.randn(p.shape, generator=g) for p in live.engine.module.parameters()]
    with torch.no_grad():
        for t in (live, pre):
            for p, n in zip(t.engine.module.parameters(), noise):
                p.add_(n.to(p.dtype))
    worst = dict(h=0.0, loss=0.0)
    with torch.no_grad():
        for _ in range(3):
            picks, batch = live.loader.next()
            pre.loader.next()
            seeds = live.pair_seeds(picks)
            a = live.forward_loss(batch, seeds).metrics
            b = pre.forward_loss(batch, seeds, ref_errors=pre.table.train_errors(picks)).metrics
            worst["h"] = max(worst["h"], *(abs(float(a[k]) - float(b[k])) for k in ("reward_w", "reward_l")))
            worst["loss"] = max(worst["loss"], abs(float(a["loss"]) - float(b["loss"])))
    close(live, pre)
    return dict(
        inputs=f"tiny SD1.5 trainer, {precision}, pass batch 5 vs micro-batch 2",
        max_logit_err_live_vs_table=worst["h"],
        loss_err=worst["loss"],
    )


def live_and_table(model: Path, cache: Path, table: Path, out: Path, pairs: int, **flags):
    """Two Trainers of the same step (``bench_train_step.bench_config``: RPO unless ``flags`` say otherwise, torch's
    AdamW): one with the live replicated reference, one reading ``table``."""
    from rpo_fast.train import Trainer

    flags = dict(ds_config="single_gpu", max_steps=16, optimizer="adamw") | flags
    live = Trainer(B.bench_config(model, cache, pairs, str(out / "live"), **flags))
    pre = Trainer(
        B.bench_config(
            model, cache, pairs, str(out / "pre"), ref_placement="precomputed", reference_table=str(table), **flags
        )
    )
    return live, pre


def close(*trainers) -> None:
    """Close the trainers and forget the one-process rank they set (the next Trainer of this process sets its own)."""
    for t in trainers:
        t.close()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)


def flops() -> list[dict]:
    """FLOPs per pair of a training step with and without the reference, counted on the meta device."""
    from rpo_fast import testing as T
    from rpo_fast.models import load_family
    from rpo_fast.recompute import step_cost

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in FLOP_MODELS:
            family = load_family(T.save_model_configs(Path(tmp) / name, name))
            with torch.device("meta"):
                denoiser = family.denoiser_class().from_config(family.config(family.denoiser_folder))
            params = sum(p.numel() for p in denoiser.parameters())
            cost = step_cost(family, "none", rows=2)
            live = cost["hardware_flops"] + cost["forward_flops"]  # policy fwd + bwd, reference fwd, 2 images
            rows.append(
                dict(
                    model=name,
                    resolution=family.default_resolution,
                    params_b=params / 1e9,
                    live_tflop_per_pair=live / 1e12,
                    precomputed_tflop_per_pair=cost["hardware_flops"] / 1e12,
                    reference_share=cost["forward_flops"] / live,
                    reference_weights_gb=2 * params / 1e9,
                )
            )
            print(f"[bench] {rows[-1]}", flush=True)
    return rows


def step(steps: int, root: Path) -> dict:
    """The SDXL-structure skeleton, RPO, 1 pair, fp32: a step with the live reference and with the table, alternated
    in one process (medians of ``steps`` each after 2 warm-up steps), and the pass's images per second."""

    from bench_host_overhead import build

    from rpo_fast.reference import ReferenceConfig, run_pass

    model, cache = build(root / "skeleton")
    ref = dict(model=str(model), data=str(cache), mixed_precision="no", progress=False, batch_size=8, epochs=2)
    t0 = time.perf_counter()
    table = run_pass(ReferenceConfig(**ref, reference_table=str(root / "skeleton-table")))
    pass_s = time.perf_counter() - t0  # (its model load included)
    images = 2 * 8 * 2 + 2 * 8  # 2 epochs of 8 pairs and the evaluation's 8, two images each
    live, pre = live_and_table(model, cache, table, root / "step", 1, mixed_precision="no")
    times = {"live": [], "precomputed": []}
    for i in range(steps + 2):
        for name, t in (("live", live), ("precomputed", pre)):
            t0 = time.perf_counter()
            t.train_step()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    close(live, pre)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return dict(
        live_ms_per_step=ms["live"],
        precomputed_ms_per_step=ms["precomputed"],
        precomputed_over_live=ms["precomputed"] / ms["live"],
        pass_images_per_s=images / pass_s,
        pass_seconds=pass_s,
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="numerics,flops,step")
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args(argv)
    parts = a.parts.split(",")
    command = "python benchmarks/bench_reference.py " + " ".join(sys.argv[1:] if argv is None else argv)
    notes = f"Command: {command}. {cpu_name()}. See the script's docstring for what each row measures."
    with tempfile.TemporaryDirectory(prefix="rpo_fast_reference_") as tmp:
        root = Path(tmp)
        if "numerics" in parts:
            table = ResultTable(
                "reference_numerics",
                "Precomputed reference: the pair logit at beta 5000, live delta vs table (m - r in float64)",
                ["inputs", "max_logit_err_live_vs_table", "max_logit_err_live_vs_float64",
                 "max_logit_err_table_vs_float64", "mean_abs_logit", "loss_err"],
                notes=notes,
                key=("inputs",),
                device="cpu",
            )  # fmt: skip
            for dtype in (torch.float32, torch.bfloat16):
                table.add(**numerics_random(dtype))
            for precision in ("no", "bf16"):
                table.add(**numerics_trainer(precision, root / "tiny"))
        if "flops" in parts:
            table = ResultTable(
                "reference_flops",
                "A training step's FLOPs per pair with the live reference and with a precomputed table (meta device)",
                ["model", "resolution", "params_b", "live_tflop_per_pair", "precomputed_tflop_per_pair",
                 "reference_share", "reference_weights_gb"],
                notes=notes + " No recompute; with --recompute full the policy's part grows by one forward.",
                key=("model",),
                device="cpu",
            )  # fmt: skip
            for row in flops():
                table.add(**row)
        if "step" in parts:
            table = ResultTable(
                "reference_step",
                "A training step with the live reference and with the table, side by side on this CPU",
                ["model", "live_ms_per_step", "precomputed_ms_per_step", "precomputed_over_live",
                 "pass_images_per_s", "pass_seconds"],
                notes=notes,
                key=("model",),
                device="cpu",
            )  # fmt: skip
            table.add(model="SDXL-structure skeleton, RPO, 1 pair, fp32", **step(a.steps, root))
    print("[bench] wrote benchmarks/results/reference_*-cpu.{json,md}")


if __name__ == "__main__":
    main()
