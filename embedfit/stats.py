"""Paired comparisons of two models scored on the same images or the same folds: one home for the statistics
`compare` and `sweep` report, and for the rule that turns them into a recommendation.

- `paired_bootstrap`: a percentile interval of the mean over images (then over splits), resampling images within
  each split; given per-image differences between two models on the same images, the paired bootstrap.
- `bootstrap_metric_difference`: the same for any metric of (labels, predictions), e.g. balanced accuracy.
- `corrected_t_interval`: fold-by-fold differences with Nadeau and Bengio's variance correction (folds share
  training images: a plain t-interval is too narrow).
- `cheapest_within_noise`: among the candidates whose interval against the best reaches zero, the cheapest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def paired_bootstrap(per_split: Sequence[np.ndarray], seed: int, n_boot: int = N_BOOT,
                     level: float = LEVEL) -> list[float]:
    """Interval of the mean over images (averaged over splits), resampling images within each split.

    Args:
        per_split: Per split, one value per image (0/1 hits, or the difference of two models' hits).
        seed: Seed of the resampling.
        n_boot: Resamples.
        level: Coverage of the interval.

    Returns:
        [low, high].
    """
    rng = np.random.default_rng(seed)
    stats = np.zeros(n_boot)
    for values in per_split:
        values = np.asarray(values, dtype=float)
        for start in range(0, n_boot, 250):  # bounded memory on large test sets
            stop = min(n_boot, start + 250)
            stats[start:stop] += values[rng.integers(0, len(values), (stop - start, len(values)))].mean(1)
    stats /= len(per_split)
    lo, hi = np.percentile(stats, [50 - level * 50, 50 + level * 50])
    return [float(lo), float(hi)]


def bootstrap_metric_difference(labels: np.ndarray, a: np.ndarray, b: np.ndarray,
                                metric: Callable[[np.ndarray, np.ndarray], float], *, seed: int = 0,
                                n_boot: int = N_BOOT, level: float = LEVEL) -> list[float]:
    """Interval of metric(labels, a) - metric(labels, b) over images resampled for both models alike."""
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(labels), len(labels))
        boots.append(metric(labels[idx], a[idx]) - metric(labels[idx], b[idx]))
    low, high = np.quantile(boots, [0.5 - level / 2, 0.5 + level / 2])
    return [float(low), float(high)]


def corrected_t_interval(differences: Sequence[float], n_folds: int, level: float = LEVEL) -> list[float]:
    """Interval of the mean fold-by-fold difference of two models on the same k-fold splits (repeated or not),
    with Nadeau and Bengio's correction of the variance (1/J + n_test/n_train, n_test/n_train = 1/(k-1))."""
    from scipy import stats

    d = np.asarray(differences, dtype=float)
    j = len(d)
    se = math.sqrt((1 / j + 1 / (n_folds - 1)) * float(np.var(d, ddof=1)))
    half = float(stats.t.ppf(0.5 + level / 2, j - 1)) * se
    return [float(d.mean()) - half, float(d.mean()) + half]


def cheapest_within_noise(best: str, cost: dict[str, float], score: dict[str, float],
                          high: dict[str, float | None]) -> str:
    """The candidate to use: the cheapest among `best` and those whose interval of (candidate - best) reaches
    zero (`high[c] >= 0`); ties in cost go to the higher score. Candidates without an interval (unpaired) are
    not within noise."""
    close = [c for c in cost if c == best or (high.get(c) is not None and high[c] >= 0)]  # type: ignore[operator]
    return min(close, key=lambda c: (cost[c], -score[c]))


def ratio(a: float, b: float) -> str:
    """a as a share of b, in words: '1/6', '40%', 'about the same' or '2.5x'."""
    if b <= 0:
        return "about the same"
    r = a / b
    if r <= 0.67:
        return f"1/{round(1 / r)}" if r < 0.45 else f"{r:.0%}"
    return "about the same" if r < 1.5 else f"{r:.1f}x"


def describe_interval(interval: Sequence[float], level: float = LEVEL) -> str:
    """'95% CI -0.012 to +0.020'."""
    return f"{level:.0%} CI {interval[0]:+.3f} to {interval[1]:+.3f}"


__all__ = ["LEVEL", "N_BOOT", "bootstrap_metric_difference", "cheapest_within_noise", "corrected_t_interval",
           "describe_interval", "paired_bootstrap", "ratio"]
