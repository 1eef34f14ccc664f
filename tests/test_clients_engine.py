"""The clients against the real gateway process on the real engine (embedded model, VADER, a
real random peft LoRA adapter): one round trip of every route through the typed client, the
benchmark in a tiny mode against the same server, and the evaluation in its tiny mode (own
offline engine). One server process serves the whole module."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from clients import Client, NotFound
from tests.adapters_util import make_peft_adapter
from tests.server_proc import ServerProcess
from vbon.prompts import task_messages

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parent.parent
MSGS = task_messages("The film was")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, embedded_model: Path) -> Path:
    folder = tmp_path_factory.mktemp("client-adapters")
    make_peft_adapter(embedded_model, folder / "vbon-n4", n=4, seed=1)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embedded_model: Path, adapters: Path):
    tmp = tmp_path_factory.mktemp("client-gateway")
    proc = ServerProcess(
        {
            "VBON_ADAPTERS_DIR": str(adapters),
            "VBON_ADAPTER_POLL_S": "0",
            "VBON_MODELS_DIR": str(embedded_model.parent),
            "VBON_MAX_N": "8",
        },
        tmp / "server.log",
    )
    yield proc
    proc.stop()


def test_every_route_round_trip(server: ServerProcess) -> None:
    with Client(server.url, timeout=120) as c:
        assert c.health() == {"status": "ok"}
        ready = c.ready()
        assert ready.ready and ready.engine["model"] == "smollm2-135m-instruct"
        assert [a["name"] for a in ready.adapters] == ["vbon-n4"]
        assert {"smollm2-135m-instruct", "bon-4", "bon-8", "vbon-n4"} <= set(c.models().ids())

        b = c.bon(messages=MSGS, n=4, return_candidates=True, max_tokens=12, seed=7)
        assert len(b.candidates) == 4 and b.reward == max(x.reward for x in b.candidates)
        assert b.usage.completion_tokens == sum(x.tokens for x in b.candidates)
        assert b.kl_bound == pytest.approx(math.log(4) - 3 / 4)
        assert sorted(x.seed for x in b.candidates) == [7, 8, 9, 10]

        v = c.vbon(messages=MSGS, max_tokens=12, score=True)
        assert v.adapter.name == "vbon-n4" and v.adapter.n == 4 and v.reward is not None
        assert 1 <= v.usage.completion_tokens <= 12 and v.cumulative_logprob < 0

        chunks = list(c.vbon_stream(messages=MSGS, max_tokens=12, n=4))
        assert chunks[-1].finish_reason in ("stop", "length")
        assert chunks[-1].reward is not None and "".join(x.text for x in chunks).strip()

        comp = c.completions("bon-4", "The film was", max_tokens=8)
        assert comp.bon["n"] == 4 and comp.choices[0].reward is not None
        chat = c.chat_completions("vbon-n4", MSGS, max_tokens=8)
        assert chat.choices[0].content and chat.usage.completion_tokens <= 8
        deltas = list(c.chat_completions_stream("smollm2-135m-instruct", MSGS, max_tokens=8))
        assert deltas[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert "vbon" in c.metrics()
        with pytest.raises(NotFound, match="no adapter named"):
            c.vbon(messages=MSGS, adapter="missing")


def test_bench_tiny_against_real_engine(server: ServerProcess, tmp_path: Path) -> None:
    from clients.bench import main as bench_main

    out = tmp_path / "bench"
    rc = bench_main(
        [
            "--url",
            server.url,
            "--methods",
            "base,bon-4,vbon",
            "--concurrency",
            "1,2",
            "--requests",
            "3",
            "--poisson-load",
            "1.0",
            "--poisson-requests",
            "2",
            "--max-tokens",
            "8",
            "--hf-n",
            "4",
            "--hf-prompts",
            "2",
            # One torch thread: two OpenMP threads crawl when other jobs share the cores, and
            # this test checks the comparison's bookkeeping, not its speed.
            "--hf-threads",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    data = json.loads((out / "bench.json").read_text())
    levels = data["closed_loop"] + data["open_loop"]
    assert all(lv["errors"] == 0 and lv["completed"] > 0 for lv in levels)
    per_req = {}
    for lv in levels:
        assert lv["answers_per_s"] == pytest.approx(lv["completed"] / lv["wall_s"])
        for o in lv["outcomes"]:
            assert lv["n"] <= o["completion_tokens"] <= 8 * lv["n"]
            per_req.setdefault(lv["method"], []).append(o["completion_tokens"])
    mean = {m: sum(v) / len(v) for m, v in per_req.items()}
    # Same requests, same max_tokens: BoN-4 generates ~4x the tokens of one sample (samples
    # that stop early make it less than exact, so allow slack).
    assert 2.8 <= mean["bon-4"] / mean["base"] <= 4.6, mean
    assert 0.6 <= mean["vbon"] / mean["base"] <= 1.5, mean
    (hf,) = data["hf_comparison"]
    assert hf["n"] == 4 and hf["prompts"] == 2 and data["hf_setup"]["threads"] == 1
    assert hf["speedup_c1"] == pytest.approx(hf["gw_c1_answers_per_s"] / hf["hf_answers_per_s"])
    assert 4 <= hf["hf_tokens_per_answer"] <= 32 and 4 <= hf["gw_tokens_per_answer"] <= 32
    assert -1 <= hf["hf_mean_reward"] <= 1
    md = (out / "bench.md").read_text()
    assert "transformers answers/s" in md and "| BoN-4 |" in md and "| vbon |" in md
    for png in ("throughput_vs_concurrency.png", "latency_vs_throughput.png"):
        assert (out / png).stat().st_size > 5000


def test_eval_tiny(adapters: Path, tmp_path: Path, embedded_model: Path) -> None:
    out = tmp_path / "eval"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "clients.eval",
            "--tiny",
            "--limit",
            "5",
            "--adapters-dir",
            str(adapters),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **__import__("os").environ,
            "VBON_MODELS_DIR": str(embedded_model.parent),
            "HF_HUB_OFFLINE": "1",
        },
    )
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((out / "eval.json").read_text())
    rows = {r["policy"]: r for r in data["policies"]}
    assert list(rows) == ["base", "bon-2", "bon-4", "vbon-n4"]
    assert rows["base"]["kl"] == 0 and rows["base"]["pareto_reward"]
    assert rows["bon-4"]["kl"] == pytest.approx(math.log(4) - 3 / 4)
    assert (
        rows["bon-4"]["mean_reward"] >= rows["bon-2"]["mean_reward"] >= rows["base"]["mean_reward"]
    )  # nested pools: BoN-4 includes BoN-2's candidates
    ad = rows["vbon-n4"]
    assert ad["kind"] == "vbon" and ad["n"] == 4 and ad["prompts"] == 5
    # A random LoRA moves far from the base: the estimate is finite and positive.
    assert math.isfinite(ad["kl"]) and ad["kl"] > 0
    # Teacher-forced log-probs (fp32) match the engine's own while sampling (bf16 here).
    assert ad["logprob_check_mean_abs"] < 0.75
    for r in rows.values():
        assert 0 <= r["win_rate"] <= 1 and -1 <= r["mean_reward"] <= 1
    md = (out / "eval.md").read_text()
    assert all(f"| {name} |" in md for name in rows)
    for png in ("reward_vs_kl.png", "winrate_vs_kl.png"):
        assert (out / png).stat().st_size > 5000
