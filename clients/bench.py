"""`python -m clients.bench`: throughput of base sampling, BoN (N = 4, 8, 16) and vBoN through
the gateway, and BoN through the gateway vs transformers `generate(num_return_sequences=N)`.

Phases (each bounded in requests and seconds, loopback only):
1. Start the gateway on a free loopback port (or use --url), warm every method up. The warm-up
   doubles as a preflight: a setting the server refuses (N above its max, no adapter) stops the
   run with the server's one-line reason.
2. Closed loop: for each method and each concurrency c, c clients send requests back to back
   (prompts from the held-out set, each as the task's chat turn) until `--requests` answers
   (at least c) or the level's time limit. Reports answers/s, generated tokens/s, latency
   p50/p95/p99, mean reward of the returned answers.
3. Open loop: Poisson arrivals at fractions (--poisson-load) of each method's closed-loop peak.
4. transformers: the same BoN-N on the same prompts and token budget with
   `model.generate(num_return_sequences=N)` + the same reward, one prompt at a time (what TRL's
   former BestOfNSampler did; vbon.hf_bon), same dtype and all CPU threads; compared with the
   gateway on the same prompts one at a time (c=1) and all at once.

Output in --out: bench.json, bench.md and the plots throughput_vs_concurrency.png and
latency_vs_throughput.png (written by vbon.report.bench). base = /v1/bon with n=1 (same route,
so reward and overheads match); vBoN = /v1/vbon with score=true. When the benchmark starts the
gateway and no adapter is installed, vBoN runs on a placeholder (vbon.placeholder_adapter):
real speed, meaningless reward.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clients.client import AsyncClient, RetryPolicy
from clients.errors import APIError, VBoNClientError
from vbon.cli import run_command
from vbon.hf_bon import hf_bon
from vbon.metrics import mean_se, none_if_nan
from vbon.placeholder_adapter import make_placeholder_adapter
from vbon.report import machine_stamp, write_report
from vbon.report.bench import peaks, plot, render_markdown
from vbon.shipped import SHIPPED_DIR

# The gateway's log and a placeholder adapter: working files, not results, so not in --out.
WORK_DIR = Path("runs") / "bench-work"
METHOD_RE = re.compile(r"^(base|vbon|bon-(\d+))$")


class BenchError(VBoNClientError):
    pass


@dataclass(frozen=True)
class Method:
    name: str

    @property
    def kind(self) -> str:
        return "vbon" if self.name == "vbon" else "bon"

    @property
    def n(self) -> int:
        """Samples the engine generates per request."""
        m = METHOD_RE.match(self.name)
        return int(m.group(2)) if m and m.group(2) else 1


def parse_methods(text: str) -> list[Method]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not METHOD_RE.match(part):
            raise BenchError(f"unknown method '{part}': use base, vbon or bon-<N> (e.g. bon-8)")
        out.append(Method(part))
    return out


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{what}: give comma-separated integers, got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise BenchError(f"{what}: give positive integers, got '{text}'")
    return values


def parse_floats(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{what}: give comma-separated numbers, got '{text}'") from None
    if any(v <= 0 for v in values):
        raise BenchError(f"{what}: give positive numbers, got '{text}'")
    return values


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Outcome:
    latency_s: float
    completion_tokens: int
    reward: float | None
    samples: int


@dataclass
class Level:
    """One measured setting (closed-loop concurrency or open-loop rate) of one method."""

    method: str
    n: int
    mode: str  # "closed" | "poisson"
    concurrency: int | None
    rate_rps: float | None
    load: float | None
    requests: int
    completed: int
    errors: int
    first_error: str | None
    retries: int
    wall_s: float
    answers_per_s: float
    samples_per_s: float
    gen_tokens_per_s: float
    tokens_per_request: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_p99_s: float | None
    latency_mean_s: float | None
    mean_reward: float | None
    reward_se: float | None
    outcomes: list[dict[str, Any]] = field(default_factory=list, repr=False)


def summarize(
    method: Method,
    mode: str,
    outcomes: list[Outcome],
    errors: list[str],
    wall_s: float,
    retries: int,
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    load: float | None = None,
) -> Level:
    lat = [o.latency_s for o in outcomes]
    rewards = [o.reward for o in outcomes if o.reward is not None]
    tokens = sum(o.completion_tokens for o in outcomes)
    wall = max(wall_s, 1e-9)
    reward_m, reward_se = mean_se(rewards)
    return Level(
        method=method.name,
        n=method.n,
        mode=mode,
        concurrency=concurrency,
        rate_rps=rate,
        load=load,
        requests=len(outcomes) + len(errors),
        completed=len(outcomes),
        errors=len(errors),
        first_error=errors[0] if errors else None,
        retries=retries,
        wall_s=wall_s,
        answers_per_s=len(outcomes) / wall,
        samples_per_s=sum(o.samples for o in outcomes) / wall,
        gen_tokens_per_s=tokens / wall,
        tokens_per_request=tokens / len(outcomes) if outcomes else None,
        latency_p50_s=percentile(lat, 50),
        latency_p95_s=percentile(lat, 95),
        latency_p99_s=percentile(lat, 99),
        latency_mean_s=statistics.fmean(lat) if lat else None,
        mean_reward=none_if_nan(reward_m),
        reward_se=none_if_nan(reward_se),
        outcomes=[asdict(o) for o in outcomes],
    )


class Runner:
    """Sends one method's requests through one AsyncClient."""

    def __init__(
        self,
        client: AsyncClient,
        prompts: list[str],
        max_tokens: int,
        adapter: str | None,
        progress: Any,
    ) -> None:
        from vbon.prompts import task_messages

        self.client = client
        self.messages = [task_messages(p) for p in prompts]
        self.max_tokens = max_tokens
        self.adapter = adapter
        self.progress = progress

    async def one(self, method: Method, i: int) -> Outcome:
        msgs = self.messages[i % len(self.messages)]
        t0 = time.perf_counter()
        if method.kind == "vbon":
            r = await self.client.vbon(
                messages=msgs, adapter=self.adapter, score=True, max_tokens=self.max_tokens
            )
            out = Outcome(time.perf_counter() - t0, r.usage.completion_tokens, r.reward, 1)
        else:
            b = await self.client.bon(messages=msgs, n=method.n, max_tokens=self.max_tokens)
            out = Outcome(time.perf_counter() - t0, b.usage.completion_tokens, b.reward, method.n)
        return out

    async def closed(
        self, method: Method, concurrency: int, requests: int, time_limit_s: float
    ) -> Level:
        outcomes: list[Outcome] = []
        errors: list[str] = []
        next_i = 0
        retries0 = self.client.retries_done
        t0 = time.perf_counter()
        deadline = t0 + time_limit_s
        last_done = t0

        async def worker() -> None:
            nonlocal next_i, last_done
            while next_i < requests and time.perf_counter() < deadline:
                i = next_i
                next_i += 1
                try:
                    outcomes.append(await self.one(method, i))
                except APIError as exc:
                    errors.append(str(exc))
                last_done = time.perf_counter()
                self.progress.update(1)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        self.progress.update(max(0, requests - next_i))  # skipped by the time limit
        return summarize(
            method,
            "closed",
            outcomes,
            errors,
            last_done - t0,
            self.client.retries_done - retries0,
            concurrency=concurrency,
        )

    async def poisson(
        self,
        method: Method,
        rate: float,
        load: float,
        requests: int,
        time_limit_s: float,
        seed: int,
    ) -> Level:
        rng = random.Random(seed)
        outcomes: list[Outcome] = []
        errors: list[str] = []
        retries0 = self.client.retries_done
        t0 = time.perf_counter()
        deadline = t0 + time_limit_s
        last_done = t0

        async def fire(i: int) -> None:
            nonlocal last_done
            try:
                outcomes.append(await self.one(method, i))
            except APIError as exc:
                errors.append(str(exc))
            last_done = time.perf_counter()
            self.progress.update(1)

        tasks = []
        at = t0
        for i in range(requests):
            at += rng.expovariate(rate)
            delay = at - time.perf_counter()
            if at > deadline:
                self.progress.update(requests - i)
                break
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(fire(i)))
        await asyncio.gather(*tasks)
        return summarize(
            method,
            "poisson",
            outcomes,
            errors,
            last_done - t0,
            self.client.retries_done - retries0,
            rate=rate,
            load=load,
        )


