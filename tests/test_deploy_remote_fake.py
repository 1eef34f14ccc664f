"""Remote mode's routing and error mapping against scripted OpenAI-compatible upstreams
(httpx.MockTransport), through the real app: fail-over, 502/503/504 naming the upstream,
runtime LoRA loading and reloading, and the bad-input cases (missing model folder, unreachable
upstream, an upstream serving another model). The same paths run on a real `vllm serve` in
tests/test_deploy_remote.py."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.remote_backend import RemoteBackend
from server.settings import ServerSettings
from tests.adapters_util import make_fake_adapter
from tests.fakes import bos_tokenizer

A, B = "http://replica-a:8000", "http://replica-b:8000"


# What vLLM answers when it refuses a parameter (its OpenAI ErrorResponse), in its current
# shape, its older flat one, and FastAPI's own validation error (422).
VLLM_400 = {"error": {"message": "temperature must be non-negative, got -1.0.",
                      "type": "BadRequestError", "param": "temperature", "code": 400}}
VLLM_400_FLAT = {"object": "error", "message": "must be non-negative, got -1.0.",
                 "type": "BadRequestError", "param": "temperature", "code": 400}
FASTAPI_422 = {"detail": [{"type": "greater_than_equal", "loc": ["body", "temperature"],
                           "msg": "Input should be greater than or equal to 0", "input": -1}]}


class FakeVLLM:
    """Scripted behaviour per upstream: 'ok', 'down' (connection refused), 'timeout',
    'error500', 'bad400' (VLLM_400), 'bad400flat', 'bad422', 'model:<id>' (serves another
    model). With `key` set, it guards its /v1 routes as `vllm serve --api-key` does: 401
    without `Authorization: Bearer <key>`, /health stays public."""

    def __init__(self, model: str, modes: dict[str, str], key: str | None = None) -> None:
        self.model = model
        self.modes = modes
        self.key = key
        self.refused: list[str] = []  # paths answered 401
        self.loras: dict[str, set[str]] = {u: set() for u in modes}
        self.completions: dict[str, int] = {u: 0 for u in modes}
        self.bodies: list[dict] = []
        self.loaded_from: list[tuple[str, str]] = []  # (lora_name, lora_path) per load
        self.unloaded: list[str] = []
        self.refuse_loads = False  # answer /v1/load_lora_adapter with vLLM's 400, path and all

    def __call__(self, request: httpx.Request) -> httpx.Response:
        up = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        mode = self.modes[up]
        if mode == "down":
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        if path == "/health":
            return httpx.Response(200)
        # (vllm/entrypoints/serve/middleware/authenticate.py)
        if self.key is not None and request.headers.get("Authorization") != f"Bearer {self.key}":
            self.refused.append(path)
            return httpx.Response(401, json={"error": "Unauthorized"})
        if path == "/v1/models":
            model = mode.split(":", 1)[1] if mode.startswith("model:") else self.model
            data = [{"id": model, "root": model, "parent": None, "max_model_len": 1024}]
            data += [{"id": n, "root": "/x", "parent": model} for n in sorted(self.loras[up])]
            return httpx.Response(200, json={"object": "list", "data": data})
        body = json.loads(request.content)
        if path == "/v1/load_lora_adapter":
            if self.refuse_loads:
                msg = f"Loading lora {body['lora_name']} failed: No adapter found for " + (
                    body["lora_path"]
                )
                return httpx.Response(400, json={"error": {"message": msg, "code": 400}})
            self.loras[up].add(body["lora_name"])
            self.loaded_from.append((body["lora_name"], body["lora_path"]))
            return httpx.Response(200, text="ok")
        if path == "/v1/unload_lora_adapter":
            self.loras[up].discard(body["lora_name"])
            self.unloaded.append(body["lora_name"])
            return httpx.Response(200, text="ok")
        assert path == "/v1/completions"
        self.bodies.append(body)
        self.completions[up] += 1
        if mode == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if mode == "error500":
            return httpx.Response(500, json={"error": {"message": "EngineDeadError"}})
        if mode == "bad400":
            return httpx.Response(400, json=VLLM_400)
        if mode == "bad400flat":
            return httpx.Response(400, json=VLLM_400_FLAT)
        if mode == "bad422":
            return httpx.Response(422, json=FASTAPI_422)
        if body["model"] != self.model and body["model"] not in self.loras[up]:
            return httpx.Response(
                404, json={"error": {"message": f"The model `{body['model']}` does not exist."}}
            )
        choices = [
            {
                "index": i,
                "text": f" good film {i}" if i % 2 else f" bad film {i}",
                "finish_reason": "length",
                "logprobs": {"token_logprobs": [-0.5, -0.25, -0.25], "tokens": ["a", "b", "c"]},
            }
            for i in range(body["n"])
        ]
        usage = {"prompt_tokens": 11, "completion_tokens": 3 * body["n"]}
        return httpx.Response(200, json={"choices": choices, "usage": usage})


def make_client(
    tmp_path: Path, model: Path | str, fake: FakeVLLM, **overrides
) -> tuple[TestClient, Callable[[], RemoteBackend]]:
    settings = ServerSettings(
        backend="remote",
        upstreams=list(fake.modes),
        model=str(model),
        adapters_dir=tmp_path / "adapters",
        adapter_poll_s=0,
        upstream_health_interval_s=3600,
        **{"shipped_adapters": False, **overrides},
    )
    holder: dict[str, RemoteBackend] = {}

    def factory(s: ServerSettings) -> RemoteBackend:
        holder["b"] = RemoteBackend(s, transport=httpx.MockTransport(fake))
        return holder["b"]

    app = create_app(settings, backend_factory=factory, background_load=False)
    return TestClient(app), lambda: holder["b"]


def test_upstreams_setting_accepts_commas_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VBON_UPSTREAMS", "http://a:8000/, http://b:8000")
    assert ServerSettings().upstreams == ["http://a:8000", "http://b:8000"]
    monkeypatch.setenv("VBON_UPSTREAMS", '["http://c:1"]')
    assert ServerSettings().upstreams == ["http://c:1"]
    monkeypatch.setenv("VBON_UPSTREAMS", "c:1")
    with pytest.raises(ValueError, match="http://"):
        ServerSettings()


def test_dead_replica_never_fails_a_request(tmp_path: Path, embedded_model: Path) -> None:
    fake = FakeVLLM(str(embedded_model), {A: "down", B: "ok"})
    client, backend = make_client(tmp_path, embedded_model, fake)
    with client:
        assert client.get("/ready").status_code == 200
        for _ in range(4):
            r = client.post("/v1/bon", json={"prompt": "The film", "n": 4, "max_tokens": 3})
            assert r.status_code == 200, r.text
        body = r.json()
        assert body["text"].startswith(" good film")  # VADER picks a positive candidate
        assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 12, "total_tokens": 23}
        assert fake.completions == {A: 0, B: 4}
        # Even when A is (wrongly) believed healthy, the request fails over to B.
        backend().upstreams[0].healthy = True
        r = client.post("/v1/bon", json={"prompt": "The film", "n": 2, "max_tokens": 3})
        assert r.status_code == 200 and not backend().upstreams[0].healthy
        sent = fake.bodies[-1]
        assert sent["model"] == str(embedded_model) and sent["logprobs"] == 0
        assert sent["top_k"] == 0 and sent["temperature"] == 1.0
        assert "repetition_penalty" not in sent and "ignore_eos" not in sent  # unset: not sent
        # vLLM's extensions pass through to the `vllm serve` upstream as they came.
        r = client.post("/v1/completions", json={
            "model": "smollm2-135m-instruct", "prompt": "x", "max_tokens": 3,
            "repetition_penalty": 1.2, "ignore_eos": True, "min_tokens": 2})
        assert r.status_code == 200, r.text
        sent = fake.bodies[-1]
        assert (sent["repetition_penalty"], sent["ignore_eos"], sent["min_tokens"]) == (
            1.2, True, 2)


def test_load_is_spread_across_healthy_replicas(tmp_path: Path, embedded_model: Path) -> None:
    fake = FakeVLLM(str(embedded_model), {A: "ok", B: "ok"})
    client, _ = make_client(tmp_path, embedded_model, fake)
    with client:
        for _ in range(6):
            assert client.post("/v1/bon", json={"prompt": "x", "n": 2}).status_code == 200
    assert fake.completions == {A: 3, B: 3}


@pytest.mark.parametrize(
    ("modes", "status", "needle"),
    [
        ({A: "down", B: "down"}, 503, "no upstream could take the request"),
        ({A: "error500", B: "down"}, 502, "answered 500: EngineDeadError"),
        ({A: "timeout"}, 504, f"upstream {A} did not answer"),
    ],
)
def test_upstream_errors_map_to_502_503_504_naming_the_upstream(
    tmp_path: Path, embedded_model: Path, modes: dict, status: int, needle: str
) -> None:
    fake = FakeVLLM(str(embedded_model), dict.fromkeys(modes, "ok"))
    client, _ = make_client(tmp_path, embedded_model, fake)
    with client:
        fake.modes.update(modes)  # healthy at start-up, broken afterwards
        r = client.post("/v1/bon", json={"prompt": "x", "n": 2})
        assert r.status_code == status, r.text
        msg = r.json()["error"]["message"]
        assert needle in msg and A in msg


@pytest.mark.parametrize("mode", ["bad400", "bad400flat", "bad422"])
def test_a_parameter_the_upstream_refuses_is_a_400_naming_it(
    tmp_path: Path, embedded_model: Path, mode: str
) -> None:
    """#29 point 1: vLLM refusing a value the client sent is the client's mistake: a 400 naming
    the parameter (as with the local engine), not a 502, and the upstream stays in service."""
    fake = FakeVLLM(str(embedded_model), {A: "ok"})
    client, backend = make_client(tmp_path, embedded_model, fake)
    with client:
        fake.modes[A] = mode
        for route, body in (
            ("/v1/bon", {"prompt": "x", "n": 2, "temperature": 0.7}),
            ("/v1/completions", {"model": "smollm2-135m-instruct", "prompt": "x",
                                 "temperature": 0.7}),
        ):  # fmt: skip
            r = client.post(route, json=body)
            assert r.status_code == 400, (route, r.text)
            err = r.json()["error"]
            assert err["param"] == "temperature", err
            assert "the engine refused the request: temperature" in err["message"], err
            assert any(w in err["message"] for w in ("non-negative", "greater than or equal"))
        assert fake.completions[A] == 2  # each tried once: no other replica would accept it
        assert backend().upstreams[0].healthy
        assert client.get("/ready").status_code == 200


def test_prompt_tokens_are_counted_as_the_upstream_counts_them(
    tmp_path: Path, embedded_model: Path
) -> None:
    """#29 point 6: the upstream's /v1/completions tokenizes the prompt we send with its
    special tokens (a BOS here); counted without them, the context check would pass a prompt
    one token too long, which the upstream then refuses."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.renderers.params import TokenizeParams

    fake = FakeVLLM(str(embedded_model), {A: "ok"})
    client, backend = make_client(tmp_path, embedded_model, fake, max_model_len=64)
    with client:
        tok = bos_tokenizer(embedded_model, tmp_path / "bos-tokenizer")
        backend()._tokenizer = tok
        assert backend().max_model_len == 64
        body = {"model": "smollm2-135m-instruct", "prompt": "a prompt of some words",
                "max_tokens": 3}  # fmt: skip
        assert client.post("/v1/completions", json=body).status_code == 200
        sent = fake.bodies[-1]
        # How the upstream tokenizes exactly what the gateway sent it.
        req = CompletionRequest.model_validate(sent)
        params = TokenizeParams(max_total_tokens=64, add_special_tokens=req.add_special_tokens)
        upstream_ids = tok.encode(sent["prompt"], **params.get_encode_kwargs())
        assert upstream_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # a BOS is added
        assert backend().count_tokens(sent["prompt"]) == len(upstream_ids)
        # One token over the context: refused by the gateway, never sent upstream.
        r = client.post("/v1/completions", json={**body, "max_tokens": 64 - len(upstream_ids) + 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
        assert fake.completions[A] == 1
        r = client.post("/v1/completions", json={**body, "max_tokens": 64 - len(upstream_ids)})
        assert r.status_code == 200, r.text


UPSTREAM_KEY = "upstream-key-0123456789"


def test_the_upstream_key_is_sent_on_every_upstream_call(
    tmp_path: Path, embedded_model: Path
) -> None:
    """#29 point 8: VBON_UPSTREAM_API_KEY reaches /v1/models (health), completions and LoRA
    loading and unloading of an upstream that requires it."""
    adapters = tmp_path / "adapters"
    _publish(adapters / "vbon-n8", embedded_model, seed=0)
    fake = FakeVLLM(str(embedded_model), {A: "ok"}, key=UPSTREAM_KEY)
    client, _ = make_client(tmp_path, embedded_model, fake, admin_key="adm",
                            upstream_api_key=UPSTREAM_KEY)  # fmt: skip
    with client:
        assert client.get("/ready").status_code == 200
        assert fake.loras[A] == {"vbon-n8@v1"}
        assert client.post("/v1/bon", json={"prompt": "x", "n": 2}).status_code == 200
        assert client.post("/v1/vbon", json={"prompt": "x", "max_tokens": 3}).status_code == 200
        _publish(adapters / "vbon-n8", embedded_model, seed=1)
        assert client.post("/admin/adapters/reload", headers=ADMIN).json()["installed"] == [
            "vbon-n8@v2"]
        assert fake.unloaded == ["vbon-n8@v1"] and fake.loras[A] == {"vbon-n8@v2"}
    assert fake.refused == [] and fake.completions[A] == 2


@pytest.mark.parametrize(("key", "needle"), [
    (None, "needs a key (401)"),
    ("not-" + UPSTREAM_KEY, "refuses the gateway's key (401)"),
])  # fmt: skip
def test_an_upstream_refusing_our_key_is_not_ready_saying_which_setting(
    tmp_path: Path, embedded_model: Path, key: str | None, needle: str
) -> None:
    """A missing or wrong VBON_UPSTREAM_API_KEY is a configuration error, not a client's nor a
    transient one: /ready is 503 naming the upstream and the setting, requests get 503 saying
    the same (never a 502 from passing them on to be refused), and once the key matches again
    the health check brings the upstream back."""
    fake = FakeVLLM(str(embedded_model), {A: "ok"}, key=UPSTREAM_KEY)
    client, backend = make_client(tmp_path, embedded_model, fake, upstream_api_key=key)
    with client:
        r = client.get("/ready")
        assert r.status_code == 503, r.text
        assert A in r.text and needle in r.text and "VBON_UPSTREAM_API_KEY" in r.text, r.text
        r = client.post("/v1/bon", json={"prompt": "x", "n": 2})
        assert r.status_code == 503, r.text
        assert needle in r.json()["error"]["message"] and A in r.json()["error"]["message"]
        assert fake.completions[A] == 0  # not passed on to be refused
        # The upstream restarts with the key the gateway has: back at the next health check.
        fake.key = key
        client.portal.call(backend().check_all)
        assert client.get("/ready").status_code == 200
        assert client.post("/v1/bon", json={"prompt": "x", "n": 2}).status_code == 200


def test_a_key_changed_under_a_running_gateway_is_a_503_naming_it(
    tmp_path: Path, embedded_model: Path
) -> None:
    """The upstream is restarted with another key between two health checks: the request it
    refuses fails over (here: to none) with a 503 naming the key, and the upstream is marked
    down, so the next requests are not sent there either."""
    fake = FakeVLLM(str(embedded_model), {A: "ok"}, key=UPSTREAM_KEY)
    client, backend = make_client(tmp_path, embedded_model, fake, upstream_api_key=UPSTREAM_KEY)
    with client:
        assert client.post("/v1/bon", json={"prompt": "x", "n": 2}).status_code == 200
        fake.key = "rotated-" + UPSTREAM_KEY
        for _ in range(2):
            r = client.post("/v1/bon", json={"prompt": "x", "n": 2})
            assert r.status_code == 503, r.text
            assert "refuses the gateway's key (401)" in r.json()["error"]["message"]
        assert fake.refused == ["/v1/completions"]  # the second one was not sent there
        assert not backend().upstreams[0].healthy


def test_adapters_load_at_install_and_again_after_an_upstream_restart(
    tmp_path: Path, embedded_model: Path
) -> None:
    make_fake_adapter(tmp_path / "adapters" / "vbon-n8", base_model=str(embedded_model))
    fake = FakeVLLM(str(embedded_model), {A: "ok"})
    client, _ = make_client(tmp_path, embedded_model, fake, upstream_adapters_dir="/adapters")
    with client:
        assert fake.loras[A] == {"vbon-n8@v1"}
        r = client.post("/v1/vbon", json={"prompt": "x", "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert fake.bodies[-1]["model"] == "vbon-n8@v1"
        fake.loras[A].clear()  # the upstream restarted and forgot the adapter
        r = client.post("/v1/vbon", json={"prompt": "x", "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert fake.loras[A] == {"vbon-n8@v1"}


def test_an_upstream_refusing_to_reload_an_adapter_is_a_502_without_the_server_path(
    tmp_path: Path, embedded_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_fake_adapter(tmp_path / "adapters" / "vbon-n8", base_model=str(embedded_model))
    fake = FakeVLLM(str(embedded_model), {A: "ok"})
    client, _ = make_client(tmp_path, embedded_model, fake, upstream_adapters_dir="/secret/ads")
    with caplog.at_level(logging.ERROR), client:
        fake.loras[A].clear()  # the upstream restarted, and now refuses the snapshot
        fake.refuse_loads = True
        r = client.post("/v1/vbon", json={"prompt": "x", "max_tokens": 3})
        assert r.status_code == 502, r.text
        message = r.json()["error"]["message"]
        assert "refused adapter vbon-n8@v1" in message and A in message
        assert "/secret" not in message and "No adapter found" not in message, message
        ref = re.search(r"err-[0-9a-f]+", message)
        assert ref is not None, message
    logged = [rec.getMessage() for rec in caplog.records if ref.group(0) in rec.getMessage()]
    assert logged and "/secret/ads/.versions/vbon-n8@v1" in logged[0], logged


ADMIN = {"Authorization": "Bearer adm"}


def _publish(folder: Path, model: Path, seed: int, **meta: object) -> bytes:
    """Publish an adapter as the trainer does with --overwrite; returns its weights."""
    from vbon.adapters import AdapterMeta, staged_folder

    with staged_folder(folder, overwrite=True) as tmp:
        make_fake_adapter(tmp, base_model=str(model), seed=seed)
        if meta:
            m = AdapterMeta.model_validate_json((tmp / "vbon.json").read_text())
            (tmp / "vbon.json").write_text(m.model_copy(update=meta).model_dump_json())
    return (folder / "adapter_model.safetensors").read_bytes()


def test_a_restarted_upstream_reloads_the_served_version_not_the_live_folder(
    tmp_path: Path, embedded_model: Path
) -> None:
    """#29 point 12: the upstreams load each version from its immutable snapshot on the shared
    volume, so after a restart they load exactly the version /ready reports, even when the
    live folder holds a refused one by then."""
    adapters = tmp_path / "adapters"
    v1 = _publish(adapters / "vbon-n8", embedded_model, seed=0)
    fake = FakeVLLM(str(embedded_model), {A: "ok"})
    client, backend = make_client(tmp_path, embedded_model, fake, admin_key="adm",
                                  upstream_adapters_dir="/mnt/adapters")
    with client:
        assert fake.loaded_from == [("vbon-n8@v1", "/mnt/adapters/.versions/vbon-n8@v1")]
        snap1 = adapters / ".versions" / "vbon-n8@v1"  # the same folder, as the gateway sees it
        assert (snap1 / "adapter_model.safetensors").read_bytes() == v1
        # Readable by upstreams running as another user.
        assert {oct(p.stat().st_mode & 0o777) for p in snap1.iterdir()} == {"0o644"}
        assert oct(snap1.stat().st_mode & 0o777) == "0o755"

        # The trainer overwrites it with a version the gateway refuses: v1 keeps serving.
        v3 = _publish(adapters / "vbon-n8", embedded_model, seed=3, base_model="/models/gpt2")
        r = client.post("/admin/adapters/reload", headers=ADMIN).json()
        assert "vbon-n8" in r["refused"] and r["installed"] == []
        ready = client.get("/ready").json()
        assert [(a["name"], a["version"]) for a in ready["adapters"]] == [("vbon-n8", 1)]

        fake.loras[A].clear()  # the upstream restarts and forgets its adapters
        r = client.post("/v1/vbon", json={"prompt": "x", "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert fake.bodies[-1]["model"] == "vbon-n8@v1"
        # Loaded again from v1's snapshot, which still holds v1 (not the live folder's v3).
        assert fake.loaded_from[-1] == ("vbon-n8@v1", "/mnt/adapters/.versions/vbon-n8@v1")
        assert (snap1 / "adapter_model.safetensors").read_bytes() == v1 != v3

        # A valid new version: installed as v2 from its own snapshot; v1, which no request
        # holds, is unloaded from the upstreams and its snapshot emptied (the empty folder
        # keeps the number taken, so the name never comes back with other weights).
        v2 = _publish(adapters / "vbon-n8", embedded_model, seed=2)
        r = client.post("/admin/adapters/reload", headers=ADMIN).json()
        assert r["installed"] == ["vbon-n8@v2"]
        assert fake.loaded_from[-1] == ("vbon-n8@v2", "/mnt/adapters/.versions/vbon-n8@v2")
        assert (adapters / ".versions" / "vbon-n8@v2" / "adapter_model.safetensors"
                ).read_bytes() == v2
        assert fake.unloaded == ["vbon-n8@v1"] and fake.loras[A] == {"vbon-n8@v2"}
        assert list(snap1.iterdir()) == []
        assert "vbon-n8@v1" not in backend()._loras  # never preloaded onto upstreams again
        r = client.post("/v1/vbon", json={"prompt": "x", "max_tokens": 3})
        assert r.status_code == 200 and fake.bodies[-1]["model"] == "vbon-n8@v2"
    # At shutdown the gateway empties its snapshots; hidden, so never scanned as adapters.
    assert sorted(p.name for p in adapters.iterdir()) == [".versions", "vbon-n8"]
    assert all(not any(p.iterdir()) for p in (adapters / ".versions").iterdir())


def test_no_version_name_is_given_to_other_weights_by_another_gateway(
    tmp_path: Path, embedded_model: Path
) -> None:
    """Two gateways on one volume and upstream, or one gateway restarted while the upstream
    keeps its adapters: each version number is claimed on the volume, so an upstream that has
    'vbon-n8@v1' loaded is never told that name means other weights."""
    adapters = tmp_path / "adapters"
    _publish(adapters / "vbon-n8", embedded_model, seed=0)
    fake = FakeVLLM(str(embedded_model), {A: "ok"})
    first, _ = make_client(tmp_path, embedded_model, fake)
    second, _ = make_client(tmp_path, embedded_model, fake)
    with first:
        with second:
            assert [n for n, _ in fake.loaded_from] == ["vbon-n8@v1", "vbon-n8@v2"]
            for client, name in ((first, "vbon-n8@v1"), (second, "vbon-n8@v2")):
                r = client.post("/v1/vbon", json={"prompt": "x", "max_tokens": 3})
                assert r.status_code == 200 and fake.bodies[-1]["model"] == name
        # The second one stopped: its snapshot is emptied, the first one's is untouched.
        assert list((adapters / ".versions" / "vbon-n8@v2").iterdir()) == []
        assert (adapters / ".versions" / "vbon-n8@v1" / "adapter_model.safetensors").is_file()
        r = first.post("/v1/vbon", json={"prompt": "x", "max_tokens": 3})
        assert r.status_code == 200
    _publish(adapters / "vbon-n8", embedded_model, seed=5)  # new weights, then a restart
    again, _ = make_client(tmp_path, embedded_model, fake)
    with again:
        assert fake.loaded_from[-1][0] == "vbon-n8@v3"


def test_copies_left_by_a_gateway_that_died_while_copying_are_removed(
    tmp_path: Path, embedded_model: Path
) -> None:
    import os

    adapters = tmp_path / "adapters"
    make_fake_adapter(adapters / "vbon-n8", base_model=str(embedded_model))
    versions = adapters / ".versions"
    stale, fresh = versions / ".vbon-n8.tmp-dead", versions / ".x.tmp-busy"
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"partial")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    client, _ = make_client(tmp_path, embedded_model, FakeVLLM(str(embedded_model), {A: "ok"}))
    with client:
        assert not stale.exists() and fresh.is_dir()  # (another gateway may be copying that)
        assert (versions / "vbon-n8@v1").is_dir()


def test_a_read_only_adapters_volume_is_refused_saying_how_to_fix(
    tmp_path: Path, embedded_model: Path
) -> None:
    adapters = tmp_path / "adapters"
    make_fake_adapter(adapters / "vbon-n8", base_model=str(embedded_model))
    (adapters / ".versions").write_text("")  # (root ignores permissions: a file blocks it)
    fake = FakeVLLM(str(embedded_model), {A: "ok"})
    client, _ = make_client(tmp_path, embedded_model, fake)
    with client:
        ready = client.get("/ready").json()
        why = ready["refused_adapters"]["vbon-n8"]
        assert ".versions" in why and "read-write" in why, why
        assert ready["adapters"] == [] and fake.loaded_from == []


def test_stream_through_the_remote_backend(tmp_path: Path, embedded_model: Path) -> None:
    def streaming(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/completions" and json.loads(request.content).get("stream"):
            chunks = [
                {"choices": [{"index": 0, "text": t, "finish_reason": f,
                              "logprobs": {"token_logprobs": [-1.0]}}]}
                for t, f in ((" good", None), (" film", "stop"))
            ]  # fmt: skip
            sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
            return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})
        return fake(request)

    fake = FakeVLLM(str(embedded_model), {A: "ok"})
    settings = ServerSettings(
        backend="remote", upstreams=[A], model=str(embedded_model),
        adapters_dir=tmp_path / "adapters", adapter_poll_s=0,
    )  # fmt: skip
    app = create_app(
        settings,
        backend_factory=lambda s: RemoteBackend(s, transport=httpx.MockTransport(streaming)),
        background_load=False,
    )
    with TestClient(app) as client:
        r = client.post(
            "/v1/completions",
            json={"model": "smollm2-135m-instruct", "prompt": "x", "stream": True},
        )
        texts = [
            json.loads(ln[6:])["choices"][0]["text"]
            for ln in r.text.splitlines()
            if ln.startswith("data: {")
        ]
        assert texts == [" good", " film"]


def test_bad_input_is_reported_by_ready_not_by_a_crash(
    tmp_path: Path, embedded_model: Path, caplog: pytest.LogCaptureFixture
):
    # A missing model volume and an unreachable upstream: the app starts, /health answers.
    fake = FakeVLLM(str(embedded_model), {A: "down"})
    client, _ = make_client(tmp_path, tmp_path / "no-such-model", fake)
    with caplog.at_level(logging.ERROR), client:
        assert client.get("/health").status_code == 200
        r = client.get("/ready")
        assert r.status_code == 503 and "VBON_MODEL" in r.text and "mount" in r.text
        # Clients get the reason and a log reference, never the server's folder or the
        # loader's exception text; the log has both under that reference.
        # (engine.model is the served name, the folder's last part, never its path.)
        error = r.json()["engine"]["error"]
        assert "no-such-model" not in error and str(tmp_path) not in r.text, r.text
        ref = re.search(r"err-[0-9a-f]+", error)
        assert ref is not None, r.text
        b = client.post("/v1/bon", json={"prompt": "x", "n": 2})
        assert b.status_code == 503 and "no-such-model" not in b.text, b.text
    logged = [rec.getMessage() for rec in caplog.records if ref.group(0) in rec.getMessage()]
    assert logged and "no-such-model" in logged[0], logged
    # The model is there but the upstream is down.
    client, _ = make_client(tmp_path, embedded_model, fake)
    with client:
        r = client.get("/ready")
        assert r.status_code == 503 and A in r.text and "unreachable" in r.text
    # The upstream serves another model: never used, and /ready says which.
    fake = FakeVLLM(str(embedded_model), {A: "model:Qwen/Qwen3-0.6B"})
    client, _ = make_client(tmp_path, embedded_model, fake)
    with client:
        r = client.get("/ready")
        assert r.status_code == 503 and "Qwen/Qwen3-0.6B" in r.text, r.text
        assert client.post("/v1/bon", json={"prompt": "x", "n": 2}).status_code == 503
        assert fake.completions[A] == 0
