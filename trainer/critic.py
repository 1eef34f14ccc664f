"""--credit critic: per-token credit in the RL stage, from a critic fitted once on the references.

RLOO hands every token of a completion the same advantage: its reward minus the mean reward of
the prompt's other completions. Of 32 tokens a few carry the sentiment; the rest get the same
push, up or down, as noise, and that noise is KL spent without reward (every recipe so far
moves along share ≈ 0.55·√KL where BoN sits at ≥ 0.91, docs/trainer.md). A baseline that
depends on the prefix s_t = (prompt, y_<t) leaves the policy gradient unbiased,
E[∇ log π(y_t | s_t) · b(s_t)] = 0, and with b(s_t) ≈ E[reward | s_t] the token y_t is credited
only with how far the reward moved after it was drawn (a value function, as in PPO with GAE at
λ = 1, but without its bias: the baseline is not bootstrapped).

The critic V(s_t) ≈ E_base[log F-hat(r(y)) | s_t] is a ridge regression from the base model's
hidden states at the position that predicts y_t (the middle and the last layer) onto the final
log F-hat of the reference samples, which are draws of the base: Monte-Carlo targets at every
prefix, fitted once before RL in closed form (no value head trained beside the policy). Per
token the RLOO advantage becomes A_t = A - (V(s_t) - V(s_0)). The step costs one no-grad
forward of the base more. V is fitted under the base's distribution and the policy drifts from
it; the gradient stays unbiased whatever V is, only the variance it removes shrinks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vbon.bon import cdf_hat

logger = logging.getLogger(__name__)

CRITIC_FILE = "critic.pt"
# Which hidden states feed the critic, as fractions of the model's depth (1.0: the last, after
# the final norm). The middle layer keeps more of what the text said; the last, what comes next.
DEPTHS = (0.5, 1.0)
# Ridge strengths tried, relative to each feature's variance; the held-out fit picks one.
RIDGE = (1e-4, 1e-3, 1e-2, 1e-1)


def layer_indices(num_layers: int) -> list[int]:
    """hidden_states indices (0 = embeddings, num_layers = after the final norm)."""
    return sorted({max(1, round(d * num_layers)) for d in DEPTHS})


def features(
    hidden_states: Sequence[torch.Tensor], layers: Sequence[int], start: int, length: int
) -> torch.Tensor:
    """The critic's input at the `length` positions from `start`: those layers' hidden states,
    concatenated, fp32 on the CPU (batch, length, features). One function for the fit and the
    RL step, so both read the same positions."""
    window = slice(start, start + length)
    return torch.cat([hidden_states[i][:, window].float().cpu() for i in layers], dim=-1)


@dataclass
class Critic:
    """V(s) = features(s) · weight + bias, on the concatenated hidden states of `layers`."""

    layers: list[int]
    weight: torch.Tensor  # (features,)
    bias: float
    r2_heldout: float  # explained variance of the final reward over held-out prefixes
    ridge: float

    def values(
        self, hidden_states: Sequence[torch.Tensor], start: int, length: int
    ) -> torch.Tensor:
        """V at the `length` positions from `start` (those predicting the completion's tokens):
        (batch, length), fp32."""
        v = features(hidden_states, self.layers, start, length) @ self.weight + self.bias
        return v.to(hidden_states[0].device)  # beside the loss's tensors

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save(
            {"layers": self.layers, "weight": self.weight, "bias": self.bias,
             "r2_heldout": self.r2_heldout, "ridge": self.ridge},
            tmp,
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Critic:
        d = torch.load(path, weights_only=True)
        return cls(d["layers"], d["weight"], float(d["bias"]), float(d["r2_heldout"]),
                   float(d["ridge"]))


class _Moments:
    """Running sums for a least-squares fit without keeping the (prefixes x features) matrix."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.sx = torch.zeros(dim, dtype=torch.float64)
        self.sy = 0.0
        self.sxx = torch.zeros(dim, dim, dtype=torch.float64)
        self.sxy = torch.zeros(dim, dtype=torch.float64)
        self.syy = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        self.n += x.size(0)
        self.sx += x.sum(0)
        self.sy += float(y.sum())
        self.sxx += x.T @ x
        self.sxy += x.T @ y
        self.syy += float((y * y).sum())

    def mse(self, w: torch.Tensor, b: float) -> float:
        """mean (y - x·w - b)^2 from the sums."""
        n = self.n
        e = (
            self.syy - 2 * float(w @ self.sxy) - 2 * b * self.sy + float(w @ self.sxx @ w)
            + 2 * b * float(w @ self.sx) + n * b * b
        )
        return e / n

    def variance(self) -> float:
        return self.syy / self.n - (self.sy / self.n) ** 2


def loo_log_fhat(rewards: Sequence[float]) -> list[float]:
    """Each sample's log F-hat against the prompt's other samples (its own draw left out, so the
    target is what an independent rollout of the same text would get)."""
    rewards = list(rewards)
    return [
        math.log(cdf_hat(sorted(rewards[:i] + rewards[i + 1 :]), r))
        for i, r in enumerate(rewards)
    ]


HiddenStates = Callable[[torch.Tensor, torch.Tensor], Sequence[torch.Tensor]]


def fit_critic(
    hidden_states: HiddenStates,
    config: Any,
    groups: Sequence[tuple[list[int], list[list[int]], list[float]]],
    *,
    heldout: float = 0.15,
    pad_id: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Critic:
    """Fit V on `groups`: per prompt (prompt ids, each sample's completion ids, each sample's
    reward). Every prefix of every sample is a training row (its target the sample's
    leave-one-out log F-hat); the last `heldout` fraction of prompts picks the ridge strength
    and measures the fit. `hidden_states(ids, mask)` is the base model's forward (the same one
    the RL step uses, so features match); `config` the model's (layers, width)."""
    layers = layer_indices(config.num_hidden_layers)
    dim = config.hidden_size * len(layers)
    split = max(1, int(len(groups) * (1 - heldout)))
    train, test = _Moments(dim), _Moments(dim)
    with torch.no_grad():
        for g, (prompt_ids, completions, rewards) in enumerate(groups):
            targets = loo_log_fhat(rewards)
            length = max(len(c) for c in completions)
            ids = torch.full((len(completions), len(prompt_ids) + length), pad_id)
            mask = torch.zeros_like(ids)
            ids[:, : len(prompt_ids)] = torch.tensor(prompt_ids)
            mask[:, : len(prompt_ids)] = 1
            for i, c in enumerate(completions):
                ids[i, len(prompt_ids) : len(prompt_ids) + len(c)] = torch.tensor(c)
                mask[i, len(prompt_ids) : len(prompt_ids) + len(c)] = 1
            start = len(prompt_ids) - 1  # the position predicting the first completion token
            feats = features(hidden_states(ids, mask), layers, start, length)
            keep = mask[:, start + 1 : start + 1 + length].bool()  # a real token follows
            y = torch.tensor(targets).unsqueeze(1).expand(-1, length)
            (train if g < split else test).add(feats[keep], y[keep])
            if progress:
                progress(g + 1, len(groups))
    best: tuple[float, torch.Tensor, float, float] | None = None
    mean_x, mean_y = train.sx / train.n, train.sy / train.n
    cov = train.sxx / train.n - torch.outer(mean_x, mean_x)
    cxy = train.sxy / train.n - mean_x * mean_y
    scale = cov.diagonal().clamp(min=1e-12)
    for lam in RIDGE:
        w = torch.linalg.solve(cov + lam * torch.diag(scale), cxy)
        b = mean_y - float(w @ mean_x)
        err = test.mse(w, b) if test.n else train.mse(w, b)
        if best is None or err < best[0]:
            best = (err, w, b, lam)
    assert best is not None
    err, w, b, lam = best
    ref = test if test.n else train
    r2 = 1.0 - err / max(ref.variance(), 1e-12)
    logger.info("critic: %d + %d prefixes, layers %s, ridge %g, held-out R^2 %.3f",
                train.n, test.n, layers, lam, r2)
    return Critic(layers, w.float(), float(b), float(r2), float(lam))


def token_advantages(
    advantages: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """A_t = A - (V(s_t) - V(s_0)) on real tokens, 0 after the completion ended."""
    return (advantages.unsqueeze(1) - (values - values[:, :1])) * mask

