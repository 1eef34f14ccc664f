"""Adaptive best-of-N: early exit and pruning. This module owns the candidates' lifetimes.

A request draws at most N candidates, in waves of `wave` (all N together without a target).
Candidate i is seeded seed + i, as plain BoN's candidate i is. A wave with pruning checkpoints
runs each candidate as its own engine request (n = 1), streamed with its token ids so that it
can be judged and stopped; a wave without checkpoints is one engine request with n = the wave.

- **Pruning.** At each checkpoint c (in generated tokens) the wave waits until every running
  candidate has c tokens or has finished short of c; the prefixes (the first c tokens,
  detokenized) are scored in one reward call off the event loop, and all but the best
  ceil(keep * participants) are aborted in the engine (their KV blocks are freed at once).
  Candidates go on generating while the checkpoint is scored.
- **Early exit.** When a wave's survivors have finished, their completions are scored in one
  call; if the best reaches the target, the request ends there, else the next wave starts.

Every decision depends only on the samples (which prefixes reach which length, their rewards),
never on timing (which candidate finished first), so a seeded request replays its decisions.
Each candidate holds one unit of the admission budget from its start to its end, so pruning and
early exit give it back at once.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from server.admission import SampleBudget
from server.backend import GenerationBackend, Sample
from server.errors import APIError
from server.protocol import AdaptiveFields, Prune
from vbon.sampling import Sampling

Scorer = Callable[[str, list[str]], Awaitable[list[float]]]


@dataclass(frozen=True)
class Plan:
    """What one adaptive request does, resolved against the server's defaults and limits."""

    n: int
    wave: int
    target: float | None = None
    at_tokens: tuple[int, ...] = ()
    keep: float = 1.0

    def waves(self) -> list[range]:
        return [range(s, min(self.n, s + self.wave)) for s in range(0, self.n, self.wave)]

    def kept(self, participants: int) -> int:
        return max(1, math.ceil(self.keep * participants - 1e-9))

    def prune_spec(self) -> Prune | None:
        return Prune(at_tokens=list(self.at_tokens), keep=self.keep) if self.at_tokens else None


def resolve_plan(
    req: AdaptiveFields,
    n: int,
    max_tokens: int,
    use_default: bool,
    default: AdaptiveFields,
    reward_range: Sequence[float] | None,
    quantile: Callable[[float], float] | None,
    remote: bool,
) -> Plan | None:
    """The request's adaptive plan, or None for plain best-of-N. Raises 400 naming the field
    when the server cannot honour it."""
    given = req.given()
    if not given and not use_default:
        return None
    field0 = given[0] if given else "adaptive"
    if remote:
        raise APIError(
            400,
            f"'{field0}': adaptive best-of-N (early exit, pruning) needs the in-process engine; "
            "in remote mode (VBON_BACKEND=remote) send plain best-of-N",
            param=field0,
        )
    if n < 2:
        raise APIError(
            400,
            f"'{field0}' needs n >= 2: adaptive best-of-N chooses among several candidates",
            param=field0,
        )
    if req.stop_at_reward is not None and req.stop_at_quantile is not None:
        raise APIError(
            400, "give one of 'stop_at_reward' and 'stop_at_quantile', not both",
            param="stop_at_quantile",
        )
    if req.wave is not None and req.wave > n:
        raise APIError(400, f"'wave' is {req.wave}; allowed: 1 <= wave <= n ({n})", param="wave")
    if req.prune is not None and req.prune.at_tokens[-1] >= max_tokens:
        raise APIError(
            400,
            f"'prune.at_tokens' is {req.prune.at_tokens}; allowed: increasing token counts "
            f"below max_tokens ({max_tokens})",
            param="prune.at_tokens",
        )
    own_target = req.stop_at_reward is not None or req.stop_at_quantile is not None
    src = req if own_target or not use_default else default
    reward_target, q = src.stop_at_reward, src.stop_at_quantile
    target = reward_target
    if q is not None:
        if quantile is None:
            raise APIError(
                400,
                "'stop_at_quantile' needs the base model's reward distribution: set "
                "VBON_REWARD_REFERENCE to a BoN log or a trainer reference file, or give "
                "'stop_at_reward'",
                param="stop_at_quantile",
            )
        target = quantile(q)
    if reward_target is not None and reward_range is not None:
        lo, hi = reward_range
        if not lo <= reward_target <= hi:
            raise APIError(
                400,
                f"'stop_at_reward' is {reward_target}; allowed: {lo} <= stop_at_reward <= {hi} "
                "(the reward model's range)",
                param="stop_at_reward",
            )
    prune = req.prune if req.prune is not None else (default.prune if use_default else None)
    at_tokens: tuple[int, ...] = ()
    keep = 1.0
    if prune is not None:
        # The server default's checkpoints apply where they fit this request's max_tokens.
        at_tokens = tuple(t for t in prune.at_tokens if t < max_tokens)
        keep = prune.keep
    if req.wave is not None:
        wave = req.wave
    elif target is not None:
        wave = min(n, default.wave or n)
    else:
        wave = n
    if target is None and wave < n:
        raise APIError(
            400,
            f"'wave' is {wave} but no target is set: waves only pay with early exit; give "
            "'stop_at_reward' or 'stop_at_quantile', or leave out 'wave'",
            param="wave",
        )
    if target is None and not at_tokens:
        raise APIError(
            400,
            "this request sets nothing adaptive that applies: give 'stop_at_reward', "
            "'stop_at_quantile' or 'prune' with checkpoints below max_tokens",
            param=field0,
        )
    return Plan(n=n, wave=wave, target=target, at_tokens=at_tokens, keep=keep)


