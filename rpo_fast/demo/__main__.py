"""The embedded demo, end to end on a CPU: align the shipped base model with the hidden preference (warmer
object colours) through the same ``deepspeed rpo_fast/train.py --ds_config ...`` path as a real SDXL run.

    python -m rpo_fast.demo [--objective rpo|dpo|sft|dspo|dense-dpo|cal-dpo] [--out runs/demo]

1. pairs: two pictures of each of the 100 training captions per round, the winner chosen by the rule's scorer;
2. cache: VAE latents, text encodings and the shipped embedder's CLIP embeddings (python -m rpo_fast.cache);
3. training: ``deepspeed --num_gpus 2 rpo_fast/train.py --ds_config configs/zero2_8bit.json ...`` on 2 CPU ranks
   (one node: ZeRO-2);
4. evaluation: the 200 held-out captions sampled from the base and the tuned model with the same seeds, scored
   by the rule: the win rate of tuned over base (ties half) with its Wilson 95% interval;
5. pictures: ``grid.png`` (base | tuned, side by side) and ``training.png`` (loss and implicit accuracy).

Threads are fixed (one per rank, two for sampling) so the result does not depend on the machine's core count.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .. import cli
from . import shapes as S

ASSETS = Path(__file__).resolve().parent / "assets"
ROOT = Path(__file__).resolve().parents[2]  # the checkout (configs/, rpo_fast/train.py)
WARM_PICTURE = 0.3  # a picture counts as warm above this warmth (the demo table's "warm pictures")

# Per-objective settings of the demo (16 pairs per step: 2 ranks x micro-batch 8, 240 steps). One learning rate
# for all: 2e-5 (1e-4 and 1e-3 degraded the pictures of this small model). RPO's "inside" weighting divides the
# effective beta by the 16 columns of its matrix, hence 8000 against DPO's 500.
SETTINGS = {
    "rpo": dict(beta=8000.0, lr=2e-5),
    "dpo": dict(beta=500.0, lr=2e-5),
    "sft": dict(lr=2e-5),
    "dspo": dict(lr=2e-5),  # the SD1.5 form and its reference beta (0.001): close to SFT
    "dense-dpo": dict(beta=500.0, lr=2e-5),
    "cal-dpo": dict(beta=500.0, lr=2e-5),
}
# The online objectives learn from the model's own samples scored by the rule itself (no pairs): each rank samples
# 2 training captions x K = 4 pictures every step (DDIM with eta 1, 10 steps, guidance 3 as the evaluation's), and
# each update reads 2 groups at one step drawn ~ gamma^k. Steps: the offline demo's count of denoiser rows (240 steps x
# 16 pairs x 2 pictures x 2 models = 15360) spent on rollouts and updates (``denoiser_rows``).
ONLINE = dict(samples=4, prompts=2, rollout_steps=10, steps_per_sample=1, groups=2)
# lr 1e-5 and a log-ratio clip of 1e-2: the clip is a trust region around the base model, and this small model moves
# fast (at lr 1e-4, or with the authors' 1e-4 clip, nearly every log-ratio lies past the clip within a few steps,
# the gradient is zero and AdamW's momentum alone moves the weights: a drift, not alignment).
SETTINGS |= {
    name: dict(lr=1e-5, online=True, log_ratio_clip=1e-2) for name in ("dense-reward", "online-dpo", "online-rpo")
}


def denoiser_rows(objective: str, steps: int, ranks: int) -> int:
    """Rows through the denoiser (policy and reference, forward) of a demo run: offline, 8 pairs x 2 pictures per
    rank per step, each through both models (SFT: the policy alone); online, each rank's rollout (prompts x K x
    sampler steps, guided: x 2) and its update (S x groups x K, guided, both models)."""
    from ..objectives import objective as spec

    if not SETTINGS[objective].get("online"):
        return steps * ranks * 8 * 2 * (2 if spec(objective).reference else 1)
    o = ONLINE
    rollout = o["prompts"] * o["samples"] * o["rollout_steps"] * 2
    update = o["steps_per_sample"] * o["groups"] * o["samples"] * 2 * 2
    return steps * ranks * (rollout + update)


def online_steps(ranks: int, offline_steps: int = 240) -> int:
    """The online demo's steps at the offline RPO demo's count of denoiser rows."""
    return denoiser_rows("rpo", offline_steps, ranks) // denoiser_rows("dense-reward", 1, ranks)


def make_pairs(out: Path, rounds: int, seed: int = 0) -> Path:
    """``rounds`` pairs per training caption, as pairs.jsonl + PNGs; the winner is the warmer by ``warmth``
    (pairs closer than 0.2 in warmth are redrawn, like near-ties that annotators skip)."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for r in range(rounds):
        for c, caption in enumerate(S.TRAIN_CAPTIONS):
            while True:
                a, b = (S.render(caption, rng.uniform(), rng) for _ in range(2))
                wa, wb = S.warmth(a), S.warmth(b)
                if abs(wa - wb) >= 0.2:
                    break
            winner, loser = (a, b) if wa > wb else (b, a)
            names = []
            for side, im in (("w", winner), ("l", loser)):
                name = f"images/{r:03d}_{c:03d}_{side}.png"
                im.save(out / name)
                names.append(name)
            lines.append(json.dumps({"caption": caption, "winner": names[0], "loser": names[1]}))
    path = out / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def render_pairs(out: Path, *, rounds: int, seed: int = 0) -> tuple[Path, Path]:
    """Training pairs (``rounds`` x 100 captions) in ``out/data`` and 100 held-out pairs of the same captions in
    ``out/eval_data`` (seed + 1), as ``pairs.jsonl`` and PNGs; what exists is reused."""
    paths = []
    for name, n, pair_seed in (("data", rounds, seed), ("eval_data", 1, seed + 1)):
        if not (out / name / "pairs.jsonl").exists():
            make_pairs(out / name, n, seed=pair_seed)
        paths.append(out / name / "pairs.jsonl")
    return paths[0], paths[1]


