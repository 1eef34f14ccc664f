"""The base model's reward distribution, for targets given as a quantile (`stop_at_quantile`):
a reward target that carries across reward models, where a raw number depends on the scale.

Read from a JSONL file in the format the gateway's BoN log and the trainer's reference cache
share ({"prompt", "responses", "rewards"} per line); all rewards are pooled."""

from __future__ import annotations

import json
import math
from pathlib import Path

from vbon.errors import ConfigError


class RewardReference:
    def __init__(self, rewards: list[float], source: str) -> None:
        if len(rewards) < 2:
            raise ConfigError(f"{source}: a reward reference needs at least 2 rewards")
        self.rewards = sorted(rewards)
        self.source = source

    @classmethod
    def from_jsonl(cls, path: Path) -> RewardReference:
        if not path.is_file():
            raise ConfigError(
                f"VBON_REWARD_REFERENCE: '{path}' does not exist (give a BoN log or a trainer "
                "reference file: JSONL with a \"rewards\" list per line)"
            )
        rewards: list[float] = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                values = row["rewards"]
                rewards += [float(r) for r in values]
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"VBON_REWARD_REFERENCE {path}:{lineno}: expected an object with a "
                    f"\"rewards\" list of numbers ({type(exc).__name__}: {exc})"
                ) from None
        if not all(math.isfinite(r) for r in rewards):
            raise ConfigError(f"VBON_REWARD_REFERENCE {path}: holds non-finite rewards")
        return cls(rewards, str(path))

    def quantile(self, q: float) -> float:
        """Linear interpolation between order statistics (numpy's default)."""
        pos = q * (len(self.rewards) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(self.rewards) - 1)
        return self.rewards[lo] + (pos - lo) * (self.rewards[hi] - self.rewards[lo])