@dataclass
class Candidate:
    index: int
    wave: int
    seed: int | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cumulative_logprob: float | None = None
    done: bool = False
    state: Literal["running", "finished", "pruned"] = "running"
    prefixes: dict[int, str] = field(default_factory=dict)  # checkpoint -> prefix text
    partial: list[tuple[int, float]] = field(default_factory=list)
    reward: float | None = None
    holds_budget: bool = False  # one unit of the admission budget, from start to end

    generated: int | None = None  # token count when token ids were not kept (whole waves)

    @property
    def tokens(self) -> int:
        return len(self.token_ids) if self.generated is None else self.generated

    def sample(self) -> Sample:
        return Sample(self.text, self.tokens, self.cumulative_logprob, self.finish_reason)


@dataclass
class Outcome:
    candidates: list[Candidate]  # every candidate started, by index
    prompt_tokens: int
    stop_reason: Literal["target_reached", "n_exhausted"]
    waves: int
    generation_s: float = 0.0
    scoring_s: float = 0.0

    @property
    def order(self) -> list[int]:
        """Finished candidates by reward, then pruned ones by their last partial reward; ties
        to the lower index."""

        def key(c: Candidate) -> tuple[int, float, int]:
            return (c.state != "finished", -(c.reward or 0.0), c.index)

        return [c.index for c in sorted(self.candidates, key=key)]

    @property
    def best(self) -> Candidate:
        return self.candidates[self.order[0]]

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.candidates)

    @property
    def pruned(self) -> int:
        return sum(c.state == "pruned" for c in self.candidates)