def cache_pairs(out: Path, model: str, pairs: tuple[Path, Path], *, seed: int = 0, embedder: str | None = None):
    """The rendered pairs cached for ``model`` (and ``embedder``) in ``out/cache`` and ``out/eval_cache``
    (a complete cache is reused)."""
    from ..data.writer import build_cache

    caches = []
    for src, dest in zip(pairs, (out / "cache", out / "eval_cache")):
        build_cache(
            model,
            src,
            dest,
            resolution=32,
            embedder=embedder,
            shard_size=256,
            batch_size=64,
            seed=seed,
            rank=0,
            world=1,
        )
        caches.append(dest)
    return caches[0], caches[1]


def make_caches(out: Path, model: str, *, rounds: int, seed: int = 0, embedder: str | None = None) -> tuple[Path, Path]:
    """``render_pairs`` then ``cache_pairs``: the training and held-out caches of the demo's task."""
    return cache_pairs(out, model, render_pairs(out, rounds=rounds, seed=seed), seed=seed, embedder=embedder)


class Phases:
    """Each phase of the demo announced as it starts, and timed: ``with phases("train", "training ..."):``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, what: str):
        print(f"[demo] {what} ...", flush=True)
        t0 = time.time()
        yield
        self.seconds[name] = time.time() - t0
        print(f"[demo] {name}: done in {_duration(self.seconds[name])}", flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def finished_steps(run_dir: Path) -> int | None:
    """The step of a finished run in ``run_dir`` (its newest complete checkpoint, with the exported UNet), else None."""
    from ..checkpoint import latest_checkpoint

    step = latest_checkpoint(run_dir) if (run_dir / "checkpoints").exists() else None
    return step if step is not None and (run_dir / "unet" / "config.json").exists() else None


def side_by_side(base: list[Path], tuned: list[Path], path: Path, n: int = 24, cols: int = 6, scale: int = 3) -> Path:
    """n held-out prompts as (base | tuned) pairs, ``cols`` pairs a row, upscaled ``scale`` times."""
    from PIL import Image, ImageDraw

    w = h = 32 * scale
    gap, pad = 6, 14
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * (2 * w + gap), rows * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for k in range(n):
        x, y = (k % cols) * (2 * w + gap), (k // cols) * (h + pad)
        draw.text((x + 2, y + 1), "base | tuned", fill="gray")
        for i, p in enumerate((base[k], tuned[k])):
            grid.paste(Image.open(p).resize((w, h), Image.NEAREST), (x + i * w, y + pad))
    grid.save(path)
    return path


def run(cmd: list[str], env: dict) -> None:
    print("[demo] $ " + " ".join(str(c) for c in cmd), flush=True)
    rc = subprocess.run([str(c) for c in cmd], env=env).returncode
    if rc != 0:  # the command printed why; a traceback of this process would add nothing
        raise SystemExit(f"[demo] that command failed with exit code {rc} (its output is above)")


def _opt(default, text: str, **meta):
    return field(default=default, metadata=dict(help=text, **meta))


@dataclass
class DemoConfig:
    """``python -m rpo_fast.demo``'s command line."""

    objective: Literal[tuple(sorted(SETTINGS))] = _opt("rpo", "the objective trained")
    out: str = _opt("runs/demo", "the demo's folder (OUT/OBJECTIVE: the run)")
    rounds: int = _opt(8, "pairs per training caption (100 captions)")
    steps: int | None = _opt(
        None, "optimizer steps (default 240 of 16 pairs; online: as many as the same count of denoiser rows)"
    )
    ranks: int = _opt(2, "deepspeed ranks (processes) on this CPU")
    seed: int = _opt(0, "seed of pairs, training and sampling")
    sample_steps: int = _opt(25, "DDIM steps when sampling")
    guidance: float = _opt(3.0, "classifier-free guidance when sampling")
    mixed_precision: Literal["no", "bf16"] = _opt(
        "no",
        "the trainer's precision. fp32 ('no') by default: a CPU without native bf16 (AVX2 only) emulates bf16 "
        "convolutions, 40x slower than fp32 (measured on a 2-core AMD EPYC); bf16 is the GPU recipe's",
    )
    model: str = _opt(str(ASSETS / "base"), "the base model (the shipped one)")
    clip: str = _opt(str(ASSETS / "clip"), "the embedder of RPO's weights (the shipped one)")
    fresh: bool = _opt(
        False,
        "remove OUT/OBJECTIVE first and train again (a finished run is otherwise reused: only sampled and scored)",
        switch=True,
    )


