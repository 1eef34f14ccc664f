"""Best-of-N math: the reference reward CDF estimate, the vBoN reward and known BoN bounds.

F(r) = P_{y'~pi_ref}(r(y') < r), with ties broken uniformly at random (the paper breaks them
arbitrarily; a reward such as VADER gives many exact ties, e.g. 0.0): estimated per prompt from
M sorted reference rewards as (rank + 1) / (M + 1), rank = the mid-rank of r among them, i.e.
the number strictly below plus half the number equal. `bon_win_probs` uses the same convention
(tied samples split their share), so the RL reward and the warm start's BoN weights agree.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence


def kl_bound(n: int) -> float:
    """Upper bound on KL(pi_BoN || pi_ref) in nats: log N - (N-1)/N (Beirami et al., 2024)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def win_rate_bound(n: int) -> float:
    """BoN's win rate against one reference sample is at most N/(N+1)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return n / (n + 1)


def beta_for_n(n: int) -> float:
    """KL weight of the vBoN objective: beta = 1/(N-1)."""
    if n < 2:
        raise ValueError(f"vBoN needs N >= 2 (beta = 1/(N-1)), got {n}")
    return 1.0 / (n - 1)


def n_for_beta(beta: float) -> float:
    return 1.0 / beta + 1.0


def mid_rank(sorted_refs: Sequence[float], reward: float) -> float:
    """#refs strictly below `reward` + half the #refs equal to it (sorted_refs ascending): the
    expected number of refs that `reward` beats when ties are broken uniformly at random."""
    below = bisect.bisect_left(sorted_refs, reward)
    tied = bisect.bisect_right(sorted_refs, reward) - below
    return below + tied / 2


def cdf_hat(sorted_refs: Sequence[float], reward: float) -> float:
    """F-hat(reward) = (mid-rank + 1) / (M + 1); sorted_refs ascending."""
    return (mid_rank(sorted_refs, reward) + 1) / (len(sorted_refs) + 1)


def log_cdf_hat(sorted_refs: Sequence[float], reward: float) -> float:
    """The vBoN reward log F-hat(r(y)), in [log(1/(M+1)), 0]."""
    return math.log(cdf_hat(sorted_refs, reward))


def bon_win_probs(rewards: Sequence[float], n: int) -> list[float]:
    """For each of M samples, the probability that it is BoN-N's choice when the N draws come
    with replacement from these M (the empirical BoN-N distribution): a sample of ascending rank
    k gets (k/M)^N - ((k-1)/M)^N; samples with equal rewards split their group's share."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    m = len(rewards)
    ordered = sorted(rewards)
    probs = []
    for r in rewards:
        below = bisect.bisect_left(ordered, r)
        tied = bisect.bisect_right(ordered, r) - below
        probs.append((((below + tied) / m) ** n - (below / m) ** n) / tied)
    return probs


def bon_log_prob_exact(log_p_ref: float, cdf: float, n: int) -> float:
    """log pi_BoN(y) = log sum_{i=1..N} C(N,i) F^{N-i} p^i for a completion y of reference
    probability p = exp(log_p_ref) whose reward has CDF value F = P(r(y') < r(y)).

    Assumes y is the only completion with its reward (ties between distinct completions are
    broken arbitrarily in the paper's derivation)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= cdf <= 1.0:
        raise ValueError(f"cdf must lie in [0, 1], got {cdf}")
    log_f = math.log(cdf) if cdf > 0 else -math.inf
    terms = []
    for i in range(1, n + 1):
        log_binom = math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
        f_part = (n - i) * log_f if n - i > 0 else 0.0
        terms.append(log_binom + f_part + i * log_p_ref)
    top = max(terms)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(t - top) for t in terms))


def bon_log_prob_bound(log_p_ref: float, cdf: float, n: int) -> float:
    """The paper's approximation log N + (N-1) log F + log p (exact when p -> 0)."""
    log_f = math.log(cdf) if cdf > 0 else -math.inf
    return math.log(n) + (n - 1) * log_f + log_p_ref
