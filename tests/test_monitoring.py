"""The compose `monitoring` profile (docker/monitoring/, docs/monitoring.md): Prometheus scrapes
the compose gateway with its key, and every metric the Grafana dashboard and the alert rules
query is one the gateway defines (server.metrics.Metrics) and, outside the shadow row, one a real
/metrics scrape exports after some traffic. Compose is parsed with `docker compose config` when
installed, else with tests/compose_util.py's stand-in for it (as tests/test_deploy_config.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.metrics import Metrics
from server.settings import ServerSettings
from tests.adapters_util import make_fake_adapter
from tests.compose_util import KEY, active, compose_config, published
from tests.fakes import FakeBackend

ROOT = Path(__file__).resolve().parent.parent
MON = ROOT / "docker" / "monitoring"
PROMETHEUS_YML = MON / "prometheus.yml"
ALERTS = MON / "alerts.yml"
PROM_ENTRYPOINT = MON / "prometheus-entrypoint.sh"
GRAFANA_ENTRYPOINT = MON / "grafana-entrypoint.sh"
DASHBOARD = MON / "grafana" / "dashboards" / "vbon.json"
DATASOURCE = MON / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = MON / "grafana" / "provisioning" / "dashboards" / "vbon.yml"
JOB = "vbon-gateway"
SHADOW_PREFIX = "vbon_shadow_"
# Labels Prometheus adds at scrape time; every other label a query names must be the metric's.
TARGET_LABELS = {"instance", "job"}
# Series Prometheus makes itself (not the gateway's).
PROMETHEUS_SERIES = {"up"}
# What the issue asks the dashboard to show, by the metric family each panel needs.
REQUIRED_ON_DASHBOARD = {
    "vbon_requests_total",
    "vbon_request_latency_seconds_bucket",
    "vbon_samples_generated_total",
    "vbon_tokens_total",
    "vbon_in_flight_requests",
    "vbon_samples_in_flight",
    "vbon_rejected_total",
    "vbon_client_disconnects_total",
    "vbon_reward_bucket",
    "vbon_adaptive_requests_total",
    "vbon_adaptive_candidates_total",
    "vbon_adapters_installed",
    "vbon_bon_log_dropped_total",
    "vbon_shadow_rank_quantile_sum",
    "vbon_shadow_rank_quantile_count",
    "vbon_shadow_expected_rank_quantile",
    "vbon_shadow_effective_n",
    "vbon_shadow_reward_gap_bucket",
    "vbon_shadow_reward_gap_mean",
    "vbon_shadow_requests_total",
}

# -- PromQL, enough of it to name the series and labels a query uses --------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r'(?<![\w:.])([A-Za-z_:][\w:]*)\s*\{((?:"(?:[^"\\]|\\.)*"|[^}"])*)\}')
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*(\"(?:[^\"\\]|\\.)*\")")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right"}


def series_names(expr: str) -> set[str]:
    """The series (metric names) an expression selects: identifiers outside label matchers,
    ranges, grouping clauses and strings that are not functions, keywords or $variables."""
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _GROUPING.sub(" ", s)
    s = re.sub(r"\$\w+", " ", s)
    return {m for m in _IDENT.findall(s) if m.lower() not in _KEYWORDS}


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for _, labels in _GROUPING.findall(_STRING.sub('""', expr))
        for label in labels.split(",")
        if label.strip()
    }


def matchers(expr: str) -> Iterator[tuple[str, str, str]]:
    """(series, label, quoted value) for each label matcher of each selector."""
    for name, body in _SELECTOR.findall(expr):
        for label, _, value in _MATCHER.findall(body):
            yield name, label, value


def test_promql_helpers_find_series_and_labels() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, route) (rate(vbon_x_bucket{a="b{c}", le="-0.1"}'
        "[$__rate_interval]))) / on (route) group_left max without (kind) (vbon_y) > bool 1e3"
        " and vector($limit)"
    )
    assert series_names(expr) == {"vbon_x_bucket", "vbon_y"}
    assert grouping_labels(expr) == {"le", "route", "kind"}
    assert list(matchers(expr)) == [
        ("vbon_x_bucket", "a", '"b{c}"'),
        ("vbon_x_bucket", "le", '"-0.1"'),
    ]


# -- what the gateway defines and exports ---------------------------------------------------


def exposition(metrics: Metrics) -> dict[str, list[dict[str, str]]]:
    """Series name -> the label sets of its samples, in the registry's text format."""
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
    return out


