"""Gateway overhead and engine configuration benchmark (issue: serving performance).

Measures, side by side in one run on this machine:
  1. the engine configuration: saturated generated tokens/s of vLLM's out-of-the-box CPU
     settings (one core reserved, no preloads) against ours (both cores, preloads, dtype
     from the CPU flags);
  2. the gateway's own cost: BoN-N latency (one request at a time) and saturated answers/s
     through the gateway over HTTP against the same AsyncLLM engine called directly, with the
     same seeded sampling parameters (so both generate the same tokens). The gateway app runs
     in this process (uvicorn on loopback, this event loop) so both paths use one engine;
     each measurement is a pair run back to back (order alternated), and the overhead is the
     median of the pairs' ratios, which cancels this machine's drift between minutes;
  3. the LoRA cost: a vBoN sample through its adapter against a base-model sample.

Writes JSON, a markdown table and a PNG plot to --out (default docs/results/gateway; with --quick
runs/bench-gateway-<time>, since a quick run is not a result people compare). The vBoN rows use
the shipped vBoN-8 adapter (vbon/data/adapters), installed into a work folder under runs/.
Usage (or `make bench-gateway`):
  .venv/bin/python scripts/bench_gateway.py [--out docs/results/gateway] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tqdm import tqdm  # noqa: E402

from clients.launch import free_port  # noqa: E402
from vbon.adapters import write_json_atomic, write_text_atomic  # noqa: E402
from vbon.prompts import default_prompt_file, load_prompts, task_messages  # noqa: E402
from vbon.report import machine_line, machine_stamp  # noqa: E402

MAX_TOKENS = 32
SHIPPED_VBON_8 = "vbon-n8-shipped"


def _messages(i: int) -> list[dict[str, str]]:
    prompts = load_prompts(default_prompt_file("eval"))
    return task_messages(prompts[i % len(prompts)])


# -- engine configuration: raw tokens/s --------------------------------------------------
ENGINE_PROBE = r"""
import json, os, sys, time
from vllm import SamplingParams
from vbon.settings import CoreSettings
from vbon.engine import build_llm
from vbon.prompts import default_prompt_file, load_prompts, render_task
if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    llm = build_llm(CoreSettings(**cfg["settings"]))
    tok = llm.get_tokenizer()
    ps = [render_task(tok, p) for p in load_prompts(default_prompt_file("eval"))[: cfg["prompts"]]]
    llm.generate(ps[:4], SamplingParams(max_tokens=8), use_tqdm=False)
    out = {}
    for n in cfg["ns"]:
        sp = SamplingParams(n=n, max_tokens=48, ignore_eos=True, temperature=1.0, seed=0)
        t = time.perf_counter(); res = llm.generate(ps, sp, use_tqdm=False)
        el = time.perf_counter() - t
        toks = sum(len(c.token_ids) for o in res for c in o.outputs)
        out[n] = {"tokens_per_s": toks / el, "answers_per_s": len(ps) / el, "seconds": el}
    print("RESULT " + json.dumps(out), flush=True)