# -- orchestration ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clients.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", help="benchmark this gateway instead of starting one (loopback)")
    p.add_argument("--api-key", default=None, help="bearer key (env VBON_API_KEY)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few minutes: clients 1,4,16, 4+ requests per level, max_tokens 16, "
        "one Poisson load, transformers at N=8 on 4 prompts",
    )
    p.add_argument("--methods", default="base,bon-4,bon-8,bon-16,vbon")
    p.add_argument("--concurrency", default=None, help="clients per level (1,2,4,8,16,32)")
    p.add_argument(
        "--requests",
        type=int,
        default=None,
        help="answers per level, at least the concurrency (default 16; quick 4)",
    )
    p.add_argument(
        "--level-timeout",
        type=float,
        default=None,
        help="seconds per level before new requests stop (default 90; quick 40)",
    )
    p.add_argument(
        "--poisson-load",
        default=None,
        help="open-loop rates as fractions of each method's peak (0.5,0.9; quick 0.7)",
    )
    p.add_argument(
        "--poisson-requests",
        type=int,
        default=None,
        help="requests per open-loop rate (default 16; quick 6)",
    )
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per sample (32; quick 16)")
    p.add_argument(
        "--hf-n",
        default=None,
        help="N for the transformers comparison (4,8,16; quick 8); 'none' to skip",
    )
    p.add_argument("--hf-prompts", type=int, default=None, help="prompts for it (8; quick 4)")
    p.add_argument(
        "--hf-threads",
        type=int,
        default=None,
        help="torch threads for transformers (default: all CPUs, like the engine)",
    )
    p.add_argument("--prompts", default=None, help="JSONL prompt file (default: held-out set)")
    p.add_argument("--adapter", default=None, help="vBoN adapter name (default: server default)")
    p.add_argument(
        "--adapters-dir",
        default=None,
        help="when starting the gateway: its VBON_ADAPTERS_DIR (default: adapters); "
        "with none installed, a random placeholder LoRA is made for vBoN's speed",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default docs/results/bench; with --quick runs/bench-<time>)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def resolve_config(a: argparse.Namespace) -> dict[str, Any]:
    q = a.quick
    hf_n_text = a.hf_n or ("8" if q else "4,8,16")
    cfg = {
        "quick": q,
        "methods": [m.name for m in parse_methods(a.methods)],
        "concurrency": parse_ints(
            a.concurrency or ("1,4,16" if q else "1,2,4,8,16,32"), "--concurrency"
        ),
        "requests": a.requests or (4 if q else 16),
        "level_timeout_s": a.level_timeout or (40.0 if q else 90.0),
        "poisson_load": parse_floats(
            a.poisson_load or ("0.7" if q else "0.5,0.9"), "--poisson-load"
        )
        if a.poisson_load != "none"
        else [],
        "poisson_requests": a.poisson_requests or (6 if q else 16),
        "max_tokens": a.max_tokens or (16 if q else 32),
        "hf_n": [] if hf_n_text == "none" else parse_ints(hf_n_text, "--hf-n"),
        "hf_prompts": a.hf_prompts or (4 if q else 8),
        "seed": a.seed,
    }
    if cfg["requests"] < 1 or cfg["max_tokens"] < 1 or cfg["hf_prompts"] < 1:
        raise BenchError("--requests, --max-tokens and --hf-prompts must be at least 1")
    return cfg


