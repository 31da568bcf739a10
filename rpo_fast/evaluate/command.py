"""Sample a prompt set from a base and a tuned model with the same seeds, score both with automated preference
models, and report means, paired win rates and picture grids.

    python -m rpo_fast.evaluate --model BASE_DIR --unet TUNED_UNET_DIR --prompts parti.tsv --out eval/ \\
        --scorer pickscore=PickScore_v1 --scorer hps=HPS_v2.1_compressed.pt:CLIP-H --scorer clipscore=clip-vit-large

Sampling: the model family's pipeline from a local folder; the papers' settings by default (guidance 7.5 for
SD1.5, 5 for SDXL, 50 steps; SD3 7 and FLUX 3.5 at 28 steps); image j of prompt i uses seed
``rpo_fast.seeding.seed_of(seed, i, j)`` for both models (paired); batched, with a progress bar, resumable (images
already written are not redone). Prompt sets: PartiPrompts (TSV/CSV, column ``Prompt``), the HPSv2 benchmark (JSON
lists, a file or a folder of them), Pick-a-Pic captions (parquet, column ``caption``), or text (one prompt a line).

Statistics, per metric: mean and 95% t-interval for base and tuned; the paired win rate of tuned over base
(ties count half) with its Wilson 95% interval. Written as ``summary.json``, ``summary.csv`` and
``scores.csv``; ``report.html`` shows the run's settings and training curves (for an rpo_fast run), the
metrics with a bar chart, and every prompt's base and tuned images side by side.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..cli import run
from .report import run_settings, training_curves, write_report
from .sampling import load_pipeline, read_prompts, sample
from .stats import Comparison, compare
from .style import read_style_references, style_metrics


def evaluate(
    model,
    prompts,
    out,
    *,
    unet=None,
    lora=None,
    scorers=(),
    seed=0,
    per_prompt=1,
    steps=None,
    guidance=None,
    batch_size=8,
    resolution=None,
    limit=None,
    device=None,
    scheduler="auto",
    max_sequence_length=None,
    progress=True,
    title="Evaluation",
    style=None,
    style_refs=None,
    style_clip=None,
    inception=None,
    report_prompts=None,
) -> dict:
    """Sample, score, compare and report (with the style-alignment metrics when ``style`` is given); returns the
    summary."""
    from ..scorers import ScorerUnavailable, load_scorer

    if unet is None and lora is None:
        raise ValueError("give the tuned model: --unet TUNED_UNET_DIR or --lora LORA_DIR")
    for name, p in (("--model", model), ("--unet", unet), ("--lora", lora)):
        if p is not None and not Path(p).exists():
            raise FileNotFoundError(f"{name} {p} does not exist")
    if style is not None and (style_refs is None or style_clip is None):
        raise ValueError("--style needs --style-refs (the styled images) and --style-clip (a CLIP folder)")
    if not scorers and style is None:
        print(f"[evaluate] {NO_SCORER}", flush=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from ..models import load_family

    family = load_family(model, max_sequence_length=max_sequence_length)  # a bad --max-sequence-length fails now
    if steps is None:  # the family's recipe, recorded in the summary
        steps = family.sample_steps
    prompts_file, prompts = prompts, read_prompts(prompts, limit)
    references = read_style_references(style_refs) if style is not None else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.json").write_text(json.dumps(prompts, indent=0))
    loaded, unavailable = [], {}
    for spec in scorers:  # before the slow part: a missing file fails now
        try:
            loaded.append(load_scorer(spec, device=device))
        except ScorerUnavailable as e:
            unavailable[spec.partition("=")[0]] = str(e)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    paths = {}
    for name, kw in (("base", {}), ("tuned", dict(unet=unet, lora=lora))):
        pipe = load_pipeline(family, device=device, dtype=dtype, scheduler=scheduler, **kw)
        paths[name] = sample(
            pipe,
            prompts,
            out / "images" / name,
            seed=seed,
            per_prompt=per_prompt,
            steps=steps,
            guidance=guidance,
            batch_size=batch_size,
            resolution=resolution,
            desc=name,
            progress=progress,
        )
        del pipe
    from PIL import Image

    prompt_of = [prompts[i] for i in range(len(prompts)) for _ in range(per_prompt)]
    chunks = {(scorer.name, name): [] for scorer in loaded for name in ("base", "tuned")}
    for name in ("base", "tuned"):
        for k in range(0, len(paths[name]), 64):  # each image read once, scored by every scorer
            ims = [Image.open(p).convert("RGB") for p in paths[name][k : k + 64]]
            for scorer in loaded:
                chunks[(scorer.name, name)].append(scorer.score(ims, prompt_of[k : k + 64]).double())
    scores = {key: torch.cat(vals).numpy() for key, vals in chunks.items()}
    comparisons = [compare(s.name, scores[(s.name, "base")], scores[(s.name, "tuned")]) for s in loaded]
    with (out / "scores.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt_index", "draw", "prompt"] + [f"{s.name}_{n}" for s in loaded for n in ("base", "tuned")])
        for k, prompt in enumerate(prompt_of):
            w.writerow(
                [k // per_prompt, k % per_prompt, prompt]
                + [float(scores[(s.name, n)][k]) for s in loaded for n in ("base", "tuned")]
            )
    summary = dict(
        model=str(model),
        unet=str(unet) if unet else None,
        lora=str(lora) if lora else None,
        prompts=str(prompts_file),
        n_prompts=len(prompts),
        per_prompt=per_prompt,
        seed=seed,
        steps=steps,
        guidance=guidance,
        max_sequence_length=max_sequence_length,
        metrics=[c.__dict__ for c in comparisons],
        not_computed=unavailable,
    )
    if style is not None:
        from ..embed import CLIPEmbedder

        base_images = [Image.open(p).convert("RGB") for p in paths["base"]]
        tuned_images = [Image.open(p).convert("RGB") for p in paths["tuned"]]
        clip = CLIPEmbedder(style_clip, device=device)
        summary["style"] = style_metrics(
            base_images, tuned_images, references, style=style, clip=clip, inception=inception
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(Comparison.__dataclass_fields__))
        w.writeheader()
        for c in comparisons:
            w.writerow(c.__dict__)
    tuned_dir = Path(unet or lora)
    curves = curves_narrow = None
    if (tuned_dir.parent / "metrics.jsonl").exists():  # an rpo_fast run: its training curves (and for a phone)
        curves = training_curves(tuned_dir.parent / "metrics.jsonl", out / "training.png").name
        curves_narrow = training_curves(
            tuned_dir.parent / "metrics.jsonl", out / "training-narrow.png", stacked=True
        ).name
    summary["report"] = str(
        write_report(
            out,
            prompts,
            paths["base"],
            paths["tuned"],
            comparisons,
            unavailable,
            per_prompt=per_prompt,
            report_prompts=report_prompts,
            title=title,
            settings=run_settings(tuned_dir),
            curves=curves,
            curves_narrow=curves_narrow,
            style=summary.get("style"),
            scores=scores,
        )
    )
    return summary


NO_SCORER = (
    "no --scorer given: the base and tuned pictures are sampled and shown side by side in report.html; no scores, "
    "means or win rates are computed (add --scorer NAME=ARG, e.g. --scorer pickscore=PickScore_v1)"
)

EXAMPLE = """example (the tuned UNet of a run against its base model, PickScore and HPS v2):
  python -m rpo_fast.evaluate --model MODELS/stable-diffusion-xl-base-1.0 --unet runs/rpo/unet \\
      --prompts PartiPrompts.tsv --out eval/rpo --scorer pickscore=MODELS/PickScore_v1 \\
      --scorer hps=MODELS/HPS_v2.1_compressed.pt:MODELS/CLIP-ViT-H-14"""


def _opt(default, text: str, **meta):
    return field(default=default, metadata=dict(help=text, **meta))


SCORER_HELP = "NAME=PATH (repeat): " + ", ".join(
    [
        "pickscore=DIR",
        "hps=CKPT:TOKENIZER_DIR",
        "aesthetic=MLP:CLIP_DIR",
        "clipscore=DIR",
        "imagereward=CKPT",
        "module.path:Factory[=ARG]",
    ]
)


@dataclass
class EvaluateConfig:
    """``python -m rpo_fast.evaluate``'s command line: the keyword arguments of ``evaluate``."""

    model: str = field(
        metadata=dict(help="the base model folder (its family is detected: SD1.5, SDXL, SD3/SD3.5 or FLUX.1)")
    )
    prompts: str = field(metadata=dict(help="PartiPrompts .tsv/.csv, HPSv2 .json (or folder), .parquet, .txt"))
    out: str = field(metadata=dict(help="output folder (resumed if it holds images)"))
    unet: str | None = _opt(None, "the tuned UNet folder (rpo_fast/train.py's OUTPUT/unet)", one_of="tuned",
                            required=True)  # fmt: skip
    lora: str | None = _opt(None, "a LoRA folder diffusers' load_lora_weights reads", one_of="tuned")
    scorers: list[str] = field(default_factory=list, metadata=dict(help=SCORER_HELP, flags=("--scorer",)))
    seed: int = _opt(0, "image j of prompt i: seed_of(seed, i, j)")
    per_prompt: int = _opt(1, "images per prompt")
    steps: int | None = _opt(None, "denoising steps per image (default: 50; SD3/FLUX 28)")
    guidance: float | None = _opt(None, "default: 7.5 (SD1.5), 5 (SDXL, Z-Image), 7 (SD3), 3.5 (FLUX)")
    batch_size: int = _opt(8, "images per pipeline call")
    resolution: int | None = _opt(None, "default: the model's")
    max_sequence_length: int | None = _opt(
        None,
        "SD3/FLUX: T5 tokens per prompt (default: the pipeline's, 256 / 512); use the cache's if it was built with "
        "another",
    )
    limit: int | None = _opt(None, "the first N prompts only")
    scheduler: Literal["auto", "folder", "ddim", "euler", "pndm"] = _opt(
        "auto", "auto: DDIM where the folder holds a training (DDPM) scheduler; folder: the folder's"
    )
    device: str | None = _opt(None, "default: cuda if available, else cpu")
    style: str | None = _opt(None, "style alignment: vangogh | sketch | winter (rpo_fast.style_data)")
    style_refs: str | None = _opt(None, "the styled reference images (style_data output or a folder)")
    style_clip: str | None = _opt(None, "CLIP folder for CLIP-FID and the style score")
    inception: str | None = _opt(None, "pytorch-fid Inception weights file (needs torchvision)")
    report_prompts: int | None = _opt(None, "report.html shows the first N prompts (default: every prompt)")
    progress: bool = _opt(True, "no progress bar", flags=("--no-progress",), switch=True)


