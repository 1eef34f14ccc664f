"""Shadow BoN: is a vBoN adapter still as good as the BoN-N it imitates, on today's traffic?

For a fraction of vBoN answers (VBON_SHADOW_BON_FRACTION), after the answer is ready, draw N
base samples of the same prompt with the same sampling (no seed), score them together with the
answer, and record where the answer falls among them (docs/shadow.md has the definitions and
alert rules). The work runs as a background task off the request path, only when there is
spare capacity, and holds its samples as a revocable lease of the admission budget: a user's
request that needs the room cancels it (its engine request is aborted), so shadow work never
delays or refuses a user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from server.admission import Lease, SampleBudget
from server.backend import GenerationBackend
from server.metrics import Metrics
from vbon.sampling import Sampling

logger = logging.getLogger(__name__)

ROUTE = "shadow"  # the route label of the shadow samples in vbon_samples_generated_total
WINDOW = 200  # comparisons behind each adapter's gauges (effective N, mean reward gap)
EFFECTIVE_N_CAP = 1000.0  # q̄ -> 1 means "beats every base sample": q̄/(1-q̄) is unbounded

Score = Callable[[str, list[str]], Awaitable[list[float]]]


def rank_quantile(answer: float, base: list[float]) -> float:
    """(base samples below `answer` + half the ties) / N. Its mean is 0.5 for an answer drawn
    like the base samples, and N/(N+1) for a true BoN-N answer (the max of N other base
    samples beats a fresh one with probability N/(N+1)), whatever the reward's scale."""
    below = sum(r < answer for r in base)
    ties = sum(r == answer for r in base)
    return (below + 0.5 * ties) / len(base)


def effective_n(mean_quantile: float) -> float:
    """The N whose BoN-N has this mean rank quantile: N/(N+1) = q  <=>  N = q/(1-q)."""
    if mean_quantile >= 1:
        return EFFECTIVE_N_CAP
    return min(EFFECTIVE_N_CAP, mean_quantile / (1 - mean_quantile))


@dataclass
class _Job:
    adapter: str
    n: int
    prompt: str
    sampling: Sampling
    answer: str
    lease: Lease | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class ShadowBoN:
    """Runs the shadow comparisons of one gateway (created with it, closed in the lifespan)."""

    def __init__(
        self,
        backend: GenerationBackend,
        budget: SampleBudget,
        score: Score,
        metrics: Metrics,
        *,
        fraction: float,
        max_load: float,
        max_jobs: int,
        timeout_s: float,
        rng: random.Random | None = None,
    ) -> None:
        self.backend = backend
        self.budget = budget
        self.score = score
        self.metrics = metrics
        self.fraction = fraction
        self.max_load = max_load
        self.max_jobs = max_jobs
        self.timeout_s = timeout_s
        self.rng = rng or random.Random()
        self._jobs: set[asyncio.Task[None]] = set()  # references, so no task is collected
        # Per adapter, the last WINDOW (rank quantile, reward gap) pairs.
        self._window: dict[str, deque[tuple[float, float]]] = {}

    @property
    def running(self) -> int:
        return len(self._jobs)

    def maybe_submit(
        self, prompt: str, sampling: Sampling, adapter: str, n: int, answer: str
    ) -> bool:
        """Start a comparison of `answer` (a finished vBoN answer) for a `fraction` of calls,
        if there is spare capacity. Never raises and never waits: call it once the user's
        answer is ready. True if a comparison started."""
        lease: Lease | None = None
        try:
            if n < 1 or self.rng.random() >= self.fraction:
                return False
            if sampling.temperature == 0 or sampling.reshaping():
                # Greedy decoding draws N copies of one text (vLLM refuses n > 1), and a
                # reshaped distribution is not the base model's BoN: nothing to compare with.
                self._count(adapter, "skipped_unsupported")
                return False
            busy = self.budget.in_flight + n > self.max_load * self.budget.limit
            if busy or len(self._jobs) >= self.max_jobs:
                self._count(adapter, "skipped_busy")
                return False
            job = _Job(adapter, n, prompt, sampling.with_(seed=None), answer)
            job.lease = lease = self.budget.lease(n, lambda: self._revoked(job))
            if job.lease is None:  # (cannot happen with max_load <= 1; kept for safety)
                self._count(adapter, "skipped_busy")
                return False
            self._in_flight_changed()
            job.task = asyncio.create_task(self._run(job), name=f"shadow-bon-{adapter}")
            self._jobs.add(job.task)
            job.task.add_done_callback(self._jobs.discard)
            return True
        except Exception:  # the user's answer must go out whatever happens here
            logger.exception("shadow BoN: could not start a comparison")
            if lease is not None:
                lease.release()
            return False

    def _revoked(self, job: _Job) -> None:
        """A user's request took the lease back: abort the engine work now. Counted here,
        once (Lease.revoke runs this once): a task cancelled before its first step never runs
        _run's handlers."""
        if job.task is not None:
            job.task.cancel()
        self._count(job.adapter, "shed")
        self._in_flight_changed()

    async def _run(self, job: _Job) -> None:
        assert job.lease is not None
        try:
            async with asyncio.timeout(self.timeout_s):
                base, answer = await self._compare(job)
            self._record(job, base, answer)
            outcome = "compared"
        except asyncio.CancelledError:
            if not job.lease.revoked:
                raise  # shutdown: not an outcome
            return  # shed: counted by _revoked
        except Exception:
            # Logged without the prompt: it is user data.
            logger.warning("shadow BoN comparison failed (adapter %s)", job.adapter, exc_info=True)
            outcome = "failed"
        finally:
            job.lease.release()
            self._in_flight_changed()
        self._count(job.adapter, outcome)

    async def _compare(self, job: _Job) -> tuple[list[float], float]:
        """(the base samples' rewards, the answer's reward), scored in one call."""
        request_id = f"shadow-{uuid.uuid4().hex[:24]}"
        gen = await self.backend.generate(job.prompt, job.sampling, job.n, request_id)
        self.metrics.samples.labels(ROUTE).inc(len(gen.samples))
        self.metrics.tokens.labels(ROUTE, "prompt").inc(gen.prompt_tokens)
        self.metrics.tokens.labels(ROUTE, "completion").inc(sum(s.tokens for s in gen.samples))
        texts = [s.text for s in gen.samples]
        rewards = await self.score(job.prompt, [*texts, job.answer])
        if len(rewards) != len(texts) + 1:
            raise ValueError(f"{len(rewards)} rewards for {len(texts) + 1} texts")
        return rewards[:-1], rewards[-1]

    def _record(self, job: _Job, base: list[float], answer: float) -> None:
        m, a = self.metrics, job.adapter
        q, gap = rank_quantile(answer, base), answer - max(base)
        m.shadow_rank_quantile.labels(a).observe(q)
        m.shadow_reward_gap.labels(a).observe(gap)
        window = self._window.setdefault(a, deque(maxlen=WINDOW))
        window.append((q, gap))
        m.shadow_effective_n.labels(a).set(effective_n(sum(w[0] for w in window) / len(window)))
        m.shadow_reward_gap_mean.labels(a).set(sum(w[1] for w in window) / len(window))
        m.shadow_expected_rank_quantile.labels(a).set(job.n / (job.n + 1))

    def _count(self, adapter: str, outcome: str) -> None:
        self.metrics.shadow_requests.labels(adapter, outcome).inc()

    def _in_flight_changed(self) -> None:
        self.metrics.samples_in_flight.set(self.budget.in_flight)

    async def close(self) -> None:
        """Cancel every running comparison (at shutdown, before the engine stops)."""
        tasks = list(self._jobs)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
