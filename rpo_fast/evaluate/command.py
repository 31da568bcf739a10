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
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .cli import run
from .seeding import seed_of

# --------------------------------------------------------------------------------------------------
# Prompt sets
# --------------------------------------------------------------------------------------------------


PROMPT_COLUMNS = ("caption", "prompt", "text")  # a parquet's prompt column: Pick-a-Pic's name, then mirrors' names


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Prompts of a PartiPrompts TSV/CSV, HPSv2 JSON file or folder, Pick-a-Pic (or mirror) parquet, or text
    file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--prompts {path} does not exist")
    if path.is_dir():
        files = sorted(path.glob("*.json")) or sorted(path.glob("*.parquet"))
        if not files:
            raise ValueError(f"--prompts {path}: a folder must hold HPSv2 .json files or parquet shards")
        prompts = [p for f in files for p in read_prompts(f)]
    elif path.suffix in (".tsv", ".csv"):
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
        if not rows or "Prompt" not in rows[0]:
            raise ValueError(f"{path}: no 'Prompt' column (PartiPrompts format)")
        prompts = [r["Prompt"] for r in rows]
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # {style: [prompts]}
            data = [p for v in data.values() for p in v]
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise ValueError(f"{path}: expected a JSON list of prompts (HPSv2 benchmark format)")
        prompts = data
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        column = next((c for c in PROMPT_COLUMNS if c in names), None)
        if column is None:
            raise ValueError(
                f"{path}: no prompt column ({', '.join(PROMPT_COLUMNS)}); its columns are {', '.join(names)}"
            )
        prompts = list(dict.fromkeys(pq.read_table(path, columns=[column])[column].to_pylist()))
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts[:limit] if limit else prompts


# --------------------------------------------------------------------------------------------------
# Pipelines and sampling
# --------------------------------------------------------------------------------------------------


def load_pipeline(
    model: str | Path,
    *,
    unet: str | Path | None = None,
    lora: str | Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    scheduler: str = "auto",
    max_sequence_length: int | None = None,
):
    """The model family's sampling pipeline from a local folder, with the tuned ``unet`` folder or ``lora`` swapped
    in. ``pipe.family`` is the family (its ``guidance`` is the papers' default). ``max_sequence_length``: the T5
    tokens per prompt of SD3/FLUX (default: the pipeline's, 256 / 512; give the cache's when it was built with
    another, so that sampling sees the captions as training did)."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler

    from .models import load_family

    family = load_family(model, max_sequence_length=max_sequence_length)
    if family.flow_matching and scheduler not in ("auto", "folder"):
        raise ValueError(f"--scheduler {scheduler}: {family.name} models sample with their flow-matching scheduler")
    pipe = family.load_pipeline(dtype=dtype)
    if unet is not None:
        setattr(pipe, family.denoiser_folder, family.load_denoiser(unet, dtype=dtype))
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    choice = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "pndm": PNDMScheduler}.get(scheduler)
    if scheduler == "auto" and isinstance(pipe.scheduler, DDPMScheduler):
        choice = DDIMScheduler  # a training scheduler in the folder: sample with DDIM
    if choice is not None:
        pipe.scheduler = choice.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.family = family
    return pipe.to(device)


def sample(
    pipe,
    prompts: list[str],
    folder: Path,
    *,
    seed: int = 0,
    per_prompt: int = 1,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 8,
    resolution: int | None = None,
    desc: str = "sampling",
    progress: bool = True,
) -> list[Path]:
    """Images ``folder/{i:05d}_{j}.png`` for every prompt i and draw j, each from its own seeded generator: the
    same seeds and batch size give the same bits, another batch size at most one 8-bit level here and there
    (float rounding of batched matmuls). Existing files are kept (resume)."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    guidance = pipe.family.guidance if guidance is None else guidance
    steps = pipe.family.sample_steps if steps is None else steps
    jobs = [(i, j) for i in range(len(prompts)) for j in range(per_prompt)]
    paths = [folder / f"{i:05d}_{j}.png" for i, j in jobs]
    todo = [(job, path) for job, path in zip(jobs, paths) if not path.exists()]
    size = resolution or pipe.family.default_resolution
    device = pipe.device
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="img", desc=desc, disable=not progress) as bar:
        for k in range(0, len(todo), batch_size):
            chunk = todo[k : k + batch_size]
            gens = [torch.Generator(device).manual_seed(seed_of(seed, i, j)) for (i, j), _ in chunk]
            t5 = (
                {}
                if pipe.family.max_sequence_length is None
                else dict(max_sequence_length=pipe.family.max_sequence_length)
            )
            out = pipe(
                [prompts[i] for (i, _), _ in chunk],
                **t5,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens,
                height=size,
                width=size,
                output_type="pil",
            )
            for img, (_, path) in zip(out.images, chunk):
                tmp = path.with_suffix(".tmp.png")
                img.save(tmp)
                os.replace(tmp, path)
            bar.update(len(chunk))
    return paths


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a proportion (successes may be fractional: ties count half)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (centre - half, centre + half)


