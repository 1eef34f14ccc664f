"""Serving logic behind the routes: prompt rendering, limits, admission, generation, scoring,
ranking, logging. Routers stay thin; this module holds what BoN and vBoN mean (what the
OpenAI-compatible model names mean is server/openai_serving.py, on top of this)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.adapter_registry import AdapterRegistry, AdapterVersion
from server.adaptive import AdaptiveRun, Outcome, Plan, resolve_plan
from server.admission import SampleBudget
from server.backend import (
    BackendError,
    Delta,
    EngineUnavailable,
    Generation,
    GenerationBackend,
    InvalidRequest,
    LoraRef,
)
from server.bon_log import BoNLog
from server.deadline import Deadline
from server.errors import APIError
from server.metrics import Metrics
from server.protocol import (
    AdapterInfo,
    AdaptiveFields,
    AdaptiveInfo,
    BoNRequest,
    BoNResponse,
    Candidate,
    PartialReward,
    PromptFields,
    Timings,
    Usage,
    VBoNRequest,
    VBoNResponse,
    usage_options,
)
from server.reward_reference import RewardReference
from server.settings import ServerSettings
from server.shadow import ShadowBoN
from vbon.bon import kl_bound
from vbon.errors import ConfigError
from vbon.rewards.base import RewardModel
from vbon.rewards.remote import RewardServerError
from vbon.sampling import Sampling

logger = logging.getLogger(__name__)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class Scored:
    """N samples of one prompt, with rewards, ranked best first."""

    generation: Generation
    rewards: list[float]
    order: list[int]
    generation_s: float
    scoring_s: float

    @property
    def best(self) -> int:
        return self.order[0]


class Gateway:
    """Everything the routes need, built in the app's lifespan and kept on app.state."""

    def __init__(
        self,
        settings: ServerSettings,
        backend: GenerationBackend,
        reward: RewardModel,
        registry: AdapterRegistry,
        metrics: Metrics,
        bon_log: BoNLog | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.reward = reward
        self.registry = registry
        self.metrics = metrics
        self.bon_log = bon_log
        self.budget = SampleBudget(settings.max_samples_in_flight)
        self.reward_reference = (
            RewardReference.from_jsonl(settings.reward_reference)
            if settings.reward_reference is not None
            else None
        )
        name = settings.served_model_name or Path(backend.model_path).name or "base"
        self.model_name = name
        # Shadow BoN (VBON_SHADOW_BON_FRACTION): vBoN answers compared with BoN-N afterwards.
        self.shadow = (
            ShadowBoN(
                backend,
                self.budget,
                self.score,
                metrics,
                fraction=settings.shadow_bon_fraction,
                max_load=settings.shadow_max_load,
                max_jobs=settings.shadow_max_jobs,
                timeout_s=settings.request_timeout_s,
            )
            if settings.shadow_bon_fraction > 0
            else None
        )

    # -- inputs ---------------------------------------------------------------------------
    def render(self, fields: PromptFields) -> str:
        if fields.messages is not None:
            return self.backend.render_chat([m.model_dump() for m in fields.messages])
        assert fields.prompt is not None
        return fields.prompt

    def check_limits(self, prompt_text: str, sampling: Sampling, n: int) -> int:
        s = self.settings
        caps = s.request_caps()
        for field, value in (("n", n), ("max_tokens", sampling.max_tokens)):
            limit, setting = caps[field]
            if value > limit:
                raise APIError(
                    400,
                    f"'{field}' is {value}; allowed: 1 <= {field} <= {limit} ({setting})",
                    param=field,
                )
        if n > 1 and sampling.temperature == 0:  # (vLLM refuses it too)
            raise APIError(
                400,
                f"temperature 0 is greedy decoding: its {n} samples would all be the same "
                "text, so best-of-N needs temperature > 0 (or n = 1)",
                param="temperature",
            )
        prompt_tokens = self.backend.count_tokens(prompt_text)
        if prompt_tokens > s.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {prompt_tokens} tokens; the limit is {s.max_prompt_tokens}: "
                "shorten it",
                param="prompt",
            )
        if prompt_tokens + sampling.max_tokens > self.backend.max_model_len:
            raise APIError(
                400,
                f"prompt ({prompt_tokens} tokens) + max_tokens ({sampling.max_tokens}) exceeds the "
                f"model's context of {self.backend.max_model_len} tokens: lower max_tokens to "
                f"{max(1, self.backend.max_model_len - prompt_tokens)} or shorten the prompt",
                param="max_tokens",
            )
        return prompt_tokens

    def resolve_adapter(self, name: str | None, n: int | None) -> AdapterVersion:
        try:
            if name is not None:
                return self.registry.get(name)
            if n is not None:
                return self.registry.for_n(n)
            return self.registry.default()
        except ConfigError as exc:
            raise APIError(400, str(exc), param="adapter") from exc
        except LookupError as exc:
            raise APIError(
                404, str(exc), param="adapter" if name else "n", code="adapter_not_found"
            ) from exc

    # -- engine calls ---------------------------------------------------------------------
    def deadline(self) -> Deadline:
        """One time limit for a whole request: every generation and every scoring in it,
        however many prompts it holds."""
        return Deadline.start(self.settings.request_timeout_s)

    @contextlib.asynccontextmanager
    async def _engine_errors(self) -> AsyncIterator[None]:
        """The engine's errors as API errors."""
        try:
            yield
        except EngineUnavailable as exc:
            raise APIError(503, str(exc), headers={"Retry-After": "5"}) from exc
        except InvalidRequest as exc:
            raise APIError(
                400, f"the engine refused the request: {exc}", param=exc.param
            ) from exc
        except BackendError as exc:  # e.g. remote mode: 502 / 504 naming the upstream
            raise APIError(exc.status_code, str(exc), code=exc.code) from exc

    @contextlib.asynccontextmanager
    async def _engine_call(self, samples: int) -> AsyncIterator[None]:
        """Admission plus _engine_errors around the work on `samples` samples: their
        generation and their scoring, which costs as much CPU as serving more samples."""
        with self.budget.hold(samples):
            self.metrics.samples_in_flight.set(self.budget.in_flight)
            try:
                async with self._engine_errors():
                    yield
            finally:
                self.metrics.samples_in_flight.set(self.budget.in_flight - samples)

    async def _generate(
        self, prompt: str, sampling: Sampling, n: int, route: str, lora: LoraRef | None
    ) -> Generation:
        """One engine generation (the caller holds admission)."""
        gen = await self.backend.generate(prompt, sampling, n, new_id("gen"), lora)
        self.metrics.samples.labels(route).inc(len(gen.samples))
        self.metrics.tokens.labels(route, "prompt").inc(gen.prompt_tokens)
        self.metrics.tokens.labels(route, "completion").inc(sum(s.tokens for s in gen.samples))
        return gen

    async def generate(
        self, prompt: str, sampling: Sampling, n: int, route: str, lora: LoraRef | None = None
    ) -> Generation:
        async with self._engine_call(n):
            return await self._generate(prompt, sampling, n, route, lora)

    async def score(self, prompt: str, completions: list[str]) -> list[float]:
        try:
            rewards = await asyncio.to_thread(
                self.reward.score, [prompt] * len(completions), completions
            )
        except RewardServerError as exc:
            # A remote reward server failed: its message names only the server's URL and what
            # went wrong there, so the client learns which dependency is down (502/504).
            logger.warning("reward server failed: %s", exc.message)
            raise APIError(exc.status, exc.message, code="reward_server_error") from exc
        except Exception as exc:
            # The exception's text stays in the log: it can hold paths and model internals.
            ref = new_id("err")
            logger.exception("reward model failed [%s]", ref)
            raise APIError(
                500,
                f"the reward model failed; the server log has the details under {ref}",
                code="reward_model_error",
            ) from exc
        if len(rewards) != len(completions):
            raise APIError(
                500,
                "the reward model returned the wrong number of scores",
                code="reward_model_error",
            )
        scores = [float(r) for r in rewards]
        if not all(math.isfinite(r) for r in scores):
            # (NaN cannot be ranked, nor sent as JSON.)
            raise APIError(
                500, "the reward model returned a non-finite score", code="reward_model_error"
            )
        return scores

    async def best_of(
        self, prompt: str, sampling: Sampling, n: int, route: str, lora: LoraRef | None = None
    ) -> Scored:
        async with self._engine_call(n):
            t0 = time.perf_counter()
            gen = await self._generate(prompt, sampling, n, route, lora)
            t1 = time.perf_counter()
            rewards = await self.score(prompt, [s.text for s in gen.samples])
            t2 = time.perf_counter()
        # Highest reward first; ties go to the lower index, so a seeded request is stable.
        order = sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))
        self.metrics.reward.labels(route).observe(rewards[order[0]])
        if self.bon_log is not None and lora is None:
            self.bon_log.log(prompt, [s.text for s in gen.samples], rewards)
        return Scored(gen, rewards, order, t1 - t0, t2 - t1)

    # -- adaptive best-of-N ----------------------------------------------------------------
    def adaptive_plan(
        self, fields: AdaptiveFields, n: int, sampling: Sampling, use_default: bool
    ) -> Plan | None:
        """The adaptive plan of a request (None: plain best-of-N), or a 400 naming the field."""
        rng = self.reward.describe().get("range")
        ref = self.reward_reference
        return resolve_plan(
            fields,
            n,
            sampling.max_tokens,
            use_default,
            self.settings.adaptive_default,
            rng if isinstance(rng, list | tuple) and len(rng) == 2 else None,
            ref.quantile if ref is not None else None,
            self.settings.backend == "remote",
        )

    async def adaptive_best_of(
        self, prompt: str, prompt_tokens: int, sampling: Sampling, plan: Plan, route: str
    ) -> Outcome:
        """`prompt_tokens`: as check_limits counted them (not tokenized again here)."""
        run = AdaptiveRun(
            self.backend,
            self.budget,
            self.score,
            lambda: self.metrics.samples_in_flight.set(self.budget.in_flight),
            new_id("abon"),
        )
        async with self._engine_errors():
            out = await run.run(prompt, prompt_tokens, sampling, plan)
        m = self.metrics
        m.samples.labels(route).inc(len(out.candidates))
        m.tokens.labels(route, "prompt").inc(out.prompt_tokens)
        m.tokens.labels(route, "completion").inc(out.completion_tokens)
        m.adaptive_candidates.labels("pruned").inc(out.pruned)
        m.adaptive_candidates.labels("finished").inc(len(out.candidates) - out.pruned)
        m.adaptive_stops.labels(out.stop_reason).inc()
        m.reward.labels(route).observe(out.best.reward or 0.0)
        return out

    def adaptive_info(self, plan: Plan, out: Outcome) -> AdaptiveInfo:
        return AdaptiveInfo(
            stop_reason=out.stop_reason,
            samples=len(out.candidates),
            waves=out.waves,
            pruned=out.pruned,
            target=plan.target,
            wave_size=plan.wave,
            prune=plan.prune_spec(),
        )

    def _adaptive_response(
        self, req: BoNRequest, plan: Plan, out: Outcome, t0: float
    ) -> BoNResponse:
        best = out.best
        candidates = None
        if req.return_candidates:
            candidates = [
                Candidate(
                    index=c.index,
                    rank=rank,
                    text=c.text,
                    reward=c.reward if c.reward is not None else 0.0,
                    tokens=c.tokens,
                    cumulative_logprob=c.cumulative_logprob,
                    finish_reason=c.finish_reason,
                    seed=c.seed,
                    stopped=c.state if c.state != "running" else None,
                    wave=c.wave,
                    partial_rewards=[PartialReward(tokens=t, reward=r) for t, r in c.partial],
                )
                for rank, c in enumerate((out.candidates[i] for i in out.order), start=1)
            ]
        return BoNResponse(
            id=new_id("bon"),
            model=self.model_name,
            n=req.n,
            text=best.text,
            reward=best.reward if best.reward is not None else 0.0,
            index=best.index,
            seed=best.seed,
            finish_reason=best.finish_reason,
            adaptive=self.adaptive_info(plan, out),
            candidates=candidates,
            usage=Usage.of(out.prompt_tokens, out.completion_tokens),
            timings=Timings(
                generation_s=out.generation_s,
                scoring_s=out.scoring_s,
                total_s=time.perf_counter() - t0,
            ),
        )

    # -- routes' logic --------------------------------------------------------------------
    async def bon(self, req: BoNRequest) -> BoNResponse:
        async with self.deadline().guard():
            return await self._bon(req)

    async def _bon(self, req: BoNRequest) -> BoNResponse:
        t0 = time.perf_counter()
        prompt = self.render(req)
        sampling = req.sampling()
        prompt_tokens = self.check_limits(prompt, sampling, req.n)
        plan = self.adaptive_plan(req, req.n, sampling, req.adaptive)
        if plan is not None:
            out = await self.adaptive_best_of(prompt, prompt_tokens, sampling, plan, "/v1/bon")
            return self._adaptive_response(req, plan, out, t0)
        scored = await self.best_of(prompt, sampling, req.n, "/v1/bon")
        gen, best = scored.generation, scored.best
        seeds = [None if req.seed is None else req.seed + i for i in range(req.n)]
        candidates = None
        if req.return_candidates:
            candidates = [
                Candidate(
                    index=i,
                    rank=rank,
                    text=gen.samples[i].text,
                    reward=scored.rewards[i],
                    tokens=gen.samples[i].tokens,
                    cumulative_logprob=gen.samples[i].cumulative_logprob,
                    finish_reason=gen.samples[i].finish_reason,
                    seed=seeds[i],
                )
                for rank, i in enumerate(scored.order, start=1)
            ]
        completion_tokens = sum(s.tokens for s in gen.samples)
        return BoNResponse(
            id=new_id("bon"),
            model=self.model_name,
            n=req.n,
            text=gen.samples[best].text,
            reward=scored.rewards[best],
            index=best,
            seed=seeds[best],
            finish_reason=gen.samples[best].finish_reason,
            kl_bound=kl_bound(req.n),
            candidates=candidates,
            usage=Usage.of(gen.prompt_tokens, completion_tokens),
            timings=Timings(
                generation_s=scored.generation_s,
                scoring_s=scored.scoring_s,
                total_s=time.perf_counter() - t0,
            ),
        )

    def adapter_info(self, v: AdapterVersion) -> AdapterInfo:
        m = v.meta
        return AdapterInfo(
            name=v.name,
            version=v.version,
            method=m.method,
            n=m.n,
            beta=m.beta,
            base_model=m.base_model,
        )

    def shadow_hook(
        self, prompt: str, sampling: Sampling, adapter: AdapterVersion
    ) -> Callable[[str], None] | None:
        """What to call with a finished vBoN answer's text (None: shadow BoN is off, or the
        adapter has no N): maybe a shadow comparison, started in the background."""
        shadow, n = self.shadow, adapter.meta.n
        if shadow is None or not n:
            return None

        def submit(text: str) -> None:
            shadow.maybe_submit(prompt, sampling, adapter.name, n, text)

        return submit

    async def vbon(self, req: VBoNRequest) -> VBoNResponse:
        async with self.deadline().guard():
            return await self._vbon(req)

    async def _vbon(self, req: VBoNRequest) -> VBoNResponse:
        t0 = time.perf_counter()
        adapter = self.resolve_adapter(req.adapter, req.n)
        prompt = self.render(req)
        sampling = req.sampling()
        self.check_limits(prompt, sampling, 1)
        async with self._engine_call(1):
            gen = await self._generate(prompt, sampling, 1, "/v1/vbon", adapter.ref)
            t1 = time.perf_counter()
            sample = gen.samples[0]
            reward = None
            if req.score:
                reward = (await self.score(prompt, [sample.text]))[0]
                self.metrics.reward.labels("/v1/vbon").observe(reward)
            t2 = time.perf_counter()
        if (shadow := self.shadow_hook(prompt, sampling, adapter)) is not None:
            shadow(sample.text)  # after the answer is ready; never awaited
        return VBoNResponse(
            id=new_id("vbon"),
            model=adapter.name,
            adapter=self.adapter_info(adapter),
            text=sample.text,
            reward=reward,
            seed=req.seed,
            finish_reason=sample.finish_reason,
            cumulative_logprob=sample.cumulative_logprob,
            usage=Usage.of(gen.prompt_tokens, sample.tokens),
            timings=Timings(generation_s=t1 - t0, scoring_s=t2 - t1, total_s=t2 - t0),
        )

    def open_vbon_stream(self, req: VBoNRequest) -> VBoNStream:
        """/v1/vbon with stream: true, beside `vbon`: the adapter, the prompt, and open_stream's
        limits and admission, all before the 200."""
        adapter = self.resolve_adapter(req.adapter, req.n)
        prompt = self.render(req)
        sampling = req.sampling()
        sample = self.open_stream(prompt, sampling, "/v1/vbon", adapter.ref)
        shadow = self.shadow_hook(prompt, sampling, adapter)
        usage, every = usage_options(req.stream_options)
        return VBoNStream(sample, self.adapter_info(adapter), req.score, shadow, usage, every)

    def open_stream(
        self, prompt: str, sampling: Sampling, route: str, lora: LoraRef | None = None
    ) -> SampleStream:
        """What every streaming route checks before its 200: the limits, and admission (a busy
        server answers 429 + Retry-After, not an error event after a 200). The stream holds
        its unit of the budget from here until it ends or is released."""
        prompt_tokens = self.check_limits(prompt, sampling, 1)
        self.budget.take(1)
        self.metrics.samples_in_flight.set(self.budget.in_flight)
        return SampleStream(self, prompt, sampling, route, lora, self.deadline(), prompt_tokens)


