"""Evaluation, one module a job (``python -m rpo_fast.evaluate``: ``command``, whose docstring says what it does):

sampling   the prompt sets, the family's pipeline with the tuned denoiser or LoRA, paired seeded sampling
stats      means and t-intervals, paired win rates with Wilson intervals, Fréchet distance, bootstrap
style      the style-alignment metrics (CLIP-FID, the style score)
report     report.html, its charts and the run settings it shows
command    ``evaluate`` (sample, score, compare, report) and the command line
"""

from .command import EvaluateConfig, evaluate, main
from .report import bar_chart, run_settings, training_curves, write_report
from .sampling import load_pipeline, read_prompts, sample
from .stats import Comparison, bootstrap_interval, compare, frechet_distance, mean_interval, wilson_interval
from .style import read_style_references, style_metrics

__all__ = [
    "Comparison",
    "EvaluateConfig",
    "bar_chart",
    "bootstrap_interval",
    "compare",
    "evaluate",
    "frechet_distance",
    "load_pipeline",
    "main",
    "mean_interval",
    "read_prompts",
    "read_style_references",
    "run_settings",
    "sample",
    "style_metrics",
    "training_curves",
    "wilson_interval",
    "write_report",
]
