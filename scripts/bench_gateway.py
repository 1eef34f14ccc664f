"""Gateway overhead and engine configuration benchmark (issue: serving performance).

Measures, side by side in one run on this machine:
  1. the engine configuration: saturated generated tokens/s of vLLM's out-of-the-box CPU
     settings (one core reserved, no preloads) against ours (both cores, preloads, dtype
     from the CPU flags);
  2. the gateway's own cost: BoN-N latency (one request at a time) and saturated answers/s
     through the gateway over HTTP against the same AsyncLLM engine called directly, with the
     same seeded sampling parameters (so both generate the same tokens);
  3. the LoRA cost: a vBoN sample through its adapter against a base-model sample.

Writes JSON, a markdown table and a PNG plot to --out. Usage:
  .venv/bin/python scripts/bench_gateway.py --out runs/bench-gateway [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tqdm import tqdm  # noqa: E402

from vbon.adapters import write_json_atomic, write_text_atomic  # noqa: E402
from vbon.prompts import default_prompt_file, load_prompts, task_messages  # noqa: E402

MAX_TOKENS = 32


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
async def direct_engine():
    from vbon.engine import build_async_engine
    from vbon.settings import CoreSettings

    return build_async_engine(CoreSettings())


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


async def saturate(call, concurrency: int, total: int) -> float:
    """Answers/s with `concurrency` closed-loop clients completing `total` requests."""
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            await call(i)

    t = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return total / (time.perf_counter() - t)


async def gateway_vs_direct(args: argparse.Namespace, results: dict, adapter_dir: Path) -> None:
    import httpx

    global _VADER
    from vbon.rewards.vader import VaderReward

    _VADER = VaderReward()
    sys.path.insert(0, str(ROOT))
    from tests.server_proc import ServerProcess

    log = Path(args.out) / "gateway.log"
    server = ServerProcess(
        {
            "VBON_ADAPTERS_DIR": str(adapter_dir),
            "VBON_ADAPTER_POLL_S": "0",
            "VBON_MAX_SAMPLES_IN_FLIGHT": "100000",
            "VBON_LOG_LEVEL": "warning",
        },
        log,
    )
    try:
        engine = await direct_engine()
        tok = engine.tokenizer or engine.get_tokenizer()
        from vllm.lora.request import LoRARequest

        lora = LoRARequest("vbon-bench", 1, str(adapter_dir / "vbon-bench"))
        async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
            # Warm both (prefix cache, LoRA load) with the exact requests measured later.
            for n in args.ns:
                for rep in range(args.reps):
                    await gateway_bon(client, rep, n, 1000 + rep)
                    await direct_bon(engine, tok, rep, n, 1000 + rep)
            latency: dict = {}
            bar = tqdm(total=len(args.ns) * args.reps * 2, desc="latency (one at a time)")
            for n in args.ns:
                g, d = [], []
                for rep in range(args.reps):  # alternate, so drift hits both alike
                    g.append(await gateway_bon(client, rep, n, 1000 + rep))
                    d.append(await direct_bon(engine, tok, rep, n, 1000 + rep))
                    bar.update(2)
                latency[n] = {"gateway_s": statistics.median(g), "direct_s": statistics.median(d)}
                latency[n]["overhead_pct"] = 100 * (
                    latency[n]["gateway_s"] / latency[n]["direct_s"] - 1
                )
            bar.close()
            results["latency"] = latency
            sat: dict = {}
            for n in args.sat_ns:
                total = max(args.concurrency, args.sat_answers // n)
                ga = await saturate(
                    lambda i, n=n: gateway_bon(client, i, n, i), args.concurrency, total
                )
                da = await saturate(
                    lambda i, n=n: direct_bon(engine, tok, i, n, i), args.concurrency, total
                )
                sat[n] = {
                    "gateway_answers_per_s": ga,
                    "direct_answers_per_s": da,
                    "overhead_pct": 100 * (da / ga - 1),
                }
                print(f"saturation n={n}: gateway {ga:.3f}/s direct {da:.3f}/s", flush=True)
            results["saturation"] = sat
            # LoRA cost: one vBoN sample vs one base sample, at saturation, direct engine.
            total = args.sat_answers
            base = await saturate(
                lambda i: direct_bon(engine, tok, i, 1, i), args.concurrency, total
            )
            lo = await saturate(
                lambda i: direct_bon(engine, tok, i, 1, i, lora), args.concurrency, total
            )
            gv = await saturate(
                lambda i: gateway_bon(client, i, 1, i, "/v1/vbon"), args.concurrency, total
            )
            results["lora"] = {
                "base_answers_per_s": base,
                "lora_answers_per_s": lo,
                "gateway_vbon_answers_per_s": gv,
                "lora_cost_pct": 100 * (base / lo - 1),
            }
        engine.shutdown()
    finally:
        server.stop()


def write_report(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Gateway benchmark", "", f"Machine: {results['machine']}", ""]
    if "engine" in results:
        lines += [
            "## Engine configuration (saturated, 48 tokens per sample, ignore_eos)",
            "",
            "| config | N | generated tokens/s | answers/s |",
            "| --- | --- | --- | --- |",
        ]
        for label, rows in results["engine"].items():
            for n, r in rows.items():
                lines.append(
                    f"| {label} | {n} | {r['tokens_per_s']:.1f} | {r['answers_per_s']:.3f} |"
                )
        lines.append("")
    if "latency" in results:
        lines += [
            "## Gateway vs direct AsyncLLM, one request at a time (median latency)",
            "",
            "| N | gateway s | direct s | gateway overhead |",
            "| --- | --- | --- | --- |",
        ]
        for n, r in results["latency"].items():
            lines.append(
                f"| {n} | {r['gateway_s']:.3f} | {r['direct_s']:.3f} | {r['overhead_pct']:+.1f}% |"
            )
        lines += [
            "",
            "## Gateway vs direct AsyncLLM, saturated",
            "",
            "| N | gateway answers/s | direct answers/s | gateway overhead |",
            "| --- | --- | --- | --- |",
        ]
        for n, r in results["saturation"].items():
            lines.append(
                f"| {n} | {r['gateway_answers_per_s']:.3f} | "
                f"{r['direct_answers_per_s']:.3f} | {r['overhead_pct']:+.1f}% |"
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
    p.add_argument("--out", default="runs/bench-gateway")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a few minutes)")
    p.add_argument("--skip-engine-config", action="store_true")
    p.add_argument("--skip-gateway", action="store_true")
    args = p.parse_args()
    args.ns = [1, 4, 8, 16]
    args.sat_ns = [1, 8] if args.quick else [1, 4, 8, 16]
    args.reps = 3 if args.quick else 5
    args.concurrency = 16
    args.sat_answers = 32 if args.quick else 64
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from vbon.cpu import cpu_count, default_dtype

    results: dict = {
        "machine": f"{cpu_count()} cores, dtype {default_dtype()}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    }
    if not args.skip_engine_config:
        prompts = 32 if args.quick else 64
        results["engine"] = {
            "vLLM default (1 core reserved)": engine_config_probe(
                "default", {"cpu_threads": "auto", "cpu_preload": False}, {}, prompts, [1, 8]
            ),
            "vbon default (both cores + preloads)": engine_config_probe(
                "ours", {}, {}, prompts, [1, 8]
            ),
        }
        print(json.dumps(results["engine"], indent=1), flush=True)
    if not args.skip_gateway:
        from tests.adapters_util import make_peft_adapter
        from vbon.models import prepare_embedded

        adapters = out / "adapters"
        if not (adapters / "vbon-bench").exists():
            make_peft_adapter(
                prepare_embedded(ROOT / "models"), adapters / "vbon-bench", n=8, rank=16
            )
        asyncio.run(gateway_vs_direct(args, results, adapters))
    write_report(results, out)
    print((out / "bench_gateway.md").read_text())


if __name__ == "__main__":
    main()
