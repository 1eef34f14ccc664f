"""LoRA cost A/B on one offline vLLM engine (issue: serving performance, aim 3).

A vBoN sample goes through a LoRA adapter; this measures what that costs against a base-model
sample on the same engine, alternating base and adapter batches so that the machine's drift
hits both alike. It reports the best of the repeats and the median ratio of each adapter batch
to the base batch just before it (use many small repeats on a noisy machine). It does so for
each CPU LoRA path in its own engine process: vLLM's stock ops, our fused path (two matmuls per
layer, the adapter's output added to the rounded base output) and the single-GEMM path (the
adapter inside the base layer's GEMM: W + B A for float32 weights, [W | B] on [x | x A^T] for
bf16). The adapter is --adapter, or a random rank-16 one on every attention and MLP projection
(the trainer's default shape: the cost does not depend on the values).

Writes results.json, table.md and lora_cost.png to --out. Usage:
  .venv/bin/python scripts/bench_lora.py --out runs/bench-lora [--dtype float32] [--prompts 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tqdm import tqdm  # noqa: E402

from vbon.adapters import write_json_atomic, write_text_atomic  # noqa: E402

# Environment of each engine process: which CPU LoRA path vbon's vLLM plugin installs.
PATHS = {
    "vLLM stock ops": {"VBON_FAST_CPU_LORA": "0"},
    "fused (2 matmuls/layer)": {"VBON_MERGED_LORA_MAX_GB": "0"},
    "single GEMM (W + BA / [W | B])": {},
}

PROBE = r"""
import json, sys, time
from vllm import SamplingParams
from vllm.lora.request import LoRARequest
from vbon.engine import build_llm
from vbon.prompts import default_prompt_file, load_prompts, render_task
from vbon.settings import CoreSettings, load_settings
if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    settings = load_settings(CoreSettings)
    llm = build_llm(settings, max_lora_rank=max(settings.max_lora_rank, cfg["rank"]))
    tok = llm.get_tokenizer()
    openings = load_prompts(default_prompt_file("eval"))[: cfg["prompts"]]
    prompts = [render_task(tok, o) for o in openings]
    sp = SamplingParams(n=cfg["n"], max_tokens=cfg["max_tokens"], ignore_eos=True, temperature=1.0)
    lora = LoRARequest("bench", 1, cfg["adapter"])
    llm.generate(prompts[:4], sp, use_tqdm=False)  # warm both, load the adapter
    llm.generate(prompts[:4], sp, lora_request=lora, use_tqdm=False)
    times = {"base": [], "lora": []}
    for _ in range(cfg["repeats"]):
        for name, req in (("base", None), ("lora", lora)):
            t = time.perf_counter()
            llm.generate(prompts, sp, lora_request=req, use_tqdm=False)
            times[name].append(time.perf_counter() - t)
    print("RESULT " + json.dumps(times), flush=True)
"""


def random_adapter(folder: Path, rank: int) -> str:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.config import TrainConfig
    from trainer.policy import lora_config
    from vbon.settings import CoreSettings, load_settings

    torch.manual_seed(0)
    base = load_settings(CoreSettings).resolved_model()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    # The trainer's adapter shape (targets, alpha = 2 x rank), with random rather than zero B.
    config = lora_config(TrainConfig(lora_rank=rank, lora_alpha=2 * rank))
    config.init_lora_weights = False
    get_peft_model(model, config).save_pretrained(folder)
    return str(folder)


def run_path(env: dict[str, str], cfg: dict) -> dict[str, list[float]]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(cfg)],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"probe failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="runs/bench-lora", help="output folder")
    ap.add_argument("--adapter", default="", help="adapter folder (default: a random rank-16)")
    ap.add_argument("--rank", type=int, default=16, help="rank of the random adapter")
    ap.add_argument("--prompts", type=int, default=64, help="prompts per batch")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens per sample (ignore_eos)")
    ap.add_argument("--repeats", type=int, default=3, help="alternated base/adapter repeats")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of paths")
    ap.add_argument(
        "--dtype", default="", help="engine dtype (VBON_DTYPE): auto, float32, bfloat16"
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter or random_adapter(Path(tmp) / "adapter", args.rank)
        cfg = {
            "adapter": str(Path(adapter).resolve()), "rank": args.rank, "prompts": args.prompts,
            "n": args.n, "max_tokens": args.max_tokens, "repeats": args.repeats,
        }  # fmt: skip
        names = [p.strip() for p in args.paths.split(",") if p.strip()]
        unknown = [p for p in names if p not in PATHS]
        if unknown:
            ap.error(f"--paths: unknown {unknown}; choose from {list(PATHS)}")
        results = {}
        dtype = {"VBON_DTYPE": args.dtype} if args.dtype else {}
        for name in tqdm(names, desc="LoRA paths", unit="engine"):
            times = run_path({**PATHS[name], **dtype}, cfg)
            base, lora = min(times["base"]), min(times["lora"])
            # Each adapter batch ran right after its base batch: their ratio cancels the
            # machine's slower drift, and the median drops the repeats a burst hit.
            pairs = sorted(b2 / b1 for b1, b2 in zip(times["base"], times["lora"], strict=True))
            results[name] = {
                "base_s": base, "lora_s": lora, "cost": lora / base - 1,
                "cost_median_pair": statistics.median(pairs) - 1, **times,
            }  # fmt: skip
    tokens = args.prompts * args.n * args.max_tokens
    rows = [
        "| CPU LoRA path | base s | adapter s | base tokens/s | adapter tokens/s | LoRA cost "
        "(best of repeats) | LoRA cost (median of pairs) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        rows.append(
            f"| {name} | {r['base_s']:.2f} | {r['lora_s']:.2f} | {tokens / r['base_s']:.0f} | "
            f"{tokens / r['lora_s']:.0f} | {100 * r['cost']:+.1f}% | "
            f"{100 * r['cost_median_pair']:+.1f}% |"
        )
    table = "\n".join(rows)
    print(table)
    cfg["dtype"] = args.dtype or "auto"
    write_json_atomic(out / "results.json", {"config": cfg, "tokens": tokens, "paths": results})
    write_text_atomic(out / "table.md", table + "\n")
    plot(results, out / "lora_cost.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [results[n]["base_s"] for n in names], 0.4, label="base")
    ax.bar([x + 0.2 for x in xs], [results[n]["lora_s"] for n in names], 0.4, label="adapter")
    for x, n in zip(xs, names, strict=True):
        ax.annotate(f"{100 * results[n]['cost']:+.0f}%", (x + 0.2, results[n]["lora_s"]),
                    ha="center", va="bottom")  # fmt: skip
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("seconds per batch (best of repeats)")
    ax.set_title("LoRA cost on one vLLM engine, base vs adapter alternated")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