def mean_interval(x: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% t-interval."""
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    m = float(x.mean())
    if len(x) < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


@dataclass
class Comparison:
    metric: str
    n: int
    base_mean: float
    base_low: float
    base_high: float
    tuned_mean: float
    tuned_low: float
    tuned_high: float
    win_rate: float  # tuned over base, ties half
    win_low: float
    win_high: float


def compare(metric: str, base: np.ndarray, tuned: np.ndarray) -> Comparison:
    base, tuned = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    wins = float((tuned > base).sum() + 0.5 * (tuned == base).sum())
    lo, hi = wilson_interval(wins, len(base))
    return Comparison(metric, len(base), *mean_interval(base), *mean_interval(tuned), wins / len(base), lo, hi)


# --------------------------------------------------------------------------------------------------
# Style alignment metrics (Diffusion-RPO's task, our construction: see rpo_fast.style_data)
# --------------------------------------------------------------------------------------------------


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples), the FID formula:

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))
    """
    from scipy import linalg

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    if not np.isfinite(covmean).all():  # singular product: offset the diagonals (as pytorch-fid does)
        eye = np.eye(len(s_a)) * 1e-6
        covmean = linalg.sqrtm((s_a + eye) @ (s_b + eye))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean.real))


def bootstrap_interval(stat, *samples: np.ndarray, n: int = 200, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``stat(*samples)``, each sample resampled (rows) independently."""
    rng = np.random.default_rng(seed)
    values = [stat(*(x[rng.integers(0, len(x), len(x))] for x in samples)) for _ in range(n)]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def read_style_references(path: str | Path) -> list:
    """The styled images: a style_data output (parquet shards: the winners, jpg_0) or a folder of images."""
    import io

    from PIL import Image

    path = Path(path)
    shards = [path] if path.suffix == ".parquet" else sorted(path.glob("*.parquet"))
    if shards:
        import pyarrow.parquet as pq

        return [
            Image.open(io.BytesIO(b)).convert("RGB")
            for s in shards
            for b in pq.read_table(s, columns=["jpg_0"])["jpg_0"].to_pylist()
        ]
    files = sorted(p for p in path.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise FileNotFoundError(f"--style-refs {path}: no parquet shards or images")
    return [Image.open(f).convert("RGB") for f in files]


def style_metrics(
    base_images: list, tuned_images: list, references: list, *, style: str, clip, inception=None, n_boot: int = 200
) -> dict:
    """CLIP-FID (Fréchet distance of L2-normalised CLIP image embeddings) of base and tuned samples to the styled
    references, Inception FID where available, and the CLIP style score 100 * cos(image, style description);
    each with a 95% bootstrap interval. ``clip`` is a CLIPEmbedder."""
    import torch.nn.functional as F

    from .data.style import STYLES

    feats = {
        k: F.normalize(clip.encode_images(v), dim=-1).numpy()
        for k, v in (("base", base_images), ("tuned", tuned_images), ("refs", references))
    }
    text = F.normalize(clip.encode_texts([STYLES[style]["description"]]), dim=-1).numpy()[0]
    out = {"style": style, "description": STYLES[style]["description"], "references": len(references)}
    for name in ("base", "tuned"):
        fid = frechet_distance(feats[name], feats["refs"])
        lo, hi = bootstrap_interval(frechet_distance, feats[name], feats["refs"], n=n_boot)
        score = 100 * feats[name] @ text
        s_lo, s_hi = bootstrap_interval(np.mean, score, n=n_boot)
        out[name] = {
            "clip_fid": fid,
            "clip_fid_low": lo,
            "clip_fid_high": hi,
            "style_score": float(score.mean()),
            "style_score_low": s_lo,
            "style_score_high": s_hi,
        }
    if inception is not None:
        try:
            import torchvision  # noqa: F401
            from pytorch_fid.inception import InceptionV3  # noqa: F401
        except ImportError as e:
            out["inception_fid"] = f"not computed: {e.name} is not installed (GPU machine: pytorch-fid + torchvision)"
        else:
            out["inception_fid"] = {
                n: _inception_fid(imgs, references, inception)
                for n, imgs in (("base", base_images), ("tuned", tuned_images))
            }
    return out


def _inception_fid(images: list, references: list, weights) -> float:  # pragma: no cover - GPU machine only
    import torchvision.transforms.functional as TF
    from pytorch_fid.inception import InceptionV3

    model = InceptionV3([3], use_fid_inception=True, inception_weights_path=str(weights)).eval()

    def feats(ims):
        with torch.no_grad():
            x = torch.stack([TF.to_tensor(im.resize((299, 299))) for im in ims])
            return model(x)[0].squeeze(-1).squeeze(-1).numpy()

    return frechet_distance(feats(images), feats(references))


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def bar_chart(comparisons: list[Comparison], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(comparisons), figsize=(3.2 * len(comparisons), 3), squeeze=False)
    for ax, c in zip(axes[0], comparisons):
        means = [c.base_mean, c.tuned_mean]
        err = [
            [c.base_mean - c.base_low, c.tuned_mean - c.tuned_low],
            [c.base_high - c.base_mean, c.tuned_high - c.tuned_mean],
        ]
        ax.bar(["base", "tuned"], means, yerr=np.nan_to_num(err), capsize=6, color=["#9aa5b1", "#e4572e"])
        ax.set_title(f"{c.metric}\nwin rate {c.win_rate:.1%} [{c.win_low:.1%}, {c.win_high:.1%}]", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curves(metrics: Path, path: Path) -> Path:
    """Loss over steps, and implicit accuracy (training batches and held-out pairs) where the objective has one;
    SFT has no reference, so its right panel is the held-out loss instead. ``metrics``: a run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines()]
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
    if pairwise or evals:
        ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# The run settings the report shows, from the trainer's OUTPUT/config.json beside the tuned UNet or LoRA folder.