"""


def engine_config_probe(label: str, settings: dict, env: dict, prompts: int, ns: list[int]) -> dict:
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith("VLLM_CPU") and k != "LD_PRELOAD"
    }
    full_env.update(env)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            ENGINE_PROBE,
            json.dumps({"settings": settings, "prompts": prompts, "ns": ns}),
        ],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{label} probe failed:\n{proc.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(line[7:]).items()}


# -- gateway vs direct --------------------------------------------------------------------
async def direct_bon(engine, tok, i: int, n: int, seed: int, lora=None) -> float:
    from vllm.sampling_params import RequestOutputKind

    from vbon.prompts import render_chat
    from vbon.sampling import Sampling, vllm_params

    t = time.perf_counter()
    prompt = render_chat(tok, _messages(i))
    params = vllm_params(
        Sampling(max_tokens=MAX_TOKENS, seed=seed),
        n=n,
        logprobs=0,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    final = None
    async for out in engine.generate(
        prompt, params, f"direct-{i}-{seed}-{time.time_ns()}", lora_request=lora
    ):
        final = out
    texts = [c.text for c in final.outputs]
    # The same scoring work the gateway does, so the comparison isolates HTTP + serving code.
    rewards = await asyncio.to_thread(_VADER.score, [prompt] * len(texts), texts)
    max(rewards)
    return time.perf_counter() - t


_VADER = None


async def gateway_bon(client, i: int, n: int, seed: int, route: str = "/v1/bon") -> float:
    t = time.perf_counter()
    body = {"messages": _messages(i), "max_tokens": MAX_TOKENS, "seed": seed}
    if route == "/v1/bon":
        body["n"] = n
    r = await client.post(route, json=body)
    r.raise_for_status()
    return time.perf_counter() - t


def per_answer(fn: Callable, *args, **kwargs) -> Callable:
    """`fn` as a closed-loop client calls it: answer i uses prompt i and seed i."""
    return lambda i: fn(*args, i=i, seed=i, **kwargs)


async def saturate(call, concurrency: int, total: int) -> float:
    """Answers/s with `concurrency` closed-loop clients completing `total` requests."""
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            await call(i)

    t = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return total / (time.perf_counter() - t)


def paired(ratios: list[float]) -> dict:
    """The median of per-pair ratios (gateway / direct) as an overhead in %, with the range of
    the middle half: each pair ran back to back, so drift between pairs cancels."""
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "overhead_pct": 100 * (statistics.median(ratios) - 1),
        "overhead_iqr_pct": [100 * (q[0] - 1), 100 * (q[2] - 1)],
        "pairs": len(ratios),
    }


async def in_turn(gateway: Callable, direct: Callable, flip: bool) -> tuple[float, float]:
    """Run the two measurements back to back (direct first when `flip`); return both results
    as (gateway, direct)."""
    if flip:
        d = await direct()
        return await gateway(), d
    g = await gateway()
    return g, await direct()


@contextlib.asynccontextmanager
async def gateway_in_process(adapter_dir: Path):
    """The gateway app (lifespan, routers, middleware) served by uvicorn on loopback in this
    event loop, so the direct calls can use the very AsyncLLM engine it built: two engines on
    two cores made both paths' timings drift apart by more than the 3 % being measured."""
    import uvicorn

    from server.app import create_app
    from server.settings import ServerSettings

    settings = ServerSettings(
        adapters_dir=adapter_dir,
        adapter_poll_s=0,
        max_samples_in_flight=100000,
        log_level="warning",
    )
    app = create_app(settings, background_load=False)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the gateway stopped while starting")
        await asyncio.sleep(0.1)
    try:
        if app.state.gateway is None:
            raise RuntimeError(f"the gateway did not start: {app.state.startup_error}")
        yield f"http://127.0.0.1:{port}", app.state.gateway
    finally:
        server.should_exit = True
        await task