class AdaptiveRun:
    """One adaptive request: waves, checkpoints, aborts. Errors propagate after every
    candidate's engine request has been aborted."""

    def __init__(
        self,
        backend: GenerationBackend,
        budget: SampleBudget,
        score: Scorer,
        on_budget: Callable[[], None],
        request_id: str,
    ) -> None:
        self.backend = backend
        self.budget = budget
        self.score = score
        self.on_budget = on_budget
        self.request_id = request_id
        self._changed = asyncio.Event()
        self.scoring_s = 0.0

    async def run(
        self, prompt: str, prompt_tokens: int, sampling: Sampling, plan: Plan
    ) -> Outcome:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        everyone: list[Candidate] = []
        stop: Literal["target_reached", "n_exhausted"] = "n_exhausted"
        waves = 0
        for w, idxs in enumerate(plan.waves()):
            waves += 1
            cands = [
                Candidate(i, w, None if sampling.seed is None else sampling.seed + i)
                for i in idxs
            ]
            everyone += cands
            # The first wave is admitted or refused (429) now; a later one waits for room,
            # since the request was admitted already.
            if w == 0:
                self.budget.take(len(cands))
            else:
                await self.budget.take_when_free(len(cands))
            for c in cands:
                c.holds_budget = True
            self.on_budget()
            await self._wave(prompt, sampling, plan, cands)
            finished = [c for c in cands if c.state == "finished"]
            t = loop.time()
            rewards = await self.score(prompt, [c.text for c in finished])
            self.scoring_s += loop.time() - t
            for c, r in zip(finished, rewards, strict=True):
                c.reward = r
            if plan.target is not None and any(r >= plan.target for r in rewards):
                stop = "target_reached"
                break
        total = loop.time() - t0
        return Outcome(everyone, prompt_tokens, stop, waves, total - self.scoring_s,
                       self.scoring_s)

    async def _wave(
        self, prompt: str, sampling: Sampling, plan: Plan, cands: list[Candidate]
    ) -> None:
        if not plan.at_tokens:
            await self._whole_wave(prompt, sampling, cands)
            return
        tasks = {
            c.index: asyncio.create_task(
                self._consume(prompt, replace(sampling, seed=c.seed), c, plan.at_tokens)
            )
            for c in cands
        }
        try:
            for cp in plan.at_tokens:
                live = [c for c in cands if c.state == "running"]
                await self._until(
                    tasks, lambda live=live, cp=cp: all(c.done or c.tokens >= cp for c in live)
                )
                part = [c for c in live if c.tokens >= cp]
                if len(part) < 2:
                    continue
                t = asyncio.get_running_loop().time()
                rewards = await self.score(prompt, [c.prefixes[cp] for c in part])
                self.scoring_s += asyncio.get_running_loop().time() - t
                for c, r in zip(part, rewards, strict=True):
                    c.partial.append((cp, r))
                ranked = sorted(zip(part, rewards, strict=True), key=lambda x: (-x[1], x[0].index))
                for c, r in ranked[plan.kept(len(part)):]:
                    c.state = "pruned"
                    c.text = c.prefixes[cp]
                    c.reward = r
                    # (It may have finished meanwhile; whether it did depends on timing, so
                    # nothing of its end is reported.)
                    c.finish_reason = c.cumulative_logprob = None
                    tasks[c.index].cancel()  # aborts its engine request
                await asyncio.gather(
                    *(tasks[c.index] for c, _ in ranked[plan.kept(len(part)):]),
                    return_exceptions=True,
                )
            await self._until(tasks, lambda: all(c.done for c in cands if c.state == "running"))
            for c in cands:
                if c.state == "running":
                    c.state = "finished"
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            # (A task cancelled before it first ran never reached its own finally.)
            for c in cands:
                self._release(c)

    def _release(self, c: Candidate) -> None:
        if c.holds_budget:
            c.holds_budget = False
            self.budget.release(1)
            self.on_budget()

    async def _whole_wave(self, prompt: str, sampling: Sampling, cands: list[Candidate]) -> None:
        """A wave nothing will stop midway (no checkpoints): one engine request with n = the
        wave, seeded seed + its first index, so its children are seeded exactly as the
        candidates are (vLLM seeds child j with seed + j). The prompt is prefilled once and the
        wave enters the engine's batch at once."""
        first = cands[0]
        try:
            gen = await self.backend.generate(
                prompt, replace(sampling, seed=first.seed), len(cands),
                f"{self.request_id}-w{first.wave}",
            )
        finally:
            for c in cands:
                c.done = True
                self._release(c)
        for c, smp in zip(cands, gen.samples, strict=True):
            c.text, c.finish_reason = smp.text, smp.finish_reason
            c.cumulative_logprob = smp.cumulative_logprob
            c.generated = smp.tokens
            c.state = "finished"

    async def _until(self, tasks: dict[int, asyncio.Task[None]], ready: Callable[[], bool]):
        while True:
            for task in tasks.values():
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if ready():
                return
            self._changed.clear()
            await self._changed.wait()

    async def _consume(
        self, prompt: str, sampling: Sampling, c: Candidate, at_tokens: tuple[int, ...]
    ) -> None:
        try:
            pending = list(at_tokens)
            async for d in self.backend.stream(
                prompt, sampling, f"{self.request_id}-{c.index}", None
            ):
                c.token_ids += d.token_ids
                c.text += d.text
                while pending and c.tokens >= pending[0]:
                    c.prefixes[pending[0]] = self.backend.decode(c.token_ids[: pending[0]])
                    pending.pop(0)
                if d.finish_reason is not None:
                    c.finish_reason = d.finish_reason
                    c.cumulative_logprob = d.cumulative_logprob
                self._changed.set()
        finally:
            c.done = True
            self._release(c)
            self._changed.set()
