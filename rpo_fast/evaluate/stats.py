"""The statistics of a comparison: means with t-intervals, the paired win rate with its Wilson interval, the
Fréchet distance and bootstrap intervals."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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
