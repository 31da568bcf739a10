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

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..config import HelpFormatter, run_cli
from . import shapes as S

ASSETS = Path(__file__).resolve().parent / "assets"
ROOT = Path(__file__).resolve().parents[2]  # the checkout (configs/, rpo_fast/train.py)

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


def make_caches(out: Path, model: str, *, rounds: int, seed: int = 0, embedder: str | None = None) -> tuple[Path, Path]:
    """Training pairs (``rounds`` x 100 captions) in ``out/data`` and 100 held-out pairs of the same captions in
    ``out/eval_data`` (seed + 1), cached for ``model`` (and ``embedder``) in ``out/cache`` and ``out/eval_cache``;
    what exists is reused."""
    from ..cache import build_cache

    caches = []
    for name, n, pair_seed in (("data", rounds, seed), ("eval_data", 1, seed + 1)):
        if not (out / name / "pairs.jsonl").exists():
            make_pairs(out / name, n, seed=pair_seed)
        dest = out / ("cache" if name == "data" else "eval_cache")
        build_cache(
            model,
            out / name / "pairs.jsonl",
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


def plot_training(metrics: Path, path: Path) -> Path:
    """Loss over steps, and implicit accuracy (training batches and held-out pairs) where the objective has one;
    SFT has no reference, so its right panel is the held-out loss instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in rows if "loss/loss" in r]
    pairwise = any("reward/implicit_acc" in r for r in train)
    key = "implicit_acc" if pairwise else "loss"
    evals = [r for r in rows if f"eval/{key}" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot([r["step"] for r in train], [r["loss/loss"] for r in train], color="#e4572e")
    ax1.set(title="training loss", xlabel="step")
    if pairwise:
        ax2.plot(
            [r["step"] for r in train],
            [r["reward/implicit_acc"] for r in train],
            color="#9aa5b1",
            label="training batches",
        )
        ax2.axhline(0.5, color="black", lw=0.5, ls=":")
        ax2.set(title="implicit accuracy", ylim=(0, 1))
    else:
        ax2.set(title="held-out loss")
    if evals:
        ax2.plot(
            [r["step"] for r in evals],
            [r[f"eval/{key}"] for r in evals],
            "o-",
            color="#17bebb",
            label="held-out pairs" if pairwise else "held-out winners",
        )
    ax2.set(xlabel="step")
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m rpo_fast.demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
        epilog="example (what make demo runs; DPO instead of RPO):\n  python -m rpo_fast.demo --objective dpo",
    )
    ap.add_argument("--objective", default="rpo", choices=sorted(SETTINGS), help="the objective trained")
    ap.add_argument("--out", default="runs/demo", help="the demo's folder (OUT/OBJECTIVE: the run)")
    ap.add_argument("--rounds", type=int, default=8, help="pairs per training caption (100 captions)")
    ap.add_argument("--steps", type=int, default=240, help="optimizer steps (16 pairs each)")
    ap.add_argument("--ranks", type=int, default=2, help="deepspeed ranks (processes) on this CPU")
    ap.add_argument("--seed", type=int, default=0, help="seed of pairs, training and sampling")
    ap.add_argument("--sample-steps", type=int, default=25, help="DDIM steps when sampling")
    ap.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance when sampling")
    ap.add_argument(
        "--mixed-precision",
        default="no",
        choices=["no", "bf16"],
        help="the trainer's precision. fp32 ('no') by default: a CPU without native bf16 (AVX2 only) emulates bf16 "
        "convolutions, 40x slower than fp32 (measured on a 2-core AMD EPYC); bf16 is the GPU recipe's",
    )
    ap.add_argument("--model", default=str(ASSETS / "base"), help="the base model (the shipped one)")
    ap.add_argument("--clip", default=str(ASSETS / "clip"), help="the embedder of RPO's weights (the shipped one)")
    return ap


def main(argv: list[str] | None = None) -> dict:
    a = parser().parse_args(argv)
    return run_cli("python -m rpo_fast.demo", lambda: run_demo(a))


def run_demo(a: argparse.Namespace) -> dict:
    t0 = time.time()
    out = Path(a.out)
    run_dir = out / a.objective
    env = dict(
        os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1"
    )
    import torch

    torch.set_num_threads(2)

    cache, eval_cache = make_caches(out, a.model, rounds=a.rounds, seed=a.seed, embedder=a.clip)

    from ..distributed import free_port

    opts = SETTINGS[a.objective]
    launcher = Path(sys.executable).parent / "deepspeed"  # the deepspeed command of this environment
    launcher = [launcher] if launcher.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    train_cmd = [
        *launcher,
        "--num_gpus",
        str(a.ranks),
        "--master_port",
        str(free_port()),
        ROOT / "rpo_fast" / "train.py",
        "--ds_config",
        ROOT / "configs" / ("zero2_8bit.json" if a.ranks > 1 else "single_gpu.json"),  # the config for the scale
        "--model",
        a.model,
        "--data",
        cache,
        "--eval-data",
        eval_cache,
        "--objective",
        a.objective,
        "--output",
        run_dir,
        "--max-steps",
        str(a.steps),
        "--micro-batch-size",
        "8",
        "--lr",
        str(opts["lr"]),
        "--eval-every",
        str(max(1, a.steps // 6)),
        "--eval-pairs",
        "100",
        "--eval-repeats",
        "2",
        "--log-every",
        "10",
        "--checkpoint-every",
        str(a.steps),
        "--keep-checkpoints",
        "1",
        "--seed",
        str(a.seed),
        "--empty-caption-prob",
        "0.1",
        "--mixed-precision",
        a.mixed_precision,
    ]
    if "beta" in opts:
        train_cmd += ["--beta", str(opts["beta"])]
    if (run_dir / "checkpoints").exists():
        train_cmd.append("--resume")
    run(train_cmd, env)

    from ..evaluate import evaluate

    prompts = out / "heldout_prompts.txt"
    prompts.write_text("\n".join(S.HELDOUT_CAPTIONS) + "\n")
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
    plot = plot_training(run_dir / "metrics.jsonl", run_dir / "training.png")
    result = dict(
        objective=a.objective,
        seed=a.seed,
        steps=a.steps,
        prompts=len(S.HELDOUT_CAPTIONS),
        win_rate=m["win_rate"],
        win_low=m["win_low"],
        win_high=m["win_high"],
        base_warmth=m["base_mean"],
        tuned_warmth=m["tuned_mean"],
        minutes=(time.time() - t0) / 60,
        grid=str(grid),
        plot=str(plot),
        report=summary["report"],
    )
    (run_dir / "demo.json").write_text(json.dumps(result, indent=1))
    print(
        f"\n[demo] {a.objective}: win rate of tuned over base on {result['prompts']} held-out prompts "
        f"{m['win_rate']:.1%} (95% Wilson interval {m['win_low']:.1%} - {m['win_high']:.1%}); mean warmth "
        f"{m['base_mean']:+.3f} -> {m['tuned_mean']:+.3f}; {result['minutes']:.1f} min"
    )
    print(f"[demo] grid (base | tuned): {grid}\n[demo] training curves: {plot}\n[demo] report: {summary['report']}")
    return result


if __name__ == "__main__":
    main()
