"""The throughput benchmark's report (python -m clients.bench): bench.md's closed-loop, peak,
open-loop and transformers-comparison tables, and the throughput and latency plots, all read
from bench.json's content (levels as dicts), so a report can be made again from the JSON."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vbon.report import machine_line, shown_path
from vbon.table import markdown_table


def _f(v: float | None, d: int = 2) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def peaks(levels: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each method's best closed-loop level (most answers/s): the benchmark's Poisson rates
    are fractions of it, and the report's peak table lists it."""
    best: dict[str, dict[str, Any]] = {}
    for lv in levels:
        m = lv["method"]
        if (
            lv["mode"] == "closed"
            and lv["completed"]
            and (m not in best or lv["answers_per_s"] > best[m]["answers_per_s"])
        ):
            best[m] = lv
    return best


def render_markdown(result: dict[str, Any]) -> str:
    """bench.md from the result bench.json holds."""
    cfg = result["config"]
    levels = result["closed_loop"]
    lines = [
        "# Throughput benchmark: base vs BoN vs vBoN",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {machine_line(result['machine'])}, "
        f"gateway {result['server']['url']} ({result['server']['model']}), "
        f"{cfg['max_tokens']} max tokens per sample, prompts from {shown_path(cfg['prompts'])}.  ",
        "Load average (1/5/15 min) at start "
        + "/".join(f"{x:.1f}" for x in result["machine"]["loadavg_start"])
        + ", at end "
        + "/".join(f"{x:.1f}" for x in result["machine"]["loadavg_end"])
        + f" (on {result['machine']['cpus']} CPUs: above that, other processes competed).  ",
        f"Date: {result['date']}",
        "",
        "## Closed loop (c clients sending back to back)",
        "",
    ]
    rows = [
        [
            lv["method"],
            lv["concurrency"],
            lv["completed"],
            lv["errors"],
            _f(lv["answers_per_s"], 3),
            _f(lv["gen_tokens_per_s"], 1),
            _f(lv["tokens_per_request"], 1),
            _f(lv["latency_p50_s"]),
            _f(lv["latency_p95_s"]),
            _f(lv["latency_p99_s"]),
            _f(lv["mean_reward"], 3),
        ]
        for lv in levels
    ]
    lines.append(
        markdown_table(
            [
                "method",
                "clients",
                "answers",
                "errors",
                "answers/s",
                "gen tok/s",
                "tok/answer",
                "p50 s",
                "p95 s",
                "p99 s",
                "mean reward",
            ],
            rows,
        )
    )
    pk = peaks(levels)
    if pk:
        base = pk.get("base")
        lines += ["", "## Peak (best closed-loop level per method)", ""]
        rows = []
        for name, lv in pk.items():
            rate = lv["answers_per_s"]
            cost = base["answers_per_s"] / rate if base and rate else None
            rows.append(
                [
                    name,
                    lv["concurrency"],
                    _f(lv["answers_per_s"], 3),
                    _f(lv["gen_tokens_per_s"], 1),
                    _f(cost, 2),
                    _f(lv["mean_reward"], 3),
                ]
            )
        lines.append(
            markdown_table(
                [
                    "method",
                    "at clients",
                    "answers/s",
                    "gen tok/s",
                    "cost vs base (x)",
                    "mean reward",
                ],
                rows,
            )
        )
        if "vbon" in pk:
            speed = [
                f"{name}: {pk['vbon']['answers_per_s'] / lv['answers_per_s']:.1f}x"
                for name, lv in pk.items()
                if name.startswith("bon-") and lv["answers_per_s"]
            ]
            if speed:
                lines += ["", "vBoN answers/s relative to BoN at peak: " + ", ".join(speed)]
    if result["open_loop"]:
        lines += ["", "## Open loop (Poisson arrivals)", ""]
        rows = [
            [
                lv["method"],
                _f(lv["load"]),
                _f(lv["rate_rps"], 3),
                lv["completed"],
                lv["errors"],
                _f(lv["answers_per_s"], 3),
                _f(lv["gen_tokens_per_s"], 1),
                _f(lv["latency_p50_s"]),
                _f(lv["latency_p95_s"]),
                _f(lv["latency_p99_s"]),
                _f(lv["mean_reward"], 3),
            ]
            for lv in result["open_loop"]
        ]
        lines.append(
            markdown_table(
                [
                    "method",
                    "load (x peak)",
                    "offered req/s",
                    "answers",
                    "errors",
                    "answers/s",
                    "gen tok/s",
                    "p50 s",
                    "p95 s",
                    "p99 s",
                    "mean reward",
                ],
                rows,
            )
        )
    if result["hf_comparison"]:
        hf = result["hf_comparison"]
        lines += [
            "",
            "## BoN: gateway vs transformers generate(num_return_sequences=N) + same reward",
            "",
            f"Same {hf[0]['prompts']} prompts, N, max tokens ({cfg['max_tokens']}), dtype "
            f"{result['hf_setup']['dtype']}, {result['hf_setup']['threads']} threads. "
            "transformers runs one prompt at a time (as TRL's BestOfNSampler did); the gateway "
            "is measured one prompt at a time (c=1) and with all prompts sent at once.",
            "",
        ]
        rows = [
            [
                f"BoN-{r['n']}",
                _f(r["hf_answers_per_s"], 3),
                _f(r["hf_gen_tokens_per_s"], 1),
                _f(r["gw_c1_answers_per_s"], 3),
                _f(r["gw_all_answers_per_s"], 3),
                _f(r["gw_all_gen_tokens_per_s"], 1),
                _f(r["speedup_c1"], 2),
                _f(r["speedup_all"], 2),
                _f(r["hf_mean_reward"], 3),
                _f(r["gw_mean_reward"], 3),
            ]
            for r in hf
        ]
        lines.append(
            markdown_table(
                [
                    "method",
                    "transformers answers/s",
                    "transformers gen tok/s",
                    "gateway c=1 answers/s",
                    "gateway all-at-once answers/s",
                    "gateway all-at-once gen tok/s",
                    "speed-up c=1 (x)",
                    "speed-up all-at-once (x)",
                    "transformers reward",
                    "gateway reward",
                ],
                rows,
            )
        )
    if result.get("notes"):
        lines += ["", "Notes:", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out: Path) -> list[str]:
    """throughput_vs_concurrency.png and latency_vs_throughput.png in `out`; their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = result["closed_loop"]
    methods = list(dict.fromkeys(lv["method"] for lv in closed))
    files = []
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in methods:
        pts = [lv for lv in closed if lv["method"] == m and lv["completed"]]
        xs = [lv["concurrency"] for lv in pts]
        ax[0].plot(xs, [lv["answers_per_s"] for lv in pts], marker="o", label=m)
        ax[1].plot(xs, [lv["gen_tokens_per_s"] for lv in pts], marker="o", label=m)
    for a, t in zip(ax, ("answers/s", "generated tokens/s"), strict=True):
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent clients")
        a.set_ylabel(t)
        a.grid(alpha=0.3)
    ax[0].set_yscale("log")
    ax[0].legend()
    fig.suptitle("Throughput vs concurrency (closed loop)")
    fig.tight_layout()
    path = out / "throughput_vs_concurrency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path.name)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, m in enumerate(methods):
        color = f"C{i}"
        pts = [lv for lv in closed if lv["method"] == m and lv["completed"]]
        ax.plot(
            [lv["answers_per_s"] for lv in pts],
            [lv["latency_p50_s"] for lv in pts],
            marker="o",
            color=color,
            label=f"{m} p50 (closed)",
        )
        ax.plot(
            [lv["answers_per_s"] for lv in pts],
            [lv["latency_p95_s"] for lv in pts],
            ls=":",
            color=color,
            alpha=0.7,
        )
        op = [lv for lv in result["open_loop"] if lv["method"] == m and lv["completed"]]
        if op:
            ax.scatter(
                [lv["answers_per_s"] for lv in op],
                [lv["latency_p50_s"] for lv in op],
                marker="x",
                s=60,
                color=color,
                label=f"{m} p50 (Poisson)",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("answers/s")
    ax.set_ylabel("latency s (solid p50, dotted p95)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Latency vs throughput")
    fig.tight_layout()
    path = out / "latency_vs_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path.name)
    return files
