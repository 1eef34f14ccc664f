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

    # Optional (not part of the Protocol, so existing backends need not define it):
    # `health() -> str | None`, why the backend cannot score now; see `reward_health`.


def reward_health(reward: RewardModel) -> str | None:
    """Why the reward model cannot score now, or None. Optional on backends (local ones are
    always ready once loaded; a remote one checks its server): blocking, call it off the event
    loop."""
    health = getattr(reward, "health", None)
    return health() if callable(health) else None


def check_batch(prompts: Sequence[str], completions: Sequence[str]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(
            f"score() needs one prompt per completion, got {len(prompts)} prompts and "
            f"{len(completions)} completions"
        )