async def gateway_vs_direct(args: argparse.Namespace, results: dict, adapter_dir: Path) -> None:
    import httpx

    global _VADER
    from vllm.lora.request import LoRARequest

    from vbon.rewards.vader import VaderReward

    _VADER = VaderReward()
    async with gateway_in_process(adapter_dir) as (url, gateway):
        engine = gateway.backend._engine
        tok = engine.tokenizer or engine.get_tokenizer()
        lora = LoRARequest("vbon-bench-direct", 10_000, str(adapter_dir / SHIPPED_VBON_8))
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            # Warm both (prefix cache, LoRA load) with the exact requests measured later.
            for n in args.ns:
                for rep in range(min(args.reps, 2)):
                    await gateway_bon(client, rep, n, 1000 + rep)
                    await direct_bon(engine, tok, rep, n, 1000 + rep)
            latency: dict = {}
            bar = tqdm(total=len(args.ns) * args.reps * 2, desc="latency (one at a time)")
            for n in args.ns:
                g, d = [], []
                for rep in range(args.reps):
                    # The same seeded request both ways, in alternating order.
                    ga, da = await in_turn(
                        partial(gateway_bon, client, rep, n, 1000 + rep),
                        partial(direct_bon, engine, tok, rep, n, 1000 + rep),
                        flip=rep % 2 == 1,
                    )
                    g.append(ga)
                    d.append(da)
                    bar.update(2)
                latency[n] = {
                    "gateway_s": statistics.median(g),
                    "direct_s": statistics.median(d),
                    **paired([x / y for x, y in zip(g, d, strict=True)]),
                }
            bar.close()
            results["latency"] = latency
            sat: dict = {}
            conc = args.concurrency
            bar = tqdm(total=len(args.sat_ns) * args.blocks * 2, desc="saturated blocks")
            for n in args.sat_ns:
                total = max(args.concurrency, args.sat_answers // n)
                ga_s, da_s = [], []
                for block in range(args.blocks):
                    ga, da = await in_turn(
                        partial(saturate, per_answer(gateway_bon, client, n=n), conc, total),
                        partial(saturate, per_answer(direct_bon, engine, tok, n=n), conc, total),
                        flip=block % 2 == 1,
                    )
                    ga_s.append(ga)
                    da_s.append(da)
                    bar.update(2)
                sat[n] = {
                    "gateway_answers_per_s": statistics.median(ga_s),
                    "direct_answers_per_s": statistics.median(da_s),
                    # Overhead = how much longer the gateway takes per answer.
                    **paired([d / g for g, d in zip(ga_s, da_s, strict=True)]),
                }
            bar.close()
            results["saturation"] = sat
            # LoRA cost: one vBoN sample vs one base sample, at saturation, direct engine.
            total = args.sat_answers
            base = await saturate(per_answer(direct_bon, engine, tok, n=1), conc, total)
            lo = await saturate(per_answer(direct_bon, engine, tok, n=1, lora=lora), conc, total)
            gv = await saturate(
                per_answer(gateway_bon, client, n=1, route="/v1/vbon"), conc, total
            )
            results["lora"] = {
                "base_answers_per_s": base,
                "lora_answers_per_s": lo,
                "gateway_vbon_answers_per_s": gv,
                "lora_cost_pct": 100 * (base / lo - 1),
            }


def _iqr(r: dict) -> str:
    lo, hi = r["overhead_iqr_pct"]
    return f"{lo:+.1f}% to {hi:+.1f}%"


def write_report(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    command = "python " + " ".join(sys.argv)
    lines = [
        "# Gateway overhead, engine configuration, LoRA cost",
        "",
        f"Written by `{command}` on {results['date']} ({results['duration_s'] / 60:.0f} min): "
        f"{machine_line(results['machine'])}. Tokens per sample {MAX_TOKENS} in the gateway "
        "rows. The gateway runs in the benchmark's process, so the gateway and the direct calls "
        "share one AsyncLLM engine; each measurement is a pair run back to back in alternating "
        "order, and an overhead is the median of the pairs' ratios (with their middle half), "
        "which cancels this machine's drift between minutes. The httpx client shares the event "
        "loop with the gateway, so the gateway rows include the client's own work: their "
        "overheads are upper bounds.",
        "",
    ]
    if "engine" in results:
        lines += [
            "## Engine configuration (saturated, 48 tokens per sample, ignore_eos; median of "
            "rounds)",
            "",
            "| config | N | generated tokens/s | answers/s |",
            "| --- | --- | --- | --- |",
        ]
        for label, rows in results["engine"].items():
            for n, r in rows.items():
                lines.append(
                    f"| {label} | {n} | {r['tokens_per_s']:.1f} | {r['answers_per_s']:.3f} |"
                )
        lines += ["", "| N | ours / vLLM default, tokens/s (median of rounds) | per round |",
                  "| --- | --- | --- |"]
        for n, r in results["engine_speedup"].items():
            per = ", ".join(f"{x:.2f}x" for x in r["per_round"])
            lines.append(f"| {n} | {r['median']:.2f}x | {per} |")
        lines.append("")
    if "latency" in results:
        lines += [
            "## Gateway vs direct AsyncLLM, one request at a time (median latency)",
            "",
            "| N | gateway s | direct s | gateway overhead (median of pairs) | middle half "
            "| pairs |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for n, r in results["latency"].items():
            lines.append(
                f"| {n} | {r['gateway_s']:.3f} | {r['direct_s']:.3f} | {r['overhead_pct']:+.1f}% "
                f"| {_iqr(r)} | {r['pairs']} |"
            )
        lines += [
            "",
            "## Gateway vs direct AsyncLLM, saturated",
            "",
            "| N | gateway answers/s | direct answers/s | gateway overhead (median of pairs) "
            "| middle half | pairs |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for n, r in results["saturation"].items():
            lines.append(
                f"| {n} | {r['gateway_answers_per_s']:.3f} | "
                f"{r['direct_answers_per_s']:.3f} | {r['overhead_pct']:+.1f}% | {_iqr(r)} "
                f"| {r['pairs']} |"
            )
        lo = results["lora"]
        lines += [
            "",
            "## LoRA (vBoN) cost, saturated, one sample per answer",
            "",
            "| base answers/s | LoRA answers/s | LoRA cost | vBoN via gateway answers/s |",
            "| --- | --- | --- | --- |",
            f"| {lo['base_answers_per_s']:.3f} | {lo['lora_answers_per_s']:.3f} | "
            f"{lo['lora_cost_pct']:+.1f}% | {lo['gateway_vbon_answers_per_s']:.3f} |",
        ]
    write_text_atomic(out / "bench_gateway.md", "\n".join(lines) + "\n")
    write_json_atomic(out / "bench_gateway.json", results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if "engine" in results:
        ax = axes[0]
        for label, rows in results["engine"].items():
            ns = sorted(rows)
            ax.plot(ns, [rows[n]["tokens_per_s"] for n in ns], marker="o", label=label)
        ax.set_xlabel("N (samples per prompt)")
        ax.set_ylabel("generated tokens/s")
        ax.set_title("Engine configuration, saturated")
        ax.legend()
    if "latency" in results:
        ax = axes[1]
        ns = list(results["latency"])
        ax.plot(
            ns, [results["latency"][n]["gateway_s"] for n in ns], marker="o", label="gateway (HTTP)"
        )
        ax.plot(
            ns, [results["latency"][n]["direct_s"] for n in ns], marker="s", label="direct AsyncLLM"
        )
        ax.set_xlabel("N")
        ax.set_ylabel("median latency (s)")
        ax.set_title("BoN-N latency, one request at a time")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bench_gateway.png", dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", default=None,
        help="output folder (default docs/results/gateway; with --quick runs/bench-gateway-<time>)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a few minutes)")
    p.add_argument("--skip-engine-config", action="store_true")
    p.add_argument("--skip-gateway", action="store_true")
    p.add_argument("--reps", type=int, help="latency pairs per N (default 12; --quick 4)")
    p.add_argument("--blocks", type=int, help="saturated block pairs per N (default 4; --quick 2)")
    p.add_argument("--engine-rounds", type=int, help="engine configuration rounds (default 2; "
                   "--quick 1)")
    args = p.parse_args()
    args.ns = [1, 4, 8, 16]
    args.sat_ns = [1, 8] if args.quick else [1, 4, 8, 16]
    args.reps = args.reps or (4 if args.quick else 12)
    args.blocks = args.blocks or (2 if args.quick else 4)
    args.engine_rounds = args.engine_rounds or (1 if args.quick else 2)
    args.concurrency = 16
    args.sat_answers = 32 if args.quick else 64
    quick_out = f"runs/bench-gateway-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out or (quick_out if args.quick else "docs/results/gateway"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict = {"machine": machine_stamp(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    if not args.skip_engine_config:
        prompts = 32
        configs = {
            "vLLM default (1 core reserved)": {"cpu_threads": "auto", "cpu_preload": False},
            "vbon default (both cores + preloads)": {},
        }
        # Each configuration needs its own engine process; alternate them over several rounds
        # and compare within a round, since this machine's speed drifts between minutes.
        rounds: list[dict] = []
        for r in tqdm(range(args.engine_rounds), desc="engine configurations"):
            labels = list(configs) if r % 2 == 0 else list(configs)[::-1]
            rounds.append(
                {lb: engine_config_probe(lb, configs[lb], {}, prompts, [1, 8]) for lb in labels}
            )
        results["engine"] = {
            lb: {n: {k: statistics.median(rd[lb][n][k] for rd in rounds)
                     for k in ("tokens_per_s", "answers_per_s")} for n in (1, 8)}
            for lb in configs
        }
        stock, ours = configs
        results["engine_speedup"] = {
            n: {
                "median": statistics.median(rd[ours][n]["tokens_per_s"]
                                            / rd[stock][n]["tokens_per_s"] for rd in rounds),
                "per_round": [rd[ours][n]["tokens_per_s"] / rd[stock][n]["tokens_per_s"]
                              for rd in rounds],
            }
            for n in (1, 8)
        }
        print(json.dumps(results["engine_speedup"], indent=1), flush=True)
    if not args.skip_gateway:
        from vbon.models import prepare_embedded
        from vbon.shipped import install_shipped

        # Only the shipped adapters in the gateway's folder: /v1/vbon then serves the shipped
        # vBoN-8, the adapter the direct calls load.
        adapters = ROOT / "runs" / "bench-gateway-adapters"
        install_shipped(adapters, str(prepare_embedded(ROOT / "models")))
        asyncio.run(gateway_vs_direct(args, results, adapters))
    results["duration_s"] = time.perf_counter() - t0
    write_report(results, out)
    print((out / "bench_gateway.md").read_text())


if __name__ == "__main__":
    main()