def defined_series() -> dict[str, list[dict[str, str]]]:
    """Every series server.metrics.Metrics can export: each of its metrics used once in a fresh
    registry (a labelled family exports nothing until a label set is used). What the client
    library really writes (e.g. no histogram `_sum` when a bucket is negative), not guessed."""
    m = Metrics()
    for collector in vars(m).values():
        if not isinstance(collector, Counter | Gauge | Histogram):
            continue
        # prometheus_client keeps a family's label names only here.
        labels = collector._labelnames  # noqa: SLF001
        child = collector.labels(*("probe",) * len(labels)) if labels else collector
        if isinstance(child, Histogram):
            child.observe(0.5)
        else:
            child.inc()
    names = exposition(m)
    return {n: v for n, v in names.items() if not n.endswith("_created")}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> Iterator[dict]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query on the dashboard."""
    return [(p["title"], t["expr"]) for p in panels(dash) for t in p.get("targets", [])]


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def check_exprs(exprs: list[tuple[str, str]], series: dict[str, list[dict[str, str]]]) -> None:
    """Every series an expression selects is in `series`, with the labels it groups or filters
    by, and every `le` it picks is one of that histogram's bucket bounds."""
    for where, expr in exprs:
        names = series_names(expr)
        # A constant line (the samples limit) is the one kind of query without a series.
        assert names or re.fullmatch(r"vector\(\$\w+\)", expr), (where, expr)
        names -= PROMETHEUS_SERIES
        missing = names - set(series)
        assert not missing, f"{where}: {sorted(missing)} not exported by the gateway ({expr})"
        labels = {k for n in names for sample in series[n] for k in sample}
        unknown = grouping_labels(expr) - labels - TARGET_LABELS
        assert not unknown, f"{where}: groups by {sorted(unknown)}, not labels of {names}"
        for name, label, value in matchers(expr):
            if name in PROMETHEUS_SERIES:
                continue
            assert label in labels | TARGET_LABELS, f"{where}: {name} has no label {label!r}"
            if label == "le":
                bounds = {sample["le"] for sample in series[name]}
                assert json.loads(value) in bounds, f"{where}: le={value} is not in {bounds}"


def active_shadow(defined: dict) -> bool:
    """Shadow metrics are required once server/metrics.py defines them."""
    return any(n.startswith(SHADOW_PREFIX) for n in defined)


# -- dashboard ------------------------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard_of_the_provisioned_datasource() -> None:
    dash = load_dashboard()
    assert dash["uid"] == "vbon-gateway" and dash["title"]
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert "vBoN vs BoN (shadow)" in rows
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in panels(dash):
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}", p["title"]
    # Each query is filtered by the gateway picker, so several gateways do not mix.
    for where, expr in dashboard_exprs(dash):
        for name, body in _SELECTOR.findall(expr):
            assert 'instance=~"$instance"' in body, (where, name)
        unfiltered = series_names(expr) - {n for n, _ in _SELECTOR.findall(expr)}
        assert not unfiltered, (where, "without the instance filter", expr)


def test_every_dashboard_and_alert_metric_is_defined_by_the_gateway() -> None:
    defined = defined_series()
    exprs = dashboard_exprs(load_dashboard())
    alerts = [(r["alert"], r["expr"]) for r in alert_rules()]
    used = {n for _, e in exprs for n in series_names(e)}
    assert used >= REQUIRED_ON_DASHBOARD, sorted(REQUIRED_ON_DASHBOARD - used)
    if not active_shadow(defined):  # until the shadow metrics exist, check the rest
        exprs = [(w, e) for w, e in exprs if not any(n.startswith(SHADOW_PREFIX)
                                                      for n in series_names(e))]
        alerts = [(w, e) for w, e in alerts if SHADOW_PREFIX not in e]
    check_exprs(exprs, defined)
    check_exprs(alerts, defined)


def test_samples_limit_variable_defaults_to_the_gateway_default() -> None:
    """The limit is not a metric: the dashboard's textbox stands in for it, at the default."""
    var = next(v for v in load_dashboard()["templating"]["list"] if v["name"] == "samples_limit")
    default = ServerSettings.model_fields["max_samples_in_flight"].default
    assert int(var["query"]) == int(var["current"]["value"]) == default