SETTINGS_SHOWN = ("objective", "model", "data", "max_steps", "micro_batch_size", "grad_accum", "lr", "seed")
SETTINGS_SHOWN += ("ds_config", "mixed_precision", "recompute", "lora_rank")


def run_settings(tuned: Path | None) -> dict:
    """The training run's settings (``SETTINGS_SHOWN`` and the loss options) where ``tuned`` is the ``unet/`` or
    ``lora/`` folder of an rpo_fast run; {} otherwise."""
    config = Path(tuned).parent / "config.json" if tuned else None
    if config is None or not config.exists():
        return {}
    try:
        run = json.loads(config.read_text())
        train = run["train"]
    except (ValueError, KeyError, TypeError):
        return {}
    shown = {k: train[k] for k in SETTINGS_SHOWN if train.get(k) not in (None, "", 0) or k == "seed"}
    return shown | {k: v for k, v in (run.get("loss") or {}).items()}


def write_report(
    out: Path,
    prompts: list[str],
    base_paths,
    tuned_paths,
    comparisons: list[Comparison],
    unavailable: dict[str, str],
    *,
    per_prompt: int,
    report_prompts: int | None = None,
    title: str = "Evaluation",
    settings: dict | None = None,
    curves: str | None = None,
    extra_images: list[tuple[str, str]] = (),
    style: dict | None = None,
    scores: dict | None = None,
) -> Path:
    """report.html: the run's settings and training curves (where known), the metrics table and bar chart, and
    every prompt (or the first ``report_prompts``) as a card with its base and tuned images side by side (the PNG
    files under images/, referenced, not copied) and the first metric's scores; the cards flow across the page
    (a phone width gets one a row). ``scores``: {(metric, "base"|"tuned"): per-image array}."""
    esc = html.escape
    charts = [bar_chart(comparisons, out / "metrics.png").name] if comparisons else []
    shown = len(prompts) if report_prompts is None else min(report_prompts, len(prompts))
    first = comparisons[0].metric if comparisons else None

    def image(path, k, side):
        rel = Path(path).resolve().relative_to(out.resolve()).as_posix()
        score = ""
        if scores and first is not None:
            score = f"<figcaption>{side} {scores[(first, side)][k]:.3g}</figcaption>"
        return f'<figure><img src="{esc(rel)}" alt="{side}" loading="lazy">{score}</figure>'

    cards = []
    for i in range(shown):
        ks = range(i * per_prompt, (i + 1) * per_prompt)
        base = "".join(image(base_paths[k], k, "base") for k in ks)
        tuned = "".join(image(tuned_paths[k], k, "tuned") for k in ks)
        cards.append(
            f'<div class="card"><p>{i}. {esc(prompts[i])}</p><div class="pair"><div>{base}</div>'
            f"<div>{tuned}</div></div></div>"
        )
    table = "".join(
        f"<tr><td>{esc(c.metric)}</td><td>{c.n}</td><td>{c.base_mean:.4g} [{c.base_low:.4g}, {c.base_high:.4g}]</td>"
        f"<td>{c.tuned_mean:.4g} [{c.tuned_low:.4g}, {c.tuned_high:.4g}]</td>"
        f"<td>{c.win_rate:.1%} [{c.win_low:.1%}, {c.win_high:.1%}]</td></tr>"
        for c in comparisons
    )
    missing = "".join(f"<li><b>{esc(k)}</b>: not computed ({esc(v)})</li>" for k, v in unavailable.items())
    settings_html = ""
    if settings:
        rows_html = "".join(f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>" for k, v in settings.items())
        settings_html = f"<h2>The training run</h2><table>{rows_html}</table>"
    curves_html = f'<h2>Training curves</h2><p><img src="{esc(curves)}" alt="training curves"></p>' if curves else ""
    style_html = ""
    if style:
        rows_html = ""
        for n in ("base", "tuned"):
            st = style[n]
            rows_html += (
                f"<tr><td>{n}</td><td>{st['clip_fid']:.4g} [{st['clip_fid_low']:.4g}, {st['clip_fid_high']:.4g}]</td>"
                f"<td>{st['style_score']:.4g} [{st['style_score_low']:.4g}, {st['style_score_high']:.4g}]</td></tr>"
            )
        incep = style.get("inception_fid")
        style_html = (
            f"<h2>Style alignment: {esc(style['style'])} ({style['references']} styled references)</h2>"
            f"<table><tr><th>model</th><th>CLIP-FID to the styled references (lower is closer)</th>"
            f"<th>style score: 100 cos(image, '{esc(style['description'])}')</th></tr>{rows_html}</table>"
            + (f"<p>Inception FID: {esc(json.dumps(incep))}</p>" if incep is not None else "")
        )
    which = "every prompt" if shown == len(prompts) else f"the first {shown} of the {len(prompts)} prompts"
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;margin-bottom:1em}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child{{text-align:left}}
img{{max-width:100%}} .cards{{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:12px}}
.card{{border:1px solid #ddd;border-radius:6px;padding:6px}} .card p{{margin:0 0 4px;font-size:13px}}
.pair{{display:grid;grid-template-columns:1fr 1fr;gap:6px}} figure{{margin:0}}
.pair img{{width:100%;image-rendering:pixelated}} figcaption{{font-size:11px;color:#555;text-align:center}}</style>
</head>
<body><h1>{esc(title)}</h1>
<p>{len(prompts)} prompts x {per_prompt} image(s), the same seeds for base and tuned. Intervals: 95% (means:
t-interval; win rate of tuned over base, ties counted half: Wilson).</p>
{settings_html}
<h2>Metrics</h2>
<table><tr><th>metric</th><th>n</th><th>base mean</th><th>tuned mean</th><th>win rate (tuned)</th></tr>{table}</table>
{f"<ul>{missing}</ul>" if missing else ""}
{style_html}
{"".join(f'<p><img src="{esc(c)}" alt="metrics"></p>' for c in charts)}
{curves_html}
{"".join(f'<h2>{esc(t)}</h2><p><img src="{esc(s)}" alt="{esc(t)}"></p>' for t, s in extra_images)}
<h2>Samples: {which} ({shown}), base on the left, tuned on the right{f", with their {esc(first)}" if first else ""}</h2>
<div class="cards">
{"".join(cards)}
</div>
</body></html>
"""
    path = out / "report.html"
    path.write_text(body, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


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
    from .scorers import ScorerUnavailable, load_scorer

    if unet is None and lora is None:
        raise ValueError("give the tuned model: --unet TUNED_UNET_DIR or --lora LORA_DIR")
    for name, p in (("--model", model), ("--unet", unet), ("--lora", lora)):
        if p is not None and not Path(p).exists():
            raise FileNotFoundError(f"{name} {p} does not exist")
    if style is not None and (style_refs is None or style_clip is None):
        raise ValueError("--style needs --style-refs (the styled images) and --style-clip (a CLIP folder)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from .models import load_family

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
        t5 = dict(max_sequence_length=max_sequence_length)
        pipe = load_pipeline(model, device=device, dtype=dtype, scheduler=scheduler, **t5, **kw)
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
        from .embed import CLIPEmbedder

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
    curves = None
    if (tuned_dir.parent / "metrics.jsonl").exists():  # an rpo_fast run: its training curves
        curves = training_curves(tuned_dir.parent / "metrics.jsonl", out / "training.png").name
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
            style=summary.get("style"),
            scores=scores,
        )
    )
    return summary


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
    guidance: float | None = _opt(None, "default: 7.5 (SD1.5), 5 (SDXL), 7 (SD3), 3.5 (FLUX)")
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