def main(argv: list[str] | None = None) -> dict:
    return cli.run(
        DemoConfig,
        argv,
        run_demo,
        prog="python -m rpo_fast.demo",
        description=__doc__.split("\n\n")[0],
        epilog="example (what make demo runs; DPO instead of RPO):\n  python -m rpo_fast.demo --objective dpo",
    )


def run_demo(a: DemoConfig) -> dict:
    t0 = time.time()
    out = Path(a.out)
    run_dir = out / a.objective
    env = dict(
        os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1"
    )
    import torch

    torch.set_num_threads(2)
    phases = Phases()
    if a.fresh and run_dir.exists():
        print(f"[demo] --fresh: removing the earlier run {run_dir} (the rendered pairs and caches are kept)")
        shutil.rmtree(run_dir)
    opts = SETTINGS[a.objective]
    online = bool(opts.get("online"))
    steps = a.steps or (online_steps(a.ranks) if online else 240)
    if online:  # no pairs: the model's own samples, scored by the rule
        train_prompts = out / "train_prompts.txt"
        out.mkdir(parents=True, exist_ok=True)
        train_prompts.write_text("\n".join(S.TRAIN_CAPTIONS) + "\n")
    else:
        with phases("render", f"rendering {a.rounds * 100} training and 100 held-out pairs into {out} (once)"):
            pairs = render_pairs(out, rounds=a.rounds, seed=a.seed)
        with phases("cache", "caching them: VAE latents, text encodings, CLIP embeddings (once)"):
            cache, eval_cache = cache_pairs(out, a.model, pairs, seed=a.seed, embedder=a.clip)

    from ..distributed import free_port

    launcher = Path(sys.executable).parent / "deepspeed"  # the deepspeed command of this environment
    launcher = [launcher] if launcher.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    train_cmd = [
        *launcher,
        "--num_gpus",
        str(a.ranks),
        "--master_port",
        str(free_port()),
        "--log_level",  # the launcher's lines (world info, CUDA_VISIBLE_DEVICES and "no hostfile" on a CPU) say nothing
        "error",
        ROOT / "rpo_fast" / "train.py",
        "--ds_config",
        ROOT / "configs" / ("zero2_8bit.json" if a.ranks > 1 else "single_gpu.json"),  # the config for the scale
        "--model",
        a.model,
        "--objective",
        a.objective,
        "--output",
        run_dir,
        "--max-steps",
        str(steps),
        "--lr",
        str(opts["lr"]),
        "--log-every",
        "10",
        "--checkpoint-every",
        str(steps),
        "--keep-checkpoints",
        "1",
        "--seed",
        str(a.seed),
        "--mixed-precision",
        a.mixed_precision,
    ]
    if online:
        o = ONLINE
        train_cmd += ["--data", train_prompts, "--reward", "rpo_fast.demo.shapes:WarmthScorer", "--resolution", "32"]
        train_cmd += ["--samples-per-prompt", o["samples"], "--rollout-prompts", o["prompts"]]
        train_cmd += ["--rollout-steps", o["rollout_steps"], "--steps-per-sample", o["steps_per_sample"]]
        train_cmd += ["--micro-batch-size", o["groups"], "--guidance", a.guidance]
        train_cmd += ["--log-ratio-clip", opts["log_ratio_clip"]]
        if a.objective == "online-rpo":
            train_cmd += ["--clip", a.clip]
    else:
        train_cmd += ["--data", cache, "--eval-data", eval_cache, "--micro-batch-size", "8", "--empty-caption-prob"]
        train_cmd += ["0.1", "--eval-every", max(1, steps // 6), "--eval-pairs", "100", "--eval-repeats", "2"]
    if "beta" in opts:
        train_cmd += ["--beta", str(opts["beta"])]
    done = finished_steps(run_dir)
    earlier = None  # the figures of the run that trained, when this one reuses it
    if done is not None and done >= steps:
        print(
            f"[demo] {run_dir} holds a finished run ({done} steps): it is not trained again; its pictures already "
            "sampled are reused and scored again (a missing one is sampled). To start over: make demo "
            "DEMO_ARGS=--fresh (or python -m rpo_fast.demo --fresh)",
            flush=True,
        )
        if (run_dir / "demo.json").exists():
            earlier = json.loads((run_dir / "demo.json").read_text())
    else:
        if not torch.cuda.is_available():
            from ..distributed import build_shm_op, shm_op_built

            if not shm_op_built():
                with phases("build", "DeepSpeed's one-time build of its CPU all-reduce op (once per machine)"):
                    build_shm_op()
        if (run_dir / "checkpoints").exists():
            train_cmd.append("--resume-or-start")
            print(f"[demo] resuming the unfinished run in {run_dir} (--fresh starts over)", flush=True)
        unit = (
            f"{ONLINE['prompts'] * a.ranks} prompts x {ONLINE['samples']} samples" if online else f"{8 * a.ranks} pairs"
        )
        what = f"training: {steps} steps of {unit} on {a.ranks} DeepSpeed rank(s) ({a.objective})"
        with phases("train", what):
            run(train_cmd, env)

    from ..evaluate import evaluate, training_curves

    prompts = out / "heldout_prompts.txt"
    prompts.write_text("\n".join(S.HELDOUT_CAPTIONS) + "\n")
    what = f"sampling the {len(S.HELDOUT_CAPTIONS)} held-out prompts from base and tuned (same seeds), then scoring"
    with phases("evaluate", what):
        summary = evaluate(
            a.model,
            prompts,
            run_dir / "eval",
            unet=run_dir / "unet",
            scorers=["rpo_fast.demo.shapes:WarmthScorer"],
            seed=a.seed,
            steps=a.sample_steps,
            guidance=a.guidance,
            batch_size=50,
            device="cpu",
            title=f"rpo_fast demo: {a.objective}",
        )
    m = summary["metrics"][0]
    images = run_dir / "eval" / "images"
    spread = slice(None, None, len(S.HELDOUT_CAPTIONS) // 24)  # 24 prompts across the held-out set
    grid = side_by_side(
        sorted((images / "base").glob("*.png"))[spread],
        sorted((images / "tuned").glob("*.png"))[spread],
        run_dir / "grid.png",
    )
    plot = training_curves(run_dir / "metrics.jsonl", run_dir / "training.png")
    warm = {name: 0 for name in ("base", "tuned")}
    with (run_dir / "eval" / "scores.csv").open() as f:
        for row in csv.DictReader(f):
            for name in warm:
                warm[name] += float(row[f"warmth_{name}"]) > WARM_PICTURE
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval/implicit_acc" in r]
    result = dict(
        objective=a.objective,
        seed=a.seed,
        steps=steps,
        denoiser_rows=denoiser_rows(a.objective, steps, a.ranks),
        prompts=len(S.HELDOUT_CAPTIONS),
        win_rate=m["win_rate"],
        win_low=m["win_low"],
        win_high=m["win_high"],
        base_warmth=m["base_mean"],
        tuned_warmth=m["tuned_mean"],
        warm_base=warm["base"],
        warm_tuned=warm["tuned"],
        heldout_implicit_acc=evals[-1]["eval/implicit_acc"] if evals else None,
        heldout_step=evals[-1]["step"] if evals else None,
        minutes=(time.time() - t0) / 60,
        phase_seconds=phases.seconds,
    )
    if earlier is not None:  # the run's own time is kept; this rerun's is recorded beside it
        result |= dict(
            minutes=earlier["minutes"],
            phase_seconds=earlier["phase_seconds"],
            rerun_minutes=result["minutes"],
            rerun_phase_seconds=result["phase_seconds"],
        )
    result |= dict(
        grid=str(grid),
        plot=str(plot),
        report=summary["report"],
    )
    (run_dir / "demo.json").write_text(json.dumps(result, indent=1))
    acc = (
        f"{result['heldout_implicit_acc']:.3f} at step {result['heldout_step']}"
        if evals
        else "none (online: no held-out pairs)"
        if online
        else "none (no reference: the objective has no implicit reward)"
    )
    print(
        f"\n[demo] {a.objective}, the figures of the README's table:\n"
        f"[demo]   win rate of tuned over base on {result['prompts']} held-out prompts: {m['win_rate']:.1%} "
        f"[{m['win_low']:.1%}, {m['win_high']:.1%}] (Wilson 95%)\n"
        f"[demo]   mean warmth base -> tuned: {m['base_mean']:+.3f} -> {m['tuned_mean']:+.3f}\n"
        f"[demo]   warm pictures (warmth > {WARM_PICTURE}) base -> tuned: {warm['base']} -> {warm['tuned']}\n"
        f"[demo]   held-out implicit accuracy: {acc}\n"
        f"[demo]   minutes (whole run): {result['minutes']:.1f} ("
        + ", ".join(f"{k} {_duration(v)}" for k, v in result["phase_seconds"].items())
        + ")"
        + (f"; this rerun, which trained nothing: {result['rerun_minutes']:.1f}" if earlier is not None else "")
    )
    print(f"[demo] grid (base | tuned): {grid}\n[demo] training curves: {plot}\n[demo] report: {summary['report']}")
    return result


if __name__ == "__main__":
    main()
