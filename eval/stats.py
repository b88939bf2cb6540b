"""Confidence intervals by bootstrap over prompts, and voting rates.

Images of one prompt are not independent (same prompt, often the same seeds across
models), so every interval here resamples *prompts* with replacement and recomputes
the statistic from all rows of the chosen prompts (a cluster bootstrap). The interval
is the percentile interval of the resampled statistic. ``scipy.stats.bootstrap``
resamples rows, not clusters, so it is not used; the ten lines below are the whole
method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Estimate:
    """A point estimate with its bootstrap interval and the number of prompts behind it."""

    mean: float
    low: float
    high: float
    n_prompts: int
    n: int

    def as_dict(self, prefix: str = "") -> dict:
        return {
            f"{prefix}mean": self.mean,
            f"{prefix}ci_low": self.low,
            f"{prefix}ci_high": self.high,
            f"{prefix}n_prompts": self.n_prompts,
            f"{prefix}n": self.n,
        }


def _groups(prompt_ids: Sequence) -> tuple[np.ndarray, int]:
    _, inverse = np.unique(np.asarray(prompt_ids, dtype=object).astype(str), return_inverse=True)
    return inverse, int(inverse.max()) + 1 if len(inverse) else 0


def bootstrap_mean(
    values: Sequence[float], prompt_ids: Sequence, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Estimate:
    """Mean of ``values`` (rows with NaN are ignored) with a cluster-bootstrap interval.

    The point estimate is the plain mean over rows; each resample draws prompts with
    replacement and takes the mean over all their rows.
    """
    v = np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(v)
    v, ids = v[keep], np.asarray(prompt_ids, dtype=object)[keep]
    if len(v) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, 0)
    g, k = _groups(ids)
    sums = np.bincount(g, weights=v, minlength=k)
    counts = np.bincount(g, minlength=k).astype(np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, k, size=(n_boot, k))
    boot = sums[idx].sum(1) / counts[idx].sum(1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return Estimate(float(v.mean()), float(lo), float(hi), k, len(v))


#: outcome codes of one vote, seen from the first model of a comparison
WIN, TIE, LOSS = 0, 1, 2


@dataclass
class VotingRate:
    """Shares of the votes of one comparison (model ``a`` vs ``b``) on one question."""

    a: str
    b: str
    question: str
    n_votes: int
    n_prompts: int
    win: Estimate  # share of votes for a
    tie: Estimate
    loss: Estimate  # share of votes for b
    gap: Estimate  # win - loss: how much more often a was chosen than b
    win_ties_half: Estimate  # (win + tie / 2): a's preference rate with ties split evenly


def voting_rate(
    outcomes: Sequence[int],
    prompt_ids: Sequence,
    a: str,
    b: str,
    question: str,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> VotingRate:
    """Voting rates of ``a`` against ``b`` from per-vote outcomes (WIN/TIE/LOSS for ``a``).

    Ties are their own share (not dropped, not split) in ``win``/``tie``/``loss``;
    ``win_ties_half`` is the common alternative that counts a tie as half a win.
    Intervals: cluster bootstrap over prompts.
    """
    o = np.asarray(outcomes, dtype=np.int64)
    g, k = _groups(prompt_ids)
    if len(o) == 0:
        nan = Estimate(float("nan"), float("nan"), float("nan"), 0, 0)
        return VotingRate(a, b, question, 0, 0, nan, nan, nan, nan, nan)
    counts = np.zeros((k, 3))
    np.add.at(counts, (g, o), 1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, k, size=(n_boot, k))
    tot = counts[idx].sum(1)  # (n_boot, 3)
    shares = tot / tot.sum(1, keepdims=True)
    point = counts.sum(0) / counts.sum()
    alpha = (1 - confidence) / 2

    def est(point_v: float, boot_v: np.ndarray) -> Estimate:
        lo, hi = np.quantile(boot_v, [alpha, 1 - alpha])
        return Estimate(float(point_v), float(lo), float(hi), k, len(o))

    return VotingRate(
        a,
        b,
        question,
        len(o),
        k,
        win=est(point[WIN], shares[:, WIN]),
        tie=est(point[TIE], shares[:, TIE]),
        loss=est(point[LOSS], shares[:, LOSS]),
        gap=est(point[WIN] - point[LOSS], shares[:, WIN] - shares[:, LOSS]),
        win_ties_half=est(point[WIN] + point[TIE] / 2, shares[:, WIN] + shares[:, TIE] / 2),
    )
