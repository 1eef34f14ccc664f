"""--credit critic (trainer/critic.py): the ridge fit recovers a prefix value it can express, and
each token's advantage is the rollout's minus the critic's change over the prefix."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import torch

from trainer.critic import Critic, fit_critic, layer_indices, loo_log_fhat, token_advantages
from vbon.bon import cdf_hat

VOCAB = 12
GOOD = 3  # each occurrence of this token raises the reward


def counts_so_far(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A stand-in for the base model's hidden states: at each position, how often each token
    occurred up to it (what a sentiment critic needs to know), the same at every layer."""
    onehot = torch.nn.functional.one_hot(ids, VOCAB).float() * mask.unsqueeze(-1)
    cum = onehot.cumsum(dim=1)
    return (cum, cum, cum)


def groups(n_prompts: int, rng: random.Random) -> list[tuple[list[int], list[list[int]], list]]:
    out = []
    for _ in range(n_prompts):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 4))]
        completions = [
            [GOOD if rng.random() < 0.3 else rng.randrange(VOCAB) for _ in range(rng.randint(3, 6))]
            for _ in range(8)
        ]
        rewards = [c.count(GOOD) + rng.gauss(0, 0.1) for c in completions]
        out.append((prompt, completions, rewards))
    return out


def test_fit_recovers_the_value_of_a_prefix() -> None:
    config = SimpleNamespace(num_hidden_layers=2, hidden_size=VOCAB)
    assert layer_indices(2) == [1, 2]
    data = groups(120, random.Random(0))
    critic = fit_critic(counts_so_far, config, data)
    # The target is the rank of a noisy count among 8 (log F-hat): most of its variance over the
    # prefixes is still to come, but what the prefix says is found, on held-out prompts.
    assert critic.r2_heldout > 0.08
    # Against rewards that the tokens do not determine, it finds nothing.
    rng = random.Random(1)
    noise = [(p, c, [rng.gauss(0, 1) for _ in r]) for p, c, r in data]
    assert fit_critic(counts_so_far, config, noise).r2_heldout < 0.05
    w = critic.weight.view(2, VOCAB).sum(0)
    assert int(w.argmax()) == GOOD and float(w[GOOD]) > 0
    # Where the prefix holds GOOD the value is higher than where it does not.
    ids = torch.tensor([[0, 1, GOOD, GOOD, 5], [0, 1, 4, 4, 5]])
    mask = torch.ones_like(ids)
    v = critic.values(counts_so_far(ids, mask), start=1, length=4)
    assert v.shape == (2, 4)
    assert float(v[0, 2]) > float(v[1, 2]) and float(v[0, 0]) == float(v[1, 0])


def test_saved_critic_loads_alike(tmp_path) -> None:
    critic = Critic([1, 2], torch.randn(2 * VOCAB), 0.25, 0.4, 1e-3)
    critic.save(tmp_path / "c.pt")
    back = Critic.load(tmp_path / "c.pt")
    assert back.layers == critic.layers and torch.equal(back.weight, critic.weight)
    assert (back.bias, back.r2_heldout, back.ridge) == (0.25, 0.4, 1e-3)


def test_targets_leave_the_sample_out() -> None:
    rewards = [0.0, 1.0, 1.0, 3.0]
    assert loo_log_fhat(rewards) == [
        math.log(cdf_hat([1.0, 1.0, 3.0], 0.0)),
        math.log(cdf_hat([0.0, 1.0, 3.0], 1.0)),
        math.log(cdf_hat([0.0, 1.0, 3.0], 1.0)),
        math.log(cdf_hat([0.0, 1.0, 1.0], 3.0)),
    ]


def test_token_advantage_is_the_rollouts_minus_the_critics_change() -> None:
    adv = torch.tensor([1.0, -2.0])
    values = torch.tensor([[0.5, 0.5, 1.5, 2.0], [0.0, -1.0, -1.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    got = token_advantages(adv, values, mask)
    # The first token gets the rollout's advantage (V(s_0) cancels); a token after which the
    # critic already expected more gets less credit; nothing after the end.
    assert torch.equal(got, torch.tensor([[1.0, 1.0, 0.0, -0.5], [-2.0, -1.0, -1.0, 0.0]]))
