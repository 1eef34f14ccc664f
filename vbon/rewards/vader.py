"""VADER sentiment (lexicon + rules, pure Python): the embedded default reward."""

from __future__ import annotations

from collections.abc import Sequence

from vbon.rewards.base import check_batch


class VaderReward:
    """Compound sentiment of the completion, in [-1, 1]; positive text scores high."""

    name = "vader"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        check_batch(prompts, completions)
        return [float(self._analyzer.polarity_scores(c)["compound"]) for c in completions]

    def describe(self) -> dict[str, object]:
        return {"backend": "vader", "range": [-1.0, 1.0], "input": "completion"}