def _has_adapters(folder: Path) -> bool:
    return folder.is_dir() and any((p / "vbon.json").is_file() for p in folder.iterdir())


def _shipped_base_model() -> str | None:
    from vbon.adapters import read_meta

    metas = [read_meta(p) for p in SHIPPED_DIR.iterdir() if (p / "vbon.json").is_file()]
    return metas[0].base_model if metas else None


async def run_gateway_phases(
    url: str,
    api_key: str | None,
    cfg: dict[str, Any],
    prompts: list[str],
    adapter: str | None,
    progress: Any,
    notes: list[str],
) -> dict[str, Any]:
    methods = [Method(m) for m in cfg["methods"]]
    conc = cfg["concurrency"]
    max_c = max(conc)
    retry = RetryPolicy(max_retries=8, backoff_s=0.5, max_wait_s=10)
    async with AsyncClient(
        url,
        api_key=api_key,
        retry=retry,
        max_connections=max(64, 2 * max_c),
        timeout=max(300.0, 4 * cfg["level_timeout_s"]),
    ) as client:
        ready = await client.ready()
        if not ready.ready:
            raise BenchError(f"the gateway at {url} is not ready: {ready.reason}")
        runner = Runner(client, prompts, cfg["max_tokens"], adapter, progress)
        progress.set_description("warm-up")
        for m in methods:  # warm-up and preflight: the server's refusal ends the run here
            try:
                await runner.one(m, 0)
                await asyncio.gather(*(runner.one(m, i) for i in range(1, 3)))
            except APIError as exc:
                raise BenchError(f"{m.name} cannot run on this server: {exc.message}") from exc
            progress.update(3)
        closed: list[Level] = []
        for m in methods:
            for c in conc:
                progress.set_description(f"{m.name} c={c}")
                closed.append(
                    await runner.closed(m, c, max(cfg["requests"], c), cfg["level_timeout_s"])
                )
        open_loop: list[Level] = []
        pk = peaks(asdict(lv) for lv in closed)
        for m in methods:
            for load in cfg["poisson_load"]:
                if m.name not in pk:
                    continue
                rate = load * pk[m.name]["answers_per_s"]
                progress.set_description(f"{m.name} poisson {load:g}x")
                open_loop.append(
                    await runner.poisson(
                        m, rate, load, cfg["poisson_requests"], cfg["level_timeout_s"], cfg["seed"]
                    )
                )
        same: dict[int, dict[str, Level]] = {}
        hf_prompts = prompts[: cfg["hf_prompts"]]
        hf_runner = Runner(client, hf_prompts, cfg["max_tokens"], adapter, progress)
        for n in cfg["hf_n"]:
            m = Method(f"bon-{n}")
            progress.set_description(f"gateway BoN-{n} same prompts")
            k = len(hf_prompts)
            same[n] = {
                "c1": await hf_runner.closed(m, 1, k, cfg["level_timeout_s"] * 4),
                "all": await hf_runner.closed(m, k, k, cfg["level_timeout_s"] * 4),
            }
        if client.retries_done:
            notes.append(f"{client.retries_done} requests were retried after 429/503")
        return {"closed": closed, "open": open_loop, "same": same, "ready": ready}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(
        lambda: _main(args), debug=args.debug, errors=(VBoNClientError, ValueError, OSError)
    )


