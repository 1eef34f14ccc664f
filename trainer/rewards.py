"""Reward functions in TRL's calling convention (keyword columns of the dataset).

vbon (bound): log F-hat(r(y)), F-hat from the prompt's sorted reference rewards (column
`ref_rewards`). vbon (exact): (log pi_BoN(y) - log pi_ref(y)) / (N-1), which tends to the bound
plus the constant log N / (N-1) as pi_ref(y) -> 0. kl-rl: the raw reward.
TRL subtracts beta * KL(sequence) itself, with beta = 1/(N-1) for vbon.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from vbon.bon import bon_log_prob_exact, cdf_hat, log_cdf_hat


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


class RewardFunction:
    """Scores TRL's completions with our reward model; logs the raw reward every step."""

    __name__ = "reward"

    def __init__(self, reward: Any) -> None:
        self.reward = reward

    def raw(self, openings: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [float(r) for r in self.reward.score(list(openings), list(completions))]

    def __call__(self, prompts, completions, opening, log_metric=None, **kwargs) -> list[float]:
        raw = self.raw(opening, completions)
        if log_metric is not None:
            log_metric("raw_reward", _mean(raw))
        return raw


class VBoNReward(RewardFunction):
    __name__ = "vbon"

    def __init__(
        self,
        reward: Any,
        n: int,
        objective: str = "bound",
        ref_logprob: Callable[[Sequence[str], Sequence[Sequence[int]]], list[float]] | None = None,
    ) -> None:
        super().__init__(reward)
        self.n = n
        self.objective = objective
        # For the exact objective: log pi_ref(completion | prompt) per row; set by the job
        # once the trainer (whose model with the adapter disabled is pi_ref) exists.
        self.ref_logprob = ref_logprob

    def __call__(
        self,
        prompts,
        completions,
        opening,
        ref_rewards,
        completion_ids=None,
        log_metric=None,
        **kwargs,
    ) -> list[float]:
        raw = self.raw(opening, completions)
        log_f = [log_cdf_hat(refs, r) for refs, r in zip(ref_rewards, raw, strict=True)]
        if log_metric is not None:
            log_metric("raw_reward", _mean(raw))
            log_metric("log_fhat", _mean(log_f))
        if self.objective == "bound":
            return log_f
        if self.ref_logprob is None or completion_ids is None:
            raise RuntimeError("the exact objective needs the reference log-probabilities")
        log_p = self.ref_logprob(prompts, completion_ids)
        out = []
        for refs, r, lp in zip(ref_rewards, raw, log_p, strict=True):
            log_bon = bon_log_prob_exact(lp, cdf_hat(refs, r), self.n)
            out.append((log_bon - lp) / (self.n - 1))
        if log_metric is not None:
            shift = math.log(self.n) / (self.n - 1)
            gap = _mean([o - lf - shift for o, lf in zip(out, log_f, strict=True)])
            log_metric("exact_minus_bound", gap)
        return out