class SampleStream:
    """One streamed sample, admitted by Gateway.open_stream. Pass `release` to the response as
    its background task too: a response that never starts its body never runs the generator's
    `finally`."""

    def __init__(
        self,
        gateway: Gateway,
        prompt: str,
        sampling: Sampling,
        route: str,
        lora: LoraRef | None,
        deadline: Deadline,
        prompt_tokens: int,
    ) -> None:
        self._gateway = gateway
        self._prompt = prompt
        self._sampling = sampling
        self._route = route
        self._lora = lora
        self._deadline = deadline
        self._held = True
        self._engine: AsyncIterator[Delta] | None = None
        self._first: Delta | None = None
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0  # so far

    async def start(self) -> None:
        """Run the sample up to its first delta, before the route sends its 200: whatever the
        engine (or a remote upstream) refuses or fails at the start — a value it validates
        more strictly than our request models, an engine that is down, the deadline — is then
        an error response with its status, never an error event after a 200. A stream that
        fails here has released its admission."""
        if self._engine is not None:
            return
        self._engine = self._engine_deltas()
        try:
            self._first = await anext(self._engine)
        except StopAsyncIteration:
            self._first = None
        except BaseException:
            self.release()  # also when cancelled before the engine call began
            raise

    def usage(self) -> Usage:
        """Tokens so far (all of them once the deltas are done)."""
        return Usage.of(self.prompt_tokens, self.completion_tokens)

    async def deltas(self) -> AsyncIterator[Delta]:
        """The sample's deltas (the first one `start` fetched, then the rest), each engine
        step within the request's deadline."""
        await self.start()
        assert self._engine is not None
        if self._first is not None:
            yield self._first
        async for delta in self._engine:
            yield delta

    async def _engine_deltas(self) -> AsyncIterator[Delta]:
        g = self._gateway
        stream = g.backend.stream(self._prompt, self._sampling, new_id("stream"), self._lora)
        try:
            # aclosing: a consumer that stops early aborts the engine request at once.
            async with contextlib.aclosing(stream):
                while True:
                    async with self._deadline.guard(), g._engine_errors():
                        try:
                            delta = await anext(stream)
                        except StopAsyncIteration:
                            break
                    self.completion_tokens += delta.tokens
                    yield delta
            g.metrics.samples.labels(self._route).inc()
            g.metrics.tokens.labels(self._route, "prompt").inc(self.prompt_tokens)
            g.metrics.tokens.labels(self._route, "completion").inc(self.completion_tokens)
        finally:
            self.release()

    async def score(self, text: str) -> float:
        """The reward of the finished text, within the same deadline and admission."""
        async with self._deadline.guard():
            return (await self._gateway.score(self._prompt, [text]))[0]

    def release(self) -> None:
        """Give back the stream's unit of the budget (once; later calls do nothing)."""
        if self._held:
            self._held = False
            self._gateway.budget.release(1)
            self._gateway.metrics.samples_in_flight.set(self._gateway.budget.in_flight)