def test_a_real_scrape_exports_every_non_shadow_dashboard_metric(tmp_path: Path) -> None:
    """The gateway (FakeBackend engine) after a BoN, a scored vBoN, an adaptive BoN, a 400 and a
    429: its /metrics (behind the key) has every series the dashboard and alerts query, with
    the labels they use; the shadow ones appear only after a shadow comparison."""
    make_fake_adapter(tmp_path / "adapters" / "vbon-n8", n=8)
    settings = ServerSettings(
        adapters_dir=tmp_path / "adapters",
        adapter_poll_s=0,
        max_n=16,
        max_tokens_limit=64,
        max_samples_in_flight=8,
        api_key=KEY,
        bon_log_path=tmp_path / "bon.jsonl",
    )
    app = create_app(settings, backend_factory=lambda s: FakeBackend(), background_load=False)
    auth = {"Authorization": f"Bearer {KEY}"}
    with TestClient(app) as c:
        sent = [
            ("/v1/bon", {"prompt": "The film", "n": 4}, 200),
            ("/v1/vbon", {"prompt": "The film", "score": True}, 200),
            ("/v1/bon", {"prompt": "The film", "n": 8, "adaptive": True, "max_tokens": 40}, 200),
            ("/v1/bon", {"prompt": "", "n": 2}, 400),
            ("/v1/bon", {"prompt": "The film", "n": 16}, 429),  # 16 samples > 8 in flight
        ]
        for path, body, status in sent:
            r = c.post(path, json=body, headers=auth)
            assert r.status_code == status, (path, body, r.text)
        assert c.get("/metrics").status_code == 401  # hence the key in prometheus.yml
        r = c.get("/metrics", headers=auth)
        assert r.status_code == 200
    scraped: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            scraped.setdefault(sample.name, []).append(dict(sample.labels))
    exprs = dashboard_exprs(load_dashboard()) + [(r["alert"], r["expr"]) for r in alert_rules()]
    core = [(w, e) for w, e in exprs if SHADOW_PREFIX not in e]
    assert len(core) >= 20
    check_exprs(core, scraped)
    assert {"/v1/bon", "/v1/vbon"} <= {s["route"] for s in scraped["vbon_reward_bucket"]}
    assert {"200", "400", "429"} <= {s["status"] for s in scraped["vbon_requests_total"]}


# -- alert rules ----------------------------------------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package `prometheus`)"
)


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "VbonHighServerErrorRate",
        "VbonSheddingLoad",
        "VbonShadowEffectiveNLow",
    }
    for r in rules:
        assert r["expr"].strip() and re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
        assert r["labels"]["severity"] in {"warning", "critical"} and r["annotations"]["summary"]
    down = next(r for r in rules if series_names(r["expr"]) == {"up"})
    assert f'job="{JOB}"' in down["expr"]


@needs_promtool
def test_promtool_accepts_the_rules_and_the_config(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    out = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # The config names in-container paths: point them at the repository's files.
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    cfg["rule_files"] = [str(ALERTS)]
    key = tmp_path / "api_key"
    key.write_text(KEY)
    cfg["scrape_configs"][0]["authorization"]["credentials_file"] = str(key)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# -- compose and the two entrypoints --------------------------------------------------------


def monitoring_config(env: dict[str, str] | None = None) -> dict:
    """The compose file with the monitoring profile, as `compose config` prints it (or, with no
    compose tool, as tests/compose_util.py's stand-in does: bind mount sources resolved)."""
    return compose_config("monitoring", env=env)


def bind_mounts(svc: dict) -> dict[str, tuple[Path, bool]]:
    """Container path -> (host path, read-only) of a service's bind mounts (v1 strings, v2
    dicts)."""
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, dict):
            if v["type"] == "bind":
                out[v["target"]] = (Path(v["source"]), bool(v.get("read_only")))
            continue
        parts = v.split(":")
        if parts[0].startswith("/"):
            out[parts[1]] = (Path(parts[0]), len(parts) > 2 and "ro" in parts[2].split(","))
    return out


def container_port(svc: dict) -> set[int]:
    ports = set()
    for p in svc.get("ports", []):
        ports.add(int(p["target"]) if isinstance(p, dict) else int(p.split("/")[0].split(":")[-1]))
    return ports


