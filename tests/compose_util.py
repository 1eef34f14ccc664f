"""docker-compose.yml as `compose config` prints it, with or without a compose tool.

With `docker compose` (v2 plugin) or `docker-compose` (v1) installed, the tool itself renders the
file. Without one (CI, most dev machines), a small pure-Python stand-in does what the deployment
tests rely on, the way compose does it: parse the YAML (merge keys included), interpolate every
string value from the given environment only (`${VAR}`, `${VAR:-default}`, `${VAR-default}`,
`${VAR:?err}`, `${VAR?err}`, `${VAR:+alt}`, `${VAR+alt}`, `$VAR`, `$$`; a required variable that
is missing fails the whole file, whatever the profiles, as compose refuses to start), keep only
the services of the active profiles (services without `profiles:` always), and normalise what
compose normalises and the tests read (environment lists into mappings with string values,
network lists into mappings, string commands into argument lists, relative bind mount sources
into absolute paths). Short port and volume syntax stays short (as v1 prints it); durations stay
strings. tests/test_deploy_config.py checks the stand-in against the real tool where there is one.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
KEY = "compose-test-key-0123456789"


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


COMPOSE = compose_command()


class ComposeError(Exception):
    """What makes compose refuse the file (it exits non-zero with this on stderr)."""


# $$ | ${NAME} ${NAME<op>arg} | $NAME | any other `$` (compose: invalid template)
_TEMPLATE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^{}]*))?\}"
    r"|(?P<named>[A-Za-z_]\w*)|(?P<invalid>))"
)


def interpolate(text: str, env: dict[str, str], where: str = "") -> str:
    """One string value, interpolated as compose does."""

    def one(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("named"):
            return env.get(m.group("named"), "")
        name = m.group("braced")
        if name is None:
            raise ComposeError(f"{where}: invalid template: {text!r}")
        op, arg = m.group("op") or "", interpolate(m.group("arg") or "", env, where)
        value = env.get(name)
        if op in ("?", ":?"):
            if value is None or (op == ":?" and not value):
                raise ComposeError(f"required variable {name} is missing a value: {arg}")
            return value
        if op == ":-":
            return value or arg
        if op == "-":
            return arg if value is None else value
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return "" if value is None else arg
        return value or ""

    return _TEMPLATE.sub(one, text)


def _interpolate_tree(node: object, env: dict[str, str], where: str) -> object:
    """Every string value in the parsed file (not the keys), as compose does before anything."""
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, env, f"{where}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(v, env, f"{where}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):
        return interpolate(node, env, where)
    return node


def _env_value(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _bind_source(volume: str, base: Path) -> str:
    source, sep, rest = volume.partition(":")
    if sep and (source in (".", "..") or source.startswith(("./", "../"))):
        return f"{(base / source).resolve()}:{rest}"
    return volume


def _normalise_service(svc: dict, base: Path) -> dict:
    svc = dict(svc)
    env = svc.get("environment")
    if isinstance(env, list):  # KEY=VALUE, or KEY alone (no value)
        env = {k: (v if sep else None) for k, sep, v in (e.partition("=") for e in env)}
    if env is not None:
        svc["environment"] = {k: _env_value(v) for k, v in env.items()}
    if isinstance(svc.get("networks"), list):
        svc["networks"] = {n: None for n in svc["networks"]}
    for field in ("command", "entrypoint"):
        if isinstance(svc.get(field), str):
            svc[field] = shlex.split(svc[field])
    if "ports" in svc:
        svc["ports"] = [p if isinstance(p, dict) else str(p) for p in svc["ports"]]
    if "volumes" in svc:
        svc["volumes"] = [
            _bind_source(v, base) if isinstance(v, str) else v for v in svc["volumes"]
        ]
    return svc


def fallback_config(*profiles: str, env: dict[str, str], path: Path = COMPOSE_FILE) -> dict:
    """The stand-in for `compose config` (see the module docstring); ComposeError where compose
    would refuse the file."""
    raw = yaml.safe_load(path.read_text())
    cfg = _interpolate_tree(raw, env, "")
    assert isinstance(cfg, dict)
    wanted = set(profiles) | {p for p in env.get("COMPOSE_PROFILES", "").split(",") if p}
    services = {
        name: _normalise_service(svc or {}, path.parent)
        for name, svc in (cfg.get("services") or {}).items()
        if not (svc or {}).get("profiles") or set(svc["profiles"]) & wanted
    }
    out = {k: v for k, v in cfg.items() if not k.startswith("x-") and k != "services"}
    out["services"] = services
    return out


def run_compose_config(
    *profiles: str, env: dict[str, str], tool: list[str] | None | bool = True
) -> subprocess.CompletedProcess:
    """`compose config` for these profiles with exactly this environment: the installed tool
    (tool=True: COMPOSE if any; a command list: that one), else (or tool=None/False) the
    stand-in, answering the same way (return code, YAML on stdout, the refusal on stderr)."""
    command = COMPOSE if tool is True else (tool or None)
    if command is not None:
        args = [*command, "-f", str(COMPOSE_FILE)]
        for p in profiles:
            args += ["--profile", p]
        return subprocess.run(
            [*args, "config"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin:/usr/local/bin", **env},
            timeout=60,
        )
    args = ["compose-config-fallback", *profiles]
    try:
        cfg = fallback_config(*profiles, env=env)
    except ComposeError as e:
        return subprocess.CompletedProcess(args, 1, "", f"{e}\n")
    return subprocess.CompletedProcess(args, 0, yaml.safe_dump(cfg, sort_keys=False), "")


def compose_config(
    *profiles: str, env: dict[str, str] | None = None, tool: list[str] | None | bool = True
) -> dict:
    """`compose config` with VBON_API_KEY set (compose requires it) unless env names it."""
    out = run_compose_config(*profiles, env={"VBON_API_KEY": KEY, **(env or {})}, tool=tool)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def published(port: str | dict) -> tuple[str, str]:
    """(host address, host port) of one `ports` entry, as v1 (a string) or v2 (a dict) prints it."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "0.0.0.0")), str(port["published"])
    parts = port.split("/")[0].split(":")
    if len(parts) == 2:
        return "0.0.0.0", parts[0]
    return ":".join(parts[:-2]), parts[-2]


def active(cfg: dict, *profiles: str) -> set[str]:
    """The services `up` starts with these profiles (v1's `config` lists them all)."""
    return {
        name
        for name, svc in cfg["services"].items()
        if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)
    }
