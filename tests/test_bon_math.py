from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vbon.bon import (
    beta_for_n,
    bon_log_prob_bound,
    bon_log_prob_exact,
    bon_win_probs,
    cdf_hat,
    kl_bound,
    log_cdf_hat,
    mid_rank,
    n_for_beta,
    win_rate_bound,
)

rewards = st.lists(st.integers(-5, 5).map(float), min_size=1, max_size=40)


@given(refs=rewards, r=st.integers(-6, 6).map(float))
def test_cdf_hat_matches_brute_force_count_with_ties(refs: list[float], r: float) -> None:
    # Brute force: r beats a reference below it, and a tied one with probability 1/2 (ties
    # broken uniformly at random: VADER gives many exact 0.0).
    beaten = sum(1.0 if x < r else 0.5 if x == r else 0.0 for x in refs)
    want = (beaten + 1) / (len(refs) + 1)
    assert cdf_hat(sorted(refs), r) == pytest.approx(want)
    assert log_cdf_hat(sorted(refs), r) == pytest.approx(math.log(want))
    assert math.log(1 / (len(refs) + 1)) <= log_cdf_hat(sorted(refs), r) <= 0.0


@given(refs=rewards, a=st.floats(-10, 10), b=st.floats(-10, 10))
def test_cdf_hat_is_monotone_and_scale_free(refs: list[float], a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    s = sorted(refs)
    assert cdf_hat(s, lo) <= cdf_hat(s, hi)
    # Only ranks matter: a monotone map of every reward changes nothing.
    f = lambda x: 2 * x  # noqa: E731  (exact in floating point: no ties appear or vanish)
    assert cdf_hat(sorted(f(x) for x in refs), f(lo)) == cdf_hat(s, lo)


@given(
    refs=st.lists(st.integers(-2, 2).map(float), min_size=1, max_size=5),
    n=st.integers(1, 4),
)
def test_bon_win_probs_match_enumeration_with_ties(refs: list[float], n: int) -> None:
    """Every ordered N-tuple of draws (with replacement) enumerated: the winner is the best
    reward, a tie at the top split evenly between the tied samples that were drawn."""
    import itertools

    want = [0.0] * len(refs)
    for draw in itertools.product(range(len(refs)), repeat=n):
        best = max(refs[i] for i in draw)
        tied = sorted({i for i in draw if refs[i] == best})
        for i in tied:
            want[i] += 1 / len(tied) / len(refs) ** n
    got = bon_win_probs(refs, n)
    assert got == pytest.approx(want)
    assert sum(got) == pytest.approx(1.0)


@given(refs=st.lists(st.integers(-2, 2).map(float), min_size=1, max_size=12))
def test_cdf_hat_and_bon_weights_share_one_tie_convention(refs: list[float]) -> None:
    """The RL reward's F-hat and the warm start's BoN weights break ties alike: BoN-2's choice
    probability of sample i among the M (draws with replacement) is 2 * mid-rank_i / M^2,
    the mid-rank counted over all M (itself included, as a tie with itself)."""
    m, s = len(refs), sorted(refs)
    got = bon_win_probs(refs, 2)
    for i, r in enumerate(refs):
        assert got[i] == pytest.approx(2 * mid_rank(s, r) / m**2)
        assert cdf_hat(s, r) == pytest.approx((mid_rank(s, r) + 1) / (m + 1))


def test_bounds_and_beta() -> None:
    assert kl_bound(1) == 0.0
    assert kl_bound(8) == pytest.approx(math.log(8) - 7 / 8)
    assert win_rate_bound(8) == pytest.approx(8 / 9)
    assert beta_for_n(8) == pytest.approx(1 / 7) and n_for_beta(1 / 7) == pytest.approx(8)
    with pytest.raises(ValueError, match="N >= 2"):
        beta_for_n(1)


def test_exact_bon_probability_matches_simulation() -> None:
    # A discrete reference over 5 completions with distinct rewards.
    probs = [0.4, 0.25, 0.15, 0.12, 0.08]
    reward = [0.0, 2.0, 1.0, 4.0, 3.0]
    n, trials = 4, 200_000
    rng = random.Random(0)
    counts = [0] * len(probs)
    for _ in range(trials):
        draws = rng.choices(range(len(probs)), weights=probs, k=n)
        counts[max(draws, key=lambda i: reward[i])] += 1
    total = 0.0
    for y, p in enumerate(probs):
        cdf = sum(q for q, r in zip(probs, reward, strict=True) if r < reward[y])
        exact = math.exp(bon_log_prob_exact(math.log(p), cdf, n))
        total += exact
        assert counts[y] / trials == pytest.approx(exact, abs=0.005)
        # The paper's bound approximates it from above-ish only for tiny p; it is finite.
        assert math.isfinite(bon_log_prob_bound(math.log(p), max(cdf, 1e-12), n))
    assert total == pytest.approx(1.0, abs=1e-9)