def test_compose_monitoring_profile_wires_prometheus_to_the_gateway() -> None:
    cfg = monitoring_config()
    services = cfg["services"]
    assert active(cfg, "monitoring") == {"gateway", "prometheus", "grafana"}
    assert "prometheus" not in active(cfg) and "grafana" not in active(cfg)
    prom, graf = services["prometheus"], services["grafana"]
    for svc, repo in ((prom, "prom/prometheus:"), (graf, "grafana/grafana:")):
        assert svc["image"].startswith(repo) and svc["image"].split(":")[1] != "latest"
        assert svc["profiles"] == ["monitoring"]
    # The exact files of docker/monitoring, read-only, where the configs expect them.
    prom_mounts, graf_mounts = bind_mounts(prom), bind_mounts(graf)
    assert prom_mounts == {
        "/etc/prometheus/prometheus.yml": (PROMETHEUS_YML, True),
        "/etc/prometheus/alerts.yml": (ALERTS, True),
        "/etc/prometheus/entrypoint.sh": (PROM_ENTRYPOINT, True),
    }
    provider = yaml.safe_load(DASHBOARD_PROVIDER.read_text())["providers"][0]
    dash_dir = provider["options"]["path"]
    assert graf_mounts == {
        "/etc/grafana/vbon-entrypoint.sh": (GRAFANA_ENTRYPOINT, True),
        "/etc/grafana/provisioning/datasources/prometheus.yml": (DATASOURCE, True),
        "/etc/grafana/provisioning/dashboards/vbon.yml": (DASHBOARD_PROVIDER, True),
        f"{dash_dir}/vbon.json": (DASHBOARD, True),
    }
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_dir}/vbon.json"
    # prometheus.yml: the gateway service, at its container port, /metrics, with the key file.
    prom_cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert prom_cfg["rule_files"] == ["/etc/prometheus/alerts.yml"]
    job = next(j for j in prom_cfg["scrape_configs"] if j["job_name"] == JOB)
    assert job.get("metrics_path", "/metrics") == "/metrics" and job.get("scheme", "http") == "http"
    gateway = services["gateway"]
    assert int(gateway["environment"]["VBON_PORT"]) in container_port(gateway)
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"gateway:{gateway['environment']['VBON_PORT']}"]
    auth = job["authorization"]
    assert auth.get("type", "Bearer") == "Bearer" and "credentials" not in auth
    key_file = auth["credentials_file"]
    # The entrypoint writes VBON_API_KEY (compose's required key) to that file, on a tmpfs.
    assert prom["entrypoint"][:3] == ["/bin/sh", "/etc/prometheus/entrypoint.sh", key_file]
    assert any(key_file.startswith(t.rstrip("/") + "/") for t in prom["tmpfs"])
    assert prom["environment"]["VBON_API_KEY"] == KEY == gateway["environment"]["VBON_API_KEY"]
    assert KEY not in PROMETHEUS_YML.read_text()
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    # Grafana's data source is the prometheus service.
    ds = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["isDefault"] is True
    host, port = ds["url"].removeprefix("http://").split(":")
    assert host == "prometheus" and int(port) in container_port(prom)
    assert graf["entrypoint"] == ["/bin/sh", "/etc/grafana/vbon-entrypoint.sh", "/run.sh"]
    assert graf["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_compose_monitoring_publishes_on_loopback_unless_told_otherwise() -> None:
    for env, addr in (({}, "127.0.0.1"), ({"VBON_PUBLISH_ADDR": "0.0.0.0"}, "0.0.0.0")):
        services = monitoring_config(env)["services"]
        for name, port in (("prometheus", "9090"), ("grafana", "3000")):
            assert [published(p) for p in services[name]["ports"]] == [(addr, port)], (name, env)


def run_entrypoint(script: Path, args: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(
        ["/bin/sh", str(script), *args],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def child_env(output: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def test_prometheus_entrypoint_writes_the_key_file_and_hides_the_variable(tmp_path: Path) -> None:
    key_file = tmp_path / "api_key"
    key = "k$ey with \\n spaces%s"  # written byte for byte: no echo escapes, no newline
    env = child_env(run_entrypoint(PROM_ENTRYPOINT, [str(key_file), "env"], {"VBON_API_KEY": key}))
    assert key_file.read_text() == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "VBON_API_KEY" not in env  # Prometheus itself never sees it


def test_grafana_entrypoint_has_no_default_admin_password() -> None:
    first = child_env(run_entrypoint(GRAFANA_ENTRYPOINT, ["env"], {}))
    second = child_env(run_entrypoint(GRAFANA_ENTRYPOINT, ["env"], {}))
    assert first["GF_AUTH_DISABLE_LOGIN_FORM"] == "true"
    assert first["GF_AUTH_BASIC_ENABLED"] == "false"
    password = first["GF_SECURITY_ADMIN_PASSWORD"]
    assert len(password) >= 32 and password != second["GF_SECURITY_ADMIN_PASSWORD"]
    chosen = child_env(
        run_entrypoint(GRAFANA_ENTRYPOINT, ["env"], {"VBON_GRAFANA_ADMIN_PASSWORD": "s3cret pw"})
    )
    assert chosen["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret pw"
    assert "GF_AUTH_DISABLE_LOGIN_FORM" not in chosen
    assert "VBON_GRAFANA_ADMIN_PASSWORD" not in chosen
