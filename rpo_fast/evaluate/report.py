"""The report of an evaluation: report.html (the run's settings and training curves, the metrics with a bar chart,
every prompt's base and tuned images side by side), its charts, and the run settings it shows."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from .stats import Comparison


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


def training_curves(metrics: Path, path: Path, *, stacked: bool = False) -> Path:
    """Loss over steps, and implicit accuracy (training batches and held-out pairs) where the objective has one;
    SFT has no reference, so its right panel is the held-out loss instead. ``metrics``: a run's metrics.jsonl.
    ``stacked``: the two panels one above the other (the report's picture for a phone's width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines()]
    train = [r for r in rows if "loss/loss" in r]
    pairwise = any("reward/implicit_acc" in r for r in train)
    key = "implicit_acc" if pairwise else "loss"
    evals = [r for r in rows if f"eval/{key}" in r]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(4.6, 6.4)) if stacked else plt.subplots(1, 2, figsize=(9, 3.2))
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
    curves_narrow: str | None = None,
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
        settings_html = f'<h2>The training run</h2><div class="wide"><table class="settings">{rows_html}</table></div>'
    curves_html = ""
    if curves:  # a phone's width gets the panels stacked (curves_narrow), readable at 340 px
        narrow = f'<source media="(max-width: 640px)" srcset="{esc(curves_narrow)}">' if curves_narrow else ""
        curves_html = f'<h2>Training curves</h2><p><picture>{narrow}<img src="{esc(curves)}" alt="training curves">'
        curves_html += "</picture></p>"
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
            '<div class="wide"><table><tr><th>model</th><th>CLIP-FID to the styled references (lower is closer)</th>'
            f"<th>style score: 100 cos(image, '{esc(style['description'])}')</th></tr>{rows_html}</table></div>"
            + (f"<p>Inception FID: {esc(json.dumps(incep))}</p>" if incep is not None else "")
        )
    which = "every prompt" if shown == len(prompts) else f"the first {shown} of the {len(prompts)} prompts"
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;margin-bottom:1em}}
@media (max-width:640px){{body{{margin:.6em}}}} .wide{{max-width:100%;overflow-x:auto}}
.settings td{{overflow-wrap:anywhere;text-align:left}}
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
<div class="wide"><table><tr><th>metric</th><th>n</th><th>base mean</th><th>tuned mean</th>
<th>win rate (tuned)</th></tr>{table}</table></div>
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
