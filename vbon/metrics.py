"""The numbers an evaluation reports, from rewards and KL estimates already in hand: mean and
standard error across prompts, win rate against a reference sample, distinct-2, the Pareto
front over (KL, score), and an adapter's summary against the base model and BoN-N.

One definition each, shared by the quality evaluation (vbon.evaluation), the trainer's
evaluation and Pareto comparison (trainer.evaluate, trainer.pareto) and the benchmark
(clients.bench), so that a number means the same in every report."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from vbon.bon import kl_bound


def mean_se(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)). NaN where
    undefined (no values: both; one value: the SE), so the pair stays floats that numpy and
    round() take; a report that writes JSON null instead converts with none_if_nan."""
    xs = [float(v) for v in values]
    if not xs:
        return math.nan, math.nan
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan
    return statistics.fmean(xs), se


def none_if_nan(value: float | None) -> float | None:
    """None for a NaN (JSON has no NaN; reports print None as '-')."""
    return None if value is None or math.isnan(value) else value


def win(a: float, b: float) -> float:
    """1 if reward a beats b, 1/2 for a tie, 0 otherwise: a win rate's unit."""
    return 1.0 if a > b else 0.5 if a == b else 0.0


def distinct_2(texts: Sequence[str]) -> float:
    """Distinct word bigrams over all bigrams of `texts`: near 1 for varied text, low for a
    policy that collapsed onto a few phrases."""
    grams, total = set(), 0
    for t in texts:
        words = t.split()
        pairs = list(zip(words, words[1:], strict=False))
        grams.update(pairs)
        total += len(pairs)
    return len(grams) / total if total else 0.0


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points (kl, score) no other point dominates (kl <= and score >=, one
    strictly), sorted by KL."""
    keep = []
    for i, (k, s) in enumerate(points):
        dominated = any(
            (k2 <= k and s2 >= s) and (k2 < k or s2 > s)
            for j, (k2, s2) in enumerate(points)
            if j != i
        )
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


def summarise(
    base: list[list[float]],
    trained: list[list[float]],
    n: int,
    kl: list[float],
    trained_texts: list[str],
    seed: int = 0,
) -> dict[str, Any]:
    """An adapter against the base model and BoN-N on the same prompts. base[p]: the base
    model's rewards on prompt p, a multiple of n (groups of n: base = their mean, BoN-N = the
    mean of each group's best); trained[p]: the adapter's; kl: its per-sample KL estimates.
    Standard errors are across prompt means, the gain fraction's by bootstrap over prompts."""
    base_a = [np.asarray(b, dtype=float) for b in base]
    bon = [b.reshape(-1, n).max(axis=1) for b in base_a]
    base_pm = np.array([b.mean() for b in base_a])
    bon_pm = np.array([b.mean() for b in bon])
    tr_pm = np.array([np.mean(t) for t in trained])
    # Win rate against one base sample of the same prompt.
    wins = [win(r, b[i % len(b)]) for b, t in zip(base_a, trained, strict=True)
            for i, r in enumerate(t)]  # fmt: skip

    def frac(idx: np.ndarray) -> float:
        denom = bon_pm[idx].mean() - base_pm[idx].mean()
        return float((tr_pm[idx].mean() - base_pm[idx].mean()) / denom) if denom else float("nan")

    rng = np.random.default_rng(seed)
    all_idx = np.arange(len(base_pm))
    boot = [frac(rng.integers(0, len(all_idx), len(all_idx))) for _ in range(2000)]
    out: dict[str, Any] = {}
    for key, arr in (("base", base_pm), ("trained", tr_pm), (f"bon{n}", bon_pm)):
        m, se = mean_se(arr)
        out[f"reward_{key}"] = round(m, 4)
        out[f"reward_{key}_se"] = round(se, 4)
    gain, gain_se = mean_se(tr_pm - base_pm)
    out["gain_trained"] = round(gain, 4)
    out["gain_trained_se"] = round(gain_se, 4)
    out["gain_fraction_of_bon"] = round(frac(all_idx), 4)
    out["gain_fraction_of_bon_se"] = round(float(np.nanstd(boot, ddof=1)), 4)
    kl_m, kl_se = mean_se(kl)
    out["kl_to_base"] = round(kl_m, 4)
    out["kl_to_base_se"] = round(kl_se, 4)
    out["kl_bound_bon"] = round(kl_bound(n), 4)
    wr, wr_se = mean_se(wins)
    out["win_rate_vs_base"] = round(wr, 4)
    out["win_rate_vs_base_se"] = round(wr_se, 4)
    out["distinct_2"] = round(distinct_2(trained_texts), 4)
    return out
