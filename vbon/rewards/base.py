"""The reward interface every backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class RewardModel(Protocol):
    """Scores completions in batches. Blocking: servers call it off the event loop."""

    name: str

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """One float per (prompt, completion) pair; higher is better."""
        ...

    def describe(self) -> dict[str, object]:
        """What was loaded, for readiness and metadata."""
        ...


def check_batch(prompts: Sequence[str], completions: Sequence[str]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(
            f"score() needs one prompt per completion, got {len(prompts)} prompts and "
            f"{len(completions)} completions"
        )