def main(argv: list[str] | None = None) -> None:
    s = run(
        EvaluateConfig,
        argv,
        lambda cfg: evaluate(**dataclasses.asdict(cfg)),
        prog="python -m rpo_fast.evaluate",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2] + "\n\n" + EXAMPLE,
    )
    _print_summary(s)


def _print_summary(s: dict) -> None:
    if not s["metrics"] and not s["not_computed"] and "style" not in s:
        print("[evaluate] no metrics: no --scorer was given")
    for m in s["metrics"]:
        print(
            f"[evaluate] {m['metric']}: base {m['base_mean']:.4g}, tuned {m['tuned_mean']:.4g}, win rate "
            f"{m['win_rate']:.1%} [{m['win_low']:.1%}, {m['win_high']:.1%}] (n={m['n']})"
        )
    for k, v in s["not_computed"].items():
        print(f"[evaluate] {k}: not computed ({v})")
    if "style" in s:
        for n in ("base", "tuned"):
            st = s["style"][n]
            print(
                f"[evaluate] style {s['style']['style']} {n}: CLIP-FID {st['clip_fid']:.4g} "
                f"[{st['clip_fid_low']:.4g}, {st['clip_fid_high']:.4g}], style score {st['style_score']:.4g}"
            )
    print(f"[evaluate] report: {s['report']}")


if __name__ == "__main__":
    main()