class VBoNStream:
    """One streamed /v1/vbon sample as `vbon.chunk`s, each naming the adapter; with `score`,
    the last one also carries the finished text's reward, and with `include_usage` the
    request's usage (with `continuous_usage_stats`, every chunk the usage so far)."""

    def __init__(
        self,
        sample: SampleStream,
        adapter: AdapterInfo,
        score: bool,
        on_done: Callable[[str], None] | None = None,
        include_usage: bool = False,
        continuous_usage: bool = False,
    ) -> None:
        self._sample = sample
        self._adapter = adapter.model_dump()
        self._score = score
        self._include_usage = include_usage
        self._continuous_usage = continuous_usage  # (vLLM's continuous_usage_stats)
        self._on_done = on_done  # called with the whole text once the sample is finished
        self.id = new_id("vbon")

    async def start(self) -> None:
        await self._sample.start()

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        text: list[str] = []
        async for d in self._sample.deltas():
            text.append(d.text)
            chunk: dict[str, Any] = {
                "id": self.id,
                "object": "vbon.chunk",
                "adapter": self._adapter,
                "text": d.text,
                "finish_reason": d.finish_reason,
            }
            if d.finish_reason is not None and self._score:
                chunk["reward"] = await self._sample.score("".join(text))
            last = d.finish_reason is not None
            if self._include_usage and (last or self._continuous_usage):
                chunk["usage"] = self._sample.usage().model_dump()
            yield chunk
        # Here the sample is finished and its unit released (not on an error or a disconnect).
        if self._on_done is not None:
            self._on_done("".join(text))

    def release(self) -> None:
        self._sample.release()