def _main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vbon.cpu import cpu_count
    from vbon.prompts import default_prompt_file, load_prompts

    cfg = resolve_config(args)
    prompt_file = args.prompts or str(default_prompt_file("eval"))
    prompts = load_prompts(prompt_file)
    cfg["prompts"] = prompt_file
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # A full run is a result people compare (docs/results); a quick one is not.
    out = Path(args.out or (f"runs/bench-{stamp}" if args.quick else "docs/results/bench"))
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if args.url and not re.match(r"^https?://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?/?$", args.url):
        notes.append(f"target {args.url} is not loopback: numbers include the network")

    n_methods = len(cfg["methods"])
    total = 3 * n_methods
    total += sum(max(cfg["requests"], c) for c in cfg["concurrency"]) * n_methods
    total += len(cfg["poisson_load"]) * cfg["poisson_requests"] * n_methods
    total += len(cfg["hf_n"]) * cfg["hf_prompts"] * 3
    server = None
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    progress = tqdm(total=total, unit="req", disable=args.no_progress, dynamic_ncols=True)
    try:
        url = args.url
        if url is None:
            from clients.launch import LocalServer
            from vbon.settings import CoreSettings

            env: dict[str, str] = {}
            core = CoreSettings()
            model_path = core.resolved_model()
            adapters_dir = Path(args.adapters_dir or core.adapters_dir)
            # The gateway installs the shipped vBoN adapters at start; a placeholder is only
            # for a model they were not trained for and no adapter of the user's.
            shipped = _has_adapters(SHIPPED_DIR) and (
                Path(model_path).name == _shipped_base_model()
            )
            if shipped:
                env["VBON_SHIPPED_ADAPTERS"] = "true"
            if "vbon" in cfg["methods"] and not _has_adapters(adapters_dir) and not shipped:
                progress.set_description("placeholder adapter")
                adapters_dir = WORK_DIR / "adapters"
                make_placeholder_adapter(adapters_dir / "placeholder-n8", model_path)
                notes.append(
                    "no vBoN adapter installed: vBoN used a random rank-16 LoRA on all "
                    "projections (placeholder-n8), so its speed is real but its reward is not"
                )
            env["VBON_ADAPTERS_DIR"] = str(adapters_dir.resolve())
            progress.set_description("starting gateway")
            server = LocalServer(env, WORK_DIR / "server.log")
            server.start()
            url = server.url
        gw = asyncio.run(
            run_gateway_phases(url, args.api_key, cfg, prompts, args.adapter, progress, notes)
        )
        ready = gw["ready"]
        engine = ready.engine or {}
        hf_rows: list[dict[str, Any]] = []
        hf_setup: dict[str, Any] = {}
        if cfg["hf_n"]:
            if server is not None:  # the transformers run gets the CPUs to itself
                server.stop()
            from vbon.engine import resolve_dtype
            from vbon.settings import CoreSettings

            # /ready names the served model, not its folder: the local settings' model (the
            # gateway's own when this benchmark started it).
            core = CoreSettings()
            model_path = core.resolved_model()
            hf_setup = {
                "model": model_path,
                "dtype": resolve_dtype(core),
                "threads": args.hf_threads or cpu_count(),
            }
            progress.set_description("transformers BoN")
            hf = hf_bon(
                model_path,
                prompts[: cfg["hf_prompts"]],
                cfg["hf_n"],
                cfg["max_tokens"],
                hf_setup["dtype"],
                hf_setup["threads"],
                core.reward,
                progress,
            )
            for row in hf:
                s = gw["same"][row["n"]]
                c1, al = s["c1"], s["all"]
                hf_rows.append(
                    {
                        "n": row["n"],
                        "prompts": row["prompts"],
                        "hf_answers_per_s": row["answers_per_s"],
                        "hf_gen_tokens_per_s": row["gen_tokens_per_s"],
                        "hf_tokens_per_answer": row["tokens_per_answer"],
                        "hf_latency_mean_s": row["latency_mean_s"],
                        "hf_mean_reward": row["mean_reward"],
                        "gw_c1_answers_per_s": c1.answers_per_s,
                        "gw_c1_latency_mean_s": c1.latency_mean_s,
                        "gw_all_answers_per_s": al.answers_per_s,
                        "gw_all_gen_tokens_per_s": al.gen_tokens_per_s,
                        "gw_tokens_per_answer": al.tokens_per_request,
                        "gw_mean_reward": al.mean_reward,
                        "speedup_c1": c1.answers_per_s / row["answers_per_s"],
                        "speedup_all": al.answers_per_s / row["answers_per_s"],
                    }
                )
    finally:
        progress.close()
        if server is not None:
            server.stop()

    result = {
        "command": " ".join(["python -m clients.bench", *args._argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "duration_s": time.perf_counter() - t_start,
        "config": cfg,
        "machine": {
            **machine_stamp(),
            "cpus": cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "server": {
            "url": url,
            "started_by_bench": server is not None,
            "model": engine.get("model"),
            "adapters": ready.adapters,
        },
        "closed_loop": [asdict(lv) for lv in gw["closed"]],
        "open_loop": [asdict(lv) for lv in gw["open"]],
        "hf_setup": hf_setup,
        "hf_comparison": hf_rows,
        "notes": notes,
    }
    write_report(out, "bench", result, render_markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
